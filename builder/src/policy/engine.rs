//! The call into AWS CloudFormation Guard (the `cfn-guard` crate).
//!
//! Guard runs the way its CLI does for `cfn-guard validate --payload --structured
//! --output-format json`: rules and data go in as strings, the report comes back as JSON.
//! Not `cfn_guard::run_checks`: in 3.2.1 it returns the unflushed tail of a `BufWriter`, so a
//! report longer than 8 KiB (about six violations) loses its beginning and is not JSON.

use cfn_guard::commands::validate::{OutputFormatType, ShowSummaryType};
use cfn_guard::commands::Executable;
use cfn_guard::utils::reader::{ReadBuffer, Reader};
use cfn_guard::utils::writer::{WriteBuffer, Writer};
use cfn_guard::CommandBuilder;

/// Guard's exit codes for a structured run: every rule passed or was skipped, or some failed.
/// Anything else (5) means it could not evaluate, for example a rules file did not parse.
const GUARD_PASS: i32 = 0;
const GUARD_FAIL: i32 = 19;

/// One `.guard` file: its name (for messages) and its text.
#[derive(Debug, Clone, Copy)]
pub struct RuleFile {
    pub name: &'static str,
    pub text: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot set up the Guard validate command: {0}")]
    Setup(String),
    #[error("rules file {name} does not parse: {message}")]
    Rules { name: String, message: String },
    #[error("Guard could not evaluate the template: {0}")]
    Evaluate(String),
    #[error("Guard stopped on an internal error (a panic): {0}")]
    Panic(String),
    #[error("Guard's report is not UTF-8 text: {0}")]
    Output(String),
}

/// Evaluates `rules` against `template_json` and returns Guard's structured JSON report: a
/// list with one file report (`status`, `not_compliant`, `compliant`, `not_applicable`).
pub fn evaluate(template_json: &str, rules: &[RuleFile]) -> Result<String, EngineError> {
    let payload = serde_json::json!({
        "rules": rules.iter().map(|r| r.text).collect::<Vec<_>>(),
        "data": [template_json],
    })
    .to_string();
    let command = cfn_guard::ValidateBuilder::default()
        .payload(true)
        .structured(true)
        .output_format(OutputFormatType::JSON)
        .show_summary(vec![ShowSummaryType::None])
        .try_build()
        .map_err(|e| EngineError::Setup(e.to_string()))?;
    let mut reader = Reader::new(ReadBuffer::Cursor(std::io::Cursor::new(
        payload.into_bytes(),
    )));
    // Guard writes rule parse errors to `err`; a Vec keeps them off the user's terminal, and
    // `parse_errors` below recovers them with their file names.
    let mut writer =
        Writer::new_with_err(WriteBuffer::Vec(Vec::new()), WriteBuffer::Vec(Vec::new()))
            .map_err(|e| EngineError::Setup(e.to_string()))?;

    // Guard has `unreachable!()`s on paths its parser admits; one of them must not take amictl
    // down with a bare panic instead of an "unable to check" exit.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        command.execute(&mut writer, &mut reader)
    }))
    .map_err(|panic| EngineError::Panic(panic_text(panic.as_ref())))?;

    match outcome {
        Ok(GUARD_PASS) | Ok(GUARD_FAIL) => writer
            .into_string()
            .map_err(|e| EngineError::Output(e.to_string())),
        Ok(code) => Err(parse_errors(rules).unwrap_or_else(|| {
            EngineError::Evaluate(format!("validate exited with status {code}"))
        })),
        Err(e) => Err(EngineError::Evaluate(e.to_string())),
    }
}

/// The first rules file that does not parse, as an error naming it.
fn parse_errors(rules: &[RuleFile]) -> Option<EngineError> {
    rules.iter().find_map(|rule| {
        cfn_guard::commands::validate::parse_rules(rule.text, rule.name)
            .err()
            .map(|e| EngineError::Rules {
                name: rule.name.to_string(),
                message: e.to_string(),
            })
    })
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"{"Resources": {"T": {"Type": "AWS::SNS::Topic"}}}"#;

    #[test]
    fn a_rules_file_that_does_not_parse_is_named() {
        let rules = [RuleFile {
            name: "broken.guard",
            text: "rule R { Resources.*[ Type == }",
        }];
        let err = evaluate(TEMPLATE, &rules).unwrap_err();
        assert!(
            matches!(&err, EngineError::Rules { name, .. } if name == "broken.guard"),
            "{err}"
        );
    }

    #[test]
    fn long_reports_come_back_whole() {
        // Enough failing clauses to pass the 8 KiB where `run_checks` truncates.
        let resources: Vec<String> = (0..40)
            .map(|i| format!(r#""T{i}": {{"Type": "AWS::SNS::Topic"}}"#))
            .collect();
        let template = format!(r#"{{"Resources": {{{}}}}}"#, resources.join(","));
        let rules = [RuleFile {
            name: "fail.guard",
            text: "rule FAIL_ALL { Resources.* { Type == 'nope' << problem: p\n fix: f >> } }",
        }];
        let report = evaluate(&template, &rules).unwrap();
        assert!(report.len() > 8192, "{}", report.len());
        let parsed: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(parsed[0]["status"], "FAIL");
    }
}
