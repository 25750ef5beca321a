//! The local fleet: the same rollout, health and drift, with `ami-agent serve` processes on
//! this machine as instances, a content directory as the image, two labelled groups as the
//! AZs, a local TCP load balancer as the target group, and the health command run here as
//! Run Command. Everything a fleet is lives under `$XDG_STATE_HOME/amictl/local/FLEET/`, so
//! a fleet outlives the amictl command that made it.

pub mod balancer;
pub mod compute;
pub mod lb;
pub mod process;
pub mod release;
pub mod run;
pub mod state;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use compute::LocalCompute;
pub use lb::LocalBalancer;
pub use run::{LocalRunCommand, LOCAL_DRIFT_COMMAND, LOCAL_HEALTH_COMMAND};
pub use state::Store;

use crate::fleet::{Alarms, CloudError, Placement};

/// The two "availability zones" of a local fleet.
pub const AZS: [&str; 2] = ["local-a", "local-b"];

pub fn placements() -> Vec<Placement> {
    AZS.iter()
        .map(|az| Placement {
            az: (*az).to_owned(),
            subnet: (*az).to_owned(),
        })
        .collect()
}

/// The launch-settings digest of a local instance: which agent binary runs it.
pub fn spec_digest(agent: &Path) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(agent.as_os_str().as_encoded_bytes());
    hex::encode(h)[..12].to_owned()
}

/// Finds `ami-agent`: `--agent`, else `AMICTL_AGENT` (the Nix package's wrapper sets it to
/// the agent built with it), else next to amictl (a cargo target directory or an installed
/// bundle), else on PATH.
pub fn resolve_agent(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        anyhow::ensure!(
            p.is_file(),
            "--agent {}: no such file (build it: cargo build --release -p agent)",
            p.display()
        );
        return Ok(std::fs::canonicalize(p)?);
    }
    if let Some(p) = std::env::var_os("AMICTL_AGENT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        anyhow::ensure!(
            p.is_file(),
            "AMICTL_AGENT={}: no such file (point it at ami-agent, or unset it)",
            p.display()
        );
        return Ok(std::fs::canonicalize(p)?);
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("ami-agent")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("ami-agent"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    sibling
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "ami-agent not found next to amictl or on PATH: build it (cargo build --release -p agent) or pass --agent PATH"
            )
        })
}

/// The local fleet has no CloudWatch: no alarm ever fires (`--alarm` is refused).
pub struct NoAlarms;

impl Alarms for NoAlarms {
    async fn firing(&self, _names: &[String]) -> Result<Vec<String>, CloudError> {
        Ok(Vec::new())
    }
}

/// Stops every process of the local fleet `fleet` (instances, then the load balancer) and
/// removes its directory. The number of instances stopped; None for a fleet that is not
/// there.
pub async fn destroy(fleet: &str) -> anyhow::Result<Option<usize>> {
    let store = Store::open(fleet)?;
    if !store.dir.exists() {
        return Ok(None);
    }
    let compute = LocalCompute::new(store.clone());
    let mut stopped = 0;
    if let Ok(state) = store.load() {
        let ids: Vec<String> = state
            .instances
            .values()
            .filter(|r| !r.terminated)
            .map(|r| r.id.clone())
            .collect();
        stopped = ids.len();
        crate::fleet::Compute::terminate(&compute, &ids).await?;
    }
    // Instances whose records were lost still hold their locks: stop them too.
    if let Ok(entries) = std::fs::read_dir(store.dir.join("instances")) {
        for e in entries.flatten() {
            let lock = e.path().join("lock");
            if process::is_alive(&lock) {
                if let Some(pid) = pid_of(&lock) {
                    process::stop(pid, &lock, compute::SHUTDOWN_GRACE).await;
                    stopped += 1;
                }
            }
        }
    }
    let dir = store.balancer_dir();
    if balancer::is_running(&dir) {
        if let Ok(Some(status)) = balancer::read_status(&dir) {
            process::stop(status.pid, &dir.join("lock"), Duration::from_secs(10)).await;
        }
    }
    anyhow::ensure!(
        !balancer::is_running(&dir),
        "the load balancer of fleet {fleet} is still running; stop it (see {}) and run destroy again",
        dir.join("status.json").display()
    );
    std::fs::remove_dir_all(&store.dir)?;
    Ok(Some(stopped))
}

/// The pid of whoever holds `lock`, from the system's lock table (Linux); None elsewhere.
fn pid_of(lock: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(lock).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        let inode = f.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        (f.get(1) == Some(&"FLOCK") && inode == ino).then(|| f.get(4)?.parse().ok())?
    })
}

/// How a local rollout paces itself (processes start in milliseconds, so it polls in
/// tenths of a second where AWS polls in seconds).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub max_surge: usize,
    pub parallel_azs: bool,
    pub health_passes: u32,
    pub timeout: Duration,
    pub bake: Duration,
    pub prefix: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_surge: 1,
            parallel_azs: false,
            health_passes: 3,
            timeout: Duration::from_secs(30),
            bake: Duration::ZERO,
            prefix: "amictl-".into(),
        }
    }
}

/// The engine's settings for a local fleet rolling onto `image` (pure).
pub fn settings(
    state: &state::FleetState,
    image: &str,
    tuning: &Tuning,
) -> crate::rollout::engine::Settings {
    let placements = placements();
    let spec = spec_digest(&state.agent);
    crate::rollout::engine::Settings {
        fleet: state.fleet.clone(),
        desired: crate::rollout::plan::Desired {
            image: image.to_owned(),
            specs: placements
                .iter()
                .map(|p| (p.az.clone(), spec.clone()))
                .collect(),
            placements,
            per_az: state.per_az,
            max_surge: tuning.max_surge.max(1),
            parallel_azs: tuning.parallel_azs,
        },
        prefix: tuning.prefix.clone(),
        health: crate::fleet::Command::Shell(state.health_command.clone()),
        health_passes: tuning.health_passes.max(1),
        health_interval: Duration::from_millis(200),
        step_timeout: tuning.timeout,
        command_timeout: Duration::from_secs(10),
        bake: tuning.bake,
        alarms: Vec::new(),
        poll: Duration::from_millis(100),
        scaling: None,
    }
}

/// The fleet's rollout journal (inside the fleet, so `destroy` takes it along).
pub fn journal(store: &Store) -> crate::rollout::journal::Journal {
    crate::rollout::journal::Journal::at(store.dir.join("journal"))
}

/// Replaces instances: stops `sick` (running but unhealthy), then rolls the fleet onto the
/// release it should run, which launches a replacement for every instance that is down
/// and retires the dead one. Refused while a rollout is unfinished.
pub async fn replace(
    store: &Store,
    sick: &[String],
) -> anyhow::Result<crate::rollout::engine::Outcome> {
    use crate::rollout::engine::{Effects, Engine};
    use crate::rollout::journal::{new_id, Entry, State};
    let state = store.load()?;
    let image = state.image.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "fleet {} has no release yet: roll it out first",
            state.fleet
        )
    })?;
    let journal = journal(store);
    if let Some(e) = journal
        .load(&state.fleet)
        .filter(|e| e.state == State::InProgress)
    {
        anyhow::bail!(
            "rollout {} of fleet {} is unfinished: resume it or roll it back (`amictl rollout --provider local --abort`) before healing",
            e.rollout,
            state.fleet
        );
    }
    for id in sick {
        if let Some(pid) = state.instances.get(id).and_then(|r| r.pid) {
            process::stop(
                pid,
                &store.instance_dir(id).join("lock"),
                compute::SHUTDOWN_GRACE,
            )
            .await;
        }
    }
    let compute = LocalCompute::new(store.clone());
    let run = LocalRunCommand {
        store: store.clone(),
    };
    let lb = LocalBalancer::new(store.clone());
    lb.ensure_running().await?;
    let settings = settings(&state, &image, &Tuning::default());
    let rollout = new_id(crate::rollout::now_unix());
    let mut entry = Entry {
        rollout: rollout.clone(),
        fleet: state.fleet.clone(),
        image: image.clone(),
        started_unix: crate::rollout::now_unix(),
        state: State::InProgress,
    };
    journal.save(&entry)?;
    let fx = Effects {
        compute: &compute,
        run: &run,
        lb: Some(&lb),
        alarms: &NoAlarms,
        groups: crate::rollout::engine::NO_GROUPS,
    };
    let outcome = Engine::new(fx, &settings, &rollout).run().await;
    entry.state = match &outcome {
        Ok(crate::rollout::engine::Outcome::Done { .. }) => State::Done,
        Ok(crate::rollout::engine::Outcome::RolledBack { .. }) => State::RolledBack,
        Err(_) => State::NeedsAttention,
    };
    journal.save(&entry)?;
    Ok(outcome?)
}
