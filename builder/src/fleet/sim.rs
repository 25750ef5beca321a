//! A simulated cloud behind the fleet traits, on tokio's clock: instances boot, targets
//! turn healthy and drain on timers, and faults can be injected. It checks the rollout's
//! safety invariant on every call (healthy in-service capacity per AZ never below the
//! desired count, once the fleet is established), and can "crash" at a given call: from
//! then on nothing changes, as if the process running the rollout had died.
//!
//! Used by the rollout simulation tests and the rollout benchmark.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Alarms, CloudError, Command, Compute, Instance, InstanceState, Invocation, Launch,
    LoadBalancer, RunCommand, TargetState,
};

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Instances of this image never pass the health command.
    pub bad_image: Option<String>,
    /// AMIs whose snapshot leaves zero blocks out (published with `--omit-zero-blocks`).
    /// Every root volume here is encrypted, as EC2Compute launches them, so those blocks
    /// read back as random bytes: the instances boot into a corrupted file system and never
    /// pass the health command.
    pub sparse_images: Vec<String>,
    /// Run Command cannot reach a new instance for this long after it is running.
    pub unreachable_for: Duration,
    /// This fraction of Run Command calls fail as throttled.
    pub throttle: f64,
    /// Launches in this AZ fail for lack of capacity.
    pub no_capacity_az: Option<String>,
    /// Alarms fire from this call on.
    pub alarm_from_call: Option<u64>,
    /// Freeze the world at this call (a crash of the rollout's process).
    pub crash_at_call: Option<u64>,
    /// TerminateInstances fails (so a rollback cannot finish).
    pub fail_terminate: bool,
}

#[derive(Debug, Clone)]
struct Node {
    inst: Instance,
    launched: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Target {
    registered: bool,
    since: Instant,
}

#[derive(Debug)]
struct World {
    nodes: BTreeMap<String, Node>,
    tokens: BTreeMap<String, String>,
    targets: BTreeMap<String, Target>,
    next: u64,
    calls: u64,
    launches: u64,
    rng: fastrand::Rng,
    faults: Faults,
    crashed: bool,
    /// When set, the capacity invariant is checked: (desired per AZ, AZs).
    established: Option<(usize, Vec<String>)>,
    violations: Vec<String>,
}

/// Timings of the simulated cloud.
pub const BOOT: Duration = Duration::from_secs(20);
pub const TARGET_HEALTHY_AFTER: Duration = Duration::from_secs(15);
pub const DRAIN: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct SimCloud {
    world: Arc<Mutex<World>>,
}

impl SimCloud {
    pub fn new(seed: u64, faults: Faults) -> Self {
        SimCloud {
            world: Arc::new(Mutex::new(World {
                nodes: BTreeMap::new(),
                tokens: BTreeMap::new(),
                targets: BTreeMap::new(),
                next: 0,
                calls: 0,
                launches: 0,
                rng: fastrand::Rng::with_seed(seed),
                faults,
                crashed: false,
                established: None,
                violations: Vec::new(),
            })),
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut w = self.world.lock().unwrap();
        w.faults = faults;
        w.crashed = false;
    }

    /// From now on, healthy capacity in each of `azs` must stay at `per_az` or more.
    pub fn establish(&self, per_az: usize, azs: Vec<String>) {
        self.world.lock().unwrap().established = Some((per_az, azs));
    }

    pub fn crashed(&self) -> bool {
        self.world.lock().unwrap().crashed
    }

    pub fn violations(&self) -> Vec<String> {
        self.world.lock().unwrap().violations.clone()
    }

    /// API calls so far.
    pub fn calls(&self) -> u64 {
        self.world.lock().unwrap().calls
    }

    /// Instances ever launched.
    pub fn launches(&self) -> u64 {
        self.world.lock().unwrap().launches
    }

    /// Live instances, and the ids registered in the load balancer with their state.
    pub fn snapshot(&self) -> (Vec<Instance>, BTreeMap<String, TargetState>) {
        let w = self.world.lock().unwrap();
        let now = Instant::now();
        let live = w
            .nodes
            .values()
            .filter(|n| n.inst.state != InstanceState::Terminated)
            .map(|n| view(n, now))
            .collect();
        let targets = w
            .targets
            .keys()
            .map(|id| (id.clone(), target_state(&w, id, now)))
            .filter(|(_, s)| *s != TargetState::Unused)
            .collect();
        (live, targets)
    }

    /// Counts a call; Err once crashed (and at the crash call itself, after which nothing
    /// changes), checking the invariant first.
    fn enter(&self) -> Result<std::sync::MutexGuard<'_, World>, CloudError> {
        let mut w = self.world.lock().unwrap();
        check_capacity(&mut w);
        if w.crashed {
            return Err(CloudError::Other("crashed".into()));
        }
        w.calls += 1;
        if w.faults.crash_at_call == Some(w.calls) {
            w.crashed = true;
            return Err(CloudError::Other("crashed".into()));
        }
        Ok(w)
    }
}

fn view(n: &Node, now: Instant) -> Instance {
    let mut i = n.inst.clone();
    if i.state == InstanceState::Pending && now >= n.launched + BOOT {
        i.state = InstanceState::Running;
    }
    i
}

fn healthy_image(w: &World, image: &str) -> bool {
    w.faults.bad_image.as_deref() != Some(image)
        && !w.faults.sparse_images.iter().any(|s| s == image)
}

fn target_state(w: &World, id: &str, now: Instant) -> TargetState {
    let Some(t) = w.targets.get(id) else {
        return TargetState::Unused;
    };
    let Some(node) = w.nodes.get(id) else {
        return TargetState::Unused;
    };
    let inst = view(node, now);
    if !t.registered {
        return if now >= t.since + DRAIN {
            TargetState::Unused
        } else {
            TargetState::Draining
        };
    }
    if inst.state != InstanceState::Running {
        return TargetState::Unhealthy;
    }
    let ready_at = t.since.max(node.launched + BOOT) + TARGET_HEALTHY_AFTER;
    match (healthy_image(w, &inst.image), now >= ready_at) {
        (true, true) => TargetState::Healthy,
        (true, false) => TargetState::Initial,
        (false, _) => TargetState::Unhealthy,
    }
}

fn check_capacity(w: &mut World) {
    let Some((per_az, azs)) = w.established.clone() else {
        return;
    };
    let now = Instant::now();
    for az in azs {
        let healthy = w
            .targets
            .keys()
            .filter(|id| w.nodes.get(*id).is_some_and(|n| n.inst.az == az))
            .filter(|id| target_state(w, id, now) == TargetState::Healthy)
            .count();
        if healthy < per_az {
            let v = format!(
                "call {}: {az} has {healthy} healthy targets, wants {per_az}",
                w.calls
            );
            if !w.violations.contains(&v) {
                w.violations.push(v);
            }
        }
    }
}

impl Compute for SimCloud {
    async fn instances(&self, fleet: &str) -> Result<Vec<Instance>, CloudError> {
        let w = self.enter()?;
        let now = Instant::now();
        let _ = fleet;
        Ok(w.nodes
            .values()
            .filter(|n| n.inst.state != InstanceState::Terminated)
            .map(|n| view(n, now))
            .collect())
    }

    async fn launch(&self, l: &Launch) -> Result<String, CloudError> {
        let mut w = self.enter()?;
        if let Some(id) = w.tokens.get(&l.token) {
            return Ok(id.clone());
        }
        if w.faults.no_capacity_az.as_deref() == Some(l.placement.az.as_str()) {
            return Err(CloudError::NoCapacity {
                az: l.placement.az.clone(),
                message: "InsufficientInstanceCapacity".into(),
            });
        }
        w.next += 1;
        w.launches += 1;
        let id = format!("i-{:04}", w.next);
        w.tokens.insert(l.token.clone(), id.clone());
        w.nodes.insert(
            id.clone(),
            Node {
                inst: Instance {
                    id: id.clone(),
                    az: l.placement.az.clone(),
                    image: l.image.clone(),
                    spec: l.spec.clone(),
                    state: InstanceState::Pending,
                    rollout: Some(l.rollout.clone()),
                    retiring: None,
                    address: Some(format!("{id}.sim")),
                },
                launched: Instant::now(),
            },
        );
        Ok(id)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        if w.faults.fail_terminate {
            return Err(CloudError::Denied {
                action: "ec2:TerminateInstances",
                message: "not authorized".into(),
            });
        }
        for id in ids {
            if let Some(n) = w.nodes.get_mut(id) {
                n.inst.state = InstanceState::Terminated;
            }
            w.targets.remove(id);
        }
        Ok(())
    }

    async fn set_retiring(&self, ids: &[String], rollout: Option<&str>) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        for id in ids {
            if let Some(n) = w.nodes.get_mut(id) {
                n.inst.retiring = rollout.map(str::to_owned);
            }
        }
        Ok(())
    }
}

impl RunCommand for SimCloud {
    async fn run(
        &self,
        ids: &[String],
        _command: &Command,
        _timeout: Duration,
    ) -> Result<BTreeMap<String, Invocation>, CloudError> {
        let mut w = self.enter()?;
        let throttle = w.faults.throttle;
        if throttle > 0.0 && w.rng.f64() < throttle {
            return Err(CloudError::Other(
                "ThrottlingException: Rate exceeded".into(),
            ));
        }
        let now = Instant::now();
        Ok(ids
            .iter()
            .filter_map(|id| w.nodes.get(id).map(|n| (id, n)))
            .map(|(id, n)| {
                let inst = view(n, now);
                let reachable_at = n.launched + BOOT + w.faults.unreachable_for;
                let inv = if inst.state != InstanceState::Running || now < reachable_at {
                    Invocation::Unreachable {
                        reason: "Undeliverable".into(),
                    }
                } else if healthy_image(&w, &inst.image) {
                    Invocation::Exited {
                        code: 0,
                        stdout: "healthy".into(),
                        stderr: String::new(),
                    }
                } else {
                    Invocation::Exited {
                        code: 2,
                        stdout: "unhealthy: /version.txt: status 500".into(),
                        stderr: String::new(),
                    }
                };
                (id.clone(), inv)
            })
            .collect())
    }
}

impl LoadBalancer for SimCloud {
    async fn register(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let now = Instant::now();
        for id in ids {
            let already = w.targets.get(id).is_some_and(|t| t.registered);
            if !already {
                w.targets.insert(
                    id.clone(),
                    Target {
                        registered: true,
                        since: now,
                    },
                );
            }
        }
        Ok(())
    }

    async fn deregister(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let now = Instant::now();
        for id in ids {
            if let Some(t) = w.targets.get_mut(id) {
                if t.registered {
                    *t = Target {
                        registered: false,
                        since: now,
                    };
                }
            }
        }
        Ok(())
    }

    async fn states(&self, ids: &[String]) -> Result<BTreeMap<String, TargetState>, CloudError> {
        let w = self.enter()?;
        let now = Instant::now();
        Ok(ids
            .iter()
            .map(|id| (id.clone(), target_state(&w, id, now)))
            .collect())
    }

    async fn url(&self) -> Result<Option<String>, CloudError> {
        Ok(Some("http://sim-lb.example".into()))
    }
}

impl Alarms for SimCloud {
    async fn firing(&self, names: &[String]) -> Result<Vec<String>, CloudError> {
        let w = self.enter()?;
        Ok(match w.faults.alarm_from_call {
            Some(at) if w.calls >= at => names.to_vec(),
            _ => Vec::new(),
        })
    }
}
