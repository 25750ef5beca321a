//! [`RunCommand`] for the local fleet: the command runs here, in the instance's directory,
//! with the instance's address in `AMI_AGENT_CHECK_URL` (which `ami-agent check` reads):
//! amictl's own commands are the agent's command lines, and shell commands run as given.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::process::is_alive;
use super::state::Store;
use crate::fleet::{CloudError, Command, Invocation, RunCommand};

/// The health command the local fleet runs by default (the agent's directory is first on
/// PATH).
pub const LOCAL_HEALTH_COMMAND: &str = "ami-agent check --json";
pub const LOCAL_DRIFT_COMMAND: &str = "ami-agent drift";

pub struct LocalRunCommand {
    pub store: Store,
}

impl RunCommand for LocalRunCommand {
    async fn run(
        &self,
        instance_ids: &[String],
        command: &Command,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Invocation>, CloudError> {
        let command = match command {
            Command::Health => LOCAL_HEALTH_COMMAND,
            Command::Drift => LOCAL_DRIFT_COMMAND,
            Command::Shell(c) => c.as_str(),
            // A dead or sick local instance is replaced, not restarted (`health --heal`).
            Command::RestartAgent => {
                return Err(CloudError::Other(
                    "the local fleet replaces instances rather than restarting their agent".into(),
                ))
            }
            Command::Document(d) => {
                return Err(CloudError::Other(format!(
                    "SSM document {d}: the local fleet runs shell commands (--health-command), not SSM documents"
                )))
            }
        };
        let state = self.store.load()?;
        let agent_dir = state.agent.parent().map(PathBuf::from).unwrap_or_default();
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut dirs = vec![agent_dir];
                dirs.extend(std::env::split_paths(&p));
                std::env::join_paths(dirs).unwrap_or(p)
            }
            None => agent_dir.into_os_string(),
        };
        let runs = instance_ids.iter().map(|id| {
            let record = state.instances.get(id).filter(|r| !r.terminated);
            let dir = self.store.instance_dir(id);
            let path = path.clone();
            async move {
                let Some(r) = record else {
                    return Invocation::Unreachable {
                        reason: "no such instance".into(),
                    };
                };
                if !is_alive(&dir.join("lock")) {
                    return Invocation::Unreachable {
                        reason: "the instance is not running".into(),
                    };
                }
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c")
                    .arg(command)
                    .current_dir(&dir)
                    .env("PATH", path)
                    .env("AMI_AGENT_CHECK_URL", format!("http://{}/", r.addr()))
                    .env("AMICTL_INSTANCE_ID", &r.id)
                    .env("AMICTL_INSTANCE_DIR", &dir)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                let child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        return Invocation::Unreachable {
                            reason: format!("cannot run sh: {e}"),
                        }
                    }
                };
                match tokio::time::timeout(timeout, child.wait_with_output()).await {
                    Err(_) => Invocation::TimedOut {
                        reason: format!("still running after {} s", timeout.as_secs_f32()),
                    },
                    Ok(Err(e)) => Invocation::Unreachable {
                        reason: e.to_string(),
                    },
                    Ok(Ok(out)) => Invocation::Exited {
                        // Killed by a signal: no exit code, like SSM's Failed.
                        code: out.status.code().unwrap_or(-1),
                        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    },
                }
            }
        });
        let results = futures_util::future::join_all(runs).await;
        Ok(instance_ids.iter().cloned().zip(results).collect())
    }
}
