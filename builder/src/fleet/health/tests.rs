use std::sync::Mutex;

use super::*;
use crate::fleet::InstanceState;

const GOOD: &str = r#"{"status":"degraded","exit_code":1,"url":"http://127.0.0.1/","release":"v7","files_checked":12,"files_ok":12,"problems":["content drift healed recently (3 heals in all)"],"agent_status":"degraded","clock_drift_seconds":-1,"heals_total":3,"uptime_seconds":3600,"summary":"degraded: http://127.0.0.1/ (release v7)"}"#;

fn instance(id: &str) -> Instance {
    Instance {
        id: id.into(),
        az: "us-east-1a".into(),
        image: "ami-1".into(),
        spec: "s".into(),
        state: InstanceState::Running,
        rollout: Some("r1".into()),
        retiring: None,
        address: None,
        group: None,
    }
}

fn exited(code: i32, stdout: &str) -> Invocation {
    Invocation::Exited {
        code,
        stdout: stdout.into(),
        stderr: String::new(),
    }
}

#[test]
fn parses_a_good_report() {
    let r = parse_report(&format!("{GOOD}\n")).unwrap();
    assert_eq!(r.status.as_deref(), Some("degraded"));
    assert_eq!(r.release.as_deref(), Some("v7"));
    assert_eq!((r.files_ok, r.files_checked), (Some(12), Some(12)));
    assert_eq!(r.clock_drift_seconds, Some(-1));
    assert_eq!(r.heals_total, Some(3));
    assert_eq!(r.problems.len(), 1);
    assert!(!r.truncated);
}

#[test]
fn tolerates_unknown_fields_missing_fields_and_text_around() {
    let r =
        parse_report("warning: something\n{\"status\":\"healthy\",\"new_field\":[1,2]}\ntrailing")
            .unwrap();
    assert_eq!(r.status.as_deref(), Some("healthy"));
    assert_eq!(r.release, None);
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(GOOD).unwrap())
            .unwrap();
    assert_eq!(parse_report(&pretty).unwrap().heals_total, Some(3));
    let r = parse_report("{oops\n{\"exit_code\":0}").unwrap();
    assert_eq!(r.exit_code, Some(0));
}

#[test]
fn salvages_a_truncated_report() {
    let cut = &GOOD[..GOOD.find("\"agent_status\"").unwrap() - 30];
    let r = parse_report(cut).unwrap();
    assert!(r.truncated);
    assert_eq!(r.status.as_deref(), Some("degraded"));
    assert_eq!(r.exit_code, Some(1));
    assert_eq!(r.release.as_deref(), Some("v7"));
    assert_eq!(r.files_ok, Some(12));
    assert_eq!(r.heals_total, None);
    // A problem that quotes a key is inside a string: its quotes are escaped.
    let tricky = r#"{"status":"unhealthy","problems":["/a: \"release\":\"evil\""],"release":"v2","#;
    let r = parse_report(tricky).unwrap();
    assert_eq!(r.release.as_deref(), Some("v2"));
}

#[test]
fn garbage_is_no_report() {
    for junk in [
        "",
        "ok",
        "{",
        "{not json",
        "[1,2]",
        "12",
        "{\"unrelated\": true",
    ] {
        assert_eq!(parse_report(junk), None, "{junk:?}");
    }
}

#[test]
fn the_exit_code_decides() {
    let i = instance("i-1");
    assert_eq!(assess(&i, &exited(0, GOOD)).status, Verdict::Healthy);
    let d = assess(&i, &exited(1, GOOD));
    assert_eq!(d.status, Verdict::Degraded);
    assert_eq!(
        d.detail.as_deref(),
        Some("content drift healed recently (3 heals in all)")
    );
    assert_eq!(assess(&i, &exited(2, "")).status, Verdict::Unhealthy);
    assert_eq!(assess(&i, &exited(3, "")).status, Verdict::Unknown);
    let missing = assess(
        &i,
        &Invocation::Exited {
            code: 127,
            stdout: String::new(),
            stderr: "sh: ami-agent: not found\n".into(),
        },
    );
    assert_eq!(missing.status, Verdict::Unknown);
    assert_eq!(missing.detail.as_deref(), Some("sh: ami-agent: not found"));
}

#[test]
fn empty_output_with_exit_zero_is_healthy() {
    let h = assess(&instance("i-1"), &exited(0, ""));
    assert_eq!(h.status, Verdict::Healthy);
    assert_eq!(h.report, None);
    assert_eq!(h.detail, None);
}

#[test]
fn unreachable_and_timed_out_are_unhealthy() {
    let i = instance("i-1");
    let u = assess(
        &i,
        &Invocation::Unreachable {
            reason: "not registered".into(),
        },
    );
    assert_eq!((u.status, u.outcome), (Verdict::Unhealthy, "unreachable"));
    assert!(!needs_heal(&u));
    let t = assess(
        &i,
        &Invocation::TimedOut {
            reason: "slow".into(),
        },
    );
    assert_eq!((t.status, t.outcome), (Verdict::Unhealthy, "timed_out"));
    assert!(needs_heal(&t));
}

#[test]
fn the_worst_wins_and_nothing_is_unknown() {
    let i = instance("i-1");
    let rows = vec![assess(&i, &exited(0, "")), assess(&i, &exited(1, ""))];
    assert_eq!(worst(&rows), Verdict::Degraded);
    let mut rows = rows;
    rows.push(assess(&i, &Invocation::Unreachable { reason: "x".into() }));
    assert_eq!(worst(&rows).exit_code(), 2);
    rows.push(assess(&i, &exited(3, "")));
    assert_eq!(worst(&rows).exit_code(), 3);
    assert_eq!(worst(&[]), Verdict::Unknown);
}

#[test]
fn table_rows() {
    let t = render(&[
        assess(&instance("i-1"), &exited(1, GOOD)),
        assess(
            &instance("i-2"),
            &Invocation::Unreachable {
                reason: "gone".into(),
            },
        ),
    ]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("INSTANCE  AZ"), "{t}");
    assert!(
        lines[1].contains("degraded") && lines[1].contains("v7"),
        "{t}"
    );
    assert!(
        lines[1].contains("12/12 ok, 3 heals") && lines[1].contains("-1 s"),
        "{t}"
    );
    assert!(
        lines[2].contains("unhealthy") && lines[2].contains("unreachable: gone"),
        "{t}"
    );
    assert_eq!(clock(Some(0)), "+0 s");
}

/// Answers from a script keyed by (command, instance); records every run.
struct Scripted {
    answers: Mutex<BTreeMap<(String, String), Vec<Invocation>>>,
    runs: Mutex<Vec<(Command, Vec<String>)>>,
}

impl Scripted {
    fn new(script: &[(Command, &str, Invocation)]) -> Self {
        let mut answers: BTreeMap<(String, String), Vec<Invocation>> = BTreeMap::new();
        for (cmd, id, inv) in script {
            answers
                .entry((format!("{cmd:?}"), id.to_string()))
                .or_default()
                .push(inv.clone());
        }
        Scripted {
            answers: Mutex::new(answers),
            runs: Mutex::new(Vec::new()),
        }
    }
}

impl RunCommand for Scripted {
    async fn run(
        &self,
        ids: &[String],
        command: &Command,
        _timeout: Duration,
    ) -> Result<BTreeMap<String, Invocation>, CloudError> {
        self.runs
            .lock()
            .unwrap()
            .push((command.clone(), ids.to_vec()));
        let mut answers = self.answers.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| {
                let q = answers.get_mut(&(format!("{command:?}"), id.clone()))?;
                let a = if q.len() > 1 {
                    q.remove(0)
                } else {
                    q[0].clone()
                };
                Some((id.clone(), a))
            })
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn heal_restarts_the_unhealthy_and_checks_them_again() {
    let c = Command::Health;
    let restart = Command::RestartAgent;
    let fleet = vec![
        instance("i-ok"),
        instance("i-sick"),
        instance("i-gone"),
        instance("i-stuck"),
    ];
    let runner = Scripted::new(&[
        (c.clone(), "i-ok", exited(0, "")),
        (c.clone(), "i-sick", exited(2, "")),
        (c.clone(), "i-sick", exited(0, "")),
        (
            c.clone(),
            "i-gone",
            Invocation::Unreachable { reason: "x".into() },
        ),
        (c.clone(), "i-stuck", exited(2, "")),
        (restart.clone(), "i-sick", exited(0, "")),
        (restart.clone(), "i-stuck", exited(5, "")),
    ]);
    let mut rows = check(&runner, &fleet, &c, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(worst(&rows), Verdict::Unhealthy);
    let heals = heal(
        &runner,
        &fleet,
        &mut rows,
        &c,
        Duration::from_secs(30),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(
        heals,
        vec![
            Heal {
                instance_id: "i-sick".into(),
                before: Verdict::Unhealthy,
                after: Some(Verdict::Healthy),
                restart: "restarted".into(),
            },
            Heal {
                instance_id: "i-stuck".into(),
                before: Verdict::Unhealthy,
                after: None,
                restart: "restart failed (exit 5)".into(),
            },
        ]
    );
    let runs = runner.runs.lock().unwrap().clone();
    assert_eq!(
        runs[1],
        (restart, vec!["i-sick".to_owned(), "i-stuck".to_owned()])
    );
    assert_eq!(runs[2], (c, vec!["i-sick".to_owned()]));
    let status: Vec<Verdict> = rows.iter().map(|r| r.status).collect();
    assert_eq!(
        status,
        vec![
            Verdict::Healthy,
            Verdict::Healthy,
            Verdict::Unhealthy,
            Verdict::Unhealthy
        ]
    );
    let printed = render_heals(&heals);
    let sick = printed.lines().find(|l| l.starts_with("i-sick")).unwrap();
    let words: Vec<&str> = sick.split_whitespace().collect();
    assert_eq!(words, vec!["i-sick", "unhealthy", "healthy", "restarted"]);
}

#[tokio::test]
async fn an_instance_without_an_answer_is_unhealthy() {
    let runner = Scripted::new(&[]);
    let rows = check(
        &runner,
        &[instance("i-1")],
        &Command::Health,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(rows[0].status, Verdict::Unhealthy);
    assert_eq!(rows[0].outcome, "unreachable");
}
