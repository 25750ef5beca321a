//! What an invocation's Status and StatusDetails mean for amictl, pure.
//!
//! GetCommandInvocation answers a Status (Pending, InProgress, Delayed, Success, Cancelled,
//! TimedOut, Failed, Cancelling) and a StatusDetails that says more (Delivery Timed Out,
//! Execution Timed Out, Undeliverable, Terminated, ...). The details decide first: a Failed
//! or TimedOut invocation that never reached the instance is `Unreachable` (retry later),
//! one that ran too long is `TimedOut`, and one that ran to the end is `Exited` with its
//! exit code (SSM says Success for 0 and Failed for any other code).

use crate::fleet::Invocation;

/// SSM keeps only this many characters of stdout (and of stderr) in
/// GetCommandInvocation's answer; the rest is only in S3, when an output bucket is set.
pub const OUTPUT_LIMIT_CHARS: usize = 24_000;

/// One GetCommandInvocation answer, reduced to what matters here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationStatus {
    /// Status as SSM spells it (`Success`, `InProgress`, ...).
    pub status: String,
    /// StatusDetails as SSM spells it (`Delivery Timed Out`, ...).
    pub details: String,
    /// The command's exit code; -1 until it has one.
    pub response_code: i32,
    pub stdout: String,
    pub stdout_url: Option<String>,
    pub stderr: String,
    pub stderr_url: Option<String>,
}

impl InvocationStatus {
    pub fn new(status: &str, details: &str, response_code: i32) -> Self {
        InvocationStatus {
            status: status.into(),
            details: details.into(),
            response_code,
            ..Default::default()
        }
    }
}

/// `Delivery Timed Out`, `DeliveryTimedOut` and `delivery-timed-out` are the same word.
fn norm(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The invocation's outcome once SSM has one, or None while it is still under way
/// (Pending, InProgress, Delayed, Cancelling, or a status this version does not know).
pub fn final_invocation(s: &InvocationStatus) -> Option<Invocation> {
    let status = norm(&s.status);
    if !matches!(
        status.as_str(),
        "success" | "failed" | "timedout" | "cancelled" | "canceled"
    ) {
        return None;
    }
    let described = |what: &str| {
        if s.details.is_empty() || norm(&s.details) == status {
            what.to_owned()
        } else {
            format!("{what} ({})", s.details)
        }
    };
    let details = norm(&s.details);
    let unreachable = match details.as_str() {
        "undeliverable" => Some(
            "SSM cannot deliver the command: the instance is gone or its agent does not answer",
        ),
        "deliverytimedout" => Some("SSM did not deliver the command before the delivery timeout"),
        "terminated" => {
            Some("SSM cancelled the invocation before it ran (the command hit MaxErrors)")
        }
        "invalidplatform" => {
            Some("the instance's platform cannot run a shell script (aws:runShellScript)")
        }
        "accessdenied" => Some("the instance's SSM agent was denied the command"),
        _ => None,
    };
    if let Some(reason) = unreachable {
        return Some(Invocation::Unreachable {
            reason: reason.into(),
        });
    }
    if details == "executiontimedout" {
        return Some(Invocation::TimedOut {
            reason: "the command did not finish before its execution timeout".into(),
        });
    }
    match status.as_str() {
        "success" => Some(exited(s, 0)),
        "failed" if s.response_code >= 0 => Some(exited(s, s.response_code)),
        "failed" => Some(Invocation::Unreachable {
            reason: described("SSM reports Failed without an exit code: the command did not run"),
        }),
        "timedout" => Some(Invocation::TimedOut {
            reason: described("SSM reports TimedOut"),
        }),
        _ => Some(Invocation::TimedOut {
            reason: described("the invocation was cancelled"),
        }),
    }
}

fn exited(s: &InvocationStatus, code: i32) -> Invocation {
    let mut stderr = s.stderr.clone();
    for (name, text, url) in [
        ("stdout", &s.stdout, &s.stdout_url),
        ("stderr", &s.stderr, &s.stderr_url),
    ] {
        if let Some(note) = truncation_note(name, text, url.as_deref()) {
            if !stderr.is_empty() && !stderr.ends_with('\n') {
                stderr.push('\n');
            }
            stderr.push_str(&note);
        }
    }
    Invocation::Exited {
        code,
        stdout: s.stdout.clone(),
        stderr,
    }
}

/// A note (added to stderr) when SSM cut an output short: readers of stdout must then
/// expect a truncated document.
pub fn truncation_note(name: &str, text: &str, url: Option<&str>) -> Option<String> {
    if text.chars().count() < OUTPUT_LIMIT_CHARS {
        return None;
    }
    let whole = match url.filter(|u| !u.is_empty()) {
        Some(u) => format!("the whole output is at {u}"),
        None => "the rest is lost (no S3 output bucket)".to_owned(),
    };
    Some(format!(
        "[amictl: SSM kept only the first {OUTPUT_LIMIT_CHARS} characters of {name}; {whole}]"
    ))
}

/// What an invocation without a final status comes to when the caller stops waiting:
/// never delivered (Pending, Delayed, or never seen) is `Unreachable`, started is
/// `TimedOut`.
pub fn at_deadline(last: Option<&InvocationStatus>) -> Invocation {
    let Some(s) = last else {
        return Invocation::Unreachable {
            reason: "SSM showed no invocation before the deadline".into(),
        };
    };
    if let Some(done) = final_invocation(s) {
        return done;
    }
    match norm(&s.status).as_str() {
        "pending" => Invocation::Unreachable {
            reason: "the command was still pending at the deadline (not delivered)".into(),
        },
        "delayed" => Invocation::Unreachable {
            reason: "SSM was still retrying delivery at the deadline (Delayed)".into(),
        },
        "inprogress" => Invocation::TimedOut {
            reason: "the command was still running at the deadline".into(),
        },
        "cancelling" => Invocation::TimedOut {
            reason: "the invocation was being cancelled at the deadline".into(),
        },
        other => Invocation::TimedOut {
            reason: format!("no final status at the deadline (status {other:?})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(status: &str, details: &str, code: i32) -> Option<Invocation> {
        final_invocation(&InvocationStatus::new(status, details, code))
    }

    fn is_unreachable(i: Option<Invocation>) -> bool {
        matches!(i, Some(Invocation::Unreachable { .. }))
    }

    fn is_timed_out(i: Option<Invocation>) -> bool {
        matches!(i, Some(Invocation::TimedOut { .. }))
    }

    #[test]
    fn under_way_is_not_final() {
        assert_eq!(fin("Pending", "Pending", -1), None);
        assert_eq!(fin("InProgress", "In Progress", -1), None);
        assert_eq!(fin("Delayed", "Delayed", -1), None);
        assert_eq!(fin("Cancelling", "Cancelling", -1), None);
        assert_eq!(fin("SomethingNew", "", -1), None);
    }

    #[test]
    fn success_is_exit_zero_with_output() {
        let mut s = InvocationStatus::new("Success", "Success", 0);
        s.stdout = "{\"status\":\"healthy\"}\n".into();
        s.stderr = "warn\n".into();
        assert_eq!(
            final_invocation(&s),
            Some(Invocation::Exited {
                code: 0,
                stdout: "{\"status\":\"healthy\"}\n".into(),
                stderr: "warn\n".into(),
            })
        );
    }

    #[test]
    fn failed_with_a_code_is_that_exit_code() {
        for code in [1, 2, 3, 127] {
            match fin("Failed", "Failed", code) {
                Some(Invocation::Exited { code: c, .. }) => assert_eq!(c, code),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn failed_without_a_code_did_not_run() {
        assert!(is_unreachable(fin("Failed", "Failed", -1)));
    }

    #[test]
    fn undeliverable_is_unreachable() {
        assert!(is_unreachable(fin("Failed", "Undeliverable", -1)));
    }

    #[test]
    fn delivery_timed_out_is_unreachable() {
        assert!(is_unreachable(fin("TimedOut", "Delivery Timed Out", -1)));
        assert!(is_unreachable(fin("TimedOut", "DeliveryTimedOut", -1)));
    }

    #[test]
    fn terminated_is_unreachable() {
        assert!(is_unreachable(fin("Failed", "Terminated", -1)));
        assert!(is_unreachable(fin("Cancelled", "Terminated", -1)));
    }

    #[test]
    fn invalid_platform_and_access_denied_are_unreachable() {
        assert!(is_unreachable(fin("Failed", "Invalid Platform", -1)));
        assert!(is_unreachable(fin("Failed", "Access Denied", -1)));
    }

    #[test]
    fn execution_timed_out_is_timed_out() {
        assert!(is_timed_out(fin("TimedOut", "Execution Timed Out", -1)));
        // Even where SSM says Failed with a code: the details decide.
        assert!(is_timed_out(fin("Failed", "Execution Timed Out", 1)));
    }

    #[test]
    fn timed_out_without_details_is_timed_out() {
        assert!(is_timed_out(fin("TimedOut", "", -1)));
    }

    #[test]
    fn cancelled_is_timed_out() {
        match fin("Cancelled", "Cancelled", -1) {
            Some(Invocation::TimedOut { reason }) => assert!(reason.contains("cancelled")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_stdout_is_noted_on_stderr_and_kept() {
        let mut s = InvocationStatus::new("Failed", "Failed", 2);
        s.stdout = "x".repeat(OUTPUT_LIMIT_CHARS);
        s.stdout_url = Some("https://s3.amazonaws.com/b/k/stdout".into());
        match final_invocation(&s) {
            Some(Invocation::Exited {
                code,
                stdout,
                stderr,
            }) => {
                assert_eq!(code, 2);
                assert_eq!(stdout.len(), OUTPUT_LIMIT_CHARS);
                assert!(
                    stderr.contains("first 24000 characters of stdout"),
                    "{stderr}"
                );
                assert!(stderr.contains("https://s3.amazonaws.com/b/k/stdout"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(truncation_note("stdout", "short", None), None);
        assert!(
            truncation_note("stdout", &"é".repeat(OUTPUT_LIMIT_CHARS), Some(""))
                .unwrap()
                .contains("no S3 output bucket")
        );
    }

    #[test]
    fn at_the_deadline() {
        assert!(matches!(at_deadline(None), Invocation::Unreachable { .. }));
        let at = |s: &str| at_deadline(Some(&InvocationStatus::new(s, s, -1)));
        assert!(matches!(at("Pending"), Invocation::Unreachable { .. }));
        assert!(matches!(at("Delayed"), Invocation::Unreachable { .. }));
        assert!(matches!(at("InProgress"), Invocation::TimedOut { .. }));
        assert!(matches!(at("Cancelling"), Invocation::TimedOut { .. }));
        assert!(matches!(at("Success"), Invocation::Exited { code: 0, .. }));
    }
}
