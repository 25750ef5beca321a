//! `amictl health`: every running instance of a fleet runs the agent's check through
//! [`RunCommand`]; the check's exit code is the verdict (0 healthy, 1 degraded, 2 unhealthy,
//! 3 unknown) and its JSON report, when there is one, adds the detail. An instance the
//! command cannot reach is unhealthy. The fleet's verdict is the worst instance's.

use std::collections::BTreeMap;
use std::time::Duration;

pub use ami_agent::check::Verdict;
use serde::{Deserialize, Serialize};

use super::table::table;
use super::{CloudError, Command, Instance, Invocation, RunCommand};

/// The agent's check, where NixOS puts it (what the `HealthCheck` document runs).
pub const DEFAULT_HEALTH_COMMAND: &str = "/run/current-system/sw/bin/ami-agent check --json";
/// What `--heal` runs on an unhealthy instance (the `RestartAgent` document).
pub const HEAL_COMMAND: &str = "systemctl restart ami-agent";

/// The agent's `check --json` report as read back: every field optional and unknown ones
/// ignored, so an agent older or newer than amictl still reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentReport {
    pub status: Option<String>,
    pub exit_code: Option<i32>,
    pub url: Option<String>,
    pub release: Option<String>,
    pub files_checked: Option<u64>,
    pub files_ok: Option<u64>,
    pub problems: Vec<String>,
    pub agent_status: Option<String>,
    pub clock_drift_seconds: Option<i64>,
    pub heals_total: Option<u64>,
    pub uptime_seconds: Option<u64>,
    pub summary: Option<String>,
    /// Set when the document was cut short (SSM keeps 24,000 characters) and only its
    /// leading fields could be read.
    #[serde(skip_deserializing, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl From<&ami_agent::check::Report> for AgentReport {
    fn from(r: &ami_agent::check::Report) -> Self {
        let json = serde_json::to_value(r).expect("a report always serializes");
        serde_json::from_value(json).unwrap_or_default()
    }
}

/// Reads the agent's JSON report out of a command's stdout (pure, never fails): the first
/// JSON object in it (text around it is ignored); else, for a document SSM truncated,
/// whatever top-level fields precede the cut; else None.
pub fn parse_report(stdout: &str) -> Option<AgentReport> {
    let mut from = 0;
    while let Some(at) = stdout[from..].find('{') {
        let rest = &stdout[from + at..];
        let mut objects = serde_json::Deserializer::from_str(rest).into_iter::<AgentReport>();
        if let Some(Ok(r)) = objects.next() {
            return Some(r);
        }
        // Not an object here: maybe on a later line (a warning printed before it).
        match rest.find('\n') {
            Some(nl) if rest[nl..].contains('{') => from += at + nl,
            _ => break,
        }
    }
    salvage(&stdout[stdout.find('{')?..])
}

/// The scalar fields of a cut-off JSON object. Inside JSON strings every `"` is escaped,
/// so `"key":` only ever matches a real key; the report is flat, so keys are top-level.
fn salvage(text: &str) -> Option<AgentReport> {
    let value = |key: &str| -> Option<serde_json::Value> {
        let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
        serde_json::Deserializer::from_str(&text[at..])
            .into_iter::<serde_json::Value>()
            .next()?
            .ok()
    };
    let string = |key: &str| value(key).and_then(|v| v.as_str().map(str::to_owned));
    let int = |key: &str| value(key).and_then(|v| v.as_i64());
    let uint = |key: &str| value(key).and_then(|v| v.as_u64());
    let r = AgentReport {
        status: string("status"),
        exit_code: int("exit_code").and_then(|c| i32::try_from(c).ok()),
        url: string("url"),
        release: string("release"),
        files_checked: uint("files_checked"),
        files_ok: uint("files_ok"),
        problems: Vec::new(),
        agent_status: string("agent_status"),
        clock_drift_seconds: int("clock_drift_seconds"),
        heals_total: uint("heals_total"),
        uptime_seconds: uint("uptime_seconds"),
        summary: string("summary"),
        truncated: true,
    };
    (r.status.is_some() || r.exit_code.is_some()).then_some(r)
}

/// One instance's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceHealth {
    pub instance_id: String,
    pub az: String,
    pub image: String,
    pub status: Verdict,
    /// How the command ended: `exited`, `unreachable` or `timed_out`.
    pub outcome: &'static str,
    /// The command's exit code, when it ran to the end.
    pub exit_code: Option<i32>,
    /// Why, in a few words, when not healthy.
    pub detail: Option<String>,
    pub report: Option<AgentReport>,
}

/// What one invocation of the health command says about an instance (pure). The exit code
/// is the truth; a code outside 0-3 (127: no agent installed) is unknown.
pub fn assess(instance: &Instance, invocation: &Invocation) -> InstanceHealth {
    let mut h = InstanceHealth {
        instance_id: instance.id.clone(),
        az: instance.az.clone(),
        image: instance.image.clone(),
        status: Verdict::Unknown,
        outcome: "exited",
        exit_code: None,
        detail: None,
        report: None,
    };
    match invocation {
        Invocation::Exited {
            code,
            stdout,
            stderr,
        } => {
            h.exit_code = Some(*code);
            h.report = parse_report(stdout);
            h.status = match code {
                0 => Verdict::Healthy,
                1 => Verdict::Degraded,
                2 => Verdict::Unhealthy,
                _ => Verdict::Unknown,
            };
            if h.status != Verdict::Healthy {
                let from_report = h.report.as_ref().and_then(|r| {
                    (!r.problems.is_empty())
                        .then(|| r.problems.join("; "))
                        .or_else(|| r.summary.clone())
                });
                let from_stderr = stderr
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty())
                    .map(str::to_owned);
                h.detail = from_report
                    .or(from_stderr)
                    .or_else(|| Some(format!("the health command exited {code}")));
            }
        }
        Invocation::Unreachable { reason } => {
            h.status = Verdict::Unhealthy;
            h.outcome = "unreachable";
            h.detail = Some(format!("unreachable: {reason}"));
        }
        Invocation::TimedOut { reason } => {
            h.status = Verdict::Unhealthy;
            h.outcome = "timed_out";
            h.detail = Some(format!("timed out: {reason}"));
        }
    }
    h
}

/// The row of an instance that is down (stopped, or its process exited): unhealthy, and
/// no command can reach it.
pub fn down(instance: &Instance) -> InstanceHealth {
    InstanceHealth {
        instance_id: instance.id.clone(),
        az: instance.az.clone(),
        image: instance.image.clone(),
        status: Verdict::Unhealthy,
        outcome: "down",
        exit_code: None,
        detail: Some("the instance is down (stopped, or its agent exited)".into()),
        report: None,
    }
}

/// The worst verdict, Unknown for no instances at all (pure).
pub fn worst<'a>(rows: impl IntoIterator<Item = &'a InstanceHealth>) -> Verdict {
    rows.into_iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(Verdict::Unknown)
}

/// Runs `command` on `instances` and assesses each one (every instance gets a row, even
/// one the runner forgot to answer for).
pub async fn check<R: RunCommand>(
    runner: &R,
    instances: &[Instance],
    command: &Command,
    timeout: Duration,
) -> Result<Vec<InstanceHealth>, CloudError> {
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    let answers = runner.run(&ids, command, timeout).await?;
    Ok(instances
        .iter()
        .map(|i| assess(i, &answer_for(&answers, &i.id)))
        .collect())
}

fn answer_for(answers: &BTreeMap<String, Invocation>, id: &str) -> Invocation {
    answers
        .get(id)
        .cloned()
        .unwrap_or_else(|| Invocation::Unreachable {
            reason: "no answer from Run Command".into(),
        })
}

/// Worth restarting the agent: unhealthy, and reachable (a restart through SSM cannot
/// reach an instance the check could not).
pub fn needs_heal(h: &InstanceHealth) -> bool {
    h.status == Verdict::Unhealthy && h.outcome != "unreachable"
}

/// One heal: the restart's outcome and the instance's health before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heal {
    pub instance_id: String,
    pub before: Verdict,
    /// None when the restart failed and nothing was checked again.
    pub after: Option<Verdict>,
    /// How the restart went: `restarted`, or why not.
    pub restart: String,
}

/// Restarts the agent on the unhealthy instances of `rows`, waits `settle`, checks them
/// again, and replaces their rows with the new ones. The heals, in `rows` order.
pub async fn heal<R: RunCommand>(
    runner: &R,
    instances: &[Instance],
    rows: &mut [InstanceHealth],
    command: &Command,
    timeout: Duration,
    settle: Duration,
) -> Result<Vec<Heal>, CloudError> {
    let sick: Vec<&Instance> = instances
        .iter()
        .filter(|i| rows.iter().any(|r| r.instance_id == i.id && needs_heal(r)))
        .collect();
    if sick.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = sick.iter().map(|i| i.id.clone()).collect();
    let restarts = runner.run(&ids, &Command::RestartAgent, timeout).await?;
    let restarted: Vec<Instance> = sick
        .iter()
        .filter(|i| {
            matches!(
                restarts.get(&i.id),
                Some(Invocation::Exited { code: 0, .. })
            )
        })
        .map(|i| (*i).clone())
        .collect();
    if !restarted.is_empty() {
        tokio::time::sleep(settle).await;
    }
    let again = if restarted.is_empty() {
        Vec::new()
    } else {
        check(runner, &restarted, command, timeout).await?
    };
    let mut heals = Vec::new();
    for row in rows.iter_mut() {
        if !ids.contains(&row.instance_id) {
            continue;
        }
        let restart = describe_restart(&answer_for(&restarts, &row.instance_id));
        let after = again.iter().find(|a| a.instance_id == row.instance_id);
        heals.push(Heal {
            instance_id: row.instance_id.clone(),
            before: row.status,
            after: after.map(|a| a.status),
            restart,
        });
        if let Some(a) = after {
            *row = a.clone();
        }
    }
    Ok(heals)
}

fn describe_restart(i: &Invocation) -> String {
    match i {
        Invocation::Exited { code: 0, .. } => "restarted".into(),
        Invocation::Exited { code, stderr, .. } => {
            let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            format!("restart failed (exit {code}) {last}")
                .trim()
                .to_owned()
        }
        Invocation::Unreachable { reason } => format!("restart not delivered: {reason}"),
        Invocation::TimedOut { reason } => format!("restart timed out: {reason}"),
    }
}

fn content(r: Option<&AgentReport>) -> String {
    let Some(r) = r else { return "-".into() };
    let files = match (r.files_ok, r.files_checked) {
        (Some(ok), Some(all)) => Some(format!("{ok}/{all} ok")),
        _ => None,
    };
    let heals = r.heals_total.map(|h| format!("{h} heals"));
    let parts: Vec<String> = files.into_iter().chain(heals).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// Clock drift as shown: `+0 s`, `-4 s`, `-`.
pub fn clock(seconds: Option<i64>) -> String {
    seconds.map_or_else(|| "-".into(), |s| format!("{s:+} s"))
}

/// The table `health` prints (pure).
pub fn render(rows: &[InstanceHealth]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let report = r.report.as_ref();
            vec![
                r.instance_id.clone(),
                r.az.clone(),
                r.image.clone(),
                r.status.as_str().to_owned(),
                report
                    .and_then(|r| r.release.clone())
                    .unwrap_or_else(|| "-".into()),
                content(report),
                clock(report.and_then(|r| r.clock_drift_seconds)),
                r.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "AZ", "AMI", "STATUS", "RELEASE", "CONTENT", "CLOCK", "DETAIL",
        ],
        &cells,
    )
}

/// The heals as printed after the table (pure).
pub fn render_heals(heals: &[Heal]) -> String {
    let cells: Vec<Vec<String>> = heals
        .iter()
        .map(|h| {
            vec![
                h.instance_id.clone(),
                h.before.as_str().to_owned(),
                h.after.map_or("-", Verdict::as_str).to_owned(),
                h.restart.clone(),
            ]
        })
        .collect();
    table(&["HEALED", "BEFORE", "AFTER", "RESTART"], &cells)
}

#[cfg(test)]
mod tests;
