//! What the agent knows about itself: the release, its metrics, and the outcome of the
//! latest self-check and clock measurement. Shared by the server and the loops.

use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::manifest::Mismatch;
use crate::metrics::Metrics;
use crate::site::Site;

/// A heal within this window makes the agent report itself degraded: the content was
/// tampered with recently and someone should look, even though it is whole again.
pub const DEGRADED_AFTER_HEAL: Duration = Duration::from_secs(15 * 60);

pub struct AgentState {
    pub site: Site,
    pub metrics: Metrics,
    started: Instant,
    status: RwLock<Status>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub last_self_check: Option<SelfCheck>,
    pub content_drift: ContentDrift,
    pub clock_drift: Option<ClockDrift>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfCheck {
    pub at_unix: u64,
    pub ok: bool,
    pub duration_ms: u64,
    pub files_fetched: usize,
    pub files_verified_on_disk: usize,
    pub error: Option<String>,
    /// Set when the server was too busy for the check to fetch through the listener or
    /// read files (every slot taken, descriptors exhausted): not a failure of the content
    /// or the process, so the check still passes and the watchdog is still fed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overloaded: Option<String>,
    /// The server's connections when the check ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
}

/// The HTTP server's load, as the health loop reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub open_connections: usize,
    pub max_connections: usize,
    /// Every connection slot is held by a connection with a request in progress, so new
    /// clients wait in the kernel's backlog.
    pub saturated: bool,
    /// accept() is failing for want of file descriptors or memory, and backing off.
    pub starved: bool,
}

impl Load {
    /// Busy rather than broken: a self-fetch that times out now says nothing about the
    /// listener or the content.
    pub fn is_overloaded(&self) -> bool {
        self.saturated || self.starved
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} connections open",
            self.open_connections, self.max_connections
        )?;
        if self.saturated {
            write!(f, ", every slot busy")?;
        }
        if self.starved {
            write!(f, ", out of file descriptors")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContentDrift {
    /// Files that differed at the last self-check (healed or not).
    pub files: Vec<DriftedFile>,
    pub heals_total: u64,
    pub last_heal_unix: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriftedFile {
    pub path: String,
    pub problem: String,
    pub healed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockDrift {
    /// Local minus reference, rounded to whole seconds; None when no source answered.
    pub seconds: Option<i64>,
    pub offset_ms: Option<i64>,
    pub source: Option<String>,
    pub measured_at_unix: u64,
    pub error: Option<String>,
}

/// The `/healthz` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub version: String,
    pub uptime_seconds: u64,
    #[serde(flatten)]
    pub detail: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// No self-check has finished yet.
    Starting,
    Ok,
    /// Serving correctly, but content drift was healed recently.
    Degraded,
    /// The last self-check failed.
    Failing,
}

impl AgentState {
    pub fn new(site: Site) -> Self {
        AgentState {
            metrics: Metrics::new(site.version()),
            site,
            started: Instant::now(),
            status: RwLock::new(Status::default()),
        }
    }

    pub fn status(&self) -> Status {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn health(&self) -> Health {
        let detail = self.status();
        Health {
            status: classify(&detail, now_unix()),
            version: self.site.version().to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            detail,
        }
    }

    pub fn record_drift(&self, files: &[(String, Mismatch, bool)]) {
        let healed = files.iter().filter(|(_, _, healed)| *healed).count() as u64;
        self.metrics.heals.inc_by(healed);
        self.metrics.content_drift_files.set(files.len() as i64);
        self.update(|s| {
            s.content_drift.files = files
                .iter()
                .map(|(path, m, healed)| DriftedFile {
                    path: path.clone(),
                    problem: m.to_string(),
                    healed: *healed,
                })
                .collect();
            s.content_drift.heals_total += healed;
            if healed > 0 {
                s.content_drift.last_heal_unix = Some(now_unix());
            }
        });
    }
}

pub fn classify(status: &Status, now_unix: u64) -> HealthStatus {
    match &status.last_self_check {
        None => HealthStatus::Starting,
        Some(check) if !check.ok => HealthStatus::Failing,
        Some(_) => match status.content_drift.last_heal_unix {
            Some(at) if now_unix.saturating_sub(at) < DEGRADED_AFTER_HEAL.as_secs() => {
                HealthStatus::Degraded
            }
            _ => HealthStatus::Ok,
        },
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(ok: bool) -> Option<SelfCheck> {
        Some(SelfCheck {
            at_unix: 1000,
            ok,
            duration_ms: 1,
            files_fetched: 1,
            files_verified_on_disk: 1,
            error: None,
            overloaded: None,
            load: None,
        })
    }

    #[test]
    fn classification() {
        let mut s = Status::default();
        assert_eq!(classify(&s, 1000), HealthStatus::Starting);
        s.last_self_check = check(false);
        assert_eq!(classify(&s, 1000), HealthStatus::Failing);
        s.last_self_check = check(true);
        assert_eq!(classify(&s, 1000), HealthStatus::Ok);
        s.content_drift.last_heal_unix = Some(1000);
        assert_eq!(classify(&s, 1000 + 60), HealthStatus::Degraded);
        assert_eq!(classify(&s, 1000 + 15 * 60), HealthStatus::Ok);
    }
}
