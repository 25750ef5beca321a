//! Guard's structured JSON report, turned into one [`Violation`] per failing check.
//!
//! The report nests: a failing rule holds checks, and a check is a clause (`Unary` or
//! `Binary`), a block whose query did not resolve, a disjunction whose every branch failed,
//! or a named rule the rule called. Each failing leaf carries the custom message written in
//! the rule (`<< problem: ... fix: ... >>`) and the path of the value it looked at, which
//! starts with `/Resources/<LogicalId>`.
//!
//! Unknown shapes are errors rather than skipped: a report this module cannot read must not
//! look like a clean template.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;

/// Stands for the resource of a violation whose path is not inside `Resources`.
pub const TEMPLATE_LEVEL: &str = "(template)";

/// One thing wrong with the template.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// The resource's logical id, or [`TEMPLATE_LEVEL`].
    pub resource: String,
    /// The Guard rule that failed, e.g. `SG_PUBLIC_INGRESS_WEB_ONLY`.
    pub rule: String,
    /// Where in the resource, e.g. `Properties.SecurityGroupIngress[2].FromPort`; `None`
    /// when the violation is about the resource as a whole.
    pub location: Option<String>,
    /// What is wrong.
    pub problem: String,
    /// How to fix it.
    pub fix: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] {}", self.resource, self.rule, self.problem)?;
        if let Some(location) = &self.location {
            write!(f, " (at {location})")?;
        }
        write!(f, ". Fix: {}", self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Guard's report has an unexpected shape: {0}")]
pub struct ReportError(String);

fn unexpected(what: impl Into<String>) -> ReportError {
    ReportError(what.into())
}

/// The violations in a structured report for one template, sorted and without duplicates.
pub fn violations(report: &str) -> Result<Vec<Violation>, ReportError> {
    let parsed: Value =
        serde_json::from_str(report).map_err(|e| unexpected(format!("not JSON: {e}")))?;
    let file = match parsed.as_array().map(Vec::as_slice) {
        Some([file]) => file,
        _ => return Err(unexpected("expected a list with one file report")),
    };
    let failing = file
        .get("not_compliant")
        .and_then(Value::as_array)
        .ok_or_else(|| unexpected("no not_compliant list"))?;

    let mut found = BTreeSet::new();
    for entry in failing {
        let rule = variant(entry, "Rule")
            .ok_or_else(|| unexpected("a not_compliant entry that is not a rule"))?;
        let name = rule
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| unexpected("a rule without a name"))?;
        let before = found.len();
        for check in checks(rule)? {
            collect(name, check, &mut found)?;
        }
        if found.len() == before {
            return Err(unexpected(format!(
                "rule {name} failed without a failing check"
            )));
        }
    }
    if found.is_empty() && file.get("status").and_then(Value::as_str) == Some("FAIL") {
        return Err(unexpected("status FAIL without any failing rule"));
    }
    Ok(found.into_iter().collect())
}

/// `{"<name>": inner}` -> `inner`: how serde writes Guard's enums.
fn variant<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    value.as_object().filter(|o| o.len() == 1)?.get(name)
}

fn checks(rule: &Value) -> Result<&Vec<Value>, ReportError> {
    rule.get("checks")
        .and_then(Value::as_array)
        .ok_or_else(|| unexpected("a rule without checks"))
}

fn collect(rule: &str, check: &Value, out: &mut BTreeSet<Violation>) -> Result<(), ReportError> {
    if let Some(named) = variant(check, "Rule") {
        // A named rule the top-level rule called (e.g. a shared helper): its failures are
        // reported under the top-level rule, the one users see in the rules list.
        for inner in checks(named)? {
            collect(rule, inner, out)?;
        }
        return Ok(());
    }
    let leaf = if let Some(disjunction) = variant(check, "Disjunctions") {
        // Every branch failed; Guard keeps the `<< >>` message on the last branch only, so
        // take the first message and the first path found among the branches.
        let mut leaf = Leaf::default();
        for branch in checks(disjunction)? {
            leaf.fill_from(&leaf_of(branch)?);
        }
        leaf
    } else {
        leaf_of(check)?
    };
    out.insert(leaf.into_violation(rule));
    Ok(())
}

/// The message and path of one failing check.
#[derive(Debug, Default)]
struct Leaf {
    custom_message: Option<String>,
    error_message: Option<String>,
    path: Option<String>,
}

impl Leaf {
    fn fill_from(&mut self, other: &Leaf) {
        if self.custom_message.is_none() {
            self.custom_message.clone_from(&other.custom_message);
        }
        if self.error_message.is_none() {
            self.error_message.clone_from(&other.error_message);
        }
        if self.path.is_none() {
            self.path.clone_from(&other.path);
        }
    }

    fn into_violation(self, rule: &str) -> Violation {
        let (resource, location) = split_path(self.path.as_deref());
        let (problem, fix) = match self.custom_message.as_deref().and_then(problem_and_fix) {
            Some(parts) => parts,
            // A check without a `<< problem: fix: >>` message is a gap in the rules file;
            // still report it, with Guard's own words.
            None => (
                squeeze(self.error_message.as_deref().unwrap_or("the check failed")),
                "see the rule in the repository's policy/ directory".to_string(),
            ),
        };
        Violation {
            resource,
            rule: rule.to_string(),
            location,
            problem,
            fix,
        }
    }
}

fn leaf_of(check: &Value) -> Result<Leaf, ReportError> {
    if let Some(clause) = variant(check, "Clause") {
        let inner = variant(clause, "Unary")
            .or_else(|| variant(clause, "Binary"))
            .ok_or_else(|| {
                unexpected(format!(
                    "a clause that is neither unary nor binary: {clause}"
                ))
            })?;
        let mut leaf = messages(inner);
        leaf.path = inner.get("check").and_then(clause_path);
        return Ok(leaf);
    }
    if let Some(block) = variant(check, "Block") {
        let mut leaf = messages(block);
        leaf.path = block
            .pointer("/unresolved/traversed_to/path")
            .and_then(Value::as_str)
            .map(str::to_string);
        return Ok(leaf);
    }
    if variant(check, "Rule").is_some() || variant(check, "Disjunctions").is_some() {
        // Nested inside a disjunction: flatten to the first leaf with something to say.
        let mut leaf = Leaf::default();
        let inner = variant(check, "Rule")
            .or_else(|| variant(check, "Disjunctions"))
            .unwrap_or(&Value::Null);
        for each in checks(inner)? {
            leaf.fill_from(&leaf_of(each)?);
        }
        return Ok(leaf);
    }
    Err(unexpected(format!("an unknown kind of check: {check}")))
}

fn messages(report: &Value) -> Leaf {
    let text = |key: &str| {
        report
            .pointer(&format!("/messages/{key}"))
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
    };
    Leaf {
        custom_message: text("custom_message"),
        error_message: text("error_message"),
        path: None,
    }
}

/// The path of the value a clause compared: `Resolved` (unary `value`, binary `from`),
/// `InResolved` (`from`), `UnResolved` (where the query stopped); `UnResolvedContext` has
/// none.
fn clause_path(check: &Value) -> Option<String> {
    let pointer = if let Some(resolved) = variant(check, "Resolved") {
        resolved
            .pointer("/value/path")
            .or_else(|| resolved.pointer("/from/path"))
    } else if let Some(resolved) = variant(check, "InResolved") {
        resolved.pointer("/from/path")
    } else if let Some(unresolved) = variant(check, "UnResolved") {
        unresolved.pointer("/value/traversed_to/path")
    } else {
        None
    };
    pointer
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

/// `/Resources/WebSG/Properties/SecurityGroupIngress/2/FromPort` ->
/// (`WebSG`, `Properties.SecurityGroupIngress[2].FromPort`). A path that ends at the resource
/// or its `Type` has no location: the violation is about the resource itself.
fn split_path(path: Option<&str>) -> (String, Option<String>) {
    let Some(path) = path else {
        return (TEMPLATE_LEVEL.to_string(), None);
    };
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("Resources"), Some(id)) = (parts.next(), parts.next()) else {
        return (TEMPLATE_LEVEL.to_string(), Some(path.to_string()));
    };
    let mut location = String::new();
    for part in parts {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            location.push_str(&format!("[{part}]"));
        } else {
            if !location.is_empty() {
                location.push('.');
            }
            location.push_str(part);
        }
    }
    let location = Some(location).filter(|l| !l.is_empty() && l != "Type");
    (id.to_string(), location)
}

/// Splits a `<< problem: ... fix: ... >>` message. Guard hands the message over with its
/// line breaks and indentation, or with the line breaks turned into `;` (for checks on a
/// variable), so whitespace is squeezed and separators around the two parts are trimmed.
pub(crate) fn problem_and_fix(message: &str) -> Option<(String, String)> {
    let start = message.find("problem:")?;
    let rest = &message[start + "problem:".len()..];
    let split = rest.find("fix:")?;
    let problem = squeeze(&rest[..split]);
    let fix = squeeze(&rest[split + "fix:".len()..]);
    (!problem.is_empty() && !fix.is_empty()).then_some((problem, fix))
}

fn squeeze(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_matches(|c: char| c == ';' || c.is_whitespace())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_resource_and_the_property() {
        assert_eq!(
            split_path(Some(
                "/Resources/WebSG/Properties/SecurityGroupIngress/2/FromPort"
            )),
            (
                "WebSG".to_string(),
                Some("Properties.SecurityGroupIngress[2].FromPort".to_string())
            )
        );
        assert_eq!(
            split_path(Some("/Resources/B/Type")),
            ("B".to_string(), None)
        );
        assert_eq!(split_path(Some("/Resources/B")), ("B".to_string(), None));
        assert_eq!(
            split_path(Some("/Outputs/X")),
            (TEMPLATE_LEVEL.to_string(), Some("/Outputs/X".to_string()))
        );
        assert_eq!(split_path(None), (TEMPLATE_LEVEL.to_string(), None));
    }

    #[test]
    fn messages_split_into_problem_and_fix() {
        let multi_line =
            "\n            problem: a thing\n   is wrong\n            fix: do x; then y\n        ";
        assert_eq!(
            problem_and_fix(multi_line),
            Some(("a thing is wrong".to_string(), "do x; then y".to_string()))
        );
        let semicolons = ";            problem: a thing is wrong;            fix: do x;        ";
        assert_eq!(
            problem_and_fix(semicolons),
            Some(("a thing is wrong".to_string(), "do x".to_string()))
        );
        assert_eq!(problem_and_fix("no structure here"), None);
        assert_eq!(problem_and_fix("problem: only half"), None);
    }

    fn report(not_compliant: Value) -> String {
        serde_json::json!([{
            "name": "DATA_STDIN[1]", "metadata": {}, "status": "FAIL",
            "not_compliant": not_compliant, "not_applicable": [], "compliant": []
        }])
        .to_string()
    }

    #[test]
    fn clauses_blocks_disjunctions_and_named_rules_are_all_read() {
        let msg =
            |m: &str| serde_json::json!({"custom_message": m, "error_message": "guard says no"});
        let text = report(serde_json::json!([{"Rule": {
            "name": "TOP", "metadata": {}, "messages": {"custom_message": null, "error_message": null},
            "checks": [
                {"Clause": {"Binary": {"context": "c", "messages": msg("problem: p1 fix: f1"),
                    "check": {"InResolved": {"from": {"path": "/Resources/A/Properties/X", "value": 1},
                                             "to": [], "comparison": ["In", false]}}}}},
                {"Rule": {"name": "helper", "metadata": {}, "messages": {}, "checks": [
                    {"Block": {"context": "b", "messages": msg(""),
                        "unresolved": {"traversed_to": {"path": "/Resources/B/Properties", "value": {}},
                                       "remaining_query": "Y", "reason": "r"}}}
                ]}},
                {"Disjunctions": {"checks": [
                    {"Clause": {"Unary": {"context": "d1", "messages": {"custom_message": null, "error_message": "e"},
                        "check": {"UnResolved": {"value": {"traversed_to": {"path": "/Resources/C/Properties", "value": {}},
                                  "remaining_query": "Z", "reason": "r"}, "comparison": ["Exists", false]}}}}},
                    {"Clause": {"Unary": {"context": "d2", "messages": msg("problem: p3 fix: f3"),
                        "check": {"UnResolved": {"value": {"traversed_to": {"path": "/Resources/C/Properties", "value": {}},
                                  "remaining_query": "W", "reason": "r"}, "comparison": ["Exists", false]}}}}}
                ]}},
                {"Clause": {"Unary": {"context": "v", "messages": msg("problem: p4 fix: f4"),
                    "check": {"UnResolvedContext": "%x not EMPTY"}}}}
            ]
        }}]));
        let found = violations(&text).unwrap();
        let summary: Vec<(String, Option<String>, String, String)> = found
            .into_iter()
            .map(|v| (v.resource, v.location, v.problem, v.fix))
            .collect();
        assert_eq!(
            summary,
            vec![
                (TEMPLATE_LEVEL.into(), None, "p4".into(), "f4".into()),
                (
                    "A".into(),
                    Some("Properties.X".into()),
                    "p1".into(),
                    "f1".into()
                ),
                (
                    "B".into(),
                    Some("Properties".into()),
                    "guard says no".into(),
                    "see the rule in the repository's policy/ directory".into()
                ),
                (
                    "C".into(),
                    Some("Properties".into()),
                    "p3".into(),
                    "f3".into()
                ),
            ]
        );
    }

    #[test]
    fn unknown_shapes_are_errors_not_clean_reports() {
        assert!(violations("not json").is_err());
        assert!(violations("[]").is_err());
        let odd = report(serde_json::json!([{"Rule": {"name": "R", "checks": [{"Mystery": {}}]}}]));
        assert!(violations(&odd).is_err());
        let silent = report(serde_json::json!([]));
        assert!(violations(&silent).is_err(), "FAIL without a failing rule");
    }
}
