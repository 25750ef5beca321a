//! Carries a plan out through the fleet's effects. The fleet's state is the truth: every
//! run plans from what the instances (and their tags) say, so a run interrupted anywhere is
//! resumed by running again with the same rollout id, or rolled back with `abort`.
//!
//! Old instances are taken out of service (deregistered, tagged `amictl:retiring`) only
//! after their replacements pass the health gate, and are terminated only when the whole
//! rollout has passed (bake included), so a rollback can always put the exact old fleet
//! back.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{info, warn};

use super::plan::{plan, Desired, Plan, Step};
use crate::fleet::{
    Alarms, CloudError, Command, Compute, Groups, Instance, InstanceState, Invocation, Launch,
    LoadBalancer, NoGroups, RunCommand, Scaling, TargetState,
};

#[derive(Debug, Clone)]
pub struct Settings {
    pub fleet: String,
    pub desired: Desired,
    /// Name tags: `{prefix}{fleet}-{az}-{n}`.
    pub prefix: String,
    /// The health gate: exit 0 passes.
    pub health: Command,
    /// Consecutive passing health checks an instance needs.
    pub health_passes: u32,
    pub health_interval: Duration,
    /// Deadline for each wait (running, reachable and healthy, target healthy, drained).
    pub step_timeout: Duration,
    /// How long one health command may run.
    pub command_timeout: Duration,
    pub bake: Duration,
    pub alarms: Vec<String>,
    /// How often waits poll the cloud.
    pub poll: Duration,
    /// How each AZ's group scales, where releases are groups; None: fixed at `per_az`.
    pub scaling: Option<Scaling>,
}

impl Settings {
    /// The group size bounds per AZ: the scaling range, or `per_az` fixed.
    pub fn bounds(&self) -> (usize, usize) {
        match self.scaling {
            Some(s) => (s.min, s.max),
            None => (self.desired.per_az, self.desired.per_az),
        }
    }
}

/// What a rollout works through. With `groups`, each release is one group per AZ that keeps
/// its own capacity (EC2 Auto Scaling); without, the rollout launches instances itself.
pub struct Effects<'a, C, R, L, A, G = NoGroups> {
    pub compute: &'a C,
    pub run: &'a R,
    pub lb: Option<&'a L>,
    pub alarms: &'a A,
    pub groups: Option<&'a G>,
}

/// `groups` for a provider without groups.
pub const NO_GROUPS: Option<&'static NoGroups> = None;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The fleet is on the desired image and settings.
    Done {
        launched: usize,
        retired: usize,
        unchanged: bool,
    },
    /// A gate failed; the fleet is exactly as it was before the rollout.
    RolledBack { reason: String },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RolloutError {
    /// Nothing was changed.
    #[error("{0}")]
    Before(CloudError),
    /// The rollout failed and so did the rollback: a person must look.
    #[error("rollout failed ({reason}) and the rollback failed too ({rollback}). The fleet now: {state}")]
    NeedsAttention {
        reason: String,
        rollback: String,
        state: String,
    },
}

impl RolloutError {
    /// The last step failed: the new release serves, but what the commit cleans up (the old
    /// instances or groups, the journal) is still there.
    pub fn commit_failed(error: String) -> Self {
        RolloutError::NeedsAttention {
            reason: "committing the rollout".into(),
            rollback: error,
            state: String::new(),
        }
    }
}

/// A launch token that is the same for the same rollout, AZ and slot, and fits EC2's
/// 64-character ClientToken.
pub fn launch_token(rollout: &str, az: &str, slot: usize) -> String {
    let h = Sha256::digest(format!("{rollout}/{az}/{slot}").as_bytes());
    format!("amictl-{}", &hex::encode(h)[..40])
}

pub struct Engine<'a, C, R, L, A, G = NoGroups> {
    pub(super) fx: Effects<'a, C, R, L, A, G>,
    pub(super) s: &'a Settings,
    pub(super) rollout: String,
}

pub(super) type StepResult = Result<(), String>;

impl<'a, C: Compute, R: RunCommand, L: LoadBalancer, A: Alarms, G: Groups>
    Engine<'a, C, R, L, A, G>
{
    pub fn new(fx: Effects<'a, C, R, L, A, G>, settings: &'a Settings, rollout: &str) -> Self {
        Engine {
            fx,
            s: settings,
            rollout: rollout.to_owned(),
        }
    }

    pub async fn instances(&self) -> Result<Vec<Instance>, CloudError> {
        self.fx.compute.instances(&self.s.fleet).await
    }

    /// What running now would do.
    pub async fn plan(&self) -> Result<Plan, CloudError> {
        Ok(plan(&self.instances().await?, &self.s.desired))
    }

    /// What running now would do, for people.
    pub async fn describe_plan(&self) -> Result<String, CloudError> {
        Ok(match self.fx.groups {
            Some(g) => format!("{:#?}", self.group_plan(g).await?),
            None => format!("{:#?}", self.plan().await?),
        })
    }

    /// Runs (or resumes) the rollout to the end, or rolls it back.
    pub async fn run(&self) -> Result<Outcome, RolloutError> {
        if let Some(groups) = self.fx.groups {
            return self.run_groups(groups).await;
        }
        let mut plan = self.plan().await.map_err(RolloutError::Before)?;
        let repairs = self.repairs(&plan).await.map_err(RolloutError::Before)?;
        if !repairs.is_empty() {
            info!(azs = ?repairs.iter().map(|s| &s.az).collect::<Vec<_>>(), "instances on the desired image are not in service yet: gating and registering them");
            plan.waves.push(super::plan::Wave { steps: repairs });
        }
        if plan.is_noop() {
            info!(fleet = %self.s.fleet, "fleet already on the desired image and settings");
            return Ok(Outcome::Done {
                launched: 0,
                retired: 0,
                unchanged: true,
            });
        }
        info!(rollout = %self.rollout, waves = plan.waves.len(), launches = plan.launches(), "rollout plan");
        for (n, wave) in plan.waves.iter().enumerate() {
            info!(wave = n + 1, azs = ?wave.steps.iter().map(|s| &s.az).collect::<Vec<_>>(), "wave");
            // Each AZ's steps in order; AZs of one wave side by side.
            let mut by_az: BTreeMap<&str, Vec<&Step>> = BTreeMap::new();
            for step in &wave.steps {
                by_az.entry(step.az.as_str()).or_default().push(step);
            }
            let runs = by_az.into_values().map(|steps| async move {
                for step in steps {
                    self.step(step).await?;
                    self.check_alarms().await?;
                }
                Ok::<(), String>(())
            });
            if let Some(reason) = futures_first_error(runs).await {
                return self.rollback(&reason).await;
            }
        }
        if let Err(reason) = self.bake().await {
            return self.rollback(&reason).await;
        }
        self.commit(&plan)
            .await
            .map_err(RolloutError::commit_failed)?;
        Ok(Outcome::Done {
            launched: plan.launches(),
            retired: plan
                .waves
                .iter()
                .flat_map(|w| &w.steps)
                .map(|s| s.retire.len())
                .sum::<usize>()
                + plan.strays.len(),
            unchanged: false,
        })
    }

    /// Steps for AZs the plan leaves alone although some instance there that already runs
    /// the desired image is not a healthy target: what a rollout interrupted between launch
    /// and registration leaves behind when its journal is lost too (a fresh CI runner). The
    /// step gates and registers them like new ones.
    async fn repairs(&self, plan: &Plan) -> Result<Vec<Step>, CloudError> {
        let Some(lb) = self.fx.lb else {
            return Ok(Vec::new());
        };
        let all = self.instances().await?;
        let planned: Vec<&str> = plan
            .waves
            .iter()
            .flat_map(|w| &w.steps)
            .map(|s| s.az.as_str())
            .collect();
        let kept: Vec<&Instance> = all
            .iter()
            .filter(|i| self.in_service_candidate(i) && !planned.contains(&i.az.as_str()))
            .collect();
        if kept.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = kept.iter().map(|i| i.id.clone()).collect();
        let states = lb.states(&ids).await?;
        let mut azs: Vec<String> = kept
            .iter()
            .filter(|i| states.get(&i.id) != Some(&TargetState::Healthy))
            .map(|i| i.az.clone())
            .collect();
        azs.sort();
        azs.dedup();
        Ok(azs
            .into_iter()
            .map(|az| Step {
                az,
                launch: 0,
                retire: Vec::new(),
            })
            .collect())
    }

    /// Live, not retiring, on the desired image and settings of its AZ.
    fn in_service_candidate(&self, i: &Instance) -> bool {
        let spec = self.s.desired.spec(&i.az);
        i.retiring.is_none()
            && matches!(i.state, InstanceState::Pending | InstanceState::Running)
            && self.s.desired.placements.iter().any(|p| p.az == i.az)
            && i.matches(&self.s.desired.image, spec)
    }

    async fn step(&self, step: &Step) -> StepResult {
        let az = step.az.as_str();
        let placement = self
            .s
            .desired
            .placements
            .iter()
            .find(|p| p.az == az)
            .expect("the plan only names desired AZs");
        let spec = self.s.desired.spec(az).to_owned();
        // Slots continue after this rollout's earlier launches in the AZ (a resumed run).
        let before = self.instances().await.map_err(|e| e.to_string())?;
        let launched_here = before
            .iter()
            .filter(|i| i.az == az && i.rollout.as_deref() == Some(&self.rollout))
            .count();
        for k in 0..step.launch {
            let slot = launched_here + k;
            let launch = Launch {
                fleet: self.s.fleet.clone(),
                placement: placement.clone(),
                image: self.s.desired.image.clone(),
                spec: spec.clone(),
                rollout: self.rollout.clone(),
                token: launch_token(&self.rollout, az, slot),
                name: format!("{}{}-{}-{}", self.s.prefix, self.s.fleet, az, slot),
            };
            let id = self
                .fx
                .compute
                .launch(&launch)
                .await
                .map_err(|e| format!("launching in {az}: {e}"))?;
            info!(%id, %az, "launched");
        }
        // The instances this step stands on: every live instance in the AZ on the desired
        // image, whichever rollout launched it (a resumed run re-checks the ones it launched
        // before; a run that lost its journal, those its predecessor launched). Checking
        // and registering an instance already in service changes nothing.
        // This rollout's own instances count in any state, so one that died fails the step.
        let mine = |all: &[Instance]| -> Vec<String> {
            all.iter()
                .filter(|i| {
                    let own = i.rollout.as_deref() == Some(&self.rollout)
                        && i.retiring.is_none()
                        && i.matches(&self.s.desired.image, &spec)
                        && i.state != InstanceState::Terminated;
                    i.az == az && (own || self.in_service_candidate(i))
                })
                .map(|i| i.id.clone())
                .collect()
        };
        let ids = mine(&self.instances().await.map_err(|e| e.to_string())?);
        self.wait_running(&ids).await?;
        self.health_gate(&ids).await?;
        if let Some(lb) = self.fx.lb {
            lb.register(&ids)
                .await
                .map_err(|e| format!("registering targets: {e}"))?;
            self.wait_targets(lb, &ids, TargetState::Healthy).await?;
        }
        if !step.retire.is_empty() {
            self.take_out_of_service(&step.retire).await?;
            if let Some(lb) = self.fx.lb {
                self.wait_targets(lb, &step.retire, TargetState::Unused)
                    .await?;
            }
            info!(ids = ?step.retire, %az, "old instances out of service");
        }
        Ok(())
    }

    /// Tags old instances retiring by this rollout, then deregisters them (they drain).
    /// Tag first: whatever happens after the tag, a rollback finds (and re-registers)
    /// every old instance this rollout touched.
    pub(super) async fn take_out_of_service(&self, ids: &[String]) -> StepResult {
        self.fx
            .compute
            .set_retiring(ids, Some(&self.rollout))
            .await
            .map_err(|e| format!("marking old instances: {e}"))?;
        if let Some(lb) = self.fx.lb {
            lb.deregister(ids)
                .await
                .map_err(|e| format!("deregistering targets: {e}"))?;
        }
        Ok(())
    }

    pub(super) async fn wait_running(&self, ids: &[String]) -> StepResult {
        let deadline = Instant::now() + self.s.step_timeout;
        loop {
            let all = self.instances().await.map_err(|e| e.to_string())?;
            let state = |id: &String| all.iter().find(|i| &i.id == id).map(|i| i.state);
            if let Some(gone) = ids.iter().find(|id| {
                matches!(
                    state(id),
                    None | Some(InstanceState::Down | InstanceState::Terminated)
                )
            }) {
                return Err(format!(
                    "instance {gone} stopped or vanished before it was running"
                ));
            }
            if ids
                .iter()
                .all(|id| state(id) == Some(InstanceState::Running))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "instances not running after {} s",
                    self.s.step_timeout.as_secs()
                ));
            }
            tokio::time::sleep(self.s.poll).await;
        }
    }

    /// Every instance must pass the health command `health_passes` times in a row; an
    /// instance SSM cannot reach yet is retried until the deadline.
    pub(super) async fn health_gate(&self, ids: &[String]) -> StepResult {
        let deadline = Instant::now() + self.s.step_timeout;
        let mut streak: BTreeMap<&String, u32> = ids.iter().map(|id| (id, 0)).collect();
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let pending: Vec<String> = streak
                .iter()
                .filter(|(_, n)| **n < self.s.health_passes)
                .map(|(id, _)| (*id).clone())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            match self
                .fx
                .run
                .run(&pending, &self.s.health, self.s.command_timeout)
                .await
            {
                Ok(results) => {
                    for id in &pending {
                        let n = streak
                            .get_mut(id)
                            .expect("pending ids are in the streak map");
                        match results.get(id) {
                            Some(Invocation::Exited { code: 0, .. }) => *n += 1,
                            Some(other) => {
                                *n = 0;
                                last.insert(id.clone(), describe(other));
                            }
                            None => *n = 0,
                        }
                    }
                }
                Err(e) => warn!(error = %e, "health command could not be sent; retrying"),
            }
            if streak.values().all(|n| *n >= self.s.health_passes) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let failing: Vec<String> = streak
                    .iter()
                    .filter(|(_, n)| **n < self.s.health_passes)
                    .map(|(id, _)| {
                        format!(
                            "{id}: {}",
                            last.get(*id).map(String::as_str).unwrap_or("no answer")
                        )
                    })
                    .collect();
                return Err(format!("health gate failed: {}", failing.join("; ")));
            }
            tokio::time::sleep(self.s.health_interval).await;
        }
    }

    pub(super) async fn wait_targets(
        &self,
        lb: &L,
        ids: &[String],
        want: TargetState,
    ) -> StepResult {
        let deadline = Instant::now() + self.s.step_timeout;
        loop {
            let states = lb
                .states(ids)
                .await
                .map_err(|e| format!("reading target health: {e}"))?;
            if ids
                .iter()
                .all(|id| states.get(id).copied().unwrap_or(TargetState::Unused) == want)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "targets not {want:?} after {} s: {states:?}",
                    self.s.step_timeout.as_secs()
                ));
            }
            tokio::time::sleep(self.s.poll).await;
        }
    }

    pub(super) async fn check_alarms(&self) -> StepResult {
        if self.s.alarms.is_empty() {
            return Ok(());
        }
        match self.fx.alarms.firing(&self.s.alarms).await {
            Ok(f) if !f.is_empty() => Err(format!("alarm firing: {}", f.join(", "))),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot read alarms: {e}")),
        }
    }

    pub(super) async fn bake(&self) -> StepResult {
        if self.s.bake.is_zero() {
            return self.check_alarms().await;
        }
        info!(
            secs = self.s.bake.as_secs(),
            "baking: watching alarms before committing"
        );
        let end = Instant::now() + self.s.bake;
        loop {
            self.check_alarms().await?;
            if Instant::now() >= end {
                return Ok(());
            }
            tokio::time::sleep(self.s.poll.min(end - Instant::now())).await;
        }
    }

    /// Terminates what the rollout took out of service, and strays.
    async fn commit(&self, plan: &Plan) -> Result<(), String> {
        let all = self.instances().await.map_err(|e| e.to_string())?;
        let mut doomed: Vec<String> = all
            .iter()
            .filter(|i| i.retiring.is_some() && i.state != InstanceState::Terminated)
            .map(|i| i.id.clone())
            .collect();
        doomed.extend(plan.strays.iter().cloned());
        // Drain before terminating: strays, and old instances a crashed run had tagged but
        // not yet deregistered, may still take traffic.
        if let (Some(lb), false) = (self.fx.lb, doomed.is_empty()) {
            lb.deregister(&doomed).await.map_err(|e| e.to_string())?;
            self.wait_targets(lb, &doomed, TargetState::Unused).await?;
        }
        if !doomed.is_empty() {
            self.fx
                .compute
                .terminate(&doomed)
                .await
                .map_err(|e| e.to_string())?;
            info!(ids = ?doomed, "terminated the old instances");
        }
        Ok(())
    }

    /// Puts the old fleet back: old instances back in service first, then this rollout's
    /// instances out and terminated.
    pub async fn rollback(&self, reason: &str) -> Result<Outcome, RolloutError> {
        warn!(rollout = %self.rollout, %reason, "rolling back");
        match self.try_rollback().await {
            Ok(()) => Ok(Outcome::RolledBack {
                reason: reason.to_owned(),
            }),
            Err(e) => Err(RolloutError::NeedsAttention {
                reason: reason.to_owned(),
                rollback: e,
                state: self.describe_state().await,
            }),
        }
    }

    async fn try_rollback(&self) -> Result<(), String> {
        if let Some(groups) = self.fx.groups {
            return self.rollback_groups(groups).await;
        }
        let all = self.instances().await.map_err(|e| e.to_string())?;
        let old: Vec<String> = all
            .iter()
            .filter(|i| {
                i.retiring.as_deref() == Some(&self.rollout) && i.state != InstanceState::Terminated
            })
            .map(|i| i.id.clone())
            .collect();
        // A group's instances go with their group (above), never one by one: the group
        // would only replace them.
        let new: Vec<String> = all
            .iter()
            .filter(|i| {
                i.rollout.as_deref() == Some(&self.rollout)
                    && i.state != InstanceState::Terminated
                    && i.group.is_none()
            })
            .map(|i| i.id.clone())
            .collect();
        if !old.is_empty() {
            if let Some(lb) = self.fx.lb {
                lb.register(&old)
                    .await
                    .map_err(|e| format!("re-registering old instances: {e}"))?;
                self.wait_targets(lb, &old, TargetState::Healthy).await?;
            }
            self.fx
                .compute
                .set_retiring(&old, None)
                .await
                .map_err(|e| format!("returning old instances to service: {e}"))?;
        }
        if !new.is_empty() {
            if let Some(lb) = self.fx.lb {
                lb.deregister(&new)
                    .await
                    .map_err(|e| format!("deregistering new instances: {e}"))?;
                self.wait_targets(lb, &new, TargetState::Unused).await?;
            }
            self.fx
                .compute
                .terminate(&new)
                .await
                .map_err(|e| format!("terminating new instances: {e}"))?;
        }
        Ok(())
    }

    /// "i-1 (us-east-1a, ami-old, in service); i-2 (us-east-1b, ami-new, launched by r-…)",
    /// after the groups, where there are groups.
    pub(super) async fn describe_state(&self) -> String {
        let groups = match self.fx.groups {
            Some(g) => self.describe_groups(g).await,
            None => String::new(),
        };
        let instances = self.describe_instances().await;
        if groups.is_empty() {
            instances
        } else {
            format!("{groups}; instances: {instances}")
        }
    }

    async fn describe_instances(&self) -> String {
        match self.instances().await {
            Err(e) => format!("unknown (cannot list instances: {e})"),
            Ok(all) if all.is_empty() => "no instances".into(),
            Ok(all) => all
                .iter()
                .map(|i| {
                    let role = match (&i.retiring, &i.rollout) {
                        (Some(r), _) => format!("out of service, retired by {r}"),
                        (None, Some(r)) if r == &self.rollout => "launched by this rollout".into(),
                        _ => "in service".into(),
                    };
                    let group = i
                        .group
                        .as_deref()
                        .map(|g| format!(", in {g}"))
                        .unwrap_or_default();
                    format!(
                        "{} ({}, {}, {:?}, {role}{group})",
                        i.id, i.az, i.image, i.state
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

fn describe(inv: &Invocation) -> String {
    match inv {
        Invocation::Exited {
            code,
            stdout,
            stderr,
        } => {
            let text = if stdout.trim().is_empty() {
                stderr
            } else {
                stdout
            };
            let line = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect::<String>();
            format!("exit {code} {line}").trim().to_owned()
        }
        Invocation::Unreachable { reason } => format!("unreachable: {reason}"),
        Invocation::TimedOut { reason } => format!("timed out: {reason}"),
    }
}

/// Runs the futures concurrently; the first error, if any (the others finish their step).
pub(super) async fn futures_first_error<F>(runs: impl Iterator<Item = F>) -> Option<String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let results = futures_util::future::join_all(runs).await;
    results.into_iter().find_map(Result::err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_tokens_are_stable_distinct_and_short() {
        let a = launch_token("r-1", "us-east-1a", 0);
        assert_eq!(a, launch_token("r-1", "us-east-1a", 0));
        assert_ne!(a, launch_token("r-1", "us-east-1a", 1));
        assert_ne!(a, launch_token("r-2", "us-east-1a", 0));
        assert!(a.len() <= 64);
    }
}
