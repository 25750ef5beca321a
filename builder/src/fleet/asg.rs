//! [`Groups`] on EC2 Auto Scaling: each release in an AZ is one Auto Scaling group with a
//! launch template of its own (named like the group), so an instance that is terminated or
//! fails its EC2 status checks (or, once attached, the target group's health checks) is
//! replaced in its AZ with no amictl process running.
//!
//! The launch template carries what `Ec2Compute` launches with: the AMI, an encrypted gp3
//! root, IMDSv2 only with one hop, no key pair, the instance profile. The group's tags
//! (fleet, prefix, rollout, image, spec) are propagated to its instances, so listing the
//! fleet's instances finds them, and AWS adds `aws:autoscaling:groupName`.
//!
//! Target groups are attached with AttachLoadBalancerTargetGroups, which AWS keeps
//! supporting beside the newer AttachTrafficSources (same effect for an ALB target group).

use aws_sdk_autoscaling::types::{
    Filter as AsgFilter, LaunchTemplateSpecification, MetricType, PredefinedMetricSpecification,
    Tag as AsgTag, TargetTrackingConfiguration,
};
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateHttpTokensState, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataEndpointState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData, ResourceType, Tag,
    TagSpecification, VolumeType,
};

use super::ec2::{client_token, Ec2Compute, TAG_MANAGED_BY};
use super::{
    Capacity, CloudError, Group, Groups, NewGroup, TAG_FLEET, TAG_IMAGE, TAG_PREFIX, TAG_RETIRING,
    TAG_ROLLOUT, TAG_SPEC,
};
use crate::aws::{classify, error_code};

/// What a held group suspends: everything that launches, terminates, replaces or scales,
/// so it keeps exactly the instances it has. (RemoveFromLoadBalancerLowPriority is not a
/// process one can suspend; AddToLoadBalancer is, and a detached group must not re-attach
/// what it launches.)
pub const HELD_PROCESSES: [&str; 9] = [
    "Launch",
    "Terminate",
    "HealthCheck",
    "ReplaceUnhealthy",
    "AZRebalance",
    "AlarmNotification",
    "ScheduledActions",
    "AddToLoadBalancer",
    "InstanceRefresh",
];

/// The target-tracking policy a scaling group gets.
pub const SCALING_POLICY: &str = "amictl-requests-per-instance";

/// How long a new instance has before the group acts on failed health checks: boot, the
/// agent's start and the target group's first checks.
const HEALTH_CHECK_GRACE_SECS: i32 = 300;

pub struct AutoScalingGroups {
    pub asg: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub compute: Ec2Compute,
    /// The fleet's target group, which groups are attached to.
    pub target_group: Option<String>,
    pub prefix: String,
    /// Requests per instance for the target-tracking policy, if the fleet scales on them.
    pub target_requests_per_instance: Option<f64>,
}

/// The group's tags (pure): propagated to its instances.
pub fn group_tags(new: &NewGroup, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Name", new.name.clone()),
        (TAG_FLEET, new.fleet.clone()),
        (TAG_PREFIX, prefix.to_owned()),
        (TAG_IMAGE, new.image.clone()),
        (TAG_SPEC, new.spec.clone()),
        (TAG_ROLLOUT, new.rollout.clone()),
        (TAG_MANAGED_BY, "amictl".to_owned()),
    ]
}

/// The ALBRequestCountPerTarget resource label (pure): `app/LB/ID/targetgroup/TG/ID` from
/// the load balancer's and the target group's ARNs.
pub fn resource_label(load_balancer_arn: &str, target_group_arn: &str) -> Option<String> {
    let lb = load_balancer_arn.split_once(":loadbalancer/")?.1;
    let tg = target_group_arn.split_once(":targetgroup/")?.1;
    Some(format!("{lb}/targetgroup/{tg}"))
}

/// A group as the fleet model sees it (pure); None for one being deleted.
pub fn to_group(
    g: &aws_sdk_autoscaling::types::AutoScalingGroup,
    target_group: Option<&str>,
) -> Option<Group> {
    if g.status().is_some_and(|s| !s.is_empty()) {
        // "Delete in progress": gone, as far as a rollout is concerned.
        return None;
    }
    let tag = |key: &str| {
        g.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    let count = |n: Option<i32>| usize::try_from(n.unwrap_or(0)).unwrap_or(0);
    let (attached, foreign): (Vec<&String>, Vec<&String>) = g
        .target_group_arns()
        .iter()
        .partition(|arn| Some(arn.as_str()) == target_group);
    Some(Group {
        name: g.auto_scaling_group_name()?.to_owned(),
        az: g.availability_zones().first().cloned().unwrap_or_default(),
        image: tag(TAG_IMAGE).unwrap_or_default(),
        spec: tag(TAG_SPEC).unwrap_or_default(),
        rollout: tag(TAG_ROLLOUT),
        retiring: tag(TAG_RETIRING),
        capacity: Capacity {
            min: count(g.min_size()),
            max: count(g.max_size()),
            desired: count(g.desired_capacity()),
        },
        attached: !attached.is_empty(),
        foreign_targets: foreign.into_iter().cloned().collect(),
        held: g
            .suspended_processes()
            .iter()
            .any(|p| p.process_name() == Some("Launch")),
        instances: g
            .instances()
            .iter()
            .filter(|i| {
                !matches!(
                    i.lifecycle_state().map(|s| s.as_str()),
                    Some("Terminating" | "Terminating:Wait" | "Terminating:Proceed" | "Terminated")
                )
            })
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect(),
    })
}

fn ec2_tags(tags: &[(&str, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(*k).value(v).build())
        .collect()
}

fn size(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl AutoScalingGroups {
    /// The launch template named like the group; one that exists (a resumed rollout) is
    /// kept.
    async fn launch_template(&self, new: &NewGroup) -> Result<(), CloudError> {
        let s = self.compute.settings();
        if s.instance_type.is_empty() {
            return Err(CloudError::Other(
                "no instance type configured for launches".into(),
            ));
        }
        let (root, volume_size) = self.compute.root_device(&new.image).await?;
        let tags = ec2_tags(&group_tags(new, &self.prefix));
        let profile = s.instance_profile.as_ref().map(|p| {
            let spec = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
            if p.starts_with("arn:") {
                spec.arn(p).build()
            } else {
                spec.name(p).build()
            }
        });
        let data = RequestLaunchTemplateData::builder()
            .image_id(&new.image)
            .instance_type(s.instance_type.as_str().into())
            .set_security_group_ids(
                (!s.security_group_ids.is_empty()).then(|| s.security_group_ids.clone()),
            )
            .set_iam_instance_profile(profile)
            .metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name(&root)
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .encrypted(true)
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .set_volume_size(volume_size)
                            .build(),
                    )
                    .build(),
            )
            // The instances get the group's tags too (propagated), but CreateAutoScalingGroup
            // authorizes ec2:RunInstances against the template as it is: its instance and
            // volume tags are what the policy's `aws:RequestTag/amictl:fleet` conditions see.
            .tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                LaunchTemplateTagSpecificationRequest::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .build();
        match self
            .compute
            .ec2()
            .create_launch_template()
            .launch_template_name(&new.name)
            .version_description(format!("{} for {}", new.image, new.rollout))
            .client_token(client_token(&format!("lt/{}", new.name)))
            .launch_template_data(data)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::LaunchTemplate)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if error_code(&e) == Some("InvalidLaunchTemplateName.AlreadyExistsException") =>
            {
                Ok(())
            }
            Err(e) => Err(classify("ec2:CreateLaunchTemplate", e).into()),
        }
    }

    /// Puts (or, without a target, deletes) the group's target-tracking policy.
    async fn scaling_policy(&self, name: &str, target: Option<f64>) -> Result<(), CloudError> {
        let Some(value) = target else {
            return match self
                .asg
                .delete_policy()
                .auto_scaling_group_name(name)
                .policy_name(SCALING_POLICY)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // No such policy: nothing to delete.
                Err(e) if error_code(&e) == Some("ValidationError") => Ok(()),
                Err(e) => Err(classify("autoscaling:DeletePolicy", e).into()),
            };
        };
        let tg = self.target_group.as_deref().ok_or_else(|| {
            CloudError::Other(
                "scaling on requests per instance needs a target group (--target-group)".into(),
            )
        })?;
        let out = self
            .elb
            .describe_target_groups()
            .target_group_arns(tg)
            .send()
            .await
            .map_err(|e| classify("elasticloadbalancing:DescribeTargetGroups", e))?;
        let lb = out
            .target_groups()
            .first()
            .and_then(|t| t.load_balancer_arns().first())
            .ok_or_else(|| {
                CloudError::Other(format!(
                    "target group {tg} is not behind a load balancer: requests per instance cannot be measured"
                ))
            })?;
        let label = resource_label(lb, tg).ok_or_else(|| {
            CloudError::Other(format!("cannot read a resource label from {lb} and {tg}"))
        })?;
        self.asg
            .put_scaling_policy()
            .auto_scaling_group_name(name)
            .policy_name(SCALING_POLICY)
            .policy_type("TargetTrackingScaling")
            .target_tracking_configuration(
                TargetTrackingConfiguration::builder()
                    .predefined_metric_specification(
                        PredefinedMetricSpecification::builder()
                            .predefined_metric_type(MetricType::AlbRequestCountPerTarget)
                            .resource_label(label)
                            .build(),
                    )
                    .target_value(value)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("autoscaling:PutScalingPolicy", e))?;
        Ok(())
    }
}

impl Groups for AutoScalingGroups {
    #[tracing::instrument(skip(self))]
    async fn groups(&self, fleet: &str) -> Result<Vec<Group>, CloudError> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = self
                .asg
                .describe_auto_scaling_groups()
                .filters(
                    AsgFilter::builder()
                        .name(format!("tag:{TAG_FLEET}"))
                        .values(fleet)
                        .build(),
                )
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", e))?;
            found.extend(
                out.auto_scaling_groups()
                    .iter()
                    .filter_map(|g| to_group(g, self.target_group.as_deref())),
            );
            match out.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => break,
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    #[tracing::instrument(skip(self), fields(group = %new.name))]
    async fn create(&self, new: &NewGroup) -> Result<(), CloudError> {
        self.launch_template(new).await?;
        let tags = group_tags(new, &self.prefix)
            .into_iter()
            .map(|(k, v)| {
                AsgTag::builder()
                    .key(k)
                    .value(v)
                    .propagate_at_launch(true)
                    .build()
            })
            .collect();
        match self
            .asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(&new.name)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(&new.name)
                    .version("1")
                    .build(),
            )
            .min_size(size(new.capacity.min))
            .max_size(size(new.capacity.max))
            .desired_capacity(size(new.capacity.desired))
            .vpc_zone_identifier(&new.placement.subnet)
            .health_check_type("EC2")
            .health_check_grace_period(HEALTH_CHECK_GRACE_SECS)
            .set_tags(Some(tags))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e) == Some("AlreadyExists") => Ok(()),
            Err(e) => Err(classify("autoscaling:CreateAutoScalingGroup", e).into()),
        }
    }

    #[tracing::instrument(skip(self))]
    async fn attach(&self, name: &str) -> Result<(), CloudError> {
        let Some(tg) = &self.target_group else {
            return Ok(());
        };
        self.asg
            .attach_load_balancer_target_groups()
            .auto_scaling_group_name(name)
            .target_group_arns(tg)
            .send()
            .await
            .map_err(|e| classify("autoscaling:AttachLoadBalancerTargetGroups", e))?;
        // Once attached, the target group's health checks replace an instance too.
        self.asg
            .update_auto_scaling_group()
            .auto_scaling_group_name(name)
            .health_check_type("ELB")
            .send()
            .await
            .map_err(|e| classify("autoscaling:UpdateAutoScalingGroup", e))?;
        if self.target_requests_per_instance.is_some() {
            self.scaling_policy(name, self.target_requests_per_instance)
                .await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn detach(&self, name: &str) -> Result<(), CloudError> {
        let Some(tg) = &self.target_group else {
            return Ok(());
        };
        self.asg
            .detach_load_balancer_target_groups()
            .auto_scaling_group_name(name)
            .target_group_arns(tg)
            .send()
            .await
            .map_err(|e| classify("autoscaling:DetachLoadBalancerTargetGroups", e))?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn hold(&self, name: &str, retiring: Option<&str>) -> Result<(), CloudError> {
        let tag = |value: Option<&str>| {
            AsgTag::builder()
                .resource_id(name)
                .resource_type("auto-scaling-group")
                .key(TAG_RETIRING)
                .set_value(value.map(str::to_owned))
                .propagate_at_launch(false)
                .build()
        };
        match retiring {
            Some(rollout) => {
                // Tagged first: a crash after it leaves a group a rollback finds.
                self.asg
                    .create_or_update_tags()
                    .tags(tag(Some(rollout)))
                    .send()
                    .await
                    .map_err(|e| classify("autoscaling:CreateOrUpdateTags", e))?;
                self.asg
                    .suspend_processes()
                    .auto_scaling_group_name(name)
                    .set_scaling_processes(Some(HELD_PROCESSES.map(String::from).to_vec()))
                    .send()
                    .await
                    .map_err(|e| classify("autoscaling:SuspendProcesses", e))?;
            }
            None => {
                self.asg
                    .resume_processes()
                    .auto_scaling_group_name(name)
                    .set_scaling_processes(Some(HELD_PROCESSES.map(String::from).to_vec()))
                    .send()
                    .await
                    .map_err(|e| classify("autoscaling:ResumeProcesses", e))?;
                self.asg
                    .delete_tags()
                    .tags(tag(None))
                    .send()
                    .await
                    .map_err(|e| classify("autoscaling:DeleteTags", e))?;
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn resize(
        &self,
        name: &str,
        capacity: Capacity,
        target: Option<f64>,
    ) -> Result<(), CloudError> {
        self.asg
            .update_auto_scaling_group()
            .auto_scaling_group_name(name)
            .min_size(size(capacity.min))
            .max_size(size(capacity.max))
            .desired_capacity(size(capacity.desired))
            .send()
            .await
            .map_err(|e| classify("autoscaling:UpdateAutoScalingGroup", e))?;
        self.scaling_policy(name, target).await
    }

    #[tracing::instrument(skip(self))]
    async fn delete(&self, name: &str) -> Result<(), CloudError> {
        match self
            .asg
            .delete_auto_scaling_group()
            .auto_scaling_group_name(name)
            // Its instances go with it: they are the old release, already drained.
            .force_delete(true)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e)
                if error_code(&e) == Some("ValidationError")
                    && e.to_string().to_ascii_lowercase().contains("not found") => {}
            Err(e) => return Err(classify("autoscaling:DeleteAutoScalingGroup", e).into()),
        }
        match self
            .compute
            .ec2()
            .delete_launch_template()
            .launch_template_name(name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if error_code(&e).is_some_and(|c| {
                    c.starts_with("InvalidLaunchTemplateName") || c.ends_with("NotFound")
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(classify("ec2:DeleteLaunchTemplate", e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_autoscaling::types::{
        AutoScalingGroup, Instance as AsgInstance, LifecycleState, SuspendedProcess, TagDescription,
    };

    fn tagged(key: &str, value: &str) -> TagDescription {
        TagDescription::builder().key(key).value(value).build()
    }

    #[test]
    fn a_group_reads_as_the_fleet_model_says() {
        let g = AutoScalingGroup::builder()
            .auto_scaling_group_name("p-web-us-east-1a-r-1")
            .availability_zones("us-east-1a")
            .min_size(2)
            .max_size(4)
            .desired_capacity(3)
            .target_group_arns("arn:tg/mine")
            .target_group_arns("arn:tg/other")
            .tags(tagged(TAG_IMAGE, "ami-1"))
            .tags(tagged(TAG_SPEC, "abc"))
            .tags(tagged(TAG_ROLLOUT, "r-1"))
            .tags(tagged(TAG_RETIRING, "r-2"))
            .suspended_processes(SuspendedProcess::builder().process_name("Launch").build())
            .instances(
                AsgInstance::builder()
                    .instance_id("i-1")
                    .lifecycle_state(LifecycleState::InService)
                    .build(),
            )
            .instances(
                AsgInstance::builder()
                    .instance_id("i-2")
                    .lifecycle_state(LifecycleState::Terminating)
                    .build(),
            )
            .build();
        let m = to_group(&g, Some("arn:tg/mine")).unwrap();
        assert_eq!(m.az, "us-east-1a");
        assert_eq!(
            m.capacity,
            Capacity {
                min: 2,
                max: 4,
                desired: 3
            }
        );
        assert!(m.attached && m.held);
        assert_eq!(m.foreign_targets, vec!["arn:tg/other".to_owned()]);
        assert_eq!((m.image.as_str(), m.spec.as_str()), ("ami-1", "abc"));
        assert_eq!(m.rollout.as_deref(), Some("r-1"));
        assert_eq!(m.retiring.as_deref(), Some("r-2"));
        assert_eq!(m.instances, vec!["i-1".to_owned()]);
        let deleting = AutoScalingGroup::builder()
            .auto_scaling_group_name("p-web-us-east-1a-r-0")
            .status("Delete in progress")
            .build();
        assert!(to_group(&deleting, None).is_none());
    }

    #[test]
    fn the_request_count_label_joins_the_two_arns() {
        assert_eq!(
            resource_label(
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/web/50dc6c495c0c9188",
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/943f017f100becff"
            )
            .as_deref(),
            Some("app/web/50dc6c495c0c9188/targetgroup/web/943f017f100becff")
        );
        assert_eq!(resource_label("nonsense", "arn:x:targetgroup/a/b"), None);
    }
}
