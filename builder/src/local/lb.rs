//! [`LoadBalancer`] for the local fleet: registrations go into `fleet.json` and, as
//! addresses, into the balancer's `targets.json`; target states come back from the
//! balancer's `status.json`, trusted only once it has applied the latest registration.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use super::balancer::{self, BackendState, Status, Target, Targets};
use super::process::{spawn_detached, tail};
use super::state::{FleetState, Store};
use crate::fleet::{CloudError, LoadBalancer, TargetState};

pub struct LocalBalancer {
    pub store: Store,
}

/// What the balancer should route to, from the fleet's state.
fn targets_of(state: &FleetState) -> Targets {
    Targets {
        generation: state.generation,
        targets: state
            .targets
            .iter()
            .filter_map(|id| state.instances.get(id))
            .map(|r| Target {
                id: r.id.clone(),
                addr: r.addr(),
            })
            .collect(),
    }
}

/// A target's state as amictl should see it (pure). A status older than the latest
/// registration change says nothing about the change: a registered target it does not
/// list is still initial, and a deregistered one it lists is still draining.
pub fn target_state(
    id: &str,
    registered: bool,
    status: Option<&Status>,
    generation: u64,
) -> TargetState {
    let seen = status.and_then(|s| s.targets.get(id)).map(|t| t.state);
    let current = status.is_none_or(|s| s.generation >= generation);
    match (registered, seen) {
        (true, None) => TargetState::Initial,
        (true, Some(_)) if !current => TargetState::Initial,
        (true, Some(BackendState::Initial)) => TargetState::Initial,
        (true, Some(BackendState::Healthy)) => TargetState::Healthy,
        (true, Some(BackendState::Unhealthy)) => TargetState::Unhealthy,
        (true, Some(BackendState::Draining)) => TargetState::Initial,
        (false, Some(_)) => TargetState::Draining,
        (false, None) if !current => TargetState::Draining,
        (false, None) => TargetState::Unused,
    }
}

impl LocalBalancer {
    pub fn new(store: Store) -> Self {
        LocalBalancer { store }
    }

    fn change(&self, f: impl FnOnce(&mut Vec<String>)) -> Result<(), CloudError> {
        let dir = self.store.balancer_dir();
        self.store.update(|state| {
            let before = state.targets.clone();
            f(&mut state.targets);
            if state.targets != before {
                state.generation += 1;
            }
            // Written under the fleet lock, so the balancer never sees an older list win.
            balancer::write_targets(&dir, &targets_of(state))
                .map_err(|e| CloudError::Other(format!("{}: {e}", dir.display())))
        })
    }

    /// Starts the fleet's balancer unless it runs; waits until it answers.
    pub async fn ensure_running(&self) -> Result<(), CloudError> {
        let dir = self.store.balancer_dir();
        if balancer::is_running(&dir) {
            return Ok(());
        }
        let state = self.store.load()?;
        std::fs::create_dir_all(&dir).map_err(|e| CloudError::Other(e.to_string()))?;
        balancer::write_targets(&dir, &targets_of(&state))
            .map_err(|e| CloudError::Other(e.to_string()))?;
        let exe = std::env::current_exe().map_err(|e| CloudError::Other(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("local-balancer")
            .arg("--dir")
            .arg(&dir)
            .arg("--listen")
            .arg(state.listen.to_string())
            .env("AMICTL_LOG", "info");
        let log = dir.join("balancer.log");
        // The balancer takes its own lock; amictl's spawn lock is a separate file.
        let pid = spawn_detached(cmd, &log, &dir.join("spawn.lock"))
            .map_err(|e| CloudError::Other(format!("cannot start the load balancer: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = balancer::read_status(&dir) {
                if s.pid == pid {
                    return Ok(());
                }
            }
            let exited = !super::process::is_alive(&dir.join("spawn.lock"));
            if exited || Instant::now() >= deadline {
                return Err(CloudError::Other(format!(
                    "the load balancer for {} did not start: {}",
                    state.listen,
                    tail(&log, 3)
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl LoadBalancer for LocalBalancer {
    async fn register(&self, ids: &[String]) -> Result<(), CloudError> {
        self.change(|targets| {
            for id in ids {
                if !targets.contains(id) {
                    targets.push(id.clone());
                }
            }
        })
    }

    async fn deregister(&self, ids: &[String]) -> Result<(), CloudError> {
        self.change(|targets| targets.retain(|t| !ids.contains(t)))
    }

    async fn states(&self, ids: &[String]) -> Result<BTreeMap<String, TargetState>, CloudError> {
        // The balancer is part of the fleet's infrastructure: bring it back if it died.
        self.ensure_running().await?;
        let state = self.store.load()?;
        let status = balancer::read_status(&self.store.balancer_dir())
            .map_err(|e| CloudError::Other(e.to_string()))?;
        Ok(ids
            .iter()
            .map(|id| {
                let registered = state.targets.contains(id);
                (
                    id.clone(),
                    target_state(id, registered, status.as_ref(), state.generation),
                )
            })
            .collect())
    }

    async fn url(&self) -> Result<Option<String>, CloudError> {
        Ok(Some(format!("http://{}/", self.store.load()?.listen)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::balancer::TargetStatus;

    fn status(generation: u64, targets: &[(&str, BackendState)]) -> Status {
        Status {
            pid: 1,
            listen: "127.0.0.1:1".parse().unwrap(),
            generation,
            updated_unix_ms: 0,
            connections_total: 0,
            requests_total: 0,
            failed_total: 0,
            retried_total: 0,
            targets: targets
                .iter()
                .map(|(id, st)| {
                    (
                        id.to_string(),
                        TargetStatus {
                            addr: "127.0.0.1:2".parse().unwrap(),
                            state: *st,
                            active: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_stale_status_never_reports_a_change_as_done() {
        use BackendState::*;
        let healthy = status(3, &[("a", Healthy)]);
        assert_eq!(
            target_state("a", true, Some(&healthy), 3),
            TargetState::Healthy
        );
        // Deregistered at generation 4, the balancer still at 3: draining, not unused.
        assert_eq!(
            target_state("a", false, Some(&healthy), 4),
            TargetState::Draining
        );
        assert_eq!(
            target_state("b", false, Some(&healthy), 4),
            TargetState::Draining
        );
        assert_eq!(
            target_state("b", false, Some(&healthy), 3),
            TargetState::Unused
        );
        // Registered at generation 4: the old verdict does not count.
        assert_eq!(
            target_state("a", true, Some(&healthy), 4),
            TargetState::Initial
        );
        assert_eq!(target_state("a", true, None, 4), TargetState::Initial);
        let draining = status(5, &[("a", Draining)]);
        assert_eq!(
            target_state("a", false, Some(&draining), 5),
            TargetState::Draining
        );
        assert_eq!(target_state("a", false, None, 0), TargetState::Unused);
    }
}
