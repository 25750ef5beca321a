//! `amictl health --fleet NAME`: the agent's check on every running instance of a fleet
//! through SSM Run Command, one row each; `--heal` restarts the agent where it is unhealthy
//! and checks again; `--url URL` checks one endpoint from outside instead (no SSM).
//! Exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown: the worst instance's.

use std::path::PathBuf;
use std::time::Duration;

use ami_agent::check::Thresholds;
use ami_agent::probe::{check_url, Url};
use serde::Serialize;
use tracing::info;

use crate::fleet::ec2::{Ec2Compute, Ec2LaunchSettings};
use crate::fleet::health::{
    check, heal, render, render_heals, worst, AgentReport, Heal, InstanceHealth, Verdict,
    DEFAULT_HEALTH_COMMAND,
};
use crate::fleet::{Compute, Instance, InstanceState};
use crate::ssm::SsmRunCommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: instances tagged amictl:fleet=NAME.
    #[arg(long, required_unless_present = "url", conflicts_with = "url")]
    pub fleet: Option<String>,
    /// Restart the agent on unhealthy instances, then check them again.
    #[arg(long, conflicts_with = "url")]
    pub heal: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Check this endpoint from here instead (the agent's own check, without SSM).
    #[arg(long)]
    pub url: Option<Url>,
    /// With --url: the manifest to check against [default: the one the agent publishes].
    #[arg(long, requires = "url")]
    pub manifest: Option<PathBuf>,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
    /// The command run on each instance; its exit code is the verdict, its JSON report
    /// (`ami-agent check --json`) adds detail.
    #[arg(long, env = "AMICTL_HEALTH_COMMAND", default_value = DEFAULT_HEALTH_COMMAND)]
    pub health_command: String,
    /// Seconds the command may run on the instances (with --url: each request).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
    /// Seconds to let a restarted agent settle before checking it again.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub heal_wait: u64,
}

#[derive(Serialize)]
struct Output<'a> {
    fleet: Option<&'a str>,
    status: Verdict,
    exit_code: i32,
    instances: &'a [InstanceHealth],
    #[serde(skip_serializing_if = "Option::is_none")]
    heals: Option<&'a [Heal]>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let (rows, heals) = match (&args.url, &args.fleet) {
        (Some(url), _) => (vec![probe(url, &args, timeout).await], None),
        (None, Some(fleet)) => {
            let config = crate::aws::load(args.region.as_deref()).await?;
            let compute = Ec2Compute::new(&config, Ec2LaunchSettings::default());
            let running = running(compute.instances(fleet).await?, fleet);
            let runner = SsmRunCommand::new(&config);
            let mut rows = check(&runner, &running, &args.health_command, timeout).await?;
            let heals = if args.heal {
                let settle = Duration::from_secs(args.heal_wait);
                Some(
                    heal(
                        &runner,
                        &running,
                        &mut rows,
                        &args.health_command,
                        timeout,
                        settle,
                    )
                    .await?,
                )
            } else {
                None
            };
            (rows, heals)
        }
        (None, None) => anyhow::bail!("--fleet NAME or --url URL is required"),
    };
    let status = worst(&rows);
    if args.json {
        let out = Output {
            fleet: args.fleet.as_deref(),
            status,
            exit_code: status.exit_code(),
            instances: &rows,
            heals: heals.as_deref(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render(&rows));
        if let Some(h) = heals.as_deref().filter(|h| !h.is_empty()) {
            println!();
            print!("{}", render_heals(h));
        }
    }
    Ok(status.exit_code())
}

/// The running instances; the others are mentioned, not checked.
pub fn running(all: Vec<Instance>, fleet: &str) -> Vec<Instance> {
    let (running, other): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|i| i.state == InstanceState::Running);
    for i in &other {
        info!(instance = %i.id, state = ?i.state, "not running: not checked");
    }
    if running.is_empty() {
        eprintln!("fleet {fleet} has no running instances");
    }
    running
}

async fn probe(url: &Url, args: &Args, timeout: Duration) -> InstanceHealth {
    let limits = Thresholds {
        max_clock_drift: 2,
        expect_version: None,
    };
    let report = check_url(url, args.manifest.as_deref(), &limits, timeout).await;
    InstanceHealth {
        instance_id: report.url.clone(),
        az: "-".into(),
        image: "-".into(),
        status: report.status,
        outcome: "http",
        exit_code: Some(report.exit_code),
        detail: (!report.problems.is_empty()).then(|| report.problems.join("; ")),
        report: Some(AgentReport::from(&report)),
    }
}
