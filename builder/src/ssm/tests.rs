//! The waiting logic against a scripted SSM, in paused time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::status::InvocationStatus;
use super::*;

type Answer = Result<InvocationStatus, SsmError>;

#[derive(Default)]
struct FakeSsm {
    /// Instances SendCommand refuses with InvalidInstanceId.
    unregistered: BTreeSet<String>,
    /// GetCommandInvocation answers per instance, in order; the last one repeats.
    /// Instances without a script succeed at once.
    scripts: Mutex<BTreeMap<String, VecDeque<Answer>>>,
    /// SendCommand throttles this many times first.
    send_throttles: Mutex<u32>,
    sends: Mutex<Vec<SendRequest>>,
    gets: Mutex<Vec<(String, Instant)>>,
    cancels: Mutex<Vec<(String, Vec<String>)>>,
}

impl FakeSsm {
    fn script(self, id: &str, answers: Vec<Answer>) -> Self {
        self.scripts
            .lock()
            .unwrap()
            .insert(id.into(), answers.into());
        self
    }

    fn gets_of(&self, id: &str) -> Vec<Instant> {
        self.gets
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, t)| *t)
            .collect()
    }
}

fn ok(status: &str, details: &str, code: i32) -> Answer {
    Ok(InvocationStatus::new(status, details, code))
}

impl SsmApi for &FakeSsm {
    async fn send(&self, req: &SendRequest) -> Result<String, SsmError> {
        {
            let mut t = self.send_throttles.lock().unwrap();
            if *t > 0 {
                *t -= 1;
                return Err(SsmError::Throttled("Rate exceeded".into()));
            }
        }
        if let Some(bad) = req
            .instance_ids
            .iter()
            .find(|i| self.unregistered.contains(*i))
        {
            return Err(SsmError::InvalidInstanceId(format!("{bad} is not valid")));
        }
        let mut sends = self.sends.lock().unwrap();
        sends.push(req.clone());
        Ok(format!("cmd-{}", sends.len()))
    }

    async fn get(
        &self,
        _command_id: &str,
        instance_id: &str,
    ) -> Result<InvocationStatus, SsmError> {
        self.gets
            .lock()
            .unwrap()
            .push((instance_id.into(), Instant::now()));
        let mut scripts = self.scripts.lock().unwrap();
        match scripts.get_mut(instance_id) {
            None => ok("Success", "Success", 0),
            Some(q) if q.len() > 1 => q.pop_front().unwrap(),
            Some(q) => q.front().unwrap().clone(),
        }
    }

    async fn cancel(&self, command_id: &str, instance_ids: &[String]) -> Result<(), SsmError> {
        self.cancels
            .lock()
            .unwrap()
            .push((command_id.into(), instance_ids.to_vec()));
        Ok(())
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("i-{i:04}")).collect()
}

#[test]
fn chunks_of_fifty_without_repeats() {
    let sizes: Vec<usize> = chunks(&ids(120)).iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![50, 50, 20]);
    let mut twice = ids(3);
    twice.extend(ids(3));
    assert_eq!(chunks(&twice), vec![ids(3)]);
    assert!(chunks(&[]).is_empty());
}

#[test]
fn the_send_command_request() {
    let req = send_request(&ids(2), "ami-agent check --json", Duration::from_secs(60));
    assert_eq!(req.document, "AWS-RunShellScript");
    assert_eq!(req.commands, vec!["ami-agent check --json".to_owned()]);
    assert_eq!(req.execution_timeout_secs, 60);
    assert_eq!(req.delivery_timeout_secs, 60);
    assert_eq!(req.max_errors, "100%");
    assert_eq!(req.max_concurrency, "50");
    assert_eq!(req.comment, "amictl: ami-agent check --json");
    // SSM's smallest delivery timeout is 30 s; the script still gets only 5.
    let short = send_request(&ids(1), &"x".repeat(300), Duration::from_secs(5));
    assert_eq!(short.delivery_timeout_secs, 30);
    assert_eq!(short.execution_timeout_secs, 5);
    assert_eq!(short.comment.chars().count(), 100);
}

#[test]
fn error_codes() {
    assert!(matches!(
        error_kind(Some("InvalidInstanceId"), "m".into()),
        Some(SsmError::InvalidInstanceId(_))
    ));
    assert!(matches!(
        error_kind(Some("InvocationDoesNotExist"), "m".into()),
        Some(SsmError::InvocationDoesNotExist)
    ));
    assert!(matches!(
        error_kind(Some("ThrottlingException"), "Rate exceeded".into()),
        Some(SsmError::Throttled(_))
    ));
    assert!(error_kind(Some("AccessDeniedException"), "m".into()).is_none());
    assert!(error_kind(None, "m".into()).is_none());
}

#[tokio::test(start_paused = true)]
async fn runs_in_chunks_and_answers_for_every_instance() {
    let fake = FakeSsm::default();
    let all = ids(120);
    let out = SsmRunCommand::with_api(&fake)
        .run(&all, "true", Duration::from_secs(30))
        .await
        .unwrap();
    let sizes: Vec<usize> = fake
        .sends
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.instance_ids.len())
        .collect();
    assert_eq!(sizes, vec![50, 50, 20]);
    assert_eq!(out.len(), 120);
    assert!(out
        .values()
        .all(|i| matches!(i, Invocation::Exited { code: 0, .. })));
}

#[tokio::test(start_paused = true)]
async fn nothing_to_run_sends_nothing() {
    let fake = FakeSsm::default();
    let out = SsmRunCommand::with_api(&fake)
        .run(&[], "true", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(out.is_empty());
    assert!(fake.sends.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_unregistered_instance_does_not_stop_the_others() {
    let fake = FakeSsm {
        unregistered: ["i-0001".to_owned()].into(),
        ..Default::default()
    }
    .script("i-0002", vec![ok("Failed", "Failed", 2)]);
    let out = SsmRunCommand::with_api(&fake)
        .run(&ids(3), "check", Duration::from_secs(30))
        .await
        .unwrap();
    match &out["i-0001"] {
        Invocation::Unreachable { reason } => {
            assert!(reason.contains("not registered with SSM"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(out["i-0000"], Invocation::Exited { code: 0, .. }));
    assert!(matches!(out["i-0002"], Invocation::Exited { code: 2, .. }));
    // The chunk failed as a whole, then the two registered instances went singly.
    let sent: Vec<Vec<String>> = fake
        .sends
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.instance_ids.clone())
        .collect();
    assert_eq!(
        sent,
        vec![vec!["i-0000".to_owned()], vec!["i-0002".to_owned()]]
    );
}

#[tokio::test(start_paused = true)]
async fn invocation_does_not_exist_is_waited_out_for_a_while_only() {
    let fake = FakeSsm::default()
        .script(
            "i-0000",
            vec![
                Err(SsmError::InvocationDoesNotExist),
                Err(SsmError::InvocationDoesNotExist),
                ok("InProgress", "In Progress", -1),
                ok("Success", "Success", 0),
            ],
        )
        .script("i-0001", vec![Err(SsmError::InvocationDoesNotExist)]);
    let start = Instant::now();
    let out = SsmRunCommand::with_api(&fake)
        .run(&ids(2), "check", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(matches!(out["i-0000"], Invocation::Exited { code: 0, .. }));
    match &out["i-0001"] {
        Invocation::Unreachable { reason } => assert!(reason.contains("no invocation"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let waited = start.elapsed();
    assert!(
        waited >= NOT_YET_WINDOW && waited < NOT_YET_WINDOW + MAX_POLL_INTERVAL * 2,
        "{waited:?}"
    );
    // Nothing is cancelled: nothing was given up on at a deadline.
    assert!(fake.cancels.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn polling_backs_off_to_five_seconds() {
    let fake = FakeSsm::default().script(
        "i-0000",
        std::iter::repeat_with(|| ok("InProgress", "In Progress", -1))
            .take(12)
            .chain([ok("Success", "Success", 0)])
            .collect(),
    );
    let start = Instant::now();
    SsmRunCommand::with_api(&fake)
        .run(&ids(1), "check", Duration::from_secs(300))
        .await
        .unwrap();
    let times = fake.gets_of("i-0000");
    assert_eq!(times.len(), 13);
    let first = times[0] - start;
    assert!(
        first >= Duration::from_millis(800) && first <= Duration::from_millis(1200),
        "{first:?}"
    );
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(6)),
        "{gaps:?}"
    );
    assert!(*gaps.last().unwrap() >= Duration::from_secs(4), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn throttling_slows_polling_and_send_retries() {
    let fake = FakeSsm {
        send_throttles: Mutex::new(2),
        ..Default::default()
    }
    .script(
        "i-0000",
        vec![
            Err(SsmError::Throttled("Rate exceeded".into())),
            ok("Success", "Success", 0),
        ],
    );
    let out = SsmRunCommand::with_api(&fake)
        .run(&ids(2), "check", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(fake.sends.lock().unwrap().len(), 1);
    assert!(out
        .values()
        .all(|i| matches!(i, Invocation::Exited { code: 0, .. })));
    // After the throttled answer the round stopped (i-0001 not asked in it), and the next
    // round came at the slowest pace.
    let gets = fake.gets.lock().unwrap().clone();
    assert_eq!(gets[0].0, "i-0000");
    assert_eq!(gets[1].0, "i-0000");
    let gap = gets[1].1 - gets[0].1;
    assert!(gap >= MAX_POLL_INTERVAL.mul_f64(0.8), "{gap:?}");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_reports_and_cancels_what_is_still_under_way() {
    let fake = FakeSsm::default()
        .script("i-0000", vec![ok("InProgress", "In Progress", -1)])
        .script("i-0001", vec![ok("Pending", "Pending", -1)])
        .script("i-0002", vec![ok("Delayed", "Delayed", -1)]);
    let start = Instant::now();
    let out = SsmRunCommand::with_api(&fake)
        .run(&ids(4), "check", Duration::from_secs(20))
        .await
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(20) + GRACE
            && waited < Duration::from_secs(20) + GRACE + Duration::from_secs(1),
        "{waited:?}"
    );
    assert!(matches!(out["i-0000"], Invocation::TimedOut { .. }));
    assert!(matches!(out["i-0001"], Invocation::Unreachable { .. }));
    assert!(matches!(out["i-0002"], Invocation::Unreachable { .. }));
    assert!(matches!(out["i-0003"], Invocation::Exited { code: 0, .. }));
    assert_eq!(
        *fake.cancels.lock().unwrap(),
        vec![("cmd-1".to_owned(), ids(3))]
    );
}

#[tokio::test(start_paused = true)]
async fn access_denied_fails_the_call() {
    let fake = FakeSsm::default().script(
        "i-0000",
        vec![Err(SsmError::Aws(crate::aws::AwsError::Denied {
            action: "ssm:GetCommandInvocation",
            message: "no".into(),
        }))],
    );
    let err = SsmRunCommand::with_api(&fake)
        .run(&ids(1), "check", Duration::from_secs(20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CloudError::Denied {
                action: "ssm:GetCommandInvocation",
                ..
            }
        ),
        "{err:?}"
    );
}
