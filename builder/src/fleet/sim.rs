//! A simulated cloud behind the fleet traits, on tokio's clock: instances boot, targets
//! turn healthy and drain on timers, and faults can be injected. It checks the rollout's
//! safety invariant on every call (healthy in-service capacity per AZ never below the
//! desired count, once the fleet is established), and can "crash" at a given call: from
//! then on nothing changes, as if the process running the rollout had died.
//!
//! Auto Scaling as EC2 models it: a group that is not held keeps its desired count of live
//! instances, replacing one that was terminated or went down, and registers what it
//! launches while it is attached; a held group (its processes suspended) keeps exactly the
//! instances it has.
//!
//! Used by the rollout simulation tests and the rollout benchmark.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Alarms, Capacity, CloudError, Command, Compute, Group, Groups, Instance, InstanceState,
    Invocation, Launch, LoadBalancer, NewGroup, RunCommand, TargetState,
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
    /// A group made is not listed for this long (eventually consistent reads).
    pub groups_listed_after: Duration,
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

#[derive(Debug, Clone)]
struct SimGroup {
    az: String,
    image: String,
    spec: String,
    rollout: String,
    retiring: Option<String>,
    capacity: Capacity,
    attached: bool,
    held: bool,
    made: Instant,
}

#[derive(Debug)]
struct World {
    nodes: BTreeMap<String, Node>,
    groups: BTreeMap<String, SimGroup>,
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
                groups: BTreeMap::new(),
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

    /// Terminates an instance behind the rollout's back (a lost host, a person): its
    /// group, if it has one, replaces it.
    pub fn kill(&self, id: &str) {
        let mut w = self.world.lock().unwrap();
        if let Some(n) = w.nodes.get_mut(id) {
            n.inst.state = InstanceState::Terminated;
        }
        w.targets.remove(id);
        // The group notices at once (EC2 takes up to a minute or so).
        reconcile(&mut w);
    }

    /// Sets a group's desired count, as a scaling policy would.
    pub fn scale(&self, group: &str, desired: usize) {
        let mut w = self.world.lock().unwrap();
        if let Some(g) = w.groups.get_mut(group) {
            g.capacity.desired = desired;
        }
        reconcile(&mut w);
    }

    /// The groups, by name: (AZ, image, desired, attached, held).
    pub fn groups(&self) -> BTreeMap<String, (String, String, usize, bool, bool)> {
        let mut w = self.world.lock().unwrap();
        reconcile(&mut w);
        w.groups
            .iter()
            .map(|(name, g)| {
                (
                    name.clone(),
                    (
                        g.az.clone(),
                        g.image.clone(),
                        g.capacity.desired,
                        g.attached,
                        g.held,
                    ),
                )
            })
            .collect()
    }

    /// Live instances, and the ids registered in the load balancer with their state.
    pub fn snapshot(&self) -> (Vec<Instance>, BTreeMap<String, TargetState>) {
        let mut w = self.world.lock().unwrap();
        reconcile(&mut w);
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
        // The groups keep working whatever happens to the rollout's process.
        reconcile(&mut w);
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

/// Auto Scaling's part, at the moment of a call: each group that is not held replaces its
/// dead instances and launches up to its desired count (none in an AZ without capacity),
/// or terminates its newest surplus; what it launches while attached is registered.
fn reconcile(w: &mut World) {
    let now = Instant::now();
    let names: Vec<String> = w.groups.keys().cloned().collect();
    for name in names {
        let g = w.groups[&name].clone();
        if g.held {
            continue;
        }
        let members: Vec<String> = w
            .nodes
            .values()
            .filter(|n| n.inst.group.as_deref() == Some(name.as_str()))
            .filter(|n| n.inst.state != InstanceState::Terminated)
            .map(|n| n.inst.id.clone())
            .collect();
        let mut live = Vec::new();
        for id in members {
            let node = w.nodes.get_mut(&id).expect("members are nodes");
            if node.inst.state == InstanceState::Down {
                node.inst.state = InstanceState::Terminated;
                w.targets.remove(&id);
            } else {
                live.push(id);
            }
        }
        while live.len() > g.capacity.desired {
            let id = live.pop().expect("more live than desired");
            if let Some(n) = w.nodes.get_mut(&id) {
                n.inst.state = InstanceState::Terminated;
            }
            w.targets.remove(&id);
        }
        if w.faults.no_capacity_az.as_deref() == Some(g.az.as_str()) {
            continue;
        }
        for _ in live.len()..g.capacity.desired {
            w.next += 1;
            w.launches += 1;
            let id = format!("i-{:04}", w.next);
            w.nodes.insert(
                id.clone(),
                Node {
                    inst: Instance {
                        id: id.clone(),
                        az: g.az.clone(),
                        image: g.image.clone(),
                        spec: g.spec.clone(),
                        state: InstanceState::Pending,
                        rollout: Some(g.rollout.clone()),
                        retiring: None,
                        address: Some(format!("{id}.sim")),
                        group: Some(name.clone()),
                    },
                    launched: now,
                },
            );
            if g.attached {
                w.targets.insert(
                    id,
                    Target {
                        registered: true,
                        since: now,
                    },
                );
            }
        }
    }
}

fn members(w: &World, group: &str) -> Vec<String> {
    w.nodes
        .values()
        .filter(|n| n.inst.group.as_deref() == Some(group))
        .filter(|n| n.inst.state != InstanceState::Terminated)
        .map(|n| n.inst.id.clone())
        .collect()
}

fn set_registered(w: &mut World, ids: &[String], registered: bool) {
    let now = Instant::now();
    for id in ids {
        match w.targets.get_mut(id) {
            Some(t) if t.registered == registered => {}
            Some(t) => {
                *t = Target {
                    registered,
                    since: now,
                }
            }
            None if registered => {
                w.targets.insert(
                    id.clone(),
                    Target {
                        registered,
                        since: now,
                    },
                );
            }
            None => {}
        }
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
                    group: None,
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
        set_registered(&mut w, ids, true);
        Ok(())
    }

    async fn deregister(&self, ids: &[String]) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        set_registered(&mut w, ids, false);
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

impl Groups for SimCloud {
    async fn groups(&self, _fleet: &str) -> Result<Vec<Group>, CloudError> {
        let w = self.enter()?;
        let now = Instant::now();
        Ok(w.groups
            .iter()
            .filter(|(_, g)| now >= g.made + w.faults.groups_listed_after)
            .map(|(name, g)| Group {
                name: name.clone(),
                az: g.az.clone(),
                image: g.image.clone(),
                spec: g.spec.clone(),
                rollout: Some(g.rollout.clone()),
                retiring: g.retiring.clone(),
                capacity: g.capacity,
                attached: g.attached,
                foreign_targets: Vec::new(),
                held: g.held,
                instances: members(&w, name),
            })
            .collect())
    }

    async fn create(&self, new: &NewGroup) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        // As CreateAutoScalingGroup does, this only makes the group: it launches on its
        // own, at the next moment the world is looked at.
        w.groups
            .entry(new.name.clone())
            .or_insert_with(|| SimGroup {
                az: new.placement.az.clone(),
                image: new.image.clone(),
                spec: new.spec.clone(),
                rollout: new.rollout.clone(),
                retiring: None,
                capacity: new.capacity,
                attached: false,
                held: false,
                made: Instant::now(),
            });
        Ok(())
    }

    async fn attach(&self, name: &str) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let g = w
            .groups
            .get_mut(name)
            .ok_or_else(|| CloudError::NotFound(format!("no group {name}")))?;
        g.attached = true;
        let ids = members(&w, name);
        set_registered(&mut w, &ids, true);
        Ok(())
    }

    async fn detach(&self, name: &str) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let g = w
            .groups
            .get_mut(name)
            .ok_or_else(|| CloudError::NotFound(format!("no group {name}")))?;
        g.attached = false;
        let ids = members(&w, name);
        set_registered(&mut w, &ids, false);
        Ok(())
    }

    async fn hold(&self, name: &str, retiring: Option<&str>) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let g = w
            .groups
            .get_mut(name)
            .ok_or_else(|| CloudError::NotFound(format!("no group {name}")))?;
        g.held = retiring.is_some();
        g.retiring = retiring.map(str::to_owned);
        Ok(())
    }

    async fn resize(
        &self,
        name: &str,
        capacity: Capacity,
        _target: Option<f64>,
    ) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        let g = w
            .groups
            .get_mut(name)
            .ok_or_else(|| CloudError::NotFound(format!("no group {name}")))?;
        g.capacity = capacity;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), CloudError> {
        let mut w = self.enter()?;
        if w.faults.fail_terminate {
            return Err(CloudError::Denied {
                action: "autoscaling:DeleteAutoScalingGroup",
                message: "not authorized".into(),
            });
        }
        if w.groups.remove(name).is_some() {
            for id in members(&w, name) {
                if let Some(n) = w.nodes.get_mut(&id) {
                    n.inst.state = InstanceState::Terminated;
                }
                w.targets.remove(&id);
            }
        }
        Ok(())
    }
}
