//! amictl's SSM Command documents, one fixed command each. IAM grants `ssm:SendCommand` per
//! document, so a grant on `{prefix}HealthCheck` lets its holder run the health check and
//! nothing else, where `AWS-RunShellScript` runs whatever it is sent, as root.
//!
//! The content is written here only: [`ensure`] creates a document from it (or restores
//! it) where no stack did, and a test holds the stack's `AWS::SSM::Document` resources to
//! it. What the operator asked for becomes a [`Command`] in [`on_aws`], which refuses
//! shell commands.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info};

use super::{SsmApi, SsmError, StoredDocument};
use crate::aws::AwsError;
use crate::fleet::drift::DEFAULT_DRIFT_COMMAND;
use crate::fleet::health::{DEFAULT_HEALTH_COMMAND, HEAL_COMMAND};
use crate::fleet::{CloudError, Command};

/// One of amictl's documents, named `{prefix}{suffix}` like the stack's other resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Document {
    /// `ami-agent check --json`: exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown.
    HealthCheck,
    /// `ami-agent drift`: the clock's offset in seconds.
    DriftReport,
    /// `systemctl restart ami-agent` (`health --heal`).
    RestartAgent,
}

/// The only parameter: how long the command may run, digits only (1 to 172800 s, as
/// `AWS-RunShellScript` allows), so no parameter can carry a command.
pub const TIMEOUT_PATTERN: &str =
    "^([1-9][0-9]{0,4}|1[0-6][0-9]{4}|17[01][0-9]{3}|172[0-7][0-9]{2}|172800)$";

impl Document {
    pub const ALL: [Document; 3] = [
        Document::HealthCheck,
        Document::DriftReport,
        Document::RestartAgent,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Document::HealthCheck => "HealthCheck",
            Document::DriftReport => "DriftReport",
            Document::RestartAgent => "RestartAgent",
        }
    }

    pub fn name(self, prefix: &str) -> String {
        format!("{prefix}{}", self.suffix())
    }

    /// The command it runs, by absolute path: SSM gives scripts an almost empty PATH.
    pub fn command(self) -> &'static str {
        match self {
            Document::HealthCheck => DEFAULT_HEALTH_COMMAND,
            Document::DriftReport => DEFAULT_DRIFT_COMMAND,
            Document::RestartAgent => HEAL_COMMAND,
        }
    }

    fn description(self) -> &'static str {
        match self {
            Document::HealthCheck => "amictl: the agent's health check. Exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown; the JSON report on stdout.",
            Document::DriftReport => "amictl: the agent's clock drift, local minus reference in whole seconds on stdout; exit 1 when no time source answers.",
            Document::RestartAgent => "amictl: restarts the agent (amictl health --heal).",
        }
    }

    /// amictl's document for `command`, if it is one of amictl's own.
    pub fn of(command: &Command) -> Option<Document> {
        match command {
            Command::Health => Some(Document::HealthCheck),
            Command::Drift => Some(Document::DriftReport),
            Command::RestartAgent => Some(Document::RestartAgent),
            Command::Shell(_) | Command::Document(_) => None,
        }
    }

    /// The document (pure): schema 2.2, one `aws:runShellScript` step with the fixed
    /// command, and `executionTimeout` as its only parameter.
    pub fn content(self) -> Value {
        json!({
            "schemaVersion": "2.2",
            "description": self.description(),
            "parameters": {
                "executionTimeout": {
                    "type": "String",
                    "default": "60",
                    "description": "Seconds the command may run (1 to 172800).",
                    "allowedPattern": TIMEOUT_PATTERN,
                }
            },
            "mainSteps": [{
                "action": "aws:runShellScript",
                "name": self.suffix(),
                "inputs": {
                    "runCommand": [self.command()],
                    "timeoutSeconds": "{{ executionTimeout }}",
                }
            }]
        })
    }

    /// The content as CreateDocument and UpdateDocument get it: the same bytes every time,
    /// since SSM refuses a new version whose bytes equal an old one's.
    pub fn text(self) -> String {
        serde_json::to_string_pretty(&self.content()).expect("a document serializes")
    }

    /// Whether `content` (JSON or YAML, as SSM returns it) is this document.
    pub fn is_content(self, content: &str) -> bool {
        // YAML is a superset of JSON: one parser reads what either format returns.
        serde_yaml::from_str::<Value>(content).is_ok_and(|v| v == self.content())
    }
}

/// A command line or document the operator asked for, and why it cannot run on AWS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{flag} {command:?}: on AWS amictl sends SSM documents with one fixed command, never a shell command (a document that runs any command it is given is a root shell on every instance for whoever may send it). Run shell commands on the local fleet (--provider local), or put the command into an SSM Command document of your own, named with the prefix (e.g. {prefix}MyCheck), grant ssm:SendCommand on it, and pass {document_flag} NAME")]
    Shell {
        flag: &'static str,
        document_flag: &'static str,
        command: String,
        prefix: String,
    },
    #[error("{flag} {name}: that is one of AWS's documents; amictl sends its own or one of yours (AWS-RunShellScript would run anything as root)")]
    AwsDocument { flag: &'static str, name: String },
    #[error("{flag} and {document_flag} name two checks: pass one of them")]
    Both {
        flag: &'static str,
        document_flag: &'static str,
    },
}

/// What the operator asked for as a [`Command`] on AWS (pure): amictl's document unless
/// they name a document of theirs. A shell command is refused, except amictl's own
/// default spelled out (an amictl.toml may hold it), which is amictl's document.
pub fn on_aws(
    document: Document,
    command: Option<&str>,
    own_document: Option<&str>,
    prefix: &str,
) -> Result<Command, Refusal> {
    let (flag, document_flag) = match document {
        Document::DriftReport => ("--drift-command", "--drift-document"),
        _ => ("--health-command", "--health-document"),
    };
    let builtin = match document {
        Document::HealthCheck => Command::Health,
        Document::DriftReport => Command::Drift,
        Document::RestartAgent => Command::RestartAgent,
    };
    let command = command.map(str::trim).filter(|c| *c != document.command());
    match (command, own_document) {
        (Some(_), Some(_)) => Err(Refusal::Both {
            flag,
            document_flag,
        }),
        (Some(c), None) => Err(Refusal::Shell {
            flag,
            document_flag,
            command: c.to_owned(),
            prefix: prefix.to_owned(),
        }),
        (None, Some(name)) => {
            // SSM reserves these starts for AWS's own documents.
            let lower = name.to_ascii_lowercase();
            if ["aws", "amazon", "amzn"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                Err(Refusal::AwsDocument {
                    flag: document_flag,
                    name: name.to_owned(),
                })
            } else {
                Ok(Command::Document(name.to_owned()))
            }
        }
        (None, None) => Ok(builtin),
    }
}

/// A new document or version is `Creating` for a moment; seconds in practice, so a minute
/// is a fault worth reporting.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_secs(1);
/// How many versions back [`ensure`] looks for amictl's content when SSM says a version
/// already holds it: two amictl releases alternating leave it one or two back; a longer
/// history is someone else's doing, and an error says so.
const LOOKBACK: u32 = 20;

/// Makes sure `{prefix}{document}` exists with amictl's content and is ready; its version,
/// for SendCommand to name. Idempotent and safe to race: a document another amictl (or the
/// stack) created or updated meanwhile is taken as it is when its content is amictl's.
pub async fn ensure<A: SsmApi>(
    api: &A,
    document: Document,
    prefix: &str,
) -> Result<String, CloudError> {
    let name = document.name(prefix);
    let deadline = Instant::now() + READY_TIMEOUT;
    // Twice at most: a create that loses a race reads what the winner made.
    for _ in 0..2 {
        match api.get_document(&name, None).await.map_err(read_error)? {
            Some(d) if document.is_content(&d.content) => {
                return ready(api, &name, d, deadline).await;
            }
            Some(d) => {
                info!(document = %name, version = %d.version, "SSM document differs from amictl's: writing a new version");
                let version = match api.update_document(&name, &document.text()).await {
                    Ok(v) => v,
                    // Some version already holds these bytes (another amictl, or an
                    // older default put back): use that one.
                    Err(SsmError::DuplicateDocumentContent) => {
                        holding(api, document, &name).await?
                    }
                    Err(e) => return Err(write_error(&name, "ssm:UpdateDocument", e)),
                };
                let d = stored(api, &name, &version).await?;
                let version = ready(api, &name, d, deadline).await?;
                api.set_default_version(&name, &version)
                    .await
                    .map_err(|e| write_error(&name, "ssm:UpdateDocumentDefaultVersion", e))?;
                return Ok(version);
            }
            None => match api.create_document(&name, &document.text()).await {
                Ok(version) => {
                    info!(document = %name, "created SSM document");
                    let d = stored(api, &name, &version).await?;
                    return ready(api, &name, d, deadline).await;
                }
                Err(SsmError::DocumentAlreadyExists) => {
                    debug!(document = %name, "created meanwhile by someone else: reading it");
                }
                Err(e) => return Err(write_error(&name, "ssm:CreateDocument", e)),
            },
        }
    }
    Err(CloudError::Other(format!(
        "SSM document {name} was created meanwhile with other content than amictl's; run again to restore it"
    )))
}

async fn stored<A: SsmApi>(
    api: &A,
    name: &str,
    version: &str,
) -> Result<StoredDocument, CloudError> {
    api.get_document(name, Some(version))
        .await
        .map_err(read_error)?
        .ok_or_else(|| {
            CloudError::NotFound(format!("SSM document {name} version {version} is gone"))
        })
}

/// The version of `name` that holds `document`'s content: the latest, or one a little older.
async fn holding<A: SsmApi>(api: &A, document: Document, name: &str) -> Result<String, CloudError> {
    let latest = stored(api, name, "$LATEST").await?;
    if document.is_content(&latest.content) {
        return Ok(latest.version);
    }
    let newest: u32 = latest.version.parse().unwrap_or(0);
    for n in (1..newest).rev().take(LOOKBACK as usize) {
        let version = n.to_string();
        // A deleted version is not there any more: look further back.
        if let Some(d) = api
            .get_document(name, Some(&version))
            .await
            .map_err(read_error)?
        {
            if document.is_content(&d.content) {
                return Ok(d.version);
            }
        }
    }
    Err(CloudError::Other(format!(
        "SSM document {name}: SSM says a version already holds amictl's content, but none of the last {LOOKBACK} does; make it the default (aws ssm update-document-default-version) or delete the document so amictl can create it again"
    )))
}

/// Waits until version `d` is Active: a Creating document cannot be sent yet.
async fn ready<A: SsmApi>(
    api: &A,
    name: &str,
    mut d: StoredDocument,
    deadline: Instant,
) -> Result<String, CloudError> {
    loop {
        match d.status.as_str() {
            "Active" => return Ok(d.version),
            "Failed" => {
                return Err(CloudError::Other(format!(
                    "SSM document {name} version {} failed: {}",
                    d.version,
                    d.status_information.as_deref().unwrap_or("no reason given")
                )))
            }
            other if Instant::now() >= deadline => {
                return Err(CloudError::Other(format!(
                    "SSM document {name} version {} is still {other} after {} s",
                    d.version,
                    READY_TIMEOUT.as_secs()
                )))
            }
            _ => {}
        }
        tokio::time::sleep(READY_POLL).await;
        d = stored(api, name, &d.version).await?;
    }
}

fn read_error(e: SsmError) -> CloudError {
    match e {
        SsmError::Aws(e) => e.into(),
        other => CloudError::Other(format!("ssm:GetDocument: {other}")),
    }
}

/// A refused write says who may make the document: the IAM policy gives that to `rollout`
/// and the stack only, since whoever may write a document and send it may run anything.
fn write_error(name: &str, action: &'static str, e: SsmError) -> CloudError {
    match e {
        SsmError::Aws(AwsError::Denied { message, .. }) => CloudError::Other(format!(
            "SSM document {name} is missing or does not hold amictl's command, and this identity may not write it ({action}: {message}). `amictl rollout` writes amictl's documents (its IAM scope may; health and drift may only read them), and so does `amictl stack deploy`"
        )),
        SsmError::Aws(e) => e.into(),
        other => CloudError::Other(format!("{action} {name}: {other}")),
    }
}

#[cfg(test)]
mod tests;
