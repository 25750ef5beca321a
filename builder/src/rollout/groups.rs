//! The rollout where releases are groups (EC2 Auto Scaling): each release is one group per
//! AZ that keeps its own capacity between rollouts. A wave makes (or resumes) the new
//! release's group in an AZ without traffic, gates its instances through Run Command, and
//! only then attaches it to the target group; the old group is held (its replacing and
//! scaling suspended, so it keeps exactly the instances it has) and detached, and deleted
//! only when the whole rollout has passed its bake. A rollback attaches the old groups again,
//! the very same instances, and deletes the new ones.
//!
//! Instances made before releases were groups (plain tagged instances) are the old release
//! of the first rollout: taken out of service the same way, put back by a rollback,
//! terminated at the commit.

use std::collections::BTreeMap;

use tracing::info;

use super::engine::{futures_first_error, Engine, Outcome, RolloutError, StepResult};
use super::plan::Desired;
use crate::fleet::{
    Alarms, Capacity, CloudError, Compute, Group, Groups, Instance, InstanceState, LoadBalancer,
    NewGroup, RunCommand, TargetState,
};

/// One AZ's step: make (or resume) the new release's group, gate it, attach it, then take
/// the old release out of service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStep {
    pub az: String,
    /// The new release's group.
    pub group: String,
    /// It does not exist yet.
    pub create: bool,
    pub capacity: Capacity,
    /// The old release's groups here.
    pub retire_groups: Vec<String>,
    /// The old release's plain instances here (made before releases were groups).
    pub retire_instances: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupPlan {
    /// Waves of steps; the steps of one wave run side by side.
    pub waves: Vec<Vec<GroupStep>>,
    /// Groups in service whose size bounds change, and nothing else.
    pub resize: Vec<(String, Capacity)>,
    /// Groups and plain instances outside every desired AZ: retired at the commit.
    pub stray_groups: Vec<String>,
    pub stray_instances: Vec<String>,
    /// Taken out of service by a rollout that did not commit: deleted at the commit.
    pub retiring_groups: Vec<String>,
    pub retiring_instances: Vec<String>,
}

impl GroupPlan {
    pub fn is_noop(&self) -> bool {
        self.waves.is_empty()
            && self.resize.is_empty()
            && self.stray_groups.is_empty()
            && self.stray_instances.is_empty()
            && self.retiring_groups.is_empty()
            && self.retiring_instances.is_empty()
    }

    fn steps(&self) -> impl Iterator<Item = &GroupStep> {
        self.waves.iter().flatten()
    }
}

/// The name of `rollout`'s group in `az`: `{prefix}{fleet}-{az}-{rollout}`, which the IAM
/// policy's resource patterns match by prefix; a fleet named with the prefix already (as
/// `up` names it) does not get it twice.
pub fn group_name(prefix: &str, fleet: &str, az: &str, rollout: &str) -> String {
    let named = if fleet.starts_with(prefix) {
        fleet.to_owned()
    } else {
        format!("{prefix}{fleet}")
    };
    format!("{named}-{az}-{rollout}")
}

/// The group size a new release starts at: what the old release has now (so a rollout
/// never shrinks a fleet that scaled out), within the bounds; the minimum for a new fleet.
pub fn starting_capacity(old: usize, (min, max): (usize, usize)) -> Capacity {
    let desired = if old == 0 { min } else { old.clamp(min, max) };
    Capacity { min, max, desired }
}

/// Plain instances that count as the old release: not in a group, not retired.
fn plain(i: &Instance) -> bool {
    i.group.is_none() && i.retiring.is_none() && i.state != InstanceState::Terminated
}

/// The plan (pure), from the fleet's groups and instances. Refuses, before anything
/// changes, a fleet whose groups were edited into a shape amictl does not make.
/// `load_balanced`: the fleet has a target group, so a group in service is an attached one.
pub fn plan_groups(
    groups: &[Group],
    instances: &[Instance],
    desired: &Desired,
    bounds: (usize, usize),
    load_balanced: bool,
    names: impl Fn(&str) -> String,
) -> Result<GroupPlan, CloudError> {
    if let Some(g) = groups.iter().find(|g| !g.foreign_targets.is_empty()) {
        return Err(CloudError::Other(format!(
            "group {} is attached to target groups amictl did not attach ({}): a rollout would leave them serving a release it retired. Detach them (aws autoscaling detach-traffic-sources --auto-scaling-group-name {} ...) and run again",
            g.name,
            g.foreign_targets.join(", "),
            g.name
        )));
    }
    let azs: Vec<&str> = desired.placements.iter().map(|p| p.az.as_str()).collect();
    let mut plan = GroupPlan {
        retiring_groups: groups
            .iter()
            .filter(|g| g.retiring.is_some())
            .map(|g| g.name.clone())
            .collect(),
        retiring_instances: instances
            .iter()
            .filter(|i| {
                i.group.is_none() && i.retiring.is_some() && i.state != InstanceState::Terminated
            })
            .map(|i| i.id.clone())
            .collect(),
        stray_groups: groups
            .iter()
            .filter(|g| g.retiring.is_none() && !azs.contains(&g.az.as_str()))
            .map(|g| g.name.clone())
            .collect(),
        stray_instances: instances
            .iter()
            .filter(|i| plain(i) && !azs.contains(&i.az.as_str()))
            .map(|i| i.id.clone())
            .collect(),
        ..GroupPlan::default()
    };
    let (min, max) = bounds;
    let mut per_az = Vec::new();
    for placement in &desired.placements {
        let az = placement.az.as_str();
        let spec = desired.spec(az);
        let live: Vec<&Group> = groups
            .iter()
            .filter(|g| g.az == az && g.retiring.is_none())
            .collect();
        // The release's group here, if one is made: this rollout's first (a resume).
        let mut matching: Vec<&Group> = live
            .iter()
            .copied()
            .filter(|g| g.image == desired.image && g.spec == spec)
            .collect();
        matching.sort_by_key(|g| (g.name != names(az), g.name.clone()));
        let target = matching.first().copied();
        let retire_groups: Vec<String> = live
            .iter()
            .filter(|g| Some(g.name.as_str()) != target.map(|t| t.name.as_str()))
            .map(|g| g.name.clone())
            .collect();
        let mut retire_instances: Vec<String> = instances
            .iter()
            .filter(|i| i.az == az && plain(i))
            .map(|i| i.id.clone())
            .collect();
        retire_instances.sort();
        let step = match target {
            Some(t)
                if retire_groups.is_empty()
                    && retire_instances.is_empty()
                    && (t.attached || !load_balanced) =>
            {
                if (t.capacity.min, t.capacity.max) != (min, max) {
                    let desired = t.capacity.desired.clamp(min, max);
                    plan.resize
                        .push((t.name.clone(), Capacity { min, max, desired }));
                }
                None
            }
            Some(t) => Some(GroupStep {
                az: az.to_owned(),
                group: t.name.clone(),
                create: false,
                capacity: t.capacity,
                retire_groups,
                retire_instances,
            }),
            None => {
                let old: usize = live.iter().map(|g| g.capacity.desired).sum::<usize>()
                    + instances
                        .iter()
                        .filter(|i| {
                            i.az == az
                                && plain(i)
                                && matches!(
                                    i.state,
                                    InstanceState::Pending | InstanceState::Running
                                )
                        })
                        .count();
                Some(GroupStep {
                    az: az.to_owned(),
                    group: names(az),
                    create: true,
                    capacity: starting_capacity(old, bounds),
                    retire_groups,
                    retire_instances,
                })
            }
        };
        per_az.extend(step);
    }
    plan.waves = if desired.parallel_azs {
        if per_az.is_empty() {
            Vec::new()
        } else {
            vec![per_az]
        }
    } else {
        per_az.into_iter().map(|s| vec![s]).collect()
    };
    Ok(plan)
}

impl<C: Compute, R: RunCommand, L: LoadBalancer, A: Alarms, G: Groups> Engine<'_, C, R, L, A, G> {
    fn name_in(&self, az: &str) -> String {
        group_name(&self.s.prefix, &self.s.fleet, az, &self.rollout)
    }

    pub(super) async fn group_plan(&self, groups: &G) -> Result<GroupPlan, CloudError> {
        let found = groups.groups(&self.s.fleet).await?;
        let instances = self.instances().await?;
        plan_groups(
            &found,
            &instances,
            &self.s.desired,
            self.s.bounds(),
            self.fx.lb.is_some(),
            |az| self.name_in(az),
        )
    }

    pub(super) async fn run_groups(&self, groups: &G) -> Result<Outcome, RolloutError> {
        let plan = self
            .group_plan(groups)
            .await
            .map_err(RolloutError::Before)?;
        if plan.is_noop() {
            info!(fleet = %self.s.fleet, "fleet already on the desired image and settings");
            return Ok(Outcome::Done {
                launched: 0,
                retired: 0,
                unchanged: true,
            });
        }
        let target = self.s.scaling.and_then(|s| s.target_requests_per_instance);
        for (name, capacity) in &plan.resize {
            groups
                .resize(name, *capacity, target)
                .await
                .map_err(RolloutError::Before)?;
            info!(group = %name, min = capacity.min, max = capacity.max, "group resized");
        }
        info!(rollout = %self.rollout, waves = plan.waves.len(), "rollout plan (groups)");
        for (n, wave) in plan.waves.iter().enumerate() {
            info!(wave = n + 1, azs = ?wave.iter().map(|s| &s.az).collect::<Vec<_>>(), "wave");
            let runs = wave.iter().map(|step| async move {
                self.group_step(groups, step).await?;
                self.check_alarms().await
            });
            if let Some(reason) = futures_first_error(runs).await {
                return self.rollback(&reason).await;
            }
        }
        // Bake whenever something is left to commit, a resumed rollout's held groups too:
        // an interrupted bake starts again rather than being skipped.
        let resize_only = plan.waves.is_empty()
            && plan.retiring_groups.is_empty()
            && plan.retiring_instances.is_empty()
            && plan.stray_groups.is_empty()
            && plan.stray_instances.is_empty();
        if !resize_only {
            if let Err(reason) = self.bake().await {
                return self.rollback(&reason).await;
            }
        }
        let retired = self
            .commit_groups(groups, &plan)
            .await
            .map_err(RolloutError::commit_failed)?;
        Ok(Outcome::Done {
            launched: plan
                .steps()
                .filter(|s| s.create)
                .map(|s| s.capacity.desired)
                .sum(),
            retired,
            unchanged: false,
        })
    }

    async fn group_step(&self, groups: &G, step: &GroupStep) -> StepResult {
        let az = step.az.as_str();
        if step.create {
            let placement = self
                .s
                .desired
                .placements
                .iter()
                .find(|p| p.az == az)
                .expect("the plan only names desired AZs");
            let new = NewGroup {
                name: step.group.clone(),
                fleet: self.s.fleet.clone(),
                placement: placement.clone(),
                image: self.s.desired.image.clone(),
                spec: self.s.desired.spec(az).to_owned(),
                rollout: self.rollout.clone(),
                capacity: step.capacity,
            };
            groups
                .create(&new)
                .await
                .map_err(|e| format!("making group {} in {az}: {e}", step.group))?;
            info!(group = %step.group, %az, desired = step.capacity.desired, "group made");
        }
        let ids = self.wait_group(groups, &step.group).await?;
        self.health_gate(&ids).await?;
        if let Some(lb) = self.fx.lb {
            groups
                .attach(&step.group)
                .await
                .map_err(|e| format!("attaching group {}: {e}", step.group))?;
            self.wait_targets(lb, &ids, TargetState::Healthy).await?;
        }
        info!(group = %step.group, %az, "group in service");
        let mut draining = Vec::new();
        if !step.retire_groups.is_empty() {
            let found = groups
                .groups(&self.s.fleet)
                .await
                .map_err(|e| e.to_string())?;
            for g in found
                .iter()
                .filter(|g| step.retire_groups.contains(&g.name))
            {
                // Held and tagged before it is detached: whatever happens after, a
                // rollback finds it, with the same instances.
                groups
                    .hold(&g.name, Some(&self.rollout))
                    .await
                    .map_err(|e| format!("holding group {}: {e}", g.name))?;
                if self.fx.lb.is_some() && g.attached {
                    groups
                        .detach(&g.name)
                        .await
                        .map_err(|e| format!("detaching group {}: {e}", g.name))?;
                }
                draining.extend(g.instances.iter().cloned());
            }
        }
        if !step.retire_instances.is_empty() {
            self.take_out_of_service(&step.retire_instances).await?;
            draining.extend(step.retire_instances.iter().cloned());
        }
        if let (Some(lb), false) = (self.fx.lb, draining.is_empty()) {
            self.wait_targets(lb, &draining, TargetState::Unused)
                .await?;
        }
        if !draining.is_empty() {
            info!(groups = ?step.retire_groups, instances = ?step.retire_instances, %az, "old release out of service");
        }
        Ok(())
    }

    /// Waits until the group has its desired count of running instances, and returns
    /// them. The group replaces an instance that dies meanwhile, and a group just made
    /// may not be listed yet (Auto Scaling's reads are eventually consistent): the wait
    /// goes on until the step's deadline.
    async fn wait_group(&self, groups: &G, name: &str) -> Result<Vec<String>, String> {
        let deadline = tokio::time::Instant::now() + self.s.step_timeout;
        loop {
            let found = groups
                .groups(&self.s.fleet)
                .await
                .map_err(|e| e.to_string())?;
            let Some(group) = found.iter().find(|g| g.name == name) else {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "group {name} is not listed {} s after it was made",
                        self.s.step_timeout.as_secs()
                    ));
                }
                tokio::time::sleep(self.s.poll).await;
                continue;
            };
            let members: Vec<Instance> = self
                .instances()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|i| {
                    i.group.as_deref() == Some(name)
                        && matches!(i.state, InstanceState::Pending | InstanceState::Running)
                })
                .collect();
            let running = members
                .iter()
                .filter(|i| i.state == InstanceState::Running)
                .count();
            if running == members.len() && running >= group.capacity.desired && running > 0 {
                let mut ids: Vec<String> = members.into_iter().map(|i| i.id).collect();
                ids.sort();
                return Ok(ids);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "group {name} has {running} of {} instances running after {} s",
                    group.capacity.desired,
                    self.s.step_timeout.as_secs()
                ));
            }
            tokio::time::sleep(self.s.poll).await;
        }
    }

    /// Deletes what the rollout took out of service and the strays; returns how many
    /// groups and plain instances went.
    async fn commit_groups(&self, groups: &G, plan: &GroupPlan) -> Result<usize, String> {
        let found = groups
            .groups(&self.s.fleet)
            .await
            .map_err(|e| e.to_string())?;
        let all = self.instances().await.map_err(|e| e.to_string())?;
        // Strays still serve: held, tagged and detached first, like an old release.
        let mut draining = Vec::new();
        for g in found
            .iter()
            .filter(|g| g.retiring.is_none() && plan.stray_groups.contains(&g.name))
        {
            groups
                .hold(&g.name, Some(&self.rollout))
                .await
                .map_err(|e| e.to_string())?;
            if self.fx.lb.is_some() && g.attached {
                groups.detach(&g.name).await.map_err(|e| e.to_string())?;
            }
            draining.extend(g.instances.iter().cloned());
        }
        let mut doomed: Vec<String> = all
            .iter()
            .filter(|i| {
                i.group.is_none() && i.retiring.is_some() && i.state != InstanceState::Terminated
            })
            .map(|i| i.id.clone())
            .collect();
        doomed.extend(plan.stray_instances.iter().cloned());
        doomed.sort();
        doomed.dedup();
        if let (Some(lb), false) = (self.fx.lb, doomed.is_empty()) {
            lb.deregister(&doomed).await.map_err(|e| e.to_string())?;
        }
        draining.extend(doomed.iter().cloned());
        if let (Some(lb), false) = (self.fx.lb, draining.is_empty()) {
            self.wait_targets(lb, &draining, TargetState::Unused)
                .await?;
        }
        let mut gone = 0;
        if !doomed.is_empty() {
            self.fx
                .compute
                .terminate(&doomed)
                .await
                .map_err(|e| e.to_string())?;
            info!(ids = ?doomed, "terminated the old instances");
            gone += doomed.len();
        }
        for g in found
            .iter()
            .filter(|g| g.retiring.is_some() || plan.stray_groups.contains(&g.name))
        {
            groups.delete(&g.name).await.map_err(|e| e.to_string())?;
            info!(group = %g.name, "deleted the old group");
            gone += 1;
        }
        Ok(gone)
    }

    /// Puts the old release back (its groups attached again and released, its plain
    /// instances registered again), then takes this rollout's groups out and deletes them.
    pub(super) async fn rollback_groups(&self, groups: &G) -> Result<(), String> {
        let found = groups
            .groups(&self.s.fleet)
            .await
            .map_err(|e| e.to_string())?;
        let all = self.instances().await.map_err(|e| e.to_string())?;
        let old_groups: Vec<&Group> = found
            .iter()
            .filter(|g| g.retiring.as_deref() == Some(&self.rollout))
            .collect();
        let old_plain: Vec<String> = all
            .iter()
            .filter(|i| {
                i.group.is_none()
                    && i.retiring.as_deref() == Some(&self.rollout)
                    && i.state != InstanceState::Terminated
            })
            .map(|i| i.id.clone())
            .collect();
        let mut back: Vec<String> = old_plain.clone();
        for g in &old_groups {
            if self.fx.lb.is_some() && !g.attached {
                groups
                    .attach(&g.name)
                    .await
                    .map_err(|e| format!("attaching old group {} again: {e}", g.name))?;
            }
            back.extend(g.instances.iter().cloned());
        }
        if let Some(lb) = self.fx.lb {
            if !old_plain.is_empty() {
                lb.register(&old_plain)
                    .await
                    .map_err(|e| format!("re-registering old instances: {e}"))?;
            }
            if !back.is_empty() {
                self.wait_targets(lb, &back, TargetState::Healthy).await?;
            }
        }
        for g in &old_groups {
            groups
                .hold(&g.name, None)
                .await
                .map_err(|e| format!("returning old group {} to service: {e}", g.name))?;
        }
        if !old_plain.is_empty() {
            self.fx
                .compute
                .set_retiring(&old_plain, None)
                .await
                .map_err(|e| format!("returning old instances to service: {e}"))?;
        }
        let new: Vec<&Group> = found
            .iter()
            .filter(|g| g.rollout.as_deref() == Some(&self.rollout) && g.retiring.is_none())
            .collect();
        let mut leaving = Vec::new();
        for g in &new {
            if self.fx.lb.is_some() && g.attached {
                groups
                    .detach(&g.name)
                    .await
                    .map_err(|e| format!("detaching new group {}: {e}", g.name))?;
            }
            leaving.extend(g.instances.iter().cloned());
        }
        if let (Some(lb), false) = (self.fx.lb, leaving.is_empty()) {
            self.wait_targets(lb, &leaving, TargetState::Unused).await?;
        }
        for g in &new {
            groups
                .delete(&g.name)
                .await
                .map_err(|e| format!("deleting new group {}: {e}", g.name))?;
        }
        Ok(())
    }

    /// "web-az-a-r-1 (az-a, ami-1, 2 of 1..4, attached, in service); …".
    pub(super) async fn describe_groups(&self, groups: &G) -> String {
        match groups.groups(&self.s.fleet).await {
            Err(e) => format!("groups unknown (cannot list them: {e})"),
            Ok(found) if found.is_empty() => String::new(),
            Ok(found) => {
                let mut by_name: BTreeMap<&str, String> = BTreeMap::new();
                for g in &found {
                    let role = match (&g.retiring, &g.rollout) {
                        (Some(r), _) => format!("held out of service by {r}"),
                        (None, Some(r)) if r == &self.rollout => "made by this rollout".into(),
                        _ => "in service".into(),
                    };
                    let attached = if g.attached { "attached" } else { "detached" };
                    by_name.insert(
                        &g.name,
                        format!(
                            "group {} ({}, {}, {} of {}..{}, {attached}, {role})",
                            g.name,
                            g.az,
                            g.image,
                            g.instances.len(),
                            g.capacity.min,
                            g.capacity.max
                        ),
                    );
                }
                by_name.into_values().collect::<Vec<_>>().join("; ")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Placement;

    fn desired() -> Desired {
        Desired {
            image: "new".into(),
            placements: ["a", "b"]
                .map(|az| Placement {
                    az: az.into(),
                    subnet: format!("s{az}"),
                })
                .to_vec(),
            specs: [
                ("a".to_owned(), "s".to_owned()),
                ("b".to_owned(), "s".to_owned()),
            ]
            .into(),
            per_az: 2,
            max_surge: 1,
            parallel_azs: false,
        }
    }

    fn group(name: &str, az: &str, image: &str, desired: usize) -> Group {
        Group {
            name: name.into(),
            az: az.into(),
            image: image.into(),
            spec: "s".into(),
            rollout: Some("r-old".into()),
            retiring: None,
            capacity: Capacity {
                min: 2,
                max: 2,
                desired,
            },
            attached: true,
            foreign_targets: Vec::new(),
            held: false,
            instances: Vec::new(),
        }
    }

    fn inst(id: &str, az: &str) -> Instance {
        Instance {
            id: id.into(),
            az: az.into(),
            image: "old".into(),
            spec: "s".into(),
            state: InstanceState::Running,
            rollout: None,
            retiring: None,
            address: None,
            group: None,
        }
    }

    fn names(az: &str) -> String {
        group_name("p-", "web", az, "r-1")
    }

    #[test]
    fn group_names_carry_the_prefix_once() {
        assert_eq!(group_name("p-", "web", "a", "r-1"), "p-web-a-r-1");
        assert_eq!(group_name("p-", "p-web", "a", "r-1"), "p-web-a-r-1");
    }

    #[test]
    fn a_new_release_is_a_group_per_az_at_the_old_size_within_bounds() {
        let groups = vec![group("old-a", "a", "old", 5), group("old-b", "b", "old", 2)];
        let p = plan_groups(&groups, &[], &desired(), (2, 4), true, names).unwrap();
        assert_eq!(p.waves.len(), 2);
        let a = &p.waves[0][0];
        assert_eq!(a.group, "p-web-a-r-1");
        assert!(a.create);
        // Scaled out to 5 with a new maximum of 4: the maximum.
        assert_eq!(
            a.capacity,
            Capacity {
                min: 2,
                max: 4,
                desired: 4
            }
        );
        assert_eq!(a.retire_groups, vec!["old-a".to_owned()]);
        assert_eq!(p.waves[1][0].capacity.desired, 2);
        // A new fleet starts at the minimum.
        let p = plan_groups(&[], &[], &desired(), (3, 6), true, names).unwrap();
        assert_eq!(p.waves[0][0].capacity.desired, 3);
    }

    #[test]
    fn plain_instances_are_the_old_release_and_count_for_the_size() {
        let cur = vec![
            inst("i-1", "a"),
            inst("i-2", "a"),
            inst("i-3", "a"),
            inst("i-4", "b"),
        ];
        let p = plan_groups(&[], &cur, &desired(), (1, 8), true, names).unwrap();
        assert_eq!(
            p.waves[0][0].retire_instances,
            vec!["i-1".to_owned(), "i-2".into(), "i-3".into()]
        );
        assert_eq!(p.waves[0][0].capacity.desired, 3);
        assert_eq!(p.waves[1][0].capacity.desired, 1);
    }

    #[test]
    fn a_fleet_in_service_on_the_release_is_a_noop_or_a_resize() {
        let mut groups = vec![group("g-a", "a", "new", 2), group("g-b", "b", "new", 2)];
        // Without a load balancer nothing is ever attached: in service all the same.
        groups[0].attached = false;
        assert!(plan_groups(&groups, &[], &desired(), (2, 2), false, names)
            .unwrap()
            .is_noop());
        assert_eq!(
            plan_groups(&groups, &[], &desired(), (2, 2), true, names)
                .unwrap()
                .waves
                .len(),
            1,
            "with one, a detached group is gated and attached"
        );
        groups[0].attached = true;
        assert!(plan_groups(&groups, &[], &desired(), (2, 2), true, names)
            .unwrap()
            .is_noop());
        let p = plan_groups(&groups, &[], &desired(), (1, 3), true, names).unwrap();
        assert!(p.waves.is_empty());
        assert_eq!(
            p.resize,
            vec![
                (
                    "g-a".to_owned(),
                    Capacity {
                        min: 1,
                        max: 3,
                        desired: 2
                    }
                ),
                (
                    "g-b".to_owned(),
                    Capacity {
                        min: 1,
                        max: 3,
                        desired: 2
                    }
                )
            ]
        );
    }

    #[test]
    fn a_resumed_rollout_continues_with_its_own_group() {
        let mut mine = group("p-web-a-r-1", "a", "new", 2);
        mine.attached = false;
        let mut held = group("old-a", "a", "old", 2);
        held.retiring = Some("r-1".into());
        let groups = vec![mine, held, group("old-b", "b", "old", 2)];
        let p = plan_groups(&groups, &[], &desired(), (2, 2), true, names).unwrap();
        let a = &p.waves[0][0];
        assert!(!a.create);
        assert!(a.retire_groups.is_empty());
        assert_eq!(p.retiring_groups, vec!["old-a".to_owned()]);
        assert_eq!(p.waves[1][0].retire_groups, vec!["old-b".to_owned()]);
    }

    #[test]
    fn a_group_attached_elsewhere_is_refused_by_name() {
        let mut g = group("old-a", "a", "old", 2);
        g.foreign_targets = vec!["arn:aws:elasticloadbalancing:tg/other".into()];
        let e = plan_groups(&[g], &[], &desired(), (2, 2), true, names).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("old-a") && e.contains("tg/other") && e.contains("Detach"),
            "{e}"
        );
    }

    #[test]
    fn strays_outside_the_azs_go_at_the_commit() {
        let groups = vec![group("old-c", "c", "new", 2)];
        let p = plan_groups(
            &groups,
            &[inst("i-9", "c")],
            &desired(),
            (2, 2),
            true,
            names,
        )
        .unwrap();
        assert_eq!(p.stray_groups, vec!["old-c".to_owned()]);
        assert_eq!(p.stray_instances, vec!["i-9".to_owned()]);
    }
}
