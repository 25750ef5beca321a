//! A fleet's effects on AWS: Auto Scaling groups of EC2 instances, SSM Run Command with amictl's documents, an
//! ELBv2 target group, CloudWatch alarms, and the lock in the stack's bucket.

use anyhow::Context;
use aws_config::SdkConfig;

use super::Effects;
use crate::fleet::asg::AutoScalingGroups;
use crate::fleet::ec2::{Ec2Compute, Ec2LaunchSettings};
use crate::fleet::elb::{CloudWatchAlarms, TargetGroup};
use crate::fleet::{Placement, Scaling};
use crate::lock::s3::S3Store;
use crate::ssm::SsmRunCommand;

/// One account and region: the clients every effect is made from.
pub struct Aws {
    pub config: SdkConfig,
}

impl Aws {
    /// The SDK's standard chain, `region` over AWS_REGION and the profile's.
    pub async fn connect(region: Option<&str>) -> anyhow::Result<Aws> {
        Ok(Aws {
            config: crate::aws::load(region).await?,
        })
    }

    /// What reads fleets and terminates instances; launching needs [`Aws::fleet`].
    pub fn instances(&self) -> Ec2Compute {
        Ec2Compute::new(&self.config, Ec2LaunchSettings::default())
    }

    /// What reads a fleet's Auto Scaling groups and deletes them; making them needs
    /// [`Aws::fleet`].
    pub fn groups(&self) -> AutoScalingGroups {
        AutoScalingGroups {
            asg: aws_sdk_autoscaling::Client::new(&self.config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&self.config),
            compute: self.instances(),
            target_group: None,
            prefix: String::new(),
            target_requests_per_instance: None,
        }
    }

    /// Run Command through amictl's `{prefix}…` documents.
    pub fn run_command(&self, prefix: &str) -> SsmRunCommand {
        SsmRunCommand::new(&self.config, prefix)
    }

    /// The fleet's lock, `amictl/locks/FLEET.json` in `bucket`.
    pub fn lock(&self, bucket: &str, fleet: &str) -> S3Store {
        S3Store::new(&self.config, bucket, fleet)
    }

    pub fn stacks(&self) -> crate::stack::CloudFormation {
        crate::stack::CloudFormation::new(&self.config)
    }

    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.config)
    }

    /// The AMI's tags; None when this account and region have no such AMI. AWS answers
    /// InvalidAMIID.NotFound (or .Malformed) for an id it does not know; any other error
    /// (access denied, throttling) is an error, not a missing AMI.
    pub async fn image_tags(&self, ami: &str) -> anyhow::Result<Option<Vec<(String, String)>>> {
        match self
            .ec2()
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(|e| crate::aws::classify("ec2:DescribeImages", e))
        {
            Ok(out) => Ok(out.images().first().map(crate::fleet::ec2::image_tags)),
            Err(crate::aws::AwsError::NotFound(_)) => Ok(None),
            Err(e) if e.to_string().contains("InvalidAMIID") => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context("looking up the AMI")),
        }
    }

    /// Each subnet with its availability zone.
    pub async fn placements(&self, subnets: &[String]) -> anyhow::Result<Vec<Placement>> {
        let out = self
            .ec2()
            .describe_subnets()
            .set_subnet_ids(Some(subnets.to_vec()))
            .send()
            .await
            .map_err(|e| crate::aws::classify("ec2:DescribeSubnets", e))
            .context("looking up the subnets' availability zones")?;
        subnets
            .iter()
            .map(|id| {
                let az = out
                    .subnets()
                    .iter()
                    .find(|s| s.subnet_id() == Some(id))
                    .and_then(|s| s.availability_zone())
                    .with_context(|| format!("subnet {id} not found"))?;
                Ok(Placement {
                    az: az.to_owned(),
                    subnet: id.clone(),
                })
            })
            .collect()
    }

    /// Everything a rollout changes: one Auto Scaling group per AZ and release, launching
    /// with `launch` and scaling by `scaling`, gated through `prefix`'s documents, attached
    /// to `target_group`, watched by CloudWatch.
    pub fn fleet(
        &self,
        launch: Ec2LaunchSettings,
        prefix: &str,
        target_group: Option<&str>,
        scaling: Option<Scaling>,
    ) -> AwsFleet {
        AwsFleet {
            groups: AutoScalingGroups {
                asg: aws_sdk_autoscaling::Client::new(&self.config),
                elb: aws_sdk_elasticloadbalancingv2::Client::new(&self.config),
                compute: Ec2Compute::new(&self.config, launch.clone()),
                target_group: target_group.map(str::to_owned),
                prefix: prefix.to_owned(),
                target_requests_per_instance: scaling.and_then(|s| s.target_requests_per_instance),
            },
            compute: Ec2Compute::new(&self.config, launch),
            run: self.run_command(prefix),
            lb: target_group.map(|arn| TargetGroup {
                client: aws_sdk_elasticloadbalancingv2::Client::new(&self.config),
                arn: arn.to_owned(),
            }),
            alarms: CloudWatchAlarms {
                client: aws_sdk_cloudwatch::Client::new(&self.config),
            },
        }
    }
}

/// A rollout's effects on AWS.
pub struct AwsFleet {
    pub groups: AutoScalingGroups,
    pub compute: Ec2Compute,
    pub run: SsmRunCommand,
    pub lb: Option<TargetGroup>,
    pub alarms: CloudWatchAlarms,
}

impl AwsFleet {
    pub fn effects(
        &self,
    ) -> Effects<'_, Ec2Compute, SsmRunCommand, TargetGroup, CloudWatchAlarms, AutoScalingGroups>
    {
        Effects {
            compute: &self.compute,
            run: &self.run,
            lb: self.lb.as_ref(),
            alarms: &self.alarms,
            groups: Some(&self.groups),
        }
    }
}
