//! The CloudFormation stack a fleet runs in: `stack.yaml` (a VPC with two public
//! subnets, an ALB and its target group, security groups, the instance profile, alarms and
//! the import bucket), deployed through change sets, and its outputs, which
//! `rollout --stack` starts from.
//!
//! The AWS calls sit behind [`Stacks`] (CloudFormation) and [`Occupants`] (EC2), in
//! [`aws`]; the decisions are pure, in [`names`], [`plan`], [`events`] and [`outputs`];
//! [`deploy`] and [`delete`] drive them, polling with a deadline and printing each new
//! stack event as it comes.

pub mod aws;
pub mod delete;
pub mod deploy;
pub mod events;
pub mod names;
pub mod outputs;
pub mod plan;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::aws::AwsError;

pub use self::aws::{CloudFormation, Ec2Occupants};
pub use self::events::StackEvent;
pub use self::outputs::StackOutputs;
use self::plan::{Kind, Operation, ParameterValue};

/// The template `amictl stack deploy` deploys.
pub const TEMPLATE: &str = include_str!("../../stack/stack.yaml");

/// Tags CloudFormation puts on the stack and on every resource in it that takes tags.
pub const STACK_TAGS: [(&str, &str); 1] = [(crate::fleet::ec2::TAG_MANAGED_BY, "amictl")];

/// A stack as DescribeStacks shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackInfo {
    /// The stack's ARN: it names the stack even after it is deleted, its name does not.
    pub id: String,
    pub name: String,
    pub status: String,
    pub reason: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, String>,
}

/// A CreateChangeSet request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetRequest {
    pub stack: String,
    /// The change set's name, also its client token.
    pub name: String,
    pub kind: Kind,
    pub template: String,
    pub parameters: Vec<(String, ParameterValue)>,
    pub tags: Vec<(String, String)>,
}

/// What CreateChangeSet answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetCreated {
    pub id: String,
    pub stack_id: String,
}

/// A change set as DescribeChangeSet shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSetState {
    /// CREATE_PENDING, CREATE_IN_PROGRESS, CREATE_COMPLETE, FAILED, ...
    pub status: String,
    /// UNAVAILABLE, AVAILABLE, EXECUTE_*, OBSOLETE.
    pub execution: Option<String>,
    pub reason: Option<String>,
}

/// One page of DescribeStackEvents: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventPage {
    pub events: Vec<StackEvent>,
    pub next: Option<String>,
}

/// CloudFormation, as much of it as amictl uses.
pub trait Stacks: Send + Sync {
    /// The stack named (or with the ARN) `stack`; None when there is none.
    fn describe(
        &self,
        stack: &str,
    ) -> impl Future<Output = Result<Option<StackInfo>, StackError>> + Send;
    fn create_change_set(
        &self,
        request: &ChangeSetRequest,
    ) -> impl Future<Output = Result<ChangeSetCreated, StackError>> + Send;
    fn change_set(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ChangeSetState, StackError>> + Send;
    /// `token` makes a retried call the same execution.
    fn execute_change_set(
        &self,
        id: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), StackError>> + Send;
    fn delete_change_set(&self, id: &str) -> impl Future<Output = Result<(), StackError>> + Send;
    /// One page of the stack's events, newest first; `next` from the previous page.
    fn events(
        &self,
        stack_id: &str,
        next: Option<String>,
    ) -> impl Future<Output = Result<EventPage, StackError>> + Send;
    fn delete_stack(
        &self,
        stack_id: &str,
        token: &str,
    ) -> impl Future<Output = Result<(), StackError>> + Send;
}

/// An instance that keeps a VPC from being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupant {
    pub id: String,
    /// Its `amictl:fleet` tag.
    pub fleet: Option<String>,
}

/// What runs in a VPC (EC2).
pub trait Occupants: Send + Sync {
    /// The instances in `vpc` that are not terminated.
    fn instances_in_vpc(
        &self,
        vpc: &str,
    ) -> impl Future<Output = Result<Vec<Occupant>, StackError>> + Send;
}

/// How long to wait, and how often to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub timeout: Duration,
    pub poll: Duration,
}

/// DescribeStacks and DescribeStackEvents every 5 s: a stack takes minutes, and this stays
/// far below CloudFormation's request limits.
pub const POLL: Duration = Duration::from_secs(5);

/// The outputs of the stack `name`, for `rollout --stack` and `stack outputs --json`.
pub async fn read_outputs<S: Stacks>(stacks: &S, name: &str) -> Result<StackOutputs, StackError> {
    names::check_stack_name(name)?;
    let stack = stacks
        .describe(name)
        .await?
        .ok_or_else(|| StackError::NotFound(name.to_owned()))?;
    let mut outputs = StackOutputs::parse(name, &stack.outputs)?;
    outputs.prefix = stack.parameters.get("Prefix").cloned();
    Ok(outputs)
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    InvalidPrefix(String),
    #[error("{0}")]
    InvalidCertificate(String),
    #[error("stack {name} was deployed with prefix {from:?}: deploying it with {to:?} would rename, so replace, nearly everything in it (the fleet's security group, target group and instance profile too); leave out --prefix to keep {from:?}, or deploy another stack for the new prefix")]
    PrefixChange {
        name: String,
        from: String,
        to: String,
    },
    /// The stack's state does not allow the operation; the message says what to do.
    #[error("{0}")]
    NotDeployable(String),
    #[error("stack {0} does not exist (create it with `amictl stack deploy --name {0}`)")]
    NotFound(String),
    #[error("CloudFormation refused the change set for stack {stack}: {reason}")]
    ChangeSetFailed { stack: String, reason: String },
    #[error("{}", failure_message(stack, *operation, status, reasons))]
    Failed {
        stack: String,
        operation: Operation,
        status: String,
        reasons: Vec<String>,
    },
    #[error("stack {stack} is still {status} after {secs} s; CloudFormation carries on with it (the console shows its events): run this command again once it has finished")]
    Timeout {
        stack: String,
        status: String,
        secs: u64,
    },
    #[error("{}", occupied_message(stack, vpc, instances))]
    Occupied {
        stack: String,
        vpc: String,
        instances: Vec<Occupant>,
    },
    #[error(transparent)]
    Outputs(#[from] outputs::MissingOutputs),
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("cannot write progress: {0}")]
    Io(#[from] std::io::Error),
}

impl StackError {
    /// A command line that cannot work as given (exit 2), rather than a failure (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            StackError::InvalidName(_)
                | StackError::InvalidPrefix(_)
                | StackError::InvalidCertificate(_)
                | StackError::PrefixChange { .. }
        )
    }
}

fn failure_message(stack: &str, op: Operation, status: &str, reasons: &[String]) -> String {
    let (what, next) = match op {
        Operation::Create => (
            "creating",
            format!("a stack whose creation failed cannot be updated: delete it with `amictl stack delete --name {stack}`, fix the cause, and deploy again"),
        ),
        Operation::Update if status == "UPDATE_ROLLBACK_COMPLETE" => (
            "updating",
            "CloudFormation rolled the stack back: it is as it was before this deploy".to_owned(),
        ),
        Operation::Update => (
            "updating",
            format!("fix the cause; if the stack is UPDATE_ROLLBACK_FAILED, `aws cloudformation continue-update-rollback --stack-name {stack}` finishes the rollback"),
        ),
        Operation::Delete => (
            "deleting",
            format!("fix the cause (an import bucket with objects left in it cannot be deleted: empty it first) and run `amictl stack delete --name {stack}` again; it deletes what is left"),
        ),
    };
    let mut text = format!("{what} stack {stack} failed ({status})");
    if reasons.is_empty() {
        text.push_str(": CloudFormation gave no reason");
    } else {
        text.push(':');
        for r in reasons {
            text.push_str("\n  ");
            text.push_str(r);
        }
    }
    text.push('\n');
    text.push_str(&next);
    text
}

fn occupied_message(stack: &str, vpc: &str, instances: &[Occupant]) -> String {
    let listed: Vec<String> = instances
        .iter()
        .map(|i| match &i.fleet {
            Some(f) => format!("{} (fleet {f})", i.id),
            None => i.id.clone(),
        })
        .collect();
    let mut fleets: Vec<&str> = instances
        .iter()
        .filter_map(|i| i.fleet.as_deref())
        .collect();
    fleets.sort_unstable();
    fleets.dedup();
    let how = if fleets.is_empty() {
        "terminate them".to_owned()
    } else {
        fleets
            .iter()
            .map(|f| format!("`amictl destroy --fleet {f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "stack {stack}'s VPC {vpc} still has instances: {}. CloudFormation cannot delete the subnets and security groups they use; take them down first ({how}), then delete the stack (nothing was changed)",
        listed.join(", ")
    )
}

#[cfg(test)]
mod tests;
