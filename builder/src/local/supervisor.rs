//! The local fleet's supervisor: keeps each AZ's instances of the fleet's current release at
//! their count between amictl commands. It runs inside the fleet's load balancer process
//! (`amictl local-balancer`), which lives as long as the fleet.
//!
//! Every [`Settings::poll`] it looks at the fleet: an instance of the current release, in
//! service (not retiring), whose process is gone (it no longer holds its lock) is dead. For
//! each dead one it takes the fleet's lease, as the commands that change the fleet do, and
//! then, still under the lease: takes the dead instance out of the balancer's targets,
//! launches a replacement on the same release in the same AZ, waits for it to answer and
//! pass the fleet's health command, registers it, waits for the balancer to call it
//! healthy, and marks the dead one terminated. It never acts while someone else holds the
//! lease (a rollout, a destroy, a `health --heal`), while a rollout is unfinished, or before
//! the fleet has a release; instances of another release, and retiring ones, belong to a
//! rollout and are left alone.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::balancer;
use super::compute::LocalCompute;
use super::lb::{target_state, LocalBalancer};
use super::process::is_alive;
use super::run::LocalRunCommand;
use super::state::{FleetState, Store};
use super::AZS;
use crate::fleet::{
    Command, Compute, InstanceState, Invocation, Launch, LoadBalancer, Placement, RunCommand,
    TargetState,
};
use crate::lock::file::FileStore;
use crate::lock::{acquire, Holder, LockError, Takeover};

/// How a lease taken by the supervisor begins its operation: `amictl` commands that find
/// such a lease wait for it (a replacement takes seconds) instead of refusing.
pub const OPERATION_PREFIX: &str = "supervisor of fleet ";

/// Whether `holder` is a local fleet's supervisor.
pub fn holds(holder: &Holder) -> bool {
    holder.operation.starts_with(OPERATION_PREFIX)
}

/// A supervisor's lease lives a minute without renewal: if the balancer process dies
/// mid-replacement, its lease is taken over at once anyway (its pid is gone), so the TTL
/// only matters for a process that hangs.
const LEASE_TTL: Duration = Duration::from_secs(60);

/// How the supervisor paces itself.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often it looks for dead instances. A look reads fleet.json and tries one flock
    /// per instance: cheap enough four times a second, and it bounds the detection delay.
    pub poll: Duration,
    /// Consecutive passes of the health command a replacement needs, as a rollout's gate.
    pub health_passes: u32,
    pub health_interval: Duration,
    /// How long one health command may run.
    pub command_timeout: Duration,
    /// From launch to a healthy target. Kept under the 15 s that commands wait for the
    /// supervisor's lease, so a rollout started meanwhile waits rather than fails.
    pub replace_timeout: Duration,
    /// After a failed replacement, the first pause before the next try; doubled up to
    /// `max_backoff`, so a release that no longer starts is not relaunched in a loop.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            poll: Duration::from_millis(250),
            health_passes: 3,
            health_interval: Duration::from_millis(200),
            command_timeout: Duration::from_secs(5),
            replace_timeout: Duration::from_secs(10),
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// One dead instance and whether it gets a replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    pub dead: String,
    pub az: String,
    /// False when the AZ already has its count of live instances (the fleet was made
    /// smaller): the dead one is only terminated.
    pub launch: bool,
}

/// What a look at the fleet concluded (pure: [`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do, and why.
    Idle(&'static str),
    Replace {
        image: String,
        of: Vec<Replacement>,
    },
}

/// What the supervisor should do with the fleet in `state`, given which instances' processes
/// are `alive` and whether a rollout of the fleet is unfinished (pure).
pub fn decide(
    state: &FleetState,
    alive: impl Fn(&str) -> bool,
    rollout_unfinished: bool,
) -> Decision {
    let Some(image) = &state.image else {
        return Decision::Idle("the fleet has no release yet");
    };
    if rollout_unfinished {
        return Decision::Idle("a rollout of the fleet is unfinished");
    }
    let mut of = Vec::new();
    for az in AZS {
        let in_service = state
            .instances
            .values()
            .filter(|r| !r.terminated && r.retiring.is_none() && r.az == az && &r.image == image);
        let (live, mut dead): (Vec<_>, Vec<_>) = in_service.partition(|r| alive(&r.id));
        dead.sort_by(|a, b| a.id.cmp(&b.id));
        let room = state.per_az.saturating_sub(live.len());
        of.extend(dead.iter().enumerate().map(|(n, r)| Replacement {
            dead: r.id.clone(),
            az: az.to_owned(),
            launch: n < room,
        }));
    }
    if of.is_empty() {
        Decision::Idle("every instance is alive")
    } else {
        Decision::Replace {
            image: image.clone(),
            of,
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    Idle(&'static str),
    /// Someone else holds the fleet's lease: nothing was touched.
    Busy(String),
    /// Dead instances terminated, each with its replacement (None: not replaced, the AZ was
    /// full), and the replacements that failed.
    Replaced {
        replaced: Vec<(String, Option<String>)>,
        failed: Vec<(String, String)>,
    },
}

/// The fleet's `decide`, from its files.
fn look(store: &Store, state: &FleetState) -> Decision {
    let unfinished = super::journal(store)
        .load(&state.fleet)
        .is_some_and(|e| e.state == crate::rollout::journal::State::InProgress);
    decide(
        state,
        |id| is_alive(&store.instance_dir(id).join("lock")),
        unfinished,
    )
}

/// One look at the fleet, and the replacements it calls for, under the fleet's lease.
pub async fn round(
    store: &Store,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Round> {
    let state = match store.load() {
        Ok(s) => s,
        // Destroyed (or not made yet): the balancer is about to be stopped.
        Err(super::state::StateError::NoFleet(_)) => return Ok(Round::Idle("no fleet")),
        Err(e) => return Err(e.into()),
    };
    let Decision::Replace { of, .. } = look(store, &state) else {
        return Ok(Round::Idle("nothing to replace"));
    };
    let dead: Vec<&str> = of.iter().map(|r| r.dead.as_str()).collect();
    let lease = match acquire(
        Arc::new(FileStore::new(store.lease_path())),
        &state.fleet,
        Holder::here(
            format!(
                "{OPERATION_PREFIX}{}: replacing {}",
                state.fleet,
                dead.join(", ")
            ),
            LEASE_TTL,
        ),
        Takeover::Never,
    )
    .await
    {
        Ok(lease) => lease,
        Err(LockError::Held {
            holder, now_unix, ..
        }) => return Ok(Round::Busy(holder.describe(now_unix))),
        Err(e) => return Err(e.into()),
    };
    // Under the lease, look again: whoever held it last may have changed the fleet.
    let result = match store.load() {
        Ok(state) => match look(store, &state) {
            Decision::Idle(why) => Ok(Round::Idle(why)),
            Decision::Replace { image, of } => {
                // Told to stop (a lost lease, SIGTERM), `replace` takes back what it
                // launched and returns.
                let stop = CancellationToken::new();
                let lost = lease.lost_token();
                let watch = async {
                    tokio::select! {
                        () = lost.cancelled() => {}
                        () = shutdown.cancelled() => {}
                    }
                    stop.cancel();
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    r = replace(store, &state, &image, &of, settings, &stop) => r,
                    () = watch => unreachable!("the watch never ends"),
                }
            }
        },
        Err(e) => Err(e.into()),
    };
    if let Err(e) = lease.release().await {
        warn!(error = %e, "the supervisor's lease was not released; it expires by itself");
    }
    result
}

/// Takes the dead instances out of the targets, replaces those that get a replacement, and
/// terminates every dead one whose replacement serves (or that gets none).
async fn replace(
    store: &Store,
    state: &FleetState,
    image: &str,
    of: &[Replacement],
    settings: &Settings,
    stop: &CancellationToken,
) -> anyhow::Result<Round> {
    let lb = LocalBalancer::new(store.clone());
    let compute = LocalCompute::new(store.clone());
    let dead: Vec<String> = of.iter().map(|r| r.dead.clone()).collect();
    // They answer nothing: out of the balancer's targets at once.
    lb.deregister(&dead).await?;
    let rollout = format!(
        "supervisor-{:x}-{:04x}",
        crate::rollout::now_unix(),
        fastrand::u16(..)
    );
    let spec = super::spec_digest(&state.agent);
    let runs = of.iter().map(|r| {
        let (compute, lb, rollout, spec) = (&compute, &lb, &rollout, &spec);
        async move {
            if !r.launch {
                return Ok(None);
            }
            let started = std::time::Instant::now();
            let launch = Launch {
                fleet: state.fleet.clone(),
                placement: Placement {
                    az: r.az.clone(),
                    subnet: r.az.clone(),
                },
                image: image.to_owned(),
                spec: spec.clone(),
                rollout: rollout.clone(),
                token: format!("{rollout}/{}", r.dead),
                name: format!("{}-{}-replaces-{}", state.fleet, r.az, r.dead),
            };
            let id = compute
                .launch(&launch)
                .await
                .map_err(|e| format!("launching in {}: {e}", r.az))?;
            info!(%id, dead = %r.dead, az = %r.az, "launched a replacement");
            let outcome = tokio::select! {
                o = into_service(store, compute, lb, &id, state, settings) => o,
                () = stop.cancelled() => Err("stopped before it was in service".to_owned()),
            };
            match outcome {
                Ok(()) => {
                    info!(%id, dead = %r.dead, az = %r.az, secs = format!("{:.2}", started.elapsed().as_secs_f32()), "replacement in service");
                    Ok(Some(id))
                }
                Err(e) => {
                    // Leave nothing half-made behind: the next round starts afresh.
                    let _ = lb.deregister(std::slice::from_ref(&id)).await;
                    let _ = compute.terminate(std::slice::from_ref(&id)).await;
                    Err(format!("replacement {id}: {e}"))
                }
            }
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let mut replaced = Vec::new();
    let mut failed = Vec::new();
    for (r, result) in of.iter().zip(results) {
        match result {
            Ok(new) => replaced.push((r.dead.clone(), new)),
            Err(e) => failed.push((r.dead.clone(), e)),
        }
    }
    let gone: Vec<String> = replaced.iter().map(|(d, _)| d.clone()).collect();
    if !gone.is_empty() {
        // Their processes are gone: this only marks them and removes their content.
        compute.terminate(&gone).await?;
    }
    Ok(Round::Replaced { replaced, failed })
}

/// Waits for `id` to answer, pass the fleet's health command `health_passes` times in a
/// row, and, registered, be called healthy by the balancer.
async fn into_service(
    store: &Store,
    compute: &LocalCompute,
    lb: &LocalBalancer,
    id: &str,
    state: &FleetState,
    settings: &Settings,
) -> Result<(), String> {
    let deadline = Instant::now() + settings.replace_timeout;
    let late = |what: &str| format!("{what} after {} s", settings.replace_timeout.as_secs_f32());
    let ids = [id.to_owned()];
    // Running: its process answers on its port.
    loop {
        let all = compute
            .instances(&state.fleet)
            .await
            .map_err(|e| e.to_string())?;
        match all.iter().find(|i| i.id == id).map(|i| i.state) {
            Some(InstanceState::Running) => break,
            Some(InstanceState::Pending) => {}
            _ => {
                let log = super::process::tail(&compute.log_path(id), 3);
                return Err(format!("its process exited: {log}"));
            }
        }
        if Instant::now() >= deadline {
            return Err(late("not answering"));
        }
        tokio::time::sleep(settings.poll.min(Duration::from_millis(50))).await;
    }
    // The fleet's health command, as a rollout's gate runs it.
    let run = LocalRunCommand {
        store: store.clone(),
    };
    let health = Command::Shell(state.health_command.clone());
    let mut passes = 0;
    let mut last = String::new();
    while passes < settings.health_passes {
        let results = run
            .run(&ids, &health, settings.command_timeout)
            .await
            .map_err(|e| e.to_string())?;
        match results.get(id) {
            Some(Invocation::Exited { code: 0, .. }) => passes += 1,
            other => {
                passes = 0;
                last = match other {
                    Some(Invocation::Exited {
                        code,
                        stdout,
                        stderr,
                    }) => {
                        let text = if stdout.trim().is_empty() {
                            stderr
                        } else {
                            stdout
                        };
                        format!("exit {code} {}", text.lines().next().unwrap_or(""))
                    }
                    Some(Invocation::Unreachable { reason } | Invocation::TimedOut { reason }) => {
                        reason.clone()
                    }
                    None => "no answer".into(),
                };
            }
        }
        if passes >= settings.health_passes {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("{}: {last}", late("health check not passing")));
        }
        tokio::time::sleep(settings.health_interval).await;
    }
    lb.register(&ids)
        .await
        .map_err(|e| format!("registering: {e}"))?;
    // The balancer's own /healthz checks: no request goes to it before they pass.
    loop {
        let fleet = store.load().map_err(|e| e.to_string())?;
        let status = balancer::read_status(&store.balancer_dir()).map_err(|e| e.to_string())?;
        let registered = fleet.targets.iter().any(|t| t == id);
        if target_state(id, registered, status.as_ref(), fleet.generation) == TargetState::Healthy {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(late("not a healthy target"));
        }
        tokio::time::sleep(settings.poll.min(Duration::from_millis(50))).await;
    }
}

/// Runs rounds until `shutdown`: the supervisor of the fleet in `store`, whose balancer is
/// the process this runs in.
pub async fn run(store: Store, settings: Settings, shutdown: CancellationToken) {
    info!(fleet = %store.fleet, "supervising the fleet: dead instances are replaced");
    let mut backoff: Option<(Instant, Duration)> = None;
    let mut busy_logged = false;
    // A damaged fleet.json fails every round: say so once, not four times a second.
    let mut last_error = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.poll) => {}
        }
        if backoff.is_some_and(|(until, _)| Instant::now() < until) {
            continue;
        }
        // Only while this process is the fleet's balancer (it took the balancer's lock).
        if !balancer::is_running(&store.balancer_dir()) {
            continue;
        }
        match round(&store, &settings, &shutdown).await {
            Ok(Round::Idle(why)) => {
                debug!(why, "nothing to do");
                busy_logged = false;
            }
            Ok(Round::Busy(holder)) => {
                if !busy_logged {
                    info!(%holder, "an instance is down, but the fleet is locked: leaving it to the holder");
                    busy_logged = true;
                }
            }
            Ok(Round::Replaced { replaced, failed }) => {
                busy_logged = false;
                for (dead, new) in &replaced {
                    match new {
                        Some(new) => info!(%dead, %new, "replaced a dead instance"),
                        None => info!(%dead, "terminated a dead instance (its AZ is full)"),
                    }
                }
                for (dead, e) in &failed {
                    warn!(%dead, error = %e, "could not replace a dead instance");
                }
                backoff = if failed.is_empty() {
                    None
                } else {
                    let pause = backoff
                        .map_or(settings.backoff, |(_, p)| (p * 2).min(settings.max_backoff));
                    warn!(secs = pause.as_secs(), "trying again after a pause");
                    Some((Instant::now() + pause, pause))
                };
            }
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    warn!(error = %e, "supervisor round failed");
                    last_error = e;
                }
                continue;
            }
        }
        last_error.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::state::InstanceRecord;
    use crate::lock::DEFAULT_TTL;

    fn record(id: &str, az: &str, image: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            az: az.into(),
            image: image.into(),
            spec: "s".into(),
            rollout: "r-1".into(),
            retiring: None,
            token: id.into(),
            name: id.into(),
            port: 1,
            pid: None,
            launched_unix: 0,
            terminated: false,
        }
    }

    fn fleet(per_az: usize, records: Vec<InstanceRecord>) -> FleetState {
        FleetState {
            fleet: "t".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            agent: "/nonexistent/ami-agent".into(),
            image: Some("rel-1".into()),
            per_az,
            health_command: "true".into(),
            generation: 0,
            targets: records.iter().map(|r| r.id.clone()).collect(),
            instances: records.into_iter().map(|r| (r.id.clone(), r)).collect(),
        }
    }

    #[test]
    fn only_dead_instances_of_the_current_release_in_service_are_replaced() {
        let mut retiring = record("i-ret", "local-a", "rel-1");
        retiring.retiring = Some("r-2".into());
        let mut gone = record("i-gone", "local-a", "rel-1");
        gone.terminated = true;
        let state = fleet(
            2,
            vec![
                record("i-a1", "local-a", "rel-1"),
                record("i-a2", "local-a", "rel-1"),
                record("i-b1", "local-b", "rel-1"),
                record("i-b2", "local-b", "rel-1"),
                record("i-old", "local-b", "rel-0"),
                retiring,
                gone,
            ],
        );
        let alive = |dead: &'static [&'static str]| move |id: &str| !dead.contains(&id);
        assert_eq!(
            decide(&state, alive(&[]), false),
            Decision::Idle("every instance is alive")
        );
        // Another release's instance, a retiring one, a terminated one: not ours.
        assert_eq!(
            decide(&state, alive(&["i-old", "i-ret", "i-gone"]), false),
            Decision::Idle("every instance is alive")
        );
        assert_eq!(
            decide(&state, alive(&["i-a2", "i-old"]), false),
            Decision::Replace {
                image: "rel-1".into(),
                of: vec![Replacement {
                    dead: "i-a2".into(),
                    az: "local-a".into(),
                    launch: true
                }]
            }
        );
        // Not while a rollout is unfinished, nor before the fleet has a release.
        assert_eq!(
            decide(&state, alive(&["i-a2"]), true),
            Decision::Idle("a rollout of the fleet is unfinished")
        );
        let mut new = state.clone();
        new.image = None;
        assert_eq!(
            decide(&new, alive(&["i-a2"]), false),
            Decision::Idle("the fleet has no release yet")
        );
        // A fleet made smaller: a dead instance beyond the count is only terminated.
        let mut smaller = state.clone();
        smaller.per_az = 1;
        let Decision::Replace { of, .. } =
            decide(&smaller, alive(&["i-a1", "i-b1", "i-b2"]), false)
        else {
            panic!("dead instances are dealt with");
        };
        assert_eq!(
            of.iter()
                .map(|r| (r.dead.as_str(), r.launch))
                .collect::<Vec<_>>(),
            [("i-a1", false), ("i-b1", true), ("i-b2", false)]
        );
    }

    #[tokio::test]
    async fn a_fleet_locked_by_someone_else_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path(), "t").unwrap();
        store
            .create(fleet(1, vec![record("i-a1", "local-a", "rel-1")]))
            .unwrap();
        std::fs::create_dir_all(store.balancer_dir()).unwrap();
        let before = std::fs::read(store.dir.join("fleet.json")).unwrap();
        // A rollout (this live process) holds the fleet.
        let rollout = acquire(
            Arc::new(FileStore::new(store.lease_path())),
            "t",
            Holder::here("rollout of fleet t to rel-2", DEFAULT_TTL),
            Takeover::Never,
        )
        .await
        .unwrap();
        let settings = Settings::default();
        let shutdown = CancellationToken::new();
        let round1 = round(&store, &settings, &shutdown).await.unwrap();
        let Round::Busy(holder) = round1 else {
            panic!("{round1:?}");
        };
        assert!(
            holder.starts_with("rollout of fleet t to rel-2"),
            "{holder}"
        );
        assert_eq!(
            std::fs::read(store.dir.join("fleet.json")).unwrap(),
            before,
            "the fleet is untouched"
        );
        rollout.release().await.unwrap();

        // Released: the supervisor goes ahead (here the launch fails: there is no release
        // to copy), and gives the lease back.
        let round2 = round(&store, &settings, &shutdown).await.unwrap();
        let Round::Replaced { replaced, failed } = round2 else {
            panic!("{round2:?}");
        };
        assert!(replaced.is_empty());
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            store.load().unwrap().targets.is_empty(),
            "the dead one is out"
        );
        assert!(!store.lease_path().exists(), "the lease is released");
    }

    #[tokio::test]
    async fn commands_wait_for_the_supervisor_but_not_for_a_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        let hold = |operation: &str| {
            acquire(
                Arc::new(FileStore::new(path.clone())),
                "t",
                Holder::here(operation, LEASE_TTL),
                Takeover::Never,
            )
        };
        let args = crate::cmd::lock::LockArgs::default();
        let take = || {
            crate::cmd::lock::take(
                FileStore::new(path.clone()),
                "t",
                "rollout of fleet t to rel-2".into(),
                &args,
                false,
            )
        };
        let supervisor = hold("supervisor of fleet t: replacing i-1").await.unwrap();
        let released = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            supervisor.release().await.unwrap();
        });
        let started = Instant::now();
        let lease = take()
            .await
            .unwrap()
            .expect("taken once the supervisor let go");
        assert!(started.elapsed() >= Duration::from_millis(400));
        released.await.unwrap();
        lease.release().await.unwrap();

        let rollout = hold("rollout of fleet t to rel-3").await.unwrap();
        let started = Instant::now();
        assert_eq!(take().await.unwrap().err(), Some(2), "refused at once");
        assert!(started.elapsed() < Duration::from_secs(2));
        rollout.release().await.unwrap();
    }
}
