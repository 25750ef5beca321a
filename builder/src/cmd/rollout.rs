//! `amictl rollout`: replace (or create) a fleet across AZs, gated by SSM health checks,
//! rolled back on any failure, resumable after an interruption. Exit 0 done, 3 rolled
//! back (the fleet is as it was), 4 needs attention, 2 usage error, 1 other error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use crate::fleet::ec2::{spec_digest, Ec2Compute, Ec2LaunchSettings};
use crate::fleet::elb::{CloudWatchAlarms, TargetGroup};
use crate::fleet::{Compute, LoadBalancer, Placement};
use crate::rollout::config::{merge, ConfigFile, FleetConfig, FleetFile};
use crate::rollout::engine::{Effects, Engine, Outcome, RolloutError, Settings};
use crate::rollout::journal::{new_id, resolve, Entry, Journal, Resolution, State};
use crate::rollout::plan::Desired;
use crate::ssm::SsmRunCommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: the instances tagged amictl:fleet=NAME.
    #[arg(long)]
    pub fleet: String,
    /// The AMI to roll the fleet onto.
    #[arg(long)]
    pub ami: Option<String>,
    /// Instances in each availability zone.
    #[arg(long)]
    pub per_az: Option<usize>,
    /// One subnet per AZ, at least two AZs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub subnets: Option<Vec<String>>,
    #[arg(long, value_delimiter = ',')]
    pub security_groups: Option<Vec<String>>,
    #[arg(long)]
    pub instance_type: Option<String>,
    /// Instance profile with AmazonSSMManagedInstanceCore (the health gate needs SSM).
    #[arg(long)]
    pub instance_profile: Option<String>,
    /// Target group ARN: new instances are registered, old ones drained.
    #[arg(long)]
    pub target_group: Option<String>,
    /// Prefix of the instances' Name tags.
    #[arg(long, env = "AMICTL_PREFIX")]
    pub prefix: Option<String>,
    /// Run through SSM on each new instance; exit 0 means healthy.
    #[arg(long)]
    pub health_command: Option<String>,
    /// Seconds each wait may take (running, healthy, drained).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// New instances launched at a time in one AZ.
    #[arg(long)]
    pub max_surge: Option<usize>,
    /// Roll every AZ at once instead of one after the other.
    #[arg(long)]
    pub parallel_azs: bool,
    /// Seconds to watch the alarms after the last wave before committing.
    #[arg(long)]
    pub bake: Option<u64>,
    /// CloudWatch alarm that rolls back when it fires (repeatable).
    #[arg(long = "alarm")]
    pub alarms: Option<Vec<String>>,
    /// Consecutive passing health checks a new instance needs.
    #[arg(long, default_value_t = 3)]
    pub health_passes: u32,
    /// Roll back the fleet's unfinished rollout instead.
    #[arg(long)]
    pub abort: bool,
    /// Only print what would happen.
    #[arg(long)]
    pub dry_run: bool,
    /// Fleet settings file ([fleets.NAME] tables).
    #[arg(long, default_value = "amictl.toml")]
    pub config: PathBuf,
    #[arg(long)]
    pub region: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let file = ConfigFile::load(&args.config)?;
    let cli = FleetFile {
        ami: args.ami.clone(),
        per_az: args.per_az,
        subnets: args.subnets.clone(),
        security_groups: args.security_groups.clone(),
        instance_type: args.instance_type.clone(),
        instance_profile: args.instance_profile.clone(),
        target_group: args.target_group.clone(),
        prefix: args.prefix.clone(),
        health_command: args.health_command.clone(),
        timeout: args.timeout,
        max_surge: args.max_surge,
        alarms: args.alarms.clone(),
        bake: args.bake,
    };
    let fleet = match merge(&args.fleet, cli, file.fleets.get(&args.fleet)) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let config = crate::aws::load(args.region.as_deref()).await?;
    let ec2 = aws_sdk_ec2::Client::new(&config);

    // Refuse a missing AMI or bad subnets before anything is launched.
    let images = ec2.describe_images().image_ids(&fleet.ami).send().await;
    let found = images
        .as_ref()
        .map(|o| !o.images().is_empty())
        .unwrap_or(false);
    if !found {
        eprintln!("error: AMI {} does not exist in this account and region (publish it with `amictl image publish`)", fleet.ami);
        return Ok(2);
    }
    let placements = placements(&ec2, &fleet.subnets).await?;
    let distinct: std::collections::BTreeSet<&str> =
        placements.iter().map(|p| p.az.as_str()).collect();
    if distinct.len() != placements.len() || distinct.len() < 2 {
        eprintln!("error: --subnets must be one subnet in each of at least two different availability zones");
        return Ok(2);
    }

    let launch = Ec2LaunchSettings {
        instance_type: fleet.instance_type.clone(),
        security_group_ids: fleet.security_groups.clone(),
        instance_profile: fleet.instance_profile.clone(),
    };
    let compute = Ec2Compute::new(&config, launch.clone());
    let ssm = SsmRunCommand::new(&config);
    let alarms = CloudWatchAlarms {
        client: aws_sdk_cloudwatch::Client::new(&config),
    };
    let lb = fleet.target_group.as_ref().map(|arn| TargetGroup {
        client: aws_sdk_elasticloadbalancingv2::Client::new(&config),
        arn: arn.clone(),
    });
    let settings = settings(&args, &fleet, placements, &launch);

    let journal = Journal::default_location();
    let current = compute.instances(&args.fleet).await?;
    let entry = journal.as_ref().and_then(|j| j.load(&args.fleet));
    let rollout = match resolve(entry.as_ref(), &current, &fleet.ami) {
        Resolution::Resume(id) => {
            info!(rollout = %id, "resuming the unfinished rollout");
            id
        }
        Resolution::Conflict { rollout, image } if !args.abort => {
            eprintln!(
                "error: rollout {rollout} of fleet {} to {image} is unfinished: resume it with --ami {image}, or roll it back with --abort",
                args.fleet
            );
            return Ok(2);
        }
        Resolution::Conflict { rollout, .. } => rollout,
        Resolution::New if args.abort => {
            eprintln!(
                "fleet {} has no unfinished rollout; nothing to abort",
                args.fleet
            );
            return Ok(0);
        }
        Resolution::New => new_id(crate::rollout::now_unix()),
    };
    let fx = Effects {
        compute: &compute,
        run: &ssm,
        lb: lb.as_ref(),
        alarms: &alarms,
    };
    let engine = Engine::new(fx, &settings, &rollout);
    if args.dry_run {
        let plan = engine.plan().await?;
        eprintln!("{plan:#?}");
        return Ok(0);
    }
    let save = |state: State| {
        if let Some(j) = &journal {
            let e = Entry {
                rollout: rollout.clone(),
                fleet: args.fleet.clone(),
                image: fleet.ami.clone(),
                started_unix: entry
                    .as_ref()
                    .map(|e| e.started_unix)
                    .unwrap_or_else(crate::rollout::now_unix),
                state,
            };
            if let Err(err) = j.save(&e) {
                warn!(error = %err, "cannot write the rollout journal (the fleet's tags still record the rollout)");
            }
        }
    };
    save(State::InProgress);
    let work = async {
        if args.abort {
            engine.rollback("aborted by request").await
        } else {
            engine.run().await
        }
    };
    // The fleet's tags record every step, so stopping at any await point is safe: say how
    // to go on rather than try to clean up half-way.
    let result = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "interrupted: rollout {rollout} of fleet {} stopped where it was; run the same command again to resume it, or add --abort to roll it back",
                args.fleet
            );
            return Ok(130);
        }
    };
    let code = match result {
        Ok(Outcome::Done {
            launched,
            retired,
            unchanged,
        }) => {
            save(State::Done);
            if unchanged {
                eprintln!(
                    "fleet {} is already on {}: nothing to do",
                    args.fleet, fleet.ami
                );
            } else {
                eprintln!(
                    "fleet {} is on {}: {launched} launched, {retired} retired",
                    args.fleet, fleet.ami
                );
            }
            0
        }
        Ok(Outcome::RolledBack { reason }) => {
            save(State::RolledBack);
            eprintln!("rolled back ({reason}): fleet {} is as it was", args.fleet);
            3
        }
        Err(RolloutError::Before(e)) => return Err(e).context("nothing was changed"),
        Err(e @ RolloutError::NeedsAttention { .. }) => {
            save(State::NeedsAttention);
            eprintln!("NEEDS ATTENTION: {e}");
            return Ok(4);
        }
    };
    // The URL, last on stdout: the load balancer's, else the instances' addresses.
    let url = match &lb {
        Some(lb) => lb.url().await.ok().flatten(),
        None => None,
    };
    match url {
        Some(url) => println!("{url}"),
        None => {
            let addrs: Vec<String> = compute
                .instances(&args.fleet)
                .await?
                .into_iter()
                .filter(|i| i.retiring.is_none())
                .filter_map(|i| i.address.map(|a| format!("http://{a}/")))
                .collect();
            println!("{}", addrs.join(" "));
        }
    }
    Ok(code)
}

async fn placements(
    ec2: &aws_sdk_ec2::Client,
    subnets: &[String],
) -> anyhow::Result<Vec<Placement>> {
    let out = ec2
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

fn settings(
    args: &Args,
    fleet: &FleetConfig,
    placements: Vec<Placement>,
    launch: &Ec2LaunchSettings,
) -> Settings {
    let specs = placements
        .iter()
        .map(|p| (p.az.clone(), spec_digest(launch, p)))
        .collect();
    Settings {
        fleet: args.fleet.clone(),
        desired: Desired {
            image: fleet.ami.clone(),
            placements,
            specs,
            per_az: fleet.per_az,
            max_surge: fleet.max_surge,
            parallel_azs: args.parallel_azs,
        },
        prefix: fleet.prefix.clone(),
        health_command: fleet.health_command.clone(),
        health_passes: args.health_passes.max(1),
        health_interval: Duration::from_secs(10),
        step_timeout: Duration::from_secs(fleet.timeout),
        command_timeout: Duration::from_secs(60),
        bake: Duration::from_secs(fleet.bake),
        alarms: fleet.alarms.clone(),
        // DescribeInstances/DescribeTargetHealth every 5 s stays far under EC2's limits.
        poll: Duration::from_secs(5),
    }
}
