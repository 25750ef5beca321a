//! Stack events (pure): which ones are new since the last look, how one is shown, and
//! which explain a failure.

/// One entry of DescribeStackEvents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackEvent {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub time: i64,
    /// The template's logical id (the stack's own name for the stack itself).
    pub resource: String,
    pub resource_type: String,
    pub status: String,
    pub reason: Option<String>,
}

pub const STACK_TYPE: &str = "AWS::CloudFormation::Stack";

/// The events of `page` (newest first, as DescribeStackEvents answers) that come after
/// `marker` (the newest event already shown; None: all of them), oldest first; and whether
/// the marker was in the page (if not, the next page may hold more new events).
pub fn newer_than(page: &[StackEvent], marker: Option<&str>) -> (Vec<StackEvent>, bool) {
    let mut fresh: Vec<StackEvent> = page
        .iter()
        .take_while(|e| Some(e.id.as_str()) != marker)
        .cloned()
        .collect();
    let reached = marker.is_some() && fresh.len() < page.len();
    fresh.reverse();
    (fresh, reached)
}

/// One line: UTC time, resource, status, reason.
pub fn format(e: &StackEvent) -> String {
    let time = aws_smithy_types::DateTime::from_secs(e.time)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| e.time.to_string());
    let mut line = format!("{time}  {}  {}", e.resource, e.status);
    if let Some(r) = e.reason.as_deref().filter(|r| !r.is_empty()) {
        line.push_str("  ");
        line.push_str(r);
    }
    line
}

/// Reasons that only say another failure stopped this resource.
fn is_knock_on(reason: &str) -> bool {
    reason.contains("Resource creation cancelled") || reason.contains("Resource update cancelled")
}

/// Why an operation failed, from its events (oldest first): each resource's own failure
/// reason, without the knock-on "cancelled" ones; if no resource says, what the stack
/// itself said (e.g. "The following resource(s) failed to create: ...").
pub fn failure_reasons(events: &[StackEvent]) -> Vec<String> {
    let failed = |e: &&StackEvent| e.status.ends_with("_FAILED");
    let resources: Vec<String> = events
        .iter()
        .filter(failed)
        .filter(|e| e.resource_type != STACK_TYPE)
        .filter_map(|e| {
            let r = e.reason.as_deref()?;
            (!is_knock_on(r)).then(|| format!("{} ({}): {r}", e.resource, e.resource_type))
        })
        .collect();
    if !resources.is_empty() {
        return resources;
    }
    events
        .iter()
        .filter(|e| e.resource_type == STACK_TYPE)
        .filter(|e| e.status.contains("ROLLBACK_IN_PROGRESS") || e.status.ends_with("_FAILED"))
        .filter_map(|e| e.reason.clone())
        .filter(|r| !r.is_empty() && r != "User Initiated")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stack::tests::event as ev;

    #[test]
    fn only_events_after_the_marker_oldest_first() {
        let page = vec![
            ev("4", "Vpc", "CREATE_COMPLETE", None),
            ev("3", "Vpc", "CREATE_IN_PROGRESS", None),
            ev("2", "web", "UPDATE_IN_PROGRESS", Some("User Initiated")),
            ev("1", "web", "CREATE_COMPLETE", None),
        ];
        let (fresh, reached) = newer_than(&page, Some("2"));
        let ids: Vec<&str> = fresh.iter().map(|e| e.id.as_str()).collect();
        assert_eq!((ids, reached), (vec!["3", "4"], true));
        let (fresh, reached) = newer_than(&page, None);
        assert_eq!((fresh.len(), reached), (4, false));
        assert_eq!(fresh[0].id, "1");
        let (fresh, reached) = newer_than(&page, Some("4"));
        assert_eq!((fresh.len(), reached), (0, true));
        // The marker is on a later page: everything here is new, look further.
        let (fresh, reached) = newer_than(&page, Some("0"));
        assert_eq!((fresh.len(), reached), (4, false));
    }

    #[test]
    fn one_line_per_event() {
        assert_eq!(
            format(&ev("1", "Vpc", "CREATE_FAILED", Some("no capacity"))),
            "2023-11-14T22:13:20Z  Vpc  CREATE_FAILED  no capacity"
        );
        assert_eq!(
            format(&ev("1", "Vpc", "CREATE_COMPLETE", Some(""))),
            "2023-11-14T22:13:20Z  Vpc  CREATE_COMPLETE"
        );
    }

    #[test]
    fn failure_reasons_name_the_cause_not_the_knock_ons() {
        let events = vec![
            ev("1", "web", "CREATE_IN_PROGRESS", Some("User Initiated")),
            ev("2", "Vpc", "CREATE_FAILED", Some("The CIDR '10.0.0.0/33' is invalid.")),
            ev("3", "Igw", "CREATE_FAILED", Some("Resource creation cancelled")),
            ev(
                "4",
                "web",
                "ROLLBACK_IN_PROGRESS",
                Some("The following resource(s) failed to create: [Vpc, Igw]. Rollback requested by user."),
            ),
            ev("5", "web", "ROLLBACK_COMPLETE", None),
        ];
        assert_eq!(
            failure_reasons(&events),
            vec!["Vpc (AWS::EC2::VPC): The CIDR '10.0.0.0/33' is invalid."]
        );
        // Without a resource's own reason, the stack's.
        let stack_only = vec![events[0].clone(), events[3].clone(), events[4].clone()];
        assert_eq!(
            failure_reasons(&stack_only),
            vec!["The following resource(s) failed to create: [Vpc, Igw]. Rollback requested by user."]
        );
    }
}
