//! `amictl rollout`: replace (or create) a fleet across AZs, gated by SSM health checks,
//! rolled back on any failure, resumable after an interruption. Exit 0 done, 3 rolled
//! back (the fleet is as it was), 4 needs attention, 2 usage error, 1 other error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cmd::lock::{self, LockArgs};
use crate::cmd::Provider;
use crate::effects::aws::Aws;
use crate::effects::local::LocalFleet;
use crate::fleet::ec2::{spec_digest, Ec2LaunchSettings};
use crate::fleet::Placement;
use crate::local::state::FleetState;
use crate::local::{Store, Tuning};
use crate::lock::Lease;
use crate::rollout::config::{merge, ConfigFile, FleetConfig, FleetFile};
use crate::rollout::engine::Settings;
use crate::rollout::journal::Journal;
use crate::rollout::plan::Desired;
use crate::rollout::run::{drive, Request};
use crate::ssm::documents::{on_aws, Document};
use crate::stack::outputs::beneath;
use crate::stack::StackError;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: the instances tagged amictl:fleet=NAME.
    #[arg(long)]
    pub fleet: String,
    /// Where the fleet runs: AWS, or `ami-agent` processes on this machine.
    #[arg(long, value_enum, env = "AMICTL_PROVIDER", default_value_t)]
    pub provider: Provider,
    /// The AMI to roll the fleet onto.
    #[arg(long)]
    pub ami: Option<String>,
    /// Local: the site to serve (the local fleet's "image").
    #[arg(long, required_if_eq("provider", "local"), conflicts_with = "ami")]
    pub content: Option<PathBuf>,
    /// Local: the release manifest the content must match (`ami-agent manifest`).
    #[arg(long, requires = "content")]
    pub manifest: Option<PathBuf>,
    /// Local: the ami-agent binary [default: the fleet's, else $AMICTL_AGENT, else next to
    /// amictl, else on PATH].
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Local: the fleet's address, fixed when the fleet is created.
    /// [default: 127.0.0.1:8080 for a new fleet; port 0 picks a free port]
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Instances in each availability zone (on AWS: each AZ's Auto Scaling group keeps
    /// this many, unless it scales).
    #[arg(long)]
    pub per_az: Option<usize>,
    /// AWS: let each AZ's group scale, down to this many instances [default: --per-az].
    #[arg(long, value_name = "N")]
    pub min_per_az: Option<usize>,
    /// AWS: let each AZ's group scale, up to this many instances [default: the minimum].
    #[arg(long, value_name = "N")]
    pub max_per_az: Option<usize>,
    /// AWS: scale each AZ's group to keep this many requests per instance (target
    /// tracking on the load balancer's request count per target; needs --max-per-az).
    #[arg(long, value_name = "REQUESTS")]
    pub target_requests_per_instance: Option<f64>,
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
    /// Prefix of the instances' Name tags and of amictl's SSM documents
    /// (`{prefix}HealthCheck`, ...).
    #[arg(long, env = "AMICTL_PREFIX")]
    pub prefix: Option<String>,
    /// Local: the shell command run on each new instance; exit 0 means healthy. (On AWS
    /// the gate is amictl's `{prefix}HealthCheck` SSM document, or --health-document.)
    #[arg(long)]
    pub health_command: Option<String>,
    /// AWS: an SSM Command document of yours to gate on instead of `{prefix}HealthCheck`
    /// (sent without parameters; exit 0 means healthy).
    #[arg(long, value_name = "NAME", conflicts_with = "health_command")]
    pub health_document: Option<String>,
    /// Seconds each wait may take (running, healthy, drained).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Local: new instances launched at a time in one AZ. (On AWS a release's group is
    /// made at its full size and gated as a whole.)
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
    /// A stack from `amictl stack deploy`: its subnets, instance security group, instance
    /// profile, target group and alarms are the defaults (flags and amictl.toml win), and
    /// the URL printed last is its load balancer's.
    #[arg(long, value_name = "NAME")]
    pub stack: Option<String>,
    #[command(flatten)]
    pub lock: LockArgs,
    /// With --break-lock: take over a live lease without asking.
    #[arg(long, requires = "break_lock")]
    pub yes: bool,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    match args.provider {
        Provider::Aws => run_aws(args).await,
        Provider::Local => run_local(args).await,
    }
}

async fn run_aws(args: Args) -> anyhow::Result<i32> {
    let file = ConfigFile::load(&args.config)?;
    let cli = FleetFile {
        ami: args.ami.clone(),
        per_az: args.per_az,
        min_per_az: args.min_per_az,
        max_per_az: args.max_per_az,
        target_requests_per_instance: args.target_requests_per_instance,
        subnets: args.subnets.clone(),
        security_groups: args.security_groups.clone(),
        instance_type: args.instance_type.clone(),
        instance_profile: args.instance_profile.clone(),
        target_group: args.target_group.clone(),
        prefix: args.prefix.clone(),
        health_command: args.health_command.clone(),
        health_document: args.health_document.clone(),
        timeout: args.timeout,
        max_surge: args.max_surge,
        alarms: args.alarms.clone(),
        bake: args.bake,
        lock_bucket: args.lock.lock_bucket.clone(),
    };
    // The stack's outputs slot in beneath the fleet's amictl.toml table.
    let mut loaded = None;
    let table = match &args.stack {
        None => file.fleets.get(&args.fleet).cloned(),
        Some(name) => {
            if let Err(e) = crate::stack::names::check_stack_name(name) {
                eprintln!("error: {e}");
                return Ok(2);
            }
            let aws = Aws::connect(args.region.as_deref()).await?;
            let stacks = aws.stacks();
            loaded = Some(aws);
            match crate::stack::read_outputs(&stacks, name).await {
                Ok(outputs) => Some(beneath(
                    file.fleets.get(&args.fleet),
                    outputs.fleet_defaults(),
                )),
                Err(e @ (StackError::NotFound(_) | StackError::Outputs(_))) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading the outputs of stack {name}"))
                }
            }
        }
    };
    let fleet = match merge(&args.fleet, cli, table.as_ref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    // Requests per instance are the target group's: refused before anything is made, not
    // when the first group is attached.
    if fleet.target_group.is_none()
        && fleet
            .scaling
            .is_some_and(|s| s.target_requests_per_instance.is_some())
    {
        eprintln!("error: --target-requests-per-instance needs a target group (--target-group or --stack): requests per instance are counted there");
        return Ok(2);
    }
    let health = match on_aws(
        Document::HealthCheck,
        fleet.health_command.as_deref(),
        fleet.health_document.as_deref(),
        &fleet.prefix,
    ) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let aws = match loaded {
        Some(aws) => aws,
        None => Aws::connect(args.region.as_deref()).await?,
    };

    // Refuse a missing AMI or bad subnets before anything is launched.
    let Some(tags) = aws.image_tags(&fleet.ami).await? else {
        eprintln!("error: AMI {} does not exist in this account and region (publish it with `amictl image publish`)", fleet.ami);
        return Ok(2);
    };
    // Every instance gets an encrypted root volume, on which a sparse snapshot's missing
    // blocks read as random bytes.
    if let Some(why) = crate::image::register::sparse_refusal(&fleet.ami, &tags) {
        eprintln!("error: {why}");
        return Ok(2);
    }
    let placements = aws.placements(&fleet.subnets).await?;
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
    // One change of the fleet at a time, from here to the end (a dry run changes nothing).
    let lease = match (&fleet.lock_bucket, args.dry_run) {
        (_, true) => None,
        (None, false) => {
            warn!(fleet = %args.fleet, "no lock bucket (--stack or --lock-bucket): nothing stops another rollout of this fleet meanwhile");
            None
        }
        (Some(bucket), false) => {
            let store = aws.lock(bucket, &args.fleet);
            match lock::take(
                store,
                &args.fleet,
                operation(&args.fleet, &fleet.ami),
                &args.lock,
                args.yes,
            )
            .await?
            {
                Ok(lease) => Some(lease),
                Err(code) => return Ok(code),
            }
        }
    };
    let result = rollout_aws(
        &args,
        &aws,
        &fleet,
        placements,
        launch,
        health,
        lease.as_ref().map(Lease::lost_token),
    )
    .await;
    lock::release(lease).await;
    result
}

/// What a fleet's lock says its holder is doing (pure).
fn operation(fleet: &str, image: &str) -> String {
    format!("rollout of fleet {fleet} to {image}")
}

async fn rollout_aws(
    args: &Args,
    aws: &Aws,
    fleet: &FleetConfig,
    placements: Vec<Placement>,
    launch: Ec2LaunchSettings,
    health: crate::fleet::Command,
    lost: Option<CancellationToken>,
) -> anyhow::Result<i32> {
    let settings = settings(args, fleet, placements, &launch, health);
    let fx = aws.fleet(
        launch,
        &fleet.prefix,
        fleet.target_group.as_deref(),
        fleet.scaling,
    );
    if !args.dry_run {
        // All of them, so that `health` and `drift`, whose IAM scopes may only read
        // documents, find theirs.
        fx.run
            .prepare(&Document::ALL)
            .await
            .context("making sure amictl's SSM documents exist (nothing was launched)")?;
    }
    let resume = |ami: &str| format!("--ami {ami}");
    let request = request(args, &resume);
    drive(
        &request,
        fx.effects(),
        &settings,
        Journal::default_location(),
        lost,
    )
    .await
}

/// The rollout `args` ask for, for the engine's driver.
fn request<'a>(args: &'a Args, resume_hint: &'a dyn Fn(&str) -> String) -> Request<'a> {
    Request {
        fleet: &args.fleet,
        abort: args.abort,
        dry_run: args.dry_run,
        resume_hint,
    }
}

/// The local fleet: import the content as a release, create the fleet (and its load
/// balancer) on first use, then the same engine as on AWS.
async fn run_local(args: Args) -> anyhow::Result<i32> {
    let refuse = |what: &str| {
        eprintln!("error: {what} is AWS-only; the local fleet takes --content, --manifest, --agent, --listen, --per-az, --max-surge, --health-command, --timeout, --bake");
        Ok(2)
    };
    if args.subnets.is_some() || args.security_groups.is_some() || args.target_group.is_some() {
        return refuse("--subnets/--security-groups/--target-group");
    }
    if args.alarms.is_some() || args.instance_profile.is_some() || args.instance_type.is_some() {
        return refuse("--alarm/--instance-profile/--instance-type");
    }
    if args.stack.is_some() {
        return refuse("--stack");
    }
    if args.health_document.is_some() {
        return refuse("--health-document (an SSM document)");
    }
    let store = match Store::open(&args.fleet) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    if args.dry_run && !store.exists() {
        // A dry run creates nothing, not even the fleet's directory.
        eprintln!(
            "fleet {} does not exist: the rollout would create it with {} instances in each of {}",
            args.fleet,
            args.per_az.unwrap_or(2),
            crate::local::AZS.join(" and ")
        );
        return Ok(0);
    }
    // Unless told otherwise, a fleet keeps its agent, size and health command.
    let stored = store.load().ok();
    let agent = match (&args.agent, &stored) {
        (Some(p), _) => crate::local::resolve_agent(Some(p))?,
        (None, Some(s)) if s.agent.is_file() => s.agent.clone(),
        (None, _) => crate::local::resolve_agent(None)?,
    };
    let per_az = args
        .per_az
        .or(stored.as_ref().map(|s| s.per_az))
        .unwrap_or(2);
    if per_az == 0 {
        eprintln!("error: --per-az must be at least 1");
        return Ok(2);
    }
    let health_command = args
        .health_command
        .clone()
        .or(stored.as_ref().map(|s| s.health_command.clone()))
        .unwrap_or_else(|| crate::local::LOCAL_HEALTH_COMMAND.into());
    // The fleet's URL is fixed when it is created.
    let listen = match (&stored, args.listen) {
        (Some(s), Some(l)) if l != s.listen && l.port() != 0 => {
            eprintln!(
                "error: fleet {} listens on {}; destroy it first to move it to {l}",
                args.fleet, s.listen
            );
            return Ok(2);
        }
        (Some(s), _) => s.listen,
        (None, l) => {
            let l = l.unwrap_or(std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
            if l.port() == 0 {
                std::net::TcpListener::bind(l)
                    .and_then(|bound| bound.local_addr())
                    .with_context(|| format!("cannot listen on {l}"))?
            } else {
                l
            }
        }
    };
    let content = args.content.clone().expect("clap requires --content");
    let release = match crate::local::release::import(
        &store.releases_dir(),
        &content,
        args.manifest.as_deref(),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    info!(release = %release.id, version = %release.version, "release");
    store.create(FleetState {
        fleet: args.fleet.clone(),
        listen,
        agent: agent.clone(),
        image: None,
        per_az,
        health_command: health_command.clone(),
        generation: 0,
        targets: Vec::new(),
        instances: Default::default(),
    })?;
    // One change of the fleet at a time: a second rollout, `health --heal` or `destroy`
    // is refused while this one runs. A dry run changes nothing.
    let local = LocalFleet::new(store);
    let lease = if args.dry_run {
        None
    } else {
        match lock::take(
            local.lock(),
            &args.fleet,
            operation(&args.fleet, &release.id),
            &args.lock,
            args.yes,
        )
        .await?
        {
            Ok(lease) => Some(lease),
            Err(code) => return Ok(code),
        }
    };
    let lost = lease.as_ref().map(Lease::lost_token);
    let result = rollout_local(&args, &local, release, agent, per_az, health_command, lost).await;
    lock::release(lease).await;
    result
}

async fn rollout_local(
    args: &Args,
    local: &LocalFleet,
    release: crate::local::release::Release,
    agent: PathBuf,
    per_az: usize,
    health_command: String,
    lost: Option<CancellationToken>,
) -> anyhow::Result<i32> {
    // Instances launch with the fleet's agent; the size and health command become the
    // fleet's only when the rollout succeeds (a failed one must not change what `health`
    // runs).
    let store = &local.store;
    let current = store.update(|s| {
        s.agent = agent.clone();
        Ok::<_, crate::local::state::StateError>(s.clone())
    })?;
    if let Err(e) = local.lb.ensure_running().await {
        if store.load().is_ok_and(|s| s.instances.is_empty()) {
            // A fleet that never ran anything: leave nothing behind, so the next try can
            // pick another address.
            let _ = std::fs::remove_dir_all(&store.dir);
        }
        eprintln!("error: {e}\n(pick a free address with --listen ADDR:PORT)");
        return Ok(1);
    }
    let tuning = Tuning {
        max_surge: args.max_surge.unwrap_or(1),
        parallel_azs: args.parallel_azs,
        health_passes: args.health_passes,
        timeout: Duration::from_secs(args.timeout.unwrap_or(30)),
        bake: Duration::from_secs(args.bake.unwrap_or(0)),
        prefix: args.prefix.clone().unwrap_or_else(|| "amictl-".into()),
    };
    let before: Vec<String> = current.instances.keys().cloned().collect();
    let next = FleetState {
        per_az,
        health_command: health_command.clone(),
        ..current
    };
    let settings = crate::local::settings(&next, &release.id, &tuning);
    let resume = |release: &str| format!("the --content of release {release}");
    let code = drive(
        &request(args, &resume),
        local.effects(),
        &settings,
        Some(crate::local::journal(store)),
        lost,
    )
    .await?;
    if code == 0 {
        // What `health --heal` restores from now on.
        store.update(|s| {
            s.image = Some(release.id.clone());
            s.per_az = per_az;
            s.health_command = health_command.clone();
            Ok::<_, crate::local::state::StateError>(())
        })?;
    } else {
        // Say why the new instances failed, from their agents' own logs.
        for (id, r) in store.load()?.instances {
            if !before.contains(&id) {
                let tail = crate::local::process::tail(&local.compute.log_path(&r.id), 4);
                if !tail.is_empty() {
                    eprintln!("instance {id} ({}) logged:\n{tail}", r.image);
                }
            }
        }
    }
    Ok(code)
}

fn settings(
    args: &Args,
    fleet: &FleetConfig,
    placements: Vec<Placement>,
    launch: &Ec2LaunchSettings,
    health: crate::fleet::Command,
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
        health,
        health_passes: args.health_passes.max(1),
        health_interval: Duration::from_secs(10),
        step_timeout: Duration::from_secs(fleet.timeout),
        command_timeout: Duration::from_secs(60),
        bake: Duration::from_secs(fleet.bake),
        alarms: fleet.alarms.clone(),
        // DescribeInstances/DescribeTargetHealth every 5 s stays far under EC2's limits.
        poll: Duration::from_secs(5),
        scaling: fleet.scaling,
    }
}
