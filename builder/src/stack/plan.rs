//! The deploy and delete decisions (pure): which change set a stack needs, with which
//! parameters, whether an answer means "nothing to change", and what a stack status means
//! for the operation being waited on.

use std::collections::BTreeMap;

use super::names::DEFAULT_PREFIX;
use super::StackError;

/// The template parameter every resource name starts with.
pub const PREFIX_PARAMETER: &str = "Prefix";
/// The template parameter that turns on HTTPS (empty: HTTP only).
pub const CERTIFICATE_PARAMETER: &str = "CertificateArn";

/// The change set a deploy creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The stack does not exist yet (or only as an unexecuted change set's
    /// REVIEW_IN_PROGRESS stack, which takes a CREATE change set too).
    Create,
    Update,
}

/// What a stack operation is, for reading its statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl From<Kind> for Operation {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Create => Operation::Create,
            Kind::Update => Operation::Update,
        }
    }
}

/// Where a stack operation is, given the stack's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    InProgress,
    Succeeded,
    /// Ended without doing what was asked (rolled back, or failed).
    Failed,
}

/// The change set `name`'s stack needs, from its current status (None: no such stack), or
/// why it cannot be deployed now and what to do.
pub fn change_set_kind(name: &str, status: Option<&str>) -> Result<Kind, StackError> {
    let refuse = |why: String| Err(StackError::NotDeployable(why));
    match status {
        None | Some("REVIEW_IN_PROGRESS") | Some("DELETE_COMPLETE") => Ok(Kind::Create),
        Some(s @ ("ROLLBACK_COMPLETE" | "ROLLBACK_FAILED" | "CREATE_FAILED")) => refuse(format!(
            "stack {name} is {s}: its creation failed, and such a stack cannot be updated; delete it with `amictl stack delete --name {name}`, then deploy again"
        )),
        Some("DELETE_FAILED") => refuse(format!(
            "stack {name} is DELETE_FAILED: finish deleting it with `amictl stack delete --name {name}`, then deploy again"
        )),
        Some("UPDATE_ROLLBACK_FAILED") => refuse(format!(
            "stack {name} is UPDATE_ROLLBACK_FAILED: CloudFormation could not roll back its last update; fix the cause and run `aws cloudformation continue-update-rollback --stack-name {name}`, then deploy again"
        )),
        Some(s) if s.ends_with("_IN_PROGRESS") => refuse(format!(
            "stack {name} is {s}: another operation is under way; wait for it to finish, then deploy again"
        )),
        // CREATE_COMPLETE, UPDATE_COMPLETE, UPDATE_ROLLBACK_COMPLETE (the last update failed
        // and was undone: the stack is fine), IMPORT_*_COMPLETE, UPDATE_FAILED.
        Some(_) => Ok(Kind::Update),
    }
}

/// The prefix a deploy uses: the one asked for, else the stack's own (an update keeps
/// it), else the default. A different prefix than the stack's is refused: it renames, so
/// replaces, nearly every resource, including the subnets and groups a fleet runs in.
pub fn prefix(
    name: &str,
    asked: Option<&str>,
    existing: Option<&BTreeMap<String, String>>,
) -> Result<String, StackError> {
    let current = existing.and_then(|p| p.get(PREFIX_PARAMETER));
    match (asked, current) {
        (Some(a), Some(c)) if a != c => Err(StackError::PrefixChange {
            name: name.to_owned(),
            from: c.clone(),
            to: a.to_owned(),
        }),
        (Some(a), _) => Ok(a.to_owned()),
        (None, Some(c)) => Ok(c.clone()),
        (None, None) => Ok(DEFAULT_PREFIX.to_owned()),
    }
}

/// One template parameter of a change set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParameterValue {
    Value(String),
    /// Keep what the stack has: set outside amictl (the console, the CLI), and amictl has
    /// no flag for it, so an update must not quietly reset it to the default.
    UsePrevious,
}

/// The change set's parameters: the prefix, the certificate when one was given (an empty
/// one turns HTTPS off), and for an update every other parameter the stack already has,
/// kept as it is (the certificate too, when none was given).
pub fn parameters(
    kind: Kind,
    prefix: &str,
    certificate: Option<&str>,
    existing: Option<&BTreeMap<String, String>>,
) -> Vec<(String, ParameterValue)> {
    let mut out = vec![(
        PREFIX_PARAMETER.to_owned(),
        ParameterValue::Value(prefix.to_owned()),
    )];
    if let Some(arn) = certificate {
        out.push((
            CERTIFICATE_PARAMETER.to_owned(),
            ParameterValue::Value(arn.to_owned()),
        ));
    }
    if kind == Kind::Update {
        if let Some(existing) = existing {
            out.extend(
                existing
                    .keys()
                    .filter(|k| !out.iter().any(|(set, _)| set == *k))
                    .map(|k| (k.clone(), ParameterValue::UsePrevious))
                    .collect::<Vec<_>>(),
            );
        }
    }
    out
}

/// Whether a failed change set (its StatusReason) or a refused CreateChangeSet (its
/// message) only means that the stack already is what was asked. CloudFormation says the
/// first for a change set; UpdateStack, and some implementations for CreateChangeSet, say
/// the second.
pub fn no_changes(reason: &str) -> bool {
    reason.contains("didn't contain changes") || reason.contains("No updates are to be performed")
}

/// What `status` means for `op`. Anything still moving ends in `_IN_PROGRESS`
/// (UPDATE_COMPLETE_CLEANUP_IN_PROGRESS included: the update is done, but old resources
/// are still being removed, and the next operation has to wait for that).
pub fn phase(op: Operation, status: &str) -> Phase {
    let done = match op {
        Operation::Create => "CREATE_COMPLETE",
        Operation::Update => "UPDATE_COMPLETE",
        Operation::Delete => "DELETE_COMPLETE",
    };
    if status == done {
        Phase::Succeeded
    } else if status.ends_with("_IN_PROGRESS") {
        Phase::InProgress
    } else {
        Phase::Failed
    }
}

/// Where a change set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeSetPhase {
    Pending,
    /// Computed and executable.
    Ready,
    /// Will never be executable; the reason says why.
    Failed(String),
}

/// What DescribeChangeSet's Status, ExecutionStatus and StatusReason mean.
pub fn change_set_phase(
    status: &str,
    execution: Option<&str>,
    reason: Option<&str>,
) -> ChangeSetPhase {
    match (status, execution) {
        ("CREATE_COMPLETE", Some("AVAILABLE")) => ChangeSetPhase::Ready,
        // The stack changed after the change set was computed.
        (_, Some("OBSOLETE")) => ChangeSetPhase::Failed(
            "the stack changed while the change set was being made (another deploy?); deploy again"
                .into(),
        ),
        ("FAILED", _) | ("DELETE_COMPLETE", _) | ("DELETE_FAILED", _) => {
            ChangeSetPhase::Failed(reason.unwrap_or(status).to_owned())
        }
        // CREATE_PENDING, CREATE_IN_PROGRESS, and CREATE_COMPLETE a moment before
        // ExecutionStatus turns AVAILABLE.
        _ => ChangeSetPhase::Pending,
    }
}

/// A change set's name: unique per deploy, and what CloudFormation accepts (a letter,
/// then letters, digits and hyphens). It doubles as the request tokens, so an SDK retry
/// of CreateChangeSet or ExecuteChangeSet is recognised as the same request.
pub fn change_set_name(unix_secs: u64, nonce: u32) -> String {
    format!("amictl-{unix_secs}-{nonce:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kind_from_status() {
        assert_eq!(change_set_kind("s", None).unwrap(), Kind::Create);
        assert_eq!(
            change_set_kind("s", Some("REVIEW_IN_PROGRESS")).unwrap(),
            Kind::Create
        );
        for s in [
            "CREATE_COMPLETE",
            "UPDATE_COMPLETE",
            "UPDATE_ROLLBACK_COMPLETE",
            "IMPORT_COMPLETE",
        ] {
            assert_eq!(change_set_kind("s", Some(s)).unwrap(), Kind::Update, "{s}");
        }
        let e = change_set_kind("web", Some("ROLLBACK_COMPLETE"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("amictl stack delete --name web") && e.contains("ROLLBACK_COMPLETE"),
            "{e}"
        );
        let e = change_set_kind("web", Some("UPDATE_IN_PROGRESS"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("wait for it"), "{e}");
        let e = change_set_kind("web", Some("UPDATE_ROLLBACK_FAILED"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("continue-update-rollback"), "{e}");
    }

    #[test]
    fn prefix_is_kept_and_never_silently_changed() {
        let existing = params(&[("Prefix", "web-"), ("VpcCidr", "10.1.0.0/16")]);
        assert_eq!(prefix("s", None, None).unwrap(), "amictl-");
        assert_eq!(prefix("s", Some("x-"), None).unwrap(), "x-");
        assert_eq!(prefix("s", None, Some(&existing)).unwrap(), "web-");
        assert_eq!(prefix("s", Some("web-"), Some(&existing)).unwrap(), "web-");
        let e = prefix("s", Some("x-"), Some(&existing)).unwrap_err();
        assert!(
            matches!(&e, StackError::PrefixChange { from, to, .. } if from == "web-" && to == "x-"),
            "{e}"
        );
    }

    #[test]
    fn update_keeps_the_other_parameters() {
        let existing = params(&[("Prefix", "web-"), ("VpcCidr", "10.1.0.0/16")]);
        assert_eq!(
            parameters(Kind::Create, "web-", None, None),
            vec![("Prefix".into(), ParameterValue::Value("web-".into()))]
        );
        assert_eq!(
            parameters(Kind::Update, "web-", None, Some(&existing)),
            vec![
                ("Prefix".into(), ParameterValue::Value("web-".into())),
                ("VpcCidr".into(), ParameterValue::UsePrevious),
            ]
        );
    }

    #[test]
    fn a_certificate_is_set_kept_or_removed() {
        const ARN: &str = "arn:aws:acm:us-east-1:123456789012:certificate/abc-123";
        let https = params(&[("Prefix", "web-"), ("CertificateArn", ARN)]);
        assert_eq!(
            parameters(Kind::Create, "web-", Some(ARN), None),
            vec![
                ("Prefix".into(), ParameterValue::Value("web-".into())),
                ("CertificateArn".into(), ParameterValue::Value(ARN.into())),
            ]
        );
        // Not given on an update: the stack keeps its certificate.
        assert_eq!(
            parameters(Kind::Update, "web-", None, Some(&https)),
            vec![
                ("Prefix".into(), ParameterValue::Value("web-".into())),
                ("CertificateArn".into(), ParameterValue::UsePrevious),
            ]
        );
        // Given empty: HTTPS off, once, not also "use previous".
        assert_eq!(
            parameters(Kind::Update, "web-", Some(""), Some(&https)),
            vec![
                ("Prefix".into(), ParameterValue::Value("web-".into())),
                (
                    "CertificateArn".into(),
                    ParameterValue::Value(String::new())
                ),
            ]
        );
    }

    #[test]
    fn no_change_answers() {
        assert!(no_changes("The submitted information didn't contain changes. Submit different information to create a change set."));
        assert!(no_changes(
            "ValidationError: No updates are to be performed."
        ));
        assert!(!no_changes(
            "Template format error: Unresolved resource dependencies"
        ));
    }

    #[test]
    fn phases() {
        use Operation::*;
        assert_eq!(phase(Create, "CREATE_COMPLETE"), Phase::Succeeded);
        assert_eq!(phase(Create, "CREATE_IN_PROGRESS"), Phase::InProgress);
        assert_eq!(phase(Create, "REVIEW_IN_PROGRESS"), Phase::InProgress);
        assert_eq!(phase(Create, "ROLLBACK_IN_PROGRESS"), Phase::InProgress);
        assert_eq!(phase(Create, "ROLLBACK_COMPLETE"), Phase::Failed);
        assert_eq!(phase(Create, "CREATE_FAILED"), Phase::Failed);
        assert_eq!(phase(Update, "UPDATE_COMPLETE"), Phase::Succeeded);
        assert_eq!(
            phase(Update, "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"),
            Phase::InProgress
        );
        assert_eq!(phase(Update, "UPDATE_ROLLBACK_COMPLETE"), Phase::Failed);
        assert_eq!(phase(Delete, "DELETE_COMPLETE"), Phase::Succeeded);
        assert_eq!(phase(Delete, "DELETE_FAILED"), Phase::Failed);
    }

    #[test]
    fn change_set_phases() {
        assert_eq!(
            change_set_phase("CREATE_COMPLETE", Some("AVAILABLE"), None),
            ChangeSetPhase::Ready
        );
        assert_eq!(
            change_set_phase("CREATE_IN_PROGRESS", Some("UNAVAILABLE"), None),
            ChangeSetPhase::Pending
        );
        assert_eq!(
            change_set_phase("CREATE_COMPLETE", Some("UNAVAILABLE"), None),
            ChangeSetPhase::Pending
        );
        assert_eq!(
            change_set_phase("FAILED", Some("UNAVAILABLE"), Some("no changes")),
            ChangeSetPhase::Failed("no changes".into())
        );
        assert!(matches!(
            change_set_phase("CREATE_COMPLETE", Some("OBSOLETE"), None),
            ChangeSetPhase::Failed(r) if r.contains("deploy again")
        ));
    }

    #[test]
    fn change_set_names_are_valid() {
        let n = change_set_name(1_700_000_000, 0xab);
        assert_eq!(n, "amictl-1700000000-000000ab");
        assert!(super::super::names::check_stack_name(&n).is_ok());
    }
}
