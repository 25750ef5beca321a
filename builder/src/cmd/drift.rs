//! `amictl drift --fleet NAME [--ami AMI]`: clock, content and image drift of every
//! running instance, one row each (on AWS through amictl's `{prefix}DriftReport` and
//! `{prefix}HealthCheck` SSM documents). Exit 1 when anything drifts (a CI gate), 3 when
//! nothing drifts but something could not be measured, 0 otherwise.

use std::time::Duration;

use serde::Serialize;

use crate::cmd::health::running;
use crate::cmd::Provider;
use crate::effects::aws::Aws;
use crate::effects::local::LocalFleet;
use crate::fleet::drift::{assess, exit_code, render, InstanceDrift};
use crate::fleet::{Command, Compute, Invocation, RunCommand};
use crate::ssm::documents::{on_aws, Document};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: instances tagged amictl:fleet=NAME.
    #[arg(long)]
    pub fleet: String,
    /// Where the fleet runs: AWS, or `ami-agent` processes on this machine.
    #[arg(long, value_enum, env = "AMICTL_PROVIDER", default_value_t)]
    pub provider: Provider,
    /// The AMI every instance should run (local: the release; default: the fleet's).
    #[arg(long)]
    pub ami: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
    /// Clock drift beyond this many seconds (either way) drifts.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub max_clock_drift: i64,
    /// Local: the clock measurement run on each instance (one integer on stdout).
    /// [default: `ami-agent drift` next to amictl] (On AWS: amictl's `{prefix}DriftReport`
    /// SSM document, or --drift-document.)
    #[arg(long, env = "AMICTL_DRIFT_COMMAND")]
    pub drift_command: Option<String>,
    /// AWS: an SSM Command document of yours instead of `{prefix}DriftReport`.
    #[arg(long, value_name = "NAME", conflicts_with = "drift_command")]
    pub drift_document: Option<String>,
    /// Local: the health check run on each instance (its JSON report gives the content
    /// drift). (On AWS: `{prefix}HealthCheck`, or --health-document.)
    #[arg(long, env = "AMICTL_HEALTH_COMMAND")]
    pub health_command: Option<String>,
    /// AWS: an SSM Command document of yours instead of `{prefix}HealthCheck`.
    #[arg(long, value_name = "NAME", conflicts_with = "health_command")]
    pub health_document: Option<String>,
    /// AWS: the prefix of amictl's SSM documents, as given to `rollout`.
    #[arg(long, env = "AMICTL_PREFIX", default_value = "amictl-")]
    pub prefix: String,
    /// Seconds the commands may run on the instances.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Serialize)]
struct Output<'a> {
    fleet: &'a str,
    ami: Option<&'a str>,
    exit_code: i32,
    instances: &'a [InstanceDrift],
}

pub async fn run(mut args: Args) -> anyhow::Result<i32> {
    match args.provider {
        Provider::Aws => {
            let drift = on_aws(
                Document::DriftReport,
                args.drift_command.as_deref(),
                args.drift_document.as_deref(),
                &args.prefix,
            )?;
            let health = on_aws(
                Document::HealthCheck,
                args.health_command.as_deref(),
                args.health_document.as_deref(),
                &args.prefix,
            )?;
            let aws = Aws::connect(args.region.as_deref()).await?;
            let runner = aws.run_command(&args.prefix);
            survey(&args, &aws.instances(), &runner, &drift, &health).await
        }
        Provider::Local => {
            if let Some(d) = args
                .drift_document
                .as_ref()
                .or(args.health_document.as_ref())
            {
                anyhow::bail!("SSM document {d}: SSM documents run on AWS; the local fleet takes --drift-command and --health-command");
            }
            let local = LocalFleet::open(&args.fleet)?;
            let state = local.store.load()?;
            if args.ami.is_none() {
                args.ami = state.image.clone();
            }
            let drift = args
                .drift_command
                .clone()
                .map_or(Command::Drift, Command::Shell);
            let health =
                Command::Shell(args.health_command.clone().unwrap_or(state.health_command));
            survey(&args, &local.compute, &local.run, &drift, &health).await
        }
    }
}

async fn survey<C: Compute, R: RunCommand>(
    args: &Args,
    compute: &C,
    runner: &R,
    drift_command: &Command,
    health_command: &Command,
) -> anyhow::Result<i32> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let instances = running(compute.instances(&args.fleet).await?, &args.fleet);
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    let (clocks, checks) = tokio::try_join!(
        runner.run(&ids, drift_command, timeout),
        runner.run(&ids, health_command, timeout),
    )?;
    let missing = Invocation::Unreachable {
        reason: "no answer from Run Command".into(),
    };
    let rows: Vec<InstanceDrift> = instances
        .iter()
        .map(|i| {
            assess(
                i,
                clocks.get(&i.id).unwrap_or(&missing),
                checks.get(&i.id).unwrap_or(&missing),
                args.ami.as_deref(),
                args.max_clock_drift,
            )
        })
        .collect();
    let code = exit_code(&rows);
    if args.json {
        let out = Output {
            fleet: &args.fleet,
            ami: args.ami.as_deref(),
            exit_code: code,
            instances: &rows,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render(&rows));
    }
    Ok(code)
}
