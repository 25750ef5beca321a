//! Running amictl's commands on instances through SSM Run Command, as [`RunCommand`].
//!
//! Each of amictl's commands is an SSM document of amictl's with one fixed command
//! ([`documents`]), made sure of before it is first sent and named in SendCommand with the
//! version whose content amictl checked. An operator's own document may be sent instead;
//! a shell command never is (IAM could not tell it from any other).
//!
//! One call is: SendCommand with the document, its `executionTimeout` (how long the command
//! may run), `TimeoutSeconds` (how long SSM may try to deliver it), `MaxErrors = "100%"`
//! (every instance's answer, not a stop at the first failure: a health check exists to
//! find the failures) and `MaxConcurrency` = everything in the request at once.
//! SendCommand takes at most 50 `InstanceIds`, so larger sets go in chunks of 50.
//!
//! One instance not registered with SSM (just launched, its agent still starting, or no
//! instance profile) makes SendCommand fail with InvalidInstanceId for the whole chunk; the
//! chunk is then sent one instance at a time, the unregistered ones come back
//! `Unreachable` and the rest run.
//!
//! Then GetCommandInvocation per instance, with backoff (polling every second hits "Rate
//! exceeded", aws/aws-rfdk #1723), until each has a final status or the deadline passes.
//! Right after SendCommand, GetCommandInvocation can answer InvocationDoesNotExist (it is
//! eventually consistent, boto/boto3 #2701): that is retried for a bounded window. What a
//! status means is decided in [`status`]. Throttling is retried by the SDK (see
//! `crate::aws`), and on top of that the polling slows down to its slowest pace.

pub mod aws;
pub mod documents;
pub mod status;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::aws::AwsError;
use crate::fleet::{CloudError, Command, Invocation, RunCommand};

pub use self::aws::AwsSsm;
pub use self::documents::Document;
use self::status::{at_deadline, final_invocation, InvocationStatus};

/// SendCommand's limit on `InstanceIds`.
pub const MAX_IDS_PER_SEND: usize = 50;
/// SendCommand's smallest delivery timeout (`TimeoutSeconds`).
const MIN_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest `executionTimeout` amictl's documents allow (48 hours, as AWS's own).
const MAX_EXECUTION_TIMEOUT: Duration = Duration::from_secs(172_800);

/// The first poll comes this long after SendCommand: a health check takes a second or
/// two, so polling sooner only spends the rate limit.
const FIRST_POLL: Duration = Duration::from_secs(1);
/// Polls slow down by half each round to this pace: every second for many instances hits
/// "Rate exceeded" (aws/aws-rfdk #1723); five seconds keeps a 100-instance fleet at about
/// 20 requests per second while adding at most five seconds to a check.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// InvocationDoesNotExist right after SendCommand is eventual consistency (boto/boto3
/// #2701, usually under a few seconds); after half a minute the invocation is not coming.
const NOT_YET_WINDOW: Duration = Duration::from_secs(30);
/// Waited beyond the caller's timeout so that SSM's own verdict (Execution Timed Out)
/// arrives rather than ours.
const GRACE: Duration = Duration::from_secs(10);

/// An SSM error, sorted by what the caller does about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SsmError {
    /// One of the instances is not registered with SSM (or does not exist).
    #[error("InvalidInstanceId: {0}")]
    InvalidInstanceId(String),
    /// GetCommandInvocation does not know the invocation (yet).
    #[error("InvocationDoesNotExist")]
    InvocationDoesNotExist,
    /// Rate exceeded, after the SDK's own retries.
    #[error("throttled: {0}")]
    Throttled(String),
    /// No such document (or version).
    #[error("no such document: {0}")]
    InvalidDocument(String),
    /// CreateDocument: the name is taken.
    #[error("DocumentAlreadyExists")]
    DocumentAlreadyExists,
    /// UpdateDocument: a version already holds the same content.
    #[error("DuplicateDocumentContent")]
    DuplicateDocumentContent,
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// Sorts an SSM error code (pure).
pub fn error_kind(code: Option<&str>, message: String) -> Option<SsmError> {
    match code? {
        "InvalidInstanceId" => Some(SsmError::InvalidInstanceId(message)),
        "InvocationDoesNotExist" => Some(SsmError::InvocationDoesNotExist),
        "ThrottlingException"
        | "Throttling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded" => Some(SsmError::Throttled(message)),
        "InvalidDocument" | "InvalidDocumentVersion" => Some(SsmError::InvalidDocument(message)),
        "DocumentAlreadyExists" => Some(SsmError::DocumentAlreadyExists),
        "DuplicateDocumentContent" => Some(SsmError::DuplicateDocumentContent),
        _ => None,
    }
}

/// A document to send: amictl's (a checked version, which takes `executionTimeout`) or
/// the operator's (its default version, sent without parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub document: String,
    pub version: Option<String>,
    pub takes_timeout: bool,
}

/// A SendCommand request (pure data, see [`send_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub instance_ids: Vec<String>,
    pub document: String,
    /// The version whose content amictl checked: a default changed meanwhile does not
    /// change what runs.
    pub document_version: Option<String>,
    /// The `executionTimeout` parameter, in seconds (amictl's documents only).
    pub execution_timeout_secs: Option<u64>,
    /// `TimeoutSeconds`: how long SSM tries to deliver the command.
    pub delivery_timeout_secs: i32,
    pub max_errors: String,
    pub max_concurrency: String,
    pub comment: String,
}

/// The SendCommand request that runs `target` on `ids` within `timeout` (pure).
pub fn send_request(ids: &[String], target: &Target, timeout: Duration) -> SendRequest {
    let execution = timeout.clamp(Duration::from_secs(1), MAX_EXECUTION_TIMEOUT);
    let delivery = timeout.max(MIN_DELIVERY_TIMEOUT);
    // Comment is limited to 100 characters.
    let mut comment = format!("amictl: {}", target.document);
    if comment.chars().count() > 100 {
        comment = comment.chars().take(97).collect::<String>() + "...";
    }
    SendRequest {
        instance_ids: ids.to_vec(),
        document: target.document.clone(),
        document_version: target.version.clone(),
        execution_timeout_secs: target.takes_timeout.then_some(execution.as_secs()),
        delivery_timeout_secs: i32::try_from(delivery.as_secs()).unwrap_or(i32::MAX),
        max_errors: "100%".into(),
        max_concurrency: MAX_IDS_PER_SEND.to_string(),
        comment,
    }
}

/// `ids` without repeats, in chunks SendCommand accepts (pure).
pub fn chunks(ids: &[String]) -> Vec<Vec<String>> {
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<String> = ids
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .cloned()
        .collect();
    unique
        .chunks(MAX_IDS_PER_SEND)
        .map(<[String]>::to_vec)
        .collect()
}

/// One version of a document as GetDocument answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    pub version: String,
    /// Creating, Active, Updating, Deleting, Failed.
    pub status: String,
    pub status_information: Option<String>,
    pub content: String,
}

/// The SSM calls Run Command needs, in front of aws-sdk-ssm so the waiting logic can be
/// tested with a scripted fake.
pub trait SsmApi: Send + Sync {
    /// SendCommand; the command id.
    fn send(&self, req: &SendRequest) -> impl Future<Output = Result<String, SsmError>> + Send;
    /// GetCommandInvocation.
    fn get(
        &self,
        command_id: &str,
        instance_id: &str,
    ) -> impl Future<Output = Result<InvocationStatus, SsmError>> + Send;
    /// CancelCommand for invocations given up on.
    fn cancel(
        &self,
        command_id: &str,
        instance_ids: &[String],
    ) -> impl Future<Output = Result<(), SsmError>> + Send;
    /// GetDocument of `version` (a number or `$LATEST`; None: the default), in JSON; None
    /// when there is no such document or version.
    fn get_document(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Option<StoredDocument>, SsmError>> + Send;
    /// CreateDocument of a Command document in JSON; the version made.
    fn create_document(
        &self,
        name: &str,
        content: &str,
    ) -> impl Future<Output = Result<String, SsmError>> + Send;
    /// UpdateDocument of the latest version; the version made.
    fn update_document(
        &self,
        name: &str,
        content: &str,
    ) -> impl Future<Output = Result<String, SsmError>> + Send;
    /// UpdateDocumentDefaultVersion.
    fn set_default_version(
        &self,
        name: &str,
        version: &str,
    ) -> impl Future<Output = Result<(), SsmError>> + Send;
}

/// [`RunCommand`] through SSM. `timeout` in [`RunCommand::run`] is how long the command
/// may run and, with a little grace for SSM's verdict, how long the call waits.
pub struct SsmRunCommand<A = AwsSsm> {
    api: A,
    /// amictl's documents are `{prefix}HealthCheck`, ...
    prefix: String,
    /// The version of each of amictl's documents checked in this process.
    versions: Mutex<BTreeMap<Document, String>>,
}

impl SsmRunCommand<AwsSsm> {
    pub fn new(config: &aws_config::SdkConfig, prefix: &str) -> Self {
        Self::with_api(AwsSsm::new(config), prefix)
    }
}

impl<A: SsmApi> SsmRunCommand<A> {
    pub fn with_api(api: A, prefix: &str) -> Self {
        SsmRunCommand {
            api,
            prefix: prefix.to_owned(),
            versions: Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes sure amictl's `documents` exist here with amictl's content, before anything
    /// depends on them (a rollout, before it launches anything). [`RunCommand::run`] does
    /// the same for a document on its first use.
    pub async fn prepare(&self, documents: &[Document]) -> Result<(), CloudError> {
        for d in documents {
            self.version(*d).await?;
        }
        Ok(())
    }

    async fn version(&self, document: Document) -> Result<String, CloudError> {
        if let Some(v) = self.versions.lock().expect("not poisoned").get(&document) {
            return Ok(v.clone());
        }
        let v = documents::ensure(&self.api, document, &self.prefix).await?;
        debug!(document = %document.name(&self.prefix), version = %v, "SSM document ready");
        self.versions
            .lock()
            .expect("not poisoned")
            .insert(document, v.clone());
        Ok(v)
    }

    async fn target(&self, command: &Command) -> Result<Target, CloudError> {
        match command {
            Command::Shell(c) => Err(CloudError::Other(format!(
                "`{c}`: SSM runs documents of amictl's or of yours, not shell commands (use the local fleet for those)"
            ))),
            Command::Document(name) => Ok(Target {
                document: name.clone(),
                version: None,
                takes_timeout: false,
            }),
            builtin => {
                let d = Document::of(builtin).expect("every other command is amictl's");
                Ok(Target {
                    document: d.name(&self.prefix),
                    version: Some(self.version(d).await?),
                    takes_timeout: true,
                })
            }
        }
    }

    /// Sends `req`, waiting out throttling until `deadline`.
    async fn send(&self, req: &SendRequest, deadline: Instant) -> Result<String, SsmError> {
        let mut delay = FIRST_POLL;
        loop {
            match self.api.send(req).await {
                Err(SsmError::Throttled(m)) if Instant::now() + delay < deadline => {
                    debug!(%m, "SendCommand throttled; backing off");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(MAX_POLL_INTERVAL);
                }
                other => return other,
            }
        }
    }

    async fn poll(
        &self,
        mut pending: Vec<Pending>,
        deadline: Instant,
        results: &mut BTreeMap<String, Invocation>,
    ) -> Result<(), CloudError> {
        let mut delay = FIRST_POLL;
        while !pending.is_empty() {
            let now = Instant::now();
            tokio::time::sleep(jitter(delay).min(deadline.saturating_duration_since(now))).await;
            let mut throttled = false;
            let mut still = Vec::with_capacity(pending.len());
            let mut queue = pending.into_iter();
            for mut p in queue.by_ref() {
                match self.api.get(&p.command_id, &p.instance_id).await {
                    Ok(s) => match final_invocation(&s) {
                        Some(done) => {
                            results.insert(p.instance_id, done);
                            continue;
                        }
                        None => p.last = Some(s),
                    },
                    Err(SsmError::InvocationDoesNotExist) if p.sent.elapsed() < NOT_YET_WINDOW => {}
                    Err(SsmError::InvocationDoesNotExist) => {
                        results.insert(
                            p.instance_id,
                            Invocation::Unreachable {
                                reason: format!(
                                    "SSM has no invocation for it {} s after SendCommand",
                                    NOT_YET_WINDOW.as_secs()
                                ),
                            },
                        );
                        continue;
                    }
                    Err(SsmError::InvalidInstanceId(m)) => {
                        results.insert(p.instance_id, unregistered(&m));
                        continue;
                    }
                    Err(SsmError::Throttled(m)) => {
                        // Stop this round: asking the rest now only prolongs the throttling.
                        debug!(%m, "GetCommandInvocation throttled; slowing down");
                        throttled = true;
                        still.push(p);
                        break;
                    }
                    Err(SsmError::Aws(e)) => return Err(e.into()),
                    Err(
                        e @ (SsmError::InvalidDocument(_)
                        | SsmError::DocumentAlreadyExists
                        | SsmError::DuplicateDocumentContent),
                    ) => return Err(CloudError::Other(format!("ssm:GetCommandInvocation: {e}"))),
                }
                still.push(p);
            }
            still.extend(queue);
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                self.give_up(pending, results).await;
                break;
            }
            delay = if throttled {
                MAX_POLL_INTERVAL
            } else {
                (delay * 3 / 2).min(MAX_POLL_INTERVAL)
            };
        }
        Ok(())
    }

    /// Reports what the invocations still under way came to, and cancels them so nothing
    /// runs on after the caller stopped listening.
    async fn give_up(&self, pending: Vec<Pending>, results: &mut BTreeMap<String, Invocation>) {
        let mut by_command: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in pending {
            by_command
                .entry(p.command_id.clone())
                .or_default()
                .push(p.instance_id.clone());
            results.insert(p.instance_id, at_deadline(p.last.as_ref()));
        }
        for (command_id, ids) in by_command {
            if let Err(e) = self.api.cancel(&command_id, &ids).await {
                warn!(%command_id, error = %e, "cannot cancel invocations past the deadline");
            }
        }
    }
}

/// An invocation being waited for.
struct Pending {
    command_id: String,
    instance_id: String,
    sent: Instant,
    last: Option<InvocationStatus>,
}

fn unregistered(message: &str) -> Invocation {
    Invocation::Unreachable {
        reason: format!(
            "not registered with SSM (InvalidInstanceId: {message}): its SSM agent has not checked in yet, or it lacks an instance profile allowing SSM"
        ),
    }
}

/// ±20 % so that many callers do not poll in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

impl<A: SsmApi> RunCommand for SsmRunCommand<A> {
    #[tracing::instrument(skip(self, instance_ids), fields(instances = instance_ids.len()))]
    async fn run(
        &self,
        instance_ids: &[String],
        command: &Command,
        timeout: Duration,
    ) -> Result<BTreeMap<String, Invocation>, CloudError> {
        if instance_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let target = self.target(command).await?;
        let deadline = Instant::now() + timeout + GRACE;
        let mut results = BTreeMap::new();
        let mut pending = Vec::new();
        for chunk in chunks(instance_ids) {
            let req = send_request(&chunk, &target, timeout);
            match self.send(&req, deadline).await {
                Ok(command_id) => {
                    debug!(%command_id, instances = chunk.len(), "sent");
                    pending.extend(chunk.into_iter().map(|id| Pending {
                        command_id: command_id.clone(),
                        instance_id: id,
                        sent: Instant::now(),
                        last: None,
                    }));
                }
                Err(SsmError::InvalidInstanceId(m)) if chunk.len() > 1 => {
                    debug!(%m, "an instance is not registered with SSM: sending one by one");
                    for id in chunk {
                        let single = send_request(std::slice::from_ref(&id), &target, timeout);
                        match self.send(&single, deadline).await {
                            Ok(command_id) => pending.push(Pending {
                                command_id,
                                instance_id: id,
                                sent: Instant::now(),
                                last: None,
                            }),
                            Err(SsmError::InvalidInstanceId(m)) => {
                                results.insert(id, unregistered(&m));
                            }
                            Err(e) => return Err(send_error(e)),
                        }
                    }
                }
                Err(SsmError::InvalidInstanceId(m)) => {
                    results.insert(chunk[0].clone(), unregistered(&m));
                }
                Err(e) => return Err(send_error(e)),
            }
        }
        self.poll(pending, deadline, &mut results).await?;
        Ok(results)
    }
}

fn send_error(e: SsmError) -> CloudError {
    match e {
        SsmError::Aws(e) => e.into(),
        other => CloudError::Other(format!("ssm:SendCommand: {other}")),
    }
}

#[cfg(test)]
mod tests;
