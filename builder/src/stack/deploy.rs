//! `stack deploy`: create or update a stack through a change set, wait for it, and answer
//! the stack as it ended. A change set that changes nothing is a success ("up to date"),
//! and is deleted rather than left behind.

use std::io::Write;

use tokio::time::Instant;
use tracing::{info, warn};

use super::names::{check_certificate_arn, check_prefix, check_stack_name};
use super::plan::{
    change_set_kind, change_set_name, change_set_phase, no_changes, parameters, prefix,
    ChangeSetPhase, Kind,
};
use super::watch::{wait_stack, EventCursor};
use super::{ChangeSetRequest, StackError, StackInfo, Stacks, Wait, STACK_TAGS};

/// What to deploy.
#[derive(Debug, Clone, Copy)]
pub struct DeployRequest<'a> {
    pub name: &'a str,
    /// None: the stack's own prefix on an update, the default on a create.
    pub prefix: Option<&'a str>,
    /// An ACM certificate for HTTPS; Some("") turns HTTPS off; None keeps what the stack
    /// has (HTTP only on a create).
    pub certificate_arn: Option<&'a str>,
    pub template: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    /// The stack already was what the template and parameters ask for.
    UpToDate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployed {
    pub change: Change,
    pub stack: StackInfo,
}

/// Creates or updates the stack, printing its events on `out` as they come; a failed
/// creation or update is an error carrying CloudFormation's reasons.
pub async fn deploy<S: Stacks>(
    stacks: &S,
    request: &DeployRequest<'_>,
    wait: Wait,
    out: &mut impl Write,
) -> Result<Deployed, StackError> {
    let name = request.name;
    check_stack_name(name)?;
    if let Some(p) = request.prefix {
        check_prefix(p)?;
    }
    if let Some(arn) = request.certificate_arn {
        check_certificate_arn(arn, None)?;
    }
    let existing = stacks.describe(name).await?;
    let kind = change_set_kind(name, existing.as_ref().map(|s| s.status.as_str()))?;
    // A REVIEW_IN_PROGRESS stack (a change set never executed) has nothing to keep.
    let existing_parameters = match kind {
        Kind::Update => existing.as_ref().map(|s| &s.parameters),
        Kind::Create => None,
    };
    let prefix = prefix(name, request.prefix, existing_parameters)?;
    let change_set = change_set_name(crate::rollout::now_unix(), fastrand::u32(..));
    info!(stack = name, ?kind, %prefix, change_set = %change_set, "creating the change set");
    let created = match stacks
        .create_change_set(&ChangeSetRequest {
            stack: name.to_owned(),
            name: change_set.clone(),
            kind,
            template: request.template.to_owned(),
            parameters: parameters(kind, &prefix, request.certificate_arn, existing_parameters),
            tags: STACK_TAGS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .await
    {
        Ok(c) => c,
        Err(e) if no_changes(&e.to_string()) => return up_to_date(name, existing),
        Err(e) => return Err(e),
    };

    let deadline = Instant::now() + wait.timeout;
    loop {
        let state = stacks.change_set(&created.id).await?;
        match change_set_phase(
            &state.status,
            state.execution.as_deref(),
            state.reason.as_deref(),
        ) {
            ChangeSetPhase::Ready => break,
            ChangeSetPhase::Failed(reason) => {
                // A failed change set stays listed on the stack until deleted.
                if let Err(e) = stacks.delete_change_set(&created.id).await {
                    warn!(error = %e, change_set = %created.id, "cannot delete the failed change set");
                }
                if no_changes(&reason) {
                    return up_to_date(name, existing);
                }
                if kind == Kind::Create && existing.is_none() {
                    // The change set made an empty REVIEW_IN_PROGRESS stack: leave nothing.
                    if let Err(e) = stacks.delete_stack(&created.stack_id, &change_set).await {
                        warn!(error = %e, stack = name, "cannot delete the empty stack the change set made");
                    }
                }
                return Err(StackError::ChangeSetFailed {
                    stack: name.to_owned(),
                    reason,
                });
            }
            ChangeSetPhase::Pending => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(StackError::Timeout {
                stack: name.to_owned(),
                status: format!("waiting for its change set ({})", state.status),
                secs: wait.timeout.as_secs(),
            });
        }
        tokio::time::sleep(wait.poll.min(remaining)).await;
    }

    let cursor = EventCursor::at_end(stacks, &created.stack_id).await?;
    info!(stack = name, change_set = %change_set, "executing the change set");
    stacks.execute_change_set(&created.id, &change_set).await?;
    let stack = wait_stack(stacks, name, kind.into(), cursor, wait, out)
        .await?
        .ok_or_else(|| StackError::NotFound(name.to_owned()))?;
    Ok(Deployed {
        change: match kind {
            Kind::Create => Change::Created,
            Kind::Update => Change::Updated,
        },
        stack,
    })
}

fn up_to_date(name: &str, existing: Option<StackInfo>) -> Result<Deployed, StackError> {
    let stack = existing.ok_or_else(|| StackError::NotFound(name.to_owned()))?;
    Ok(Deployed {
        change: Change::UpToDate,
        stack,
    })
}
