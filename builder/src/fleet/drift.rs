//! `amictl drift`: what differs from what it should be, per instance (pure). Three kinds:
//! the clock (against the agent's time reference), the content (the check report's files
//! and a recent heal) and the image (not the expected AMI, or not launched by amictl).
//! Each is `ok`, `drift` or `unknown` (not measurable now: the command failed).

use serde::Serialize;

use super::health::{parse_report, AgentReport};
use super::table::table;
use super::{Instance, Invocation};

/// The agent's clock measurement, where NixOS puts it: one integer on stdout, local minus
/// reference in seconds; nothing on stdout and a non-zero exit when it cannot measure.
pub const DEFAULT_DRIFT_COMMAND: &str = "/run/current-system/sw/bin/ami-agent drift";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Ok,
    Unknown,
    Drift,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Unknown => "unknown",
            State::Drift => "drift",
        }
    }
}

/// One kind of drift on one instance: its state and what was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub state: State,
    pub detail: String,
}

impl Finding {
    fn new(state: State, detail: impl Into<String>) -> Self {
        Finding {
            state,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceDrift {
    pub instance_id: String,
    pub az: String,
    pub image: String,
    pub clock_seconds: Option<i64>,
    pub clock: Finding,
    pub content: Finding,
    pub ami: Finding,
}

impl InstanceDrift {
    /// Drift if anything drifts, else unknown if anything is unknown, else ok.
    pub fn state(&self) -> State {
        self.clock.state.max(self.content.state).max(self.ami.state)
    }
}

/// The `ami-agent drift` answer: seconds, or why not (pure).
pub fn clock_seconds(inv: &Invocation) -> Result<i64, String> {
    match inv {
        Invocation::Exited {
            code: 0, stdout, ..
        } => stdout
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .and_then(|l| l.parse::<i64>().ok())
            .ok_or_else(|| {
                if stdout.trim().is_empty() {
                    "no measurement on stdout".to_owned()
                } else {
                    format!("not a number of seconds: {:?}", truncate(stdout.trim(), 40))
                }
            }),
        Invocation::Exited { code, stderr, .. } => {
            let why = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            Err(format!("cannot measure (exit {code}) {why}")
                .trim()
                .to_owned())
        }
        Invocation::Unreachable { reason } => Err(format!("unreachable: {reason}")),
        Invocation::TimedOut { reason } => Err(format!("timed out: {reason}")),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Clock drift beyond `max_seconds` either way drifts (pure).
pub fn clock_finding(measured: &Result<i64, String>, max_seconds: i64) -> Finding {
    match measured {
        Ok(s) if s.abs() > max_seconds => {
            Finding::new(State::Drift, format!("{s:+} s (more than {max_seconds} s)"))
        }
        Ok(s) => Finding::new(State::Ok, format!("{s:+} s")),
        Err(e) => Finding::new(State::Unknown, e.clone()),
    }
}

/// Content drifts when files do not match now, or the agent healed some recently (its
/// status is then `degraded`); older heals are only shown (pure).
pub fn content_finding(report: Option<&AgentReport>) -> Finding {
    let Some(r) = report else {
        return Finding::new(State::Unknown, "no check report");
    };
    let heals = r
        .heals_total
        .map(|h| format!(", {h} heals"))
        .unwrap_or_default();
    match (r.files_ok, r.files_checked) {
        (Some(ok), Some(all)) if ok < all => {
            Finding::new(State::Drift, format!("{ok}/{all} files match{heals}"))
        }
        (Some(ok), Some(all)) if r.agent_status.as_deref() == Some("degraded") => Finding::new(
            State::Drift,
            format!("{ok}/{all} files match, healed recently{heals}"),
        ),
        (Some(ok), Some(all)) if all > 0 => {
            Finding::new(State::Ok, format!("{ok}/{all} files match{heals}"))
        }
        _ => Finding::new(
            State::Unknown,
            format!(
                "no files checked{}",
                r.summary
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ),
        ),
    }
}

/// The image drifts from `expected` (when given), and any instance amictl did not
/// launch (no `amictl:rollout` tag) drifts (pure).
pub fn ami_finding(instance: &Instance, expected: Option<&str>) -> Finding {
    let mut why = Vec::new();
    if let Some(want) = expected {
        if instance.image != want {
            why.push(format!("runs {}, expected {want}", instance.image));
        }
    }
    if instance.rollout.is_none() {
        why.push("not launched by amictl (no amictl:rollout tag)".into());
    }
    if why.is_empty() {
        Finding::new(State::Ok, instance.image.clone())
    } else {
        Finding::new(State::Drift, why.join("; "))
    }
}

/// One instance's drift from its two command answers (pure).
pub fn assess(
    instance: &Instance,
    clock: &Invocation,
    check: &Invocation,
    expected_ami: Option<&str>,
    max_clock_seconds: i64,
) -> InstanceDrift {
    let measured = clock_seconds(clock);
    let report = match check {
        Invocation::Exited { stdout, .. } => parse_report(stdout),
        _ => None,
    };
    InstanceDrift {
        instance_id: instance.id.clone(),
        az: instance.az.clone(),
        image: instance.image.clone(),
        clock_seconds: measured.as_ref().ok().copied(),
        clock: clock_finding(&measured, max_clock_seconds),
        content: content_finding(report.as_ref()),
        ami: ami_finding(instance, expected_ami),
    }
}

/// 1 when anything drifts, 3 when nothing drifts but something could not be measured,
/// 0 when everything is as it should be (an empty fleet is unknown) (pure).
pub fn exit_code(rows: &[InstanceDrift]) -> i32 {
    match rows.iter().map(InstanceDrift::state).max() {
        Some(State::Ok) => 0,
        Some(State::Drift) => 1,
        Some(State::Unknown) | None => 3,
    }
}

/// `text` cut to `max` characters, marked with an ellipsis when cut (pure).
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// The table `drift` prints (pure).
pub fn render(rows: &[InstanceDrift]) -> String {
    // A table cell keeps the gist; `--json` has every word.
    let cell = |f: &Finding| clip(&format!("{}: {}", f.state.as_str(), f.detail), 72);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.instance_id.clone(),
                r.az.clone(),
                r.state().as_str().to_owned(),
                cell(&r.clock),
                cell(&r.content),
                cell(&r.ami),
            ]
        })
        .collect();
    table(
        &["INSTANCE", "AZ", "DRIFT", "CLOCK", "CONTENT", "AMI"],
        &cells,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::InstanceState;

    #[test]
    fn long_cells_are_clipped() {
        assert_eq!(clip("short", 72), "short");
        let long = "x".repeat(100);
        assert_eq!(clip(&long, 10).chars().count(), 10);
        assert!(clip(&long, 10).ends_with('…'));
    }

    fn instance(image: &str, rollout: Option<&str>) -> Instance {
        Instance {
            id: "i-1".into(),
            az: "us-east-1a".into(),
            image: image.into(),
            spec: "s".into(),
            state: InstanceState::Running,
            rollout: rollout.map(str::to_owned),
            retiring: None,
            address: None,
            group: None,
        }
    }

    fn out(code: i32, stdout: &str) -> Invocation {
        Invocation::Exited {
            code,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    const REPORT: &str = r#"{"status":"healthy","files_checked":4,"files_ok":4,"heals_total":0,"agent_status":"ok"}"#;

    #[test]
    fn clock() {
        assert_eq!(clock_seconds(&out(0, "-3\n")), Ok(-3));
        assert_eq!(clock_seconds(&out(0, " 0 ")), Ok(0));
        assert!(clock_seconds(&out(0, ""))
            .unwrap_err()
            .contains("no measurement"));
        assert!(clock_seconds(&out(0, "soon"))
            .unwrap_err()
            .contains("not a number"));
        assert!(clock_seconds(&out(1, "")).unwrap_err().contains("exit 1"));
        assert!(clock_seconds(&Invocation::Unreachable { reason: "x".into() }).is_err());
        assert_eq!(clock_finding(&Ok(2), 2).state, State::Ok);
        assert_eq!(clock_finding(&Ok(-3), 2).state, State::Drift);
        assert_eq!(clock_finding(&Err("x".into()), 2).state, State::Unknown);
    }

    #[test]
    fn content() {
        let r = |s: &str| parse_report(s);
        assert_eq!(content_finding(r(REPORT).as_ref()).state, State::Ok);
        let bad = r(r#"{"files_checked":4,"files_ok":3,"heals_total":1}"#);
        let f = content_finding(bad.as_ref());
        assert_eq!(
            (f.state, f.detail.as_str()),
            (State::Drift, "3/4 files match, 1 heals")
        );
        let healed =
            r(r#"{"files_checked":4,"files_ok":4,"heals_total":1,"agent_status":"degraded"}"#);
        assert_eq!(content_finding(healed.as_ref()).state, State::Drift);
        let old_heals =
            r(r#"{"files_checked":4,"files_ok":4,"heals_total":9,"agent_status":"ok"}"#);
        assert_eq!(content_finding(old_heals.as_ref()).state, State::Ok);
        assert_eq!(content_finding(None).state, State::Unknown);
        let unreachable =
            r(r#"{"status":"unhealthy","files_checked":0,"files_ok":0,"summary":"unhealthy: x"}"#);
        assert_eq!(content_finding(unreachable.as_ref()).state, State::Unknown);
    }

    #[test]
    fn ami() {
        assert_eq!(
            ami_finding(&instance("ami-1", Some("r1")), Some("ami-1")).state,
            State::Ok
        );
        assert_eq!(
            ami_finding(&instance("ami-1", Some("r1")), None).state,
            State::Ok
        );
        let f = ami_finding(&instance("ami-0", Some("r1")), Some("ami-1"));
        assert_eq!(
            (f.state, f.detail.as_str()),
            (State::Drift, "runs ami-0, expected ami-1")
        );
        let f = ami_finding(&instance("ami-1", None), None);
        assert_eq!(f.state, State::Drift);
        assert!(f.detail.contains("not launched by amictl"));
    }

    #[test]
    fn exit_codes_gate_ci() {
        let i = instance("ami-1", Some("r1"));
        let ok = assess(&i, &out(0, "0"), &out(0, REPORT), Some("ami-1"), 2);
        assert_eq!(ok.state(), State::Ok);
        assert_eq!(exit_code(std::slice::from_ref(&ok)), 0);
        let unknown = assess(&i, &out(0, ""), &out(0, ""), Some("ami-1"), 2);
        assert_eq!(exit_code(&[ok.clone(), unknown.clone()]), 3);
        let drift = assess(&i, &out(0, "0"), &out(0, REPORT), Some("ami-2"), 2);
        assert_eq!(exit_code(&[ok, unknown, drift]), 1);
        assert_eq!(exit_code(&[]), 3);
    }

    #[test]
    fn table() {
        let i = instance("ami-1", Some("r1"));
        let t = render(&[assess(&i, &out(0, "-5"), &out(0, REPORT), None, 2)]);
        let row = t.lines().nth(1).unwrap();
        assert!(row.starts_with("i-1"), "{t}");
        assert!(row.contains("drift: -5 s (more than 2 s)"), "{t}");
        assert!(row.contains("ok: 4/4 files match, 0 heals"), "{t}");
        assert!(row.contains("ok: ami-1"), "{t}");
    }
}
