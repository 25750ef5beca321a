//! `deploy` and `delete` against a scripted CloudFormation, in paused time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::delete::{delete, prepare, Prepared};
use super::deploy::{deploy, Change, DeployRequest};
use super::events::STACK_TYPE;
use super::plan::{Kind, ParameterValue};
use super::watch::EventCursor;
use super::*;

const POLL: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(600);
const WAIT: Wait = Wait {
    timeout: TIMEOUT,
    poll: POLL,
};

/// One look at the stack after the operation started: its status then, and the events
/// that happened by then.
type Step = (&'static str, Vec<StackEvent>);

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    stack: Mutex<Option<StackInfo>>,
    /// What CreateChangeSet fails with, if it does.
    create_error: Option<String>,
    /// DescribeChangeSet's answers in turn (the last one repeats).
    change_sets: Mutex<VecDeque<ChangeSetState>>,
    /// Played one step per DescribeStacks once the change set runs or the deletion starts
    /// (the last one repeats).
    script: Mutex<VecDeque<Step>>,
    started: Mutex<bool>,
    /// Oldest first.
    events: Mutex<Vec<StackEvent>>,
    /// DescribeStackEvents' page size.
    page: usize,
    /// The outputs once the stack is complete.
    outputs: BTreeMap<String, String>,
    occupants: Vec<Occupant>,
}

/// A stack event for tests: `web` is the stack itself, anything else a VPC.
pub(crate) fn event(id: &str, resource: &str, status: &str, reason: Option<&str>) -> StackEvent {
    StackEvent {
        id: id.into(),
        time: 1_700_000_000,
        resource: resource.into(),
        resource_type: if resource == "web" {
            STACK_TYPE.into()
        } else {
            "AWS::EC2::VPC".into()
        },
        status: status.into(),
        reason: reason.map(str::to_owned),
    }
}

fn stack(status: &str, parameters: &[(&str, &str)]) -> StackInfo {
    StackInfo {
        id: "arn:stack/web/1".into(),
        name: "web".into(),
        status: status.into(),
        reason: None,
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        outputs: [("Vpc", "vpc-1"), ("Url", "http://lb/")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

fn ready() -> ChangeSetState {
    ChangeSetState {
        status: "CREATE_COMPLETE".into(),
        execution: Some("AVAILABLE".into()),
        reason: None,
    }
}

fn pending() -> ChangeSetState {
    ChangeSetState {
        status: "CREATE_IN_PROGRESS".into(),
        execution: Some("UNAVAILABLE".into()),
        reason: None,
    }
}

fn failed(reason: &str) -> ChangeSetState {
    ChangeSetState {
        status: "FAILED".into(),
        execution: Some("UNAVAILABLE".into()),
        reason: Some(reason.into()),
    }
}

impl Fake {
    fn new() -> Self {
        Fake {
            page: 100,
            outputs: [("Vpc", "vpc-9"), ("Url", "http://new-lb/")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Fake::default()
        }
    }

    fn with_stack(self, s: StackInfo) -> Self {
        *self.stack.lock().unwrap() = Some(s);
        self
    }

    fn with_change_sets(self, states: Vec<ChangeSetState>) -> Self {
        *self.change_sets.lock().unwrap() = states.into();
        self
    }

    fn with_script(self, steps: Vec<Step>) -> Self {
        *self.script.lock().unwrap() = steps.into();
        self
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn called(&self, what: &str) -> bool {
        self.calls().iter().any(|c| c.starts_with(what))
    }

    fn call(&self, c: String) {
        self.calls.lock().unwrap().push(c);
    }
}

impl Stacks for Fake {
    async fn describe(&self, name: &str) -> Result<Option<StackInfo>, StackError> {
        self.call(format!("describe {name}"));
        let mut current = self.stack.lock().unwrap();
        if *self.started.lock().unwrap() {
            let mut script = self.script.lock().unwrap();
            let step = if script.len() > 1 {
                script.pop_front()
            } else {
                script.front().cloned()
            };
            if let Some((status, events)) = step {
                self.events.lock().unwrap().extend(events);
                let s = current.get_or_insert_with(|| stack("REVIEW_IN_PROGRESS", &[]));
                s.status = status.to_owned();
                if status.ends_with("_COMPLETE") && !status.contains("ROLLBACK") {
                    s.outputs = self.outputs.clone();
                }
            }
        }
        // A deleted stack is listed by its ARN only.
        Ok(current
            .clone()
            .filter(|s| s.status != "DELETE_COMPLETE" || name.starts_with("arn:")))
    }

    async fn create_change_set(
        &self,
        request: &ChangeSetRequest,
    ) -> Result<ChangeSetCreated, StackError> {
        self.call(format!("create_change_set {:?}", request.kind));
        assert_eq!(request.template, TEMPLATE);
        if let Some(e) = &self.create_error {
            return Err(AwsError::Other {
                action: "cloudformation:CreateChangeSet",
                message: e.clone(),
            }
            .into());
        }
        self.stack
            .lock()
            .unwrap()
            .get_or_insert_with(|| stack("REVIEW_IN_PROGRESS", &[]));
        self.calls
            .lock()
            .unwrap()
            .push(format!("parameters {:?}", request.parameters));
        Ok(ChangeSetCreated {
            id: "arn:changeSet/1".into(),
            stack_id: "arn:stack/web/1".into(),
        })
    }

    async fn change_set(&self, _id: &str) -> Result<ChangeSetState, StackError> {
        let mut states = self.change_sets.lock().unwrap();
        Ok(if states.len() > 1 {
            states.pop_front().unwrap()
        } else {
            states.front().cloned().expect("a change set state")
        })
    }

    async fn execute_change_set(&self, _id: &str, token: &str) -> Result<(), StackError> {
        self.call(format!("execute {token}"));
        *self.started.lock().unwrap() = true;
        Ok(())
    }

    async fn delete_change_set(&self, _id: &str) -> Result<(), StackError> {
        self.call("delete_change_set".into());
        Ok(())
    }

    async fn events(&self, _stack_id: &str, next: Option<String>) -> Result<EventPage, StackError> {
        let newest_first: Vec<StackEvent> =
            self.events.lock().unwrap().iter().rev().cloned().collect();
        let from: usize = next.map(|n| n.parse().unwrap()).unwrap_or(0);
        let to = (from + self.page).min(newest_first.len());
        Ok(EventPage {
            events: newest_first[from..to].to_vec(),
            next: (to < newest_first.len()).then(|| to.to_string()),
        })
    }

    async fn delete_stack(&self, stack_id: &str, _token: &str) -> Result<(), StackError> {
        self.call(format!("delete_stack {stack_id}"));
        *self.started.lock().unwrap() = true;
        Ok(())
    }
}

impl Occupants for Fake {
    async fn instances_in_vpc(&self, vpc: &str) -> Result<Vec<Occupant>, StackError> {
        self.call(format!("occupants {vpc}"));
        Ok(self.occupants.clone())
    }
}

async fn go(fake: &Fake, prefix: Option<&str>) -> (Result<deploy::Deployed, StackError>, String) {
    let mut out = Vec::new();
    let request = DeployRequest {
        name: "web",
        prefix,
        certificate_arn: None,
        template: TEMPLATE,
    };
    let r = deploy(fake, &request, WAIT, &mut out).await;
    (r, String::from_utf8(out).unwrap())
}

#[tokio::test(start_paused = true)]
async fn creates_through_a_change_set_and_prints_each_event_once() {
    let fake = Fake::new()
        .with_change_sets(vec![pending(), ready()])
        .with_script(vec![
            (
                "CREATE_IN_PROGRESS",
                vec![
                    event("1", "web", "CREATE_IN_PROGRESS", Some("User Initiated")),
                    event("2", "Vpc", "CREATE_IN_PROGRESS", None),
                ],
            ),
            ("CREATE_IN_PROGRESS", vec![]),
            (
                "CREATE_COMPLETE",
                vec![
                    event("3", "Vpc", "CREATE_COMPLETE", None),
                    event("4", "web", "CREATE_COMPLETE", None),
                ],
            ),
        ]);
    let start = Instant::now();
    let (r, out) = go(&fake, None).await;
    let d = r.unwrap();
    assert_eq!(d.change, Change::Created);
    assert_eq!(d.stack.outputs["Url"], "http://new-lb/");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].ends_with("web  CREATE_IN_PROGRESS  User Initiated"),
        "{out}"
    );
    assert!(lines[3].ends_with("web  CREATE_COMPLETE"), "{out}");
    // One poll for the change set, two for the stack.
    assert_eq!(start.elapsed(), 3 * POLL);
    let calls = fake.calls();
    assert!(
        calls.contains(&"create_change_set Create".to_owned()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&r#"parameters [("Prefix", Value("amictl-"))]"#.to_owned()),
        "{calls:?}"
    );
    assert!(fake.called("execute amictl-"), "{calls:?}");
}

#[tokio::test(start_paused = true)]
async fn an_update_keeps_the_prefix_and_the_other_parameters() {
    let fake = Fake::new()
        .with_stack(stack(
            "UPDATE_COMPLETE",
            &[("Prefix", "web-"), ("VpcCidr", "10.9.0.0/16")],
        ))
        .with_change_sets(vec![ready()])
        .with_script(vec![("UPDATE_COMPLETE", vec![])]);
    let (r, _) = go(&fake, None).await;
    assert_eq!(r.unwrap().change, Change::Updated);
    let expected = vec![
        ("Prefix".to_owned(), ParameterValue::Value("web-".into())),
        ("VpcCidr".to_owned(), ParameterValue::UsePrevious),
    ];
    assert!(
        fake.calls().contains(&format!("parameters {expected:?}")),
        "{:?}",
        fake.calls()
    );
    assert!(fake.called(&format!("create_change_set {:?}", Kind::Update)));
}

#[tokio::test(start_paused = true)]
async fn an_unexecuted_change_set_stack_is_created_afresh() {
    // Left by a deploy that stopped before executing: its prefix binds nothing.
    let fake = Fake::new()
        .with_stack(stack("REVIEW_IN_PROGRESS", &[("Prefix", "old-")]))
        .with_change_sets(vec![ready()])
        .with_script(vec![("CREATE_COMPLETE", vec![])]);
    let (r, _) = go(&fake, Some("new-")).await;
    assert_eq!(r.unwrap().change, Change::Created);
    assert!(
        fake.calls()
            .contains(&r#"parameters [("Prefix", Value("new-"))]"#.to_owned()),
        "{:?}",
        fake.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_change_set_without_changes_is_up_to_date_and_deleted() {
    let fake = Fake::new()
        .with_stack(stack("CREATE_COMPLETE", &[("Prefix", "amictl-")]))
        .with_change_sets(vec![
            pending(),
            failed("The submitted information didn't contain changes. Submit different information to create a change set."),
        ]);
    let (r, out) = go(&fake, Some("amictl-")).await;
    let d = r.unwrap();
    assert_eq!(d.change, Change::UpToDate);
    assert_eq!(d.stack.outputs["Url"], "http://lb/");
    assert!(out.is_empty(), "{out}");
    assert!(fake.called("delete_change_set"));
    assert!(!fake.called("execute"));
}

#[tokio::test(start_paused = true)]
async fn no_updates_to_be_performed_is_up_to_date() {
    let mut fake = Fake::new().with_stack(stack("UPDATE_COMPLETE", &[("Prefix", "amictl-")]));
    fake.create_error = Some("ValidationError: No updates are to be performed.".into());
    let (r, _) = go(&fake, None).await;
    assert_eq!(r.unwrap().change, Change::UpToDate);
    assert!(!fake.called("delete_change_set") && !fake.called("execute"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_create_reports_the_reasons_and_how_to_delete() {
    let fake = Fake::new()
        .with_change_sets(vec![ready()])
        .with_script(vec![
            (
                "CREATE_IN_PROGRESS",
                vec![event("1", "Vpc", "CREATE_IN_PROGRESS", None)],
            ),
            (
                "ROLLBACK_IN_PROGRESS",
                vec![
                    event("2", "Vpc", "CREATE_FAILED", Some("The CIDR is invalid")),
                    event(
                        "3",
                        "Igw",
                        "CREATE_FAILED",
                        Some("Resource creation cancelled"),
                    ),
                    event(
                        "4",
                        "web",
                        "ROLLBACK_IN_PROGRESS",
                        Some("The following resource(s) failed to create: [Vpc, Igw]."),
                    ),
                ],
            ),
            (
                "ROLLBACK_COMPLETE",
                vec![event("5", "web", "ROLLBACK_COMPLETE", None)],
            ),
        ]);
    let (r, out) = go(&fake, None).await;
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, StackError::Failed { status, reasons, .. }
            if status == "ROLLBACK_COMPLETE" && reasons.len() == 1),
        "{msg}"
    );
    assert!(msg.contains("The CIDR is invalid"), "{msg}");
    assert!(msg.contains("amictl stack delete --name web"), "{msg}");
    assert_eq!(out.lines().count(), 5, "{out}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_change_set_leaves_nothing_behind() {
    let fake = Fake::new().with_change_sets(vec![failed("Template format error: bad")]);
    let (r, _) = go(&fake, None).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("Template format error"), "{msg}");
    assert!(fake.called("delete_change_set"));
    assert!(
        fake.called("delete_stack arn:stack/web/1"),
        "{:?}",
        fake.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn the_wait_has_a_deadline() {
    let fake = Fake::new()
        .with_change_sets(vec![ready()])
        .with_script(vec![("CREATE_IN_PROGRESS", vec![])]);
    let start = Instant::now();
    let (r, _) = go(&fake, None).await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("still CREATE_IN_PROGRESS after 600 s"),
        "{msg}"
    );
    assert_eq!(start.elapsed(), TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn refusals_come_before_any_change() {
    let fake = Fake::new().with_stack(stack("ROLLBACK_COMPLETE", &[("Prefix", "amictl-")]));
    let msg = go(&fake, None).await.0.unwrap_err().to_string();
    assert!(msg.contains("amictl stack delete --name web"), "{msg}");
    assert!(!fake.called("create_change_set"));

    let fake = Fake::new().with_stack(stack("CREATE_COMPLETE", &[("Prefix", "amictl-")]));
    let e = go(&fake, Some("other-")).await.0.unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(!fake.called("create_change_set"));

    let fake = Fake::new();
    let e = go(&fake, Some("Bad_Prefix")).await.0.unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[tokio::test(start_paused = true)]
async fn a_bad_name_makes_no_call() {
    let fake = Fake::new();
    let mut out = Vec::new();
    let request = DeployRequest {
        name: "9lives",
        prefix: None,
        certificate_arn: None,
        template: TEMPLATE,
    };
    let e = deploy(&fake, &request, WAIT, &mut out).await.unwrap_err();
    assert!(e.is_usage(), "{e}");
    let e = prepare(&fake, &fake, "bad name").await.unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(fake.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn deleting_what_does_not_exist_is_nothing() {
    let fake = Fake::new();
    assert_eq!(
        prepare(&fake, &fake, "web").await.unwrap(),
        Prepared::Nothing
    );
}

#[tokio::test(start_paused = true)]
async fn instances_in_the_vpc_stop_a_delete_before_it_starts() {
    let mut fake = Fake::new().with_stack(stack("CREATE_COMPLETE", &[]));
    fake.occupants = vec![Occupant {
        id: "i-1".into(),
        fleet: Some("web".into()),
    }];
    let e = prepare(&fake, &fake, "web").await.unwrap_err().to_string();
    assert!(e.contains("amictl destroy --fleet web"), "{e}");
    assert!(fake.called("occupants vpc-1"));
    assert!(!fake.called("delete_stack"));
}

#[tokio::test(start_paused = true)]
async fn delete_waits_for_delete_complete() {
    let fake = Fake::new()
        .with_stack(stack("CREATE_COMPLETE", &[]))
        .with_script(vec![
            (
                "DELETE_IN_PROGRESS",
                vec![event(
                    "1",
                    "web",
                    "DELETE_IN_PROGRESS",
                    Some("User Initiated"),
                )],
            ),
            (
                "DELETE_COMPLETE",
                vec![event("2", "web", "DELETE_COMPLETE", None)],
            ),
        ]);
    let Prepared::Ready(s) = prepare(&fake, &fake, "web").await.unwrap() else {
        panic!("the stack exists")
    };
    let mut out = Vec::new();
    let start = Instant::now();
    delete(&fake, &s, WAIT, &mut out).await.unwrap();
    assert_eq!(start.elapsed(), POLL);
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
    assert!(fake.called("delete_stack arn:stack/web/1"));
    // Gone by name.
    assert_eq!(fake.describe("web").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_failed_delete_says_why() {
    let fake = Fake::new()
        .with_stack(stack("CREATE_COMPLETE", &[]))
        .with_script(vec![(
            "DELETE_FAILED",
            vec![event(
                "1",
                "Vpc",
                "DELETE_FAILED",
                Some("The bucket you tried to delete is not empty"),
            )],
        )]);
    let Prepared::Ready(s) = prepare(&fake, &fake, "web").await.unwrap() else {
        panic!("the stack exists")
    };
    let e = delete(&fake, &s, WAIT, &mut Vec::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not empty") && e.contains("run `amictl stack delete --name web` again"),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn events_are_read_across_pages() {
    let mut fake = Fake::new();
    fake.page = 2;
    *fake.events.lock().unwrap() = (1..=3)
        .map(|i| event(&i.to_string(), "Vpc", "CREATE_IN_PROGRESS", None))
        .collect();
    let mut cursor = EventCursor::at_end(&fake, "arn").await.unwrap();
    assert!(cursor.next(&fake).await.unwrap().is_empty());
    fake.events
        .lock()
        .unwrap()
        .extend((4..=8).map(|i| event(&i.to_string(), "Vpc", "CREATE_COMPLETE", None)));
    let ids: Vec<String> = cursor
        .next(&fake)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec!["4", "5", "6", "7", "8"]);
    assert!(cursor.next(&fake).await.unwrap().is_empty());
}

#[test]
fn template_is_embedded() {
    assert!(TEMPLATE.starts_with("AWSTemplateFormatVersion"));
    for output in [
        outputs::key::VPC,
        outputs::key::SUBNETS,
        outputs::key::INSTANCE_SECURITY_GROUP,
        outputs::key::INSTANCE_PROFILE,
        outputs::key::TARGET_GROUP,
        outputs::key::ALARMS,
        outputs::key::URL,
        outputs::key::IMPORT_BUCKET,
    ] {
        assert!(
            TEMPLATE.contains(&format!("\n  {output}:\n")),
            "the template has no output {output}"
        );
    }
    assert!(TEMPLATE.contains(&format!("\n  {}:\n", plan::PREFIX_PARAMETER)));
}

#[test]
fn occupied_names_the_fleets_to_destroy() {
    let e = StackError::Occupied {
        stack: "web".into(),
        vpc: "vpc-1".into(),
        instances: vec![
            Occupant {
                id: "i-1".into(),
                fleet: Some("api".into()),
            },
            Occupant {
                id: "i-2".into(),
                fleet: None,
            },
            Occupant {
                id: "i-3".into(),
                fleet: Some("api".into()),
            },
        ],
    }
    .to_string();
    assert!(e.contains("i-1 (fleet api), i-2, i-3 (fleet api)"), "{e}");
    assert!(e.contains("(`amictl destroy --fleet api`)"), "{e}");
}

#[test]
fn failures_say_what_next() {
    let e = StackError::Failed {
        stack: "web".into(),
        operation: Operation::Create,
        status: "ROLLBACK_COMPLETE".into(),
        reasons: vec!["Vpc (AWS::EC2::VPC): bad CIDR".into()],
    }
    .to_string();
    assert_eq!(
        e,
        "creating stack web failed (ROLLBACK_COMPLETE):\n  Vpc (AWS::EC2::VPC): bad CIDR\n\
         a stack whose creation failed cannot be updated: delete it with `amictl stack delete --name web`, fix the cause, and deploy again"
    );
}
