//! Waiting on a stack operation: poll its status until it ends or the deadline passes,
//! and print each new stack event on the way.

use std::io::Write;

use tokio::time::Instant;
use tracing::debug;

use super::events::{failure_reasons, format, newer_than, StackEvent};
use super::plan::{phase, Operation, Phase};
use super::{StackError, StackInfo, Stacks, Wait};

/// Pages read per look at the events: with the marker on the first page as a rule, more
/// would only be read after a long gap between looks; 20 pages is 2,000 events, far more
/// than this template's resources make in one operation.
const MAX_EVENT_PAGES: usize = 20;

/// The stack's events not shown yet, oldest first.
pub struct EventCursor {
    stack_id: String,
    /// The newest event already seen.
    marker: Option<String>,
}

impl EventCursor {
    /// A cursor after the stack's newest event now: only what happens from here is shown.
    pub async fn at_end<S: Stacks>(stacks: &S, stack_id: &str) -> Result<Self, StackError> {
        let page = stacks.events(stack_id, None).await?;
        Ok(EventCursor {
            stack_id: stack_id.to_owned(),
            marker: page.events.first().map(|e| e.id.clone()),
        })
    }

    /// The events after the last ones seen, oldest first.
    pub async fn next<S: Stacks>(&mut self, stacks: &S) -> Result<Vec<StackEvent>, StackError> {
        let mut collected: Vec<StackEvent> = Vec::new();
        let mut token = None;
        let mut newest = None;
        for _ in 0..MAX_EVENT_PAGES {
            let page = stacks.events(&self.stack_id, token).await?;
            if newest.is_none() {
                newest = page.events.first().map(|e| e.id.clone());
            }
            let (mut fresh, reached) = newer_than(&page.events, self.marker.as_deref());
            // A later page is older: it goes before what was collected.
            fresh.append(&mut collected);
            collected = fresh;
            if reached || page.next.is_none() {
                break;
            }
            token = page.next;
        }
        if newest.is_some() {
            self.marker = newest;
        }
        Ok(collected)
    }
}

/// Waits until `op` on the stack `stack_id` (named `name`) has ended, printing each new
/// event on `out`. Answers the stack as it ended (None: deleted and no longer listed), or
/// the failure with the events' reasons.
pub async fn wait_stack<S: Stacks>(
    stacks: &S,
    name: &str,
    op: Operation,
    mut cursor: EventCursor,
    wait: Wait,
    out: &mut impl Write,
) -> Result<Option<StackInfo>, StackError> {
    let deadline = Instant::now() + wait.timeout;
    let mut seen: Vec<StackEvent> = Vec::new();
    loop {
        // Status first, then the events: every event up to that status is then shown,
        // and a failure's reasons are among them.
        let info = stacks.describe(&cursor.stack_id).await?;
        let fresh = cursor.next(stacks).await?;
        for e in &fresh {
            writeln!(out, "{}", format(e))?;
        }
        seen.extend(fresh);
        let Some(info) = info else {
            return match op {
                // Not even listed by its ARN any more: gone.
                Operation::Delete => Ok(None),
                _ => Err(StackError::NotFound(name.to_owned())),
            };
        };
        match phase(op, &info.status) {
            Phase::Succeeded => return Ok(Some(info)),
            Phase::Failed => {
                let mut reasons = failure_reasons(&seen);
                if reasons.is_empty() {
                    reasons.extend(info.reason.clone());
                }
                return Err(StackError::Failed {
                    stack: name.to_owned(),
                    operation: op,
                    status: info.status,
                    reasons,
                });
            }
            Phase::InProgress => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(StackError::Timeout {
                stack: name.to_owned(),
                status: info.status,
                secs: wait.timeout.as_secs(),
            });
        }
        debug!(stack = name, status = %info.status, "waiting");
        tokio::time::sleep(wait.poll.min(remaining)).await;
    }
}
