//! [`Compute`] for the local fleet: an instance is an `ami-agent serve` process with its own
//! copy of the release's content, listening on a loopback port of its own.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tracing::info;

use ami_agent::http::pass_listener;
use tokio::net::TcpListener;

use super::process::{is_alive, spawn_detached, stop};
use super::release::{copy_content, find};
use super::state::{InstanceRecord, StateError, Store};
use crate::fleet::{CloudError, Compute, Instance, InstanceState, Launch};

/// How long an instance gets to finish its requests after SIGTERM before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct LocalCompute {
    pub store: Store,
}

impl From<StateError> for CloudError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NoFleet(_) => CloudError::NotFound(e.to_string()),
            other => CloudError::Other(other.to_string()),
        }
    }
}

/// The instance id a launch token stands for: the same token, the same instance.
pub fn instance_id(token: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("i-{}", &hex::encode(Sha256::digest(token.as_bytes()))[..12])
}

impl LocalCompute {
    pub fn new(store: Store) -> Self {
        LocalCompute { store }
    }

    pub fn lock_path(&self, id: &str) -> std::path::PathBuf {
        self.store.instance_dir(id).join("lock")
    }

    pub fn log_path(&self, id: &str) -> std::path::PathBuf {
        self.store.instance_dir(id).join("agent.log")
    }

    fn state_of(&self, r: &InstanceRecord) -> InstanceState {
        if r.terminated {
            InstanceState::Terminated
        } else if !is_alive(&self.lock_path(&r.id)) {
            InstanceState::Down
        } else if accepting(r.addr()) {
            InstanceState::Running
        } else {
            // Started, still loading and verifying its release.
            InstanceState::Pending
        }
    }

    /// Starts the agent on `listener`, which it inherits: the port was never free for
    /// another process to take between choosing it and the agent serving on it.
    fn start(
        &self,
        record: &InstanceRecord,
        listener: &TcpListener,
        agent: &Path,
    ) -> Result<u32, CloudError> {
        let dir = self.store.instance_dir(&record.id);
        let release = find(&self.store.releases_dir(), &record.image)
            .map_err(|e| CloudError::NotFound(e.to_string()))?;
        let www = dir.join("www");
        if www.exists() {
            std::fs::remove_dir_all(&www).map_err(other)?;
        }
        std::fs::create_dir_all(&www).map_err(other)?;
        copy_content(&release, &www).map_err(|e| CloudError::Other(e.to_string()))?;
        let mut cmd = Command::new(agent);
        cmd.arg("serve")
            .arg("--root")
            .arg(&www)
            .arg("--shutdown-timeout")
            .arg(
                SHUTDOWN_GRACE
                    .as_secs()
                    .saturating_sub(2)
                    .max(1)
                    .to_string(),
            )
            .current_dir(&dir);
        if let Some(m) = release.manifest() {
            let copy = dir.join("manifest.json");
            std::fs::copy(&m, &copy).map_err(other)?;
            cmd.arg("--manifest").arg(copy);
        }
        pass_listener(&mut cmd, listener);
        // The agent reads AMI_AGENT_* settings: the user's own must not leak into a fleet.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AMI_AGENT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "info");
        spawn_detached(cmd, &self.log_path(&record.id), &self.lock_path(&record.id)).map_err(
            |e| {
                CloudError::Other(format!(
                    "cannot start {} for instance {}: {e} (pass --agent PATH, or build it: cargo build --release -p agent)",
                    agent.display(),
                    record.id
                ))
            },
        )
    }
}

fn other(e: std::io::Error) -> CloudError {
    CloudError::Other(e.to_string())
}

/// Something is listening at `addr`.
fn accepting(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

impl Compute for LocalCompute {
    async fn instances(&self, fleet: &str) -> Result<Vec<Instance>, CloudError> {
        let state = self.store.load()?;
        debug_assert_eq!(state.fleet, fleet);
        Ok(state
            .instances
            .values()
            .filter(|r| !r.terminated)
            .map(|r| Instance {
                id: r.id.clone(),
                az: r.az.clone(),
                image: r.image.clone(),
                spec: r.spec.clone(),
                state: self.state_of(r),
                rollout: Some(r.rollout.clone()),
                retiring: r.retiring.clone(),
                address: Some(r.addr().to_string()),
                group: None,
            })
            .collect())
    }

    async fn launch(&self, launch: &Launch) -> Result<String, CloudError> {
        let id = instance_id(&launch.token);
        // Bound here and inherited by the agent; this process's copy closes at the end. The
        // agent's own bind, so the socket is what the agent would have made (SO_REUSEADDR,
        // its listen backlog), not std's backlog of 128.
        let listener =
            ami_agent::http::bind(SocketAddr::from(([127, 0, 0, 1], 0)), false).map_err(other)?;
        self.store.update(|state| {
            if state.instances.contains_key(&id) {
                return Ok::<_, CloudError>(());
            }
            let record = InstanceRecord {
                id: id.clone(),
                az: launch.placement.az.clone(),
                image: launch.image.clone(),
                spec: launch.spec.clone(),
                rollout: launch.rollout.clone(),
                retiring: None,
                token: launch.token.clone(),
                name: launch.name.clone(),
                port: listener.local_addr().map_err(other)?.port(),
                pid: None,
                launched_unix: crate::rollout::now_unix(),
                terminated: false,
            };
            let pid = self.start(&record, &listener, &state.agent.clone())?;
            info!(%id, pid, port = record.port, image = %record.image, "started instance");
            state.instances.insert(
                id.clone(),
                InstanceRecord {
                    pid: Some(pid),
                    ..record
                },
            );
            Ok(())
        })?;
        Ok(id)
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
        let state = self.store.load()?;
        let stops = ids.iter().filter_map(|id| state.instances.get(id)).map(|r| {
            let lock = self.lock_path(&r.id);
            async move {
                if let Some(pid) = r.pid {
                    if stop(pid, &lock, SHUTDOWN_GRACE).await {
                        tracing::warn!(id = %r.id, "did not stop within the grace period: killed");
                    }
                }
            }
        });
        futures_util::future::join_all(stops).await;
        self.store.update(|state| {
            for id in ids {
                if let Some(r) = state.instances.get_mut(id) {
                    r.terminated = true;
                    r.pid = None;
                }
            }
            Ok::<_, CloudError>(())
        })?;
        // The content goes; the log stays (it says why an instance failed) until the fleet
        // is destroyed.
        for id in ids {
            let _ = std::fs::remove_dir_all(self.store.instance_dir(id).join("www"));
        }
        Ok(())
    }

    async fn set_retiring(&self, ids: &[String], rollout: Option<&str>) -> Result<(), CloudError> {
        self.store.update(|state| {
            for id in ids {
                let r = state
                    .instances
                    .get_mut(id)
                    .ok_or_else(|| CloudError::NotFound(format!("instance {id} not found")))?;
                r.retiring = rollout.map(str::to_owned);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_tokens() {
        assert_eq!(instance_id("amictl-1"), instance_id("amictl-1"));
        assert_ne!(instance_id("amictl-1"), instance_id("amictl-2"));
        assert_eq!(instance_id("x").len(), 14);
    }
}
