//! The health verdict, pure: what was observed goes in, an exit code and one summary line
//! come out. The fetching lives in `probe.rs`.

use serde::Serialize;

use crate::state::{Health, HealthStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Healthy = 0,
    Degraded = 1,
    Unhealthy = 2,
    Unknown = 3,
}

impl Verdict {
    pub fn exit_code(self) -> i32 {
        self as i32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Unhealthy => "unhealthy",
            Verdict::Unknown => "unknown",
        }
    }
}

/// Everything one check saw.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub url: String,
    /// Set when the agent did not answer at all.
    pub unreachable: Option<String>,
    /// Set when no manifest could be had (neither `--manifest` nor the agent's own).
    pub manifest_error: Option<String>,
    pub release: Option<String>,
    /// Every manifest file fetched: (path, problem if it did not match).
    pub files: Vec<(String, Option<String>)>,
    /// The agent's `/healthz`, when it publishes one.
    pub health: Option<Health>,
}

#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Clock drift beyond this many seconds (either way) makes the instance degraded.
    pub max_clock_drift: i64,
    /// The release the instance must serve, if the caller knows it.
    pub expect_version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Verdict,
    pub exit_code: i32,
    pub url: String,
    pub release: Option<String>,
    pub files_checked: usize,
    pub files_ok: usize,
    pub problems: Vec<String>,
    pub agent_status: Option<HealthStatus>,
    pub clock_drift_seconds: Option<i64>,
    pub heals_total: Option<u64>,
    pub uptime_seconds: Option<u64>,
    pub summary: String,
}

pub fn classify(obs: &Observation, limits: &Thresholds) -> Report {
    let mut verdict = Verdict::Healthy;
    let mut problems = Vec::new();
    let mut raise = |v: Verdict, problem: String, problems: &mut Vec<String>| {
        verdict = verdict.max(v);
        problems.push(problem);
    };

    if let Some(e) = &obs.unreachable {
        raise(
            Verdict::Unhealthy,
            format!("does not answer: {e}"),
            &mut problems,
        );
    } else if let Some(e) = &obs.manifest_error {
        raise(Verdict::Unknown, e.clone(), &mut problems);
    }
    for (path, problem) in &obs.files {
        if let Some(p) = problem {
            raise(Verdict::Unhealthy, format!("/{path}: {p}"), &mut problems);
        }
    }
    let health = obs.health.as_ref();
    if let (Some(want), Some(release)) = (&limits.expect_version, &obs.release) {
        if want != release {
            raise(
                Verdict::Unhealthy,
                format!("serves release {release}, expected {want}"),
                &mut problems,
            );
        }
    }
    if let Some(h) = health {
        match h.status {
            HealthStatus::Failing => raise(
                Verdict::Unhealthy,
                format!(
                    "agent self-check failing: {}",
                    h.detail
                        .last_self_check
                        .as_ref()
                        .and_then(|c| c.error.clone())
                        .unwrap_or_default()
                ),
                &mut problems,
            ),
            HealthStatus::Degraded => raise(
                Verdict::Degraded,
                format!(
                    "content drift healed recently ({} heals in all)",
                    h.detail.content_drift.heals_total
                ),
                &mut problems,
            ),
            HealthStatus::Starting | HealthStatus::Ok => {}
        }
    }
    let clock = health
        .and_then(|h| h.detail.clock_drift.as_ref())
        .and_then(|c| c.seconds);
    if let Some(s) = clock {
        if s.abs() > limits.max_clock_drift {
            raise(
                Verdict::Degraded,
                format!("clock drift {s} s exceeds {} s", limits.max_clock_drift),
                &mut problems,
            );
        }
    }

    let files_ok = obs.files.iter().filter(|(_, p)| p.is_none()).count();
    let release = obs
        .release
        .clone()
        .or_else(|| health.map(|h| h.version.clone()));
    let mut facts = Vec::new();
    if let Some(r) = &release {
        facts.push(format!("release {r}"));
    }
    if obs.unreachable.is_none() && obs.manifest_error.is_none() {
        facts.push(format!("{files_ok}/{} files match", obs.files.len()));
    }
    if let Some(s) = clock {
        facts.push(format!("clock drift {s} s"));
    }
    if let Some(h) = health {
        facts.push(format!("{} heals", h.detail.content_drift.heals_total));
    }
    let mut summary = format!("{}: {}", verdict.as_str(), obs.url);
    if !facts.is_empty() {
        summary.push_str(&format!(" ({})", facts.join(", ")));
    }
    if !problems.is_empty() {
        summary.push_str(&format!(": {}", problems.join("; ")));
    }
    Report {
        status: verdict,
        exit_code: verdict.exit_code(),
        url: obs.url.clone(),
        release,
        files_checked: obs.files.len(),
        files_ok,
        problems,
        agent_status: health.map(|h| h.status),
        clock_drift_seconds: clock,
        heals_total: health.map(|h| h.detail.content_drift.heals_total),
        uptime_seconds: health.map(|h| h.uptime_seconds),
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClockDrift, Status};

    fn limits() -> Thresholds {
        Thresholds {
            max_clock_drift: 2,
            expect_version: None,
        }
    }

    fn healthy() -> Observation {
        Observation {
            url: "http://127.0.0.1/".into(),
            release: Some("v1".into()),
            files: vec![("index.html".into(), None), ("version.txt".into(), None)],
            health: Some(Health {
                status: HealthStatus::Ok,
                version: "v1".into(),
                uptime_seconds: 5,
                detail: Status::default(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn healthy_instance() {
        let r = classify(&healthy(), &limits());
        assert_eq!(r.status, Verdict::Healthy);
        assert_eq!(r.exit_code, 0);
        assert_eq!(
            r.summary,
            "healthy: http://127.0.0.1/ (release v1, 2/2 files match, 0 heals)"
        );
    }

    #[test]
    fn wrong_content_is_unhealthy() {
        let mut o = healthy();
        o.files[1].1 = Some("sha256 ab, manifest says cd".into());
        let r = classify(&o, &limits());
        assert_eq!(r.status, Verdict::Unhealthy);
        assert_eq!(r.files_ok, 1);
        assert!(r.summary.contains("/version.txt: sha256"), "{}", r.summary);
    }

    #[test]
    fn unreachable_is_unhealthy_and_no_manifest_is_unknown() {
        let o = Observation {
            url: "http://127.0.0.1:9/".into(),
            unreachable: Some("connection refused".into()),
            ..Default::default()
        };
        assert_eq!(classify(&o, &limits()).exit_code, 2);
        let o = Observation {
            url: "http://x/".into(),
            manifest_error: Some("no manifest".into()),
            ..Default::default()
        };
        assert_eq!(classify(&o, &limits()).exit_code, 3);
    }

    #[test]
    fn degraded_by_heals_or_clock_and_worst_wins() {
        let mut o = healthy();
        o.health.as_mut().unwrap().status = HealthStatus::Degraded;
        assert_eq!(classify(&o, &limits()).status, Verdict::Degraded);

        let mut o = healthy();
        o.health.as_mut().unwrap().detail.clock_drift = Some(ClockDrift {
            seconds: Some(-4),
            offset_ms: Some(-4000),
            source: Some("ntp://x".into()),
            measured_at_unix: 0,
            error: None,
        });
        let r = classify(&o, &limits());
        assert_eq!(r.status, Verdict::Degraded);
        assert_eq!(r.clock_drift_seconds, Some(-4));
        o.files[0].1 = Some("status 404".into());
        assert_eq!(classify(&o, &limits()).status, Verdict::Unhealthy);
    }

    #[test]
    fn failing_self_check_and_wrong_release_are_unhealthy() {
        let mut o = healthy();
        o.health.as_mut().unwrap().status = HealthStatus::Failing;
        assert_eq!(classify(&o, &limits()).status, Verdict::Unhealthy);
        let r = classify(
            &healthy(),
            &Thresholds {
                expect_version: Some("v2".into()),
                ..limits()
            },
        );
        assert_eq!(r.status, Verdict::Unhealthy);
        assert!(r.summary.contains("expected v2"));
    }
}
