//! `amictl health --fleet NAME`: the agent's check on every running instance of a fleet
//! through SSM Run Command (amictl's `{prefix}HealthCheck` document), one row each; `--heal`
//! restarts the agent where it is unhealthy (`{prefix}RestartAgent`) and checks again;
//! `--url URL` checks one endpoint from outside instead (no SSM).
//! Exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown: the worst instance's.

use std::path::PathBuf;
use std::time::Duration;

use ami_agent::check::Thresholds;
use ami_agent::probe::{check_url, Url};
use serde::Serialize;
use tracing::info;

use crate::cmd::Provider;
use crate::effects::aws::Aws;
use crate::effects::local::LocalFleet;
use crate::fleet::health::{
    check, heal, render, render_heals, worst, AgentReport, Heal, InstanceHealth, Verdict,
};
use crate::fleet::{Command, Compute, Instance, InstanceState};
use crate::lock::{Holder, Takeover, DEFAULT_TTL};
use crate::ssm::documents::{on_aws, Document};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: instances tagged amictl:fleet=NAME.
    #[arg(long, required_unless_present = "url", conflicts_with = "url")]
    pub fleet: Option<String>,
    /// Where the fleet runs: AWS, or `ami-agent` processes on this machine.
    #[arg(long, value_enum, env = "AMICTL_PROVIDER", default_value_t)]
    pub provider: Provider,
    /// Restart the agent on unhealthy instances, then check them again (local: replace
    /// unhealthy and down instances).
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
    /// Local: the shell command run on each instance; its exit code is the verdict, its
    /// JSON report (`ami-agent check --json`) adds detail. [default: the fleet's own]
    /// (On AWS the check is amictl's `{prefix}HealthCheck` SSM document, or
    /// --health-document.)
    #[arg(long, env = "AMICTL_HEALTH_COMMAND")]
    pub health_command: Option<String>,
    /// AWS: an SSM Command document of yours to run instead of `{prefix}HealthCheck`
    /// (sent without parameters; its exit code is the verdict).
    #[arg(long, value_name = "NAME", conflicts_with = "health_command")]
    pub health_document: Option<String>,
    /// AWS: the prefix of amictl's SSM documents, as given to `rollout`.
    #[arg(long, env = "AMICTL_PREFIX", default_value = "amictl-")]
    pub prefix: String,
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
    let (rows, heals) = match (&args.url, &args.fleet, args.provider) {
        (Some(url), _, _) => (vec![probe(url, &args, timeout).await], None),
        (None, Some(fleet), Provider::Aws) => {
            let command = on_aws(
                Document::HealthCheck,
                args.health_command.as_deref(),
                args.health_document.as_deref(),
                &args.prefix,
            )?;
            let aws = Aws::connect(args.region.as_deref()).await?;
            let compute = aws.instances();
            let all = compute.instances(fleet).await?;
            let runner = aws.run_command(&args.prefix);
            let running = running(all.clone(), fleet);
            let mut rows = check(&runner, &running, &command, timeout).await?;
            rows.extend(down_rows(&all));
            let heals = if args.heal {
                let settle = Duration::from_secs(args.heal_wait);
                Some(heal(&runner, &running, &mut rows, &command, timeout, settle).await?)
            } else {
                None
            };
            (rows, heals)
        }
        (None, Some(fleet), Provider::Local) => local(fleet, &args, timeout).await?,
        (None, None, _) => anyhow::bail!("--fleet NAME or --url URL is required"),
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

/// Rows for the instances that are down: no command reaches them, and they are a fault.
fn down_rows(all: &[Instance]) -> Vec<InstanceHealth> {
    all.iter()
        .filter(|i| i.state == InstanceState::Down)
        .map(crate::fleet::health::down)
        .collect()
}

/// The row a local fleet's dead load balancer gets in place of an instance id.
const LOAD_BALANCER_ROW: &str = "load-balancer";

/// The local fleet: the same check run here; `--heal` replaces what is unhealthy or down
/// through the rollout engine, then checks the fleet again.
async fn local(
    fleet: &str,
    args: &Args,
    timeout: Duration,
) -> anyhow::Result<(Vec<InstanceHealth>, Option<Vec<Heal>>)> {
    if let Some(d) = &args.health_document {
        anyhow::bail!("--health-document {d}: SSM documents run on AWS; the local fleet takes --health-command");
    }
    let local = LocalFleet::open(fleet)?;
    let store = &local.store;
    let state = store.load()?;
    let command = Command::Shell(args.health_command.clone().unwrap_or(state.health_command));
    let survey = || async {
        let all = local.compute.instances(fleet).await?;
        let mut rows = check(&local.run, &running(all.clone(), fleet), &command, timeout).await?;
        rows.extend(down_rows(&all));
        if !crate::local::balancer::is_running(&store.balancer_dir()) {
            // Every instance may be fine, but nothing reaches them.
            rows.push(InstanceHealth {
                instance_id: LOAD_BALANCER_ROW.into(),
                az: "-".into(),
                image: "-".into(),
                status: Verdict::Unhealthy,
                outcome: "down",
                exit_code: None,
                detail: Some(format!(
                    "not running: the fleet's URL http://{}/ does not answer",
                    state.listen
                )),
                report: None,
            });
        }
        Ok::<_, anyhow::Error>(rows)
    };
    let rows = survey().await?;
    if !args.heal {
        return Ok((rows, None));
    }
    // Healing changes the fleet: not while a rollout (or another heal) does.
    let lease = match crate::cmd::lock::patient_acquire(
        std::sync::Arc::new(local.lock()),
        fleet,
        Holder::here(format!("health --heal of fleet {fleet}"), DEFAULT_TTL),
        Takeover::Never,
    )
    .await
    {
        Ok(lease) => lease,
        Err(e) => {
            let heals = rows
                .iter()
                .filter(|r| r.status == Verdict::Unhealthy)
                .map(|r| Heal {
                    instance_id: r.instance_id.clone(),
                    before: r.status,
                    after: Some(r.status),
                    restart: format!("not healed: {e}"),
                })
                .collect();
            return Ok((rows, Some(heals)));
        }
    };
    let healed = heal_local(&local, rows).await;
    crate::cmd::lock::release(Some(lease)).await;
    let mut heals = healed?;
    // A replaced instance has no row any more: its "after" is the fleet's.
    let after = survey().await?;
    let fleet_verdict = worst(&after);
    for h in &mut heals {
        let row = after.iter().find(|a| a.instance_id == h.instance_id);
        h.after = Some(row.map_or(fleet_verdict, |a| a.status));
    }
    Ok((after, Some(heals)))
}

/// Restarts the load balancer if it is down and replaces the unhealthy instances.
async fn heal_local(local: &LocalFleet, rows: Vec<InstanceHealth>) -> anyhow::Result<Vec<Heal>> {
    let mut heals = Vec::new();
    if let Some(row) = rows.iter().find(|r| r.instance_id == LOAD_BALANCER_ROW) {
        let restart = match local.lb.ensure_running().await {
            Ok(()) => "restarted".to_owned(),
            Err(e) => format!("restart failed: {e}"),
        };
        heals.push(Heal {
            instance_id: row.instance_id.clone(),
            before: row.status,
            after: None,
            restart,
        });
    }
    let rows: Vec<InstanceHealth> = rows
        .into_iter()
        .filter(|r| r.instance_id != LOAD_BALANCER_ROW)
        .collect();
    let sick: Vec<&InstanceHealth> = rows
        .iter()
        .filter(|r| r.status == Verdict::Unhealthy)
        .collect();
    if !sick.is_empty() {
        let running_sick: Vec<String> = sick
            .iter()
            .filter(|r| r.outcome != "down")
            .map(|r| r.instance_id.clone())
            .collect();
        let replaced = match crate::local::replace(&local.store, &running_sick).await {
            Ok(crate::rollout::engine::Outcome::Done { launched, .. }) => {
                format!("replaced ({launched} launched)")
            }
            Ok(crate::rollout::engine::Outcome::RolledBack { reason }) => {
                format!("replacement failed: {reason}")
            }
            Err(e) => format!("replacement failed: {e:#}"),
        };
        heals.extend(sick.iter().map(|r| Heal {
            instance_id: r.instance_id.clone(),
            before: r.status,
            after: None,
            restart: replaced.clone(),
        }));
    }
    Ok(heals)
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
