//! `stack delete`: look the stack up and refuse while instances still run in its VPC (in
//! [`prepare`]; the caller then asks for the go-ahead), then DeleteStack and wait for
//! DELETE_COMPLETE (in [`delete`]). A stack that does not exist is already deleted.

use std::io::Write;

use tracing::info;

use super::names::check_stack_name;
use super::outputs::key;
use super::plan::Operation;
use super::watch::{wait_stack, EventCursor};
use super::{Occupants, StackError, StackInfo, Stacks, Wait};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// No such stack: nothing to delete.
    Nothing,
    /// The stack, ready to be deleted.
    Ready(StackInfo),
}

/// The stack to delete, once nothing but the stack's own resources is in its VPC: the
/// fleet's instances use its subnets and security group, and CloudFormation would spend
/// many minutes failing to delete those.
pub async fn prepare<S: Stacks, O: Occupants>(
    stacks: &S,
    occupants: &O,
    name: &str,
) -> Result<Prepared, StackError> {
    check_stack_name(name)?;
    let Some(stack) = stacks.describe(name).await? else {
        return Ok(Prepared::Nothing);
    };
    if let Some(vpc) = stack.outputs.get(key::VPC) {
        let instances = occupants.instances_in_vpc(vpc).await?;
        if !instances.is_empty() {
            return Err(StackError::Occupied {
                stack: name.to_owned(),
                vpc: vpc.clone(),
                instances,
            });
        }
    }
    Ok(Prepared::Ready(stack))
}

/// Deletes `stack` and waits until CloudFormation reports it DELETE_COMPLETE, printing
/// its events on `out`. A deletion already under way is waited on, not started again.
pub async fn delete<S: Stacks>(
    stacks: &S,
    stack: &StackInfo,
    wait: Wait,
    out: &mut impl Write,
) -> Result<(), StackError> {
    // The ARN, not the name: a deleted stack is listed by its ARN only, with its status.
    let cursor = EventCursor::at_end(stacks, &stack.id).await?;
    if stack.status != "DELETE_IN_PROGRESS" {
        info!(stack = %stack.name, "deleting");
        let token = format!("amictl-delete-{}", crate::rollout::now_unix());
        stacks.delete_stack(&stack.id, &token).await?;
    }
    wait_stack(stacks, &stack.name, Operation::Delete, cursor, wait, out).await?;
    Ok(())
}
