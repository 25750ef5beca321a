//! The waiting logic against a scripted SSM, in paused time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::status::InvocationStatus;
use super::*;

type Answer = Result<InvocationStatus, SsmError>;

/// A document's versions (content, GetDocument calls left before it is Active) and default.
#[derive(Debug, Clone, Default)]
pub(super) struct FakeDocument {
    pub(super) versions: Vec<(String, u32)>,
    /// 1-based, as SSM numbers versions.
    pub(super) default: usize,
}

#[derive(Default)]
pub(super) struct FakeSsm {
    /// Instances SendCommand refuses with InvalidInstanceId.
    pub(super) unregistered: BTreeSet<String>,
    /// GetCommandInvocation answers per instance, in order; the last one repeats.
    /// Instances without a script succeed at once.
    pub(super) scripts: Mutex<BTreeMap<String, VecDeque<Answer>>>,
    /// SendCommand throttles this many times first.
    pub(super) send_throttles: Mutex<u32>,
    pub(super) sends: Mutex<Vec<SendRequest>>,
    pub(super) gets: Mutex<Vec<(String, Instant)>>,
    pub(super) cancels: Mutex<Vec<(String, Vec<String>)>>,
    /// SSM documents by name.
    pub(super) documents: Mutex<BTreeMap<String, FakeDocument>>,
    /// The document calls, in order: `get NAME VERSION`, `create NAME`, `update NAME`,
    /// `default NAME VERSION`.
    pub(super) document_calls: Mutex<Vec<String>>,
    /// CreateDocument and UpdateDocument are denied (health's and drift's IAM scopes).
    pub(super) read_only: bool,
    /// New versions stay Creating for this many GetDocument calls.
    pub(super) creating_for: u32,
    /// Someone else creates the document with this content just before our CreateDocument.
    pub(super) created_meanwhile: Mutex<Option<String>>,
}

impl FakeSsm {
    pub(super) fn with_document(self, name: &str, versions: &[&str], default: usize) -> Self {
        self.documents.lock().unwrap().insert(
            name.into(),
            FakeDocument {
                versions: versions.iter().map(|c| (c.to_string(), 0)).collect(),
                default,
            },
        );
        self
    }

    pub(super) fn calls(&self) -> Vec<String> {
        self.document_calls.lock().unwrap().clone()
    }

    fn call(&self, c: String) {
        self.document_calls.lock().unwrap().push(c);
    }

    fn denied(&self, action: &'static str) -> Result<(), SsmError> {
        if self.read_only {
            return Err(SsmError::Aws(crate::aws::AwsError::Denied {
                action,
                message: "not authorized".into(),
            }));
        }
        Ok(())
    }

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

    async fn get_document(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<StoredDocument>, SsmError> {
        self.call(format!("get {name} {}", version.unwrap_or("default")));
        let mut docs = self.documents.lock().unwrap();
        let Some(d) = docs.get_mut(name) else {
            return Ok(None);
        };
        let n = match version {
            None => d.default,
            Some("$LATEST") => d.versions.len(),
            Some(v) => v.parse().unwrap(),
        };
        let Some((content, creating)) = d.versions.get_mut(n.wrapping_sub(1)) else {
            return Ok(None);
        };
        let status = if *creating > 0 {
            *creating -= 1;
            "Creating"
        } else {
            "Active"
        };
        Ok(Some(StoredDocument {
            version: n.to_string(),
            status: status.into(),
            status_information: None,
            content: content.clone(),
        }))
    }

    async fn create_document(&self, name: &str, content: &str) -> Result<String, SsmError> {
        self.call(format!("create {name}"));
        self.denied("ssm:CreateDocument")?;
        let mut docs = self.documents.lock().unwrap();
        if let Some(theirs) = self.created_meanwhile.lock().unwrap().take() {
            docs.insert(
                name.into(),
                FakeDocument {
                    versions: vec![(theirs, 0)],
                    default: 1,
                },
            );
        }
        if docs.contains_key(name) {
            return Err(SsmError::DocumentAlreadyExists);
        }
        docs.insert(
            name.into(),
            FakeDocument {
                versions: vec![(content.into(), self.creating_for)],
                default: 1,
            },
        );
        Ok("1".into())
    }

    async fn update_document(&self, name: &str, content: &str) -> Result<String, SsmError> {
        self.call(format!("update {name}"));
        self.denied("ssm:UpdateDocument")?;
        let mut docs = self.documents.lock().unwrap();
        let d = docs
            .get_mut(name)
            .ok_or_else(|| SsmError::InvalidDocument(name.into()))?;
        // As SSM: no two versions with the same bytes.
        if d.versions.iter().any(|(c, _)| c == content) {
            return Err(SsmError::DuplicateDocumentContent);
        }
        d.versions.push((content.into(), self.creating_for));
        Ok(d.versions.len().to_string())
    }

    async fn set_default_version(&self, name: &str, version: &str) -> Result<(), SsmError> {
        self.call(format!("default {name} {version}"));
        self.denied("ssm:UpdateDocumentDefaultVersion")?;
        let mut docs = self.documents.lock().unwrap();
        let d = docs
            .get_mut(name)
            .ok_or_else(|| SsmError::InvalidDocument(name.into()))?;
        d.default = version.parse().unwrap();
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
    let ours = Target {
        document: "amictl-HealthCheck".into(),
        version: Some("3".into()),
        takes_timeout: true,
    };
    let req = send_request(&ids(2), &ours, Duration::from_secs(60));
    assert_eq!(req.document, "amictl-HealthCheck");
    assert_eq!(req.document_version.as_deref(), Some("3"));
    assert_eq!(req.execution_timeout_secs, Some(60));
    assert_eq!(req.delivery_timeout_secs, 60);
    assert_eq!(req.max_errors, "100%");
    assert_eq!(req.max_concurrency, "50");
    assert_eq!(req.comment, "amictl: amictl-HealthCheck");
    // SSM's smallest delivery timeout is 30 s; the command still gets only 5.
    let short = send_request(&ids(1), &ours, Duration::from_secs(5));
    assert_eq!(short.delivery_timeout_secs, 30);
    assert_eq!(short.execution_timeout_secs, Some(5));
    // The operator's document: its default version, no parameters it may not take.
    let theirs = Target {
        document: "x".repeat(120),
        version: None,
        takes_timeout: false,
    };
    let req = send_request(&ids(1), &theirs, Duration::from_secs(60));
    assert_eq!(req.execution_timeout_secs, None);
    assert_eq!(req.document_version, None);
    assert_eq!(req.comment.chars().count(), 100);
}

#[tokio::test(start_paused = true)]
async fn amictls_commands_go_as_its_documents_at_the_checked_version() {
    // An old default with the wrong content: amictl writes version 2 and names it.
    let fake = FakeSsm::default().with_document("web-HealthCheck", &["{}"], 1);
    let runner = SsmRunCommand::with_api(&fake, "web-");
    runner
        .run(&ids(1), &Command::Health, Duration::from_secs(30))
        .await
        .unwrap();
    runner
        .run(&ids(1), &Command::Health, Duration::from_secs(30))
        .await
        .unwrap();
    runner
        .run(&ids(1), &Command::Drift, Duration::from_secs(30))
        .await
        .unwrap();
    let sends = fake.sends.lock().unwrap().clone();
    let sent: Vec<(&str, Option<&str>, Option<u64>)> = sends
        .iter()
        .map(|r| {
            (
                r.document.as_str(),
                r.document_version.as_deref(),
                r.execution_timeout_secs,
            )
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("web-HealthCheck", Some("2"), Some(30)),
            ("web-HealthCheck", Some("2"), Some(30)),
            ("web-DriftReport", Some("1"), Some(30)),
        ]
    );
    // Each document is checked once per process.
    let gets = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("get web-HealthCheck default"))
        .count();
    assert_eq!(gets, 1, "{:?}", fake.calls());
}

#[tokio::test(start_paused = true)]
async fn a_shell_command_is_never_sent_and_an_own_document_goes_as_is() {
    let fake = FakeSsm::default();
    let runner = SsmRunCommand::with_api(&fake, "amictl-");
    let err = runner
        .run(
            &ids(1),
            &Command::Shell("id".into()),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not shell commands"), "{err}");
    runner
        .run(
            &ids(1),
            &Command::Document("amictl-MyCheck".into()),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let sends = fake.sends.lock().unwrap().clone();
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].document, "amictl-MyCheck");
    assert_eq!(sends[0].document_version, None);
    // Not amictl's: neither read nor written.
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
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
    assert!(matches!(
        error_kind(Some("InvalidDocument"), "m".into()),
        Some(SsmError::InvalidDocument(_))
    ));
    assert!(matches!(
        error_kind(Some("DocumentAlreadyExists"), "m".into()),
        Some(SsmError::DocumentAlreadyExists)
    ));
    assert!(matches!(
        error_kind(Some("DuplicateDocumentContent"), "m".into()),
        Some(SsmError::DuplicateDocumentContent)
    ));
    assert!(error_kind(Some("AccessDeniedException"), "m".into()).is_none());
    assert!(error_kind(None, "m".into()).is_none());
}

#[tokio::test(start_paused = true)]
async fn runs_in_chunks_and_answers_for_every_instance() {
    let fake = FakeSsm::default();
    let all = ids(120);
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&all, &Command::Health, Duration::from_secs(30))
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
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&[], &Command::Health, Duration::from_secs(30))
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
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(3), &Command::Health, Duration::from_secs(30))
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
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(2), &Command::Health, Duration::from_secs(300))
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
    SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(1), &Command::Health, Duration::from_secs(300))
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
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(2), &Command::Health, Duration::from_secs(60))
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
    let out = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(4), &Command::Health, Duration::from_secs(20))
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
    let err = SsmRunCommand::with_api(&fake, "amictl-")
        .run(&ids(1), &Command::Health, Duration::from_secs(20))
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
