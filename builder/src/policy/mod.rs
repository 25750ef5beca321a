//! Policy as code: `amictl stack check [TEMPLATE]` holds a CloudFormation template to the
//! project's security rules before anything is deployed.
//!
//! The rules are AWS CloudFormation Guard files in the repository's `policy/` directory,
//! embedded in the binary, and evaluated by Guard itself (the `cfn-guard` crate). The template
//! is read here ([`template`]), evaluated ([`engine`]), and Guard's report turned into one
//! line per violation ([`report`]).

pub mod engine;
pub mod report;
pub mod template;

pub use engine::RuleFile;
pub use report::Violation;

use std::path::Path;

/// What `amictl stack check` checks without a TEMPLATE: the very template `amictl stack
/// deploy` deploys.
pub const DEFAULT_TEMPLATE: &str = crate::stack::TEMPLATE;

/// Exit codes of `amictl stack check`.
pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_VIOLATIONS: i32 = 1;
/// The template could not be read, parsed or evaluated: nothing is known about it.
pub const EXIT_UNCHECKED: i32 = 2;

macro_rules! rule_file {
    ($name:literal) => {
        RuleFile {
            name: $name,
            text: include_str!(concat!("../../../policy/", $name)),
        }
    };
}

/// The rules, one file per concern (see each file's header for what it checks and why).
pub const RULES: &[RuleFile] = &[
    rule_file!("security_group_ingress.guard"),
    rule_file!("imdsv2.guard"),
    rule_file!("s3_bucket.guard"),
    rule_file!("iam_wildcards.guard"),
    rule_file!("ebs_encryption.guard"),
    rule_file!("alb.guard"),
];

/// Why a template could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{name} is not a CloudFormation template: {source}")]
    Template {
        name: String,
        source: template::TemplateError,
    },
    #[error("cannot evaluate the rules against {name}: {source}")]
    Engine {
        name: String,
        source: engine::EngineError,
    },
    #[error("cannot read the rules' verdict on {name}: {source}")]
    Report {
        name: String,
        source: report::ReportError,
    },
}

/// The outcome of checking one template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// What the template is called in messages (its path, or the embedded template).
    pub name: String,
    /// Sorted by resource, then rule.
    pub violations: Vec<Violation>,
    /// Names of the rules evaluated (the upper-case rules of [`RULES`]).
    pub rules: Vec<String>,
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        if self.violations.is_empty() {
            EXIT_CLEAN
        } else {
            EXIT_VIOLATIONS
        }
    }

    /// The closing line: how many violations, in how many resources, of which rules.
    pub fn summary(&self) -> String {
        let rules = self.rules.len();
        if self.violations.is_empty() {
            return format!("{}: passes all {rules} policy rules", self.name);
        }
        let resources: std::collections::BTreeSet<&str> = self
            .violations
            .iter()
            .map(|v| v.resource.as_str())
            .collect();
        let failed: std::collections::BTreeSet<&str> =
            self.violations.iter().map(|v| v.rule.as_str()).collect();
        format!(
            "{}: {} violation{} in {} resource{}; {} of {rules} policy rules failed: {}",
            self.name,
            self.violations.len(),
            plural(self.violations.len()),
            resources.len(),
            plural(resources.len()),
            failed.len(),
            failed.into_iter().collect::<Vec<_>>().join(", "),
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The rules users see: Guard rules named in upper case. Lower-case rules are helpers the
/// others call with parameters, and report under their caller.
pub fn rule_names(rules: &[RuleFile]) -> Vec<String> {
    rules
        .iter()
        .flat_map(|file| file.text.lines())
        .filter_map(|line| line.strip_prefix("rule "))
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty() && !name.chars().any(|c| c.is_ascii_lowercase())).then_some(name)
        })
        .collect()
}

/// Checks template text (YAML or JSON) against [`RULES`]. `name` is used in messages.
pub fn check(text: &str, name: &str) -> Result<Report, CheckError> {
    let template = template::parse(text).map_err(|source| CheckError::Template {
        name: name.to_string(),
        source,
    })?;
    let verdict =
        engine::evaluate(&template.to_string(), RULES).map_err(|source| CheckError::Engine {
            name: name.to_string(),
            source,
        })?;
    let violations = report::violations(&verdict).map_err(|source| CheckError::Report {
        name: name.to_string(),
        source,
    })?;
    Ok(Report {
        name: name.to_string(),
        violations,
        rules: rule_names(RULES),
    })
}

/// Reads and checks a template file.
pub fn check_file(path: &Path) -> Result<Report, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckError::Read {
        path: path.display().to_string(),
        source,
    })?;
    check(&text, &path.display().to_string())
}

/// `amictl stack check [TEMPLATE]`: exit 0 clean, 1 violations, 2 unreadable input.
///
/// Violations go to stdout, one per line, then the summary; a template that cannot be
/// checked is an error on stderr and exit 2, never 1, so that "violations" always means the
/// rules ran.
pub fn run_check(template: Option<&std::path::Path>) -> anyhow::Result<i32> {
    let outcome = match template {
        Some(path) => check_file(path),
        None => check(DEFAULT_TEMPLATE, "the built-in stack template"),
    };
    match outcome {
        Ok(report) => {
            for violation in &report.violations {
                println!("{violation}");
            }
            println!("{}", report.summary());
            Ok(report.exit_code())
        }
        Err(err) => {
            eprintln!("error: {err}");
            Ok(EXIT_UNCHECKED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_in_the_rules_names_the_problem_and_the_fix() {
        for file in RULES {
            let mut rest = file.text;
            let mut count = 0;
            while let Some(start) = rest.find("<<") {
                let end = rest[start..]
                    .find(">>")
                    .unwrap_or_else(|| panic!("{}: unclosed <<", file.name));
                let message = &rest[start + 2..start + end];
                assert!(
                    report::problem_and_fix(message).is_some(),
                    "{}: message without problem: and fix: {message}",
                    file.name
                );
                count += 1;
                rest = &rest[start + end..];
            }
            assert!(count > 0, "{} has no messages", file.name);
        }
    }

    #[test]
    fn rule_names_are_the_upper_case_rules() {
        let names = rule_names(RULES);
        for expected in [
            "SG_PUBLIC_INGRESS_WEB_ONLY",
            "LAUNCH_TEMPLATE_IMDSV2_REQUIRED",
            "INSTANCE_IMDSV2_VIA_LAUNCH_TEMPLATE",
            "S3_BUCKET_ENCRYPTED",
            "S3_BUCKET_PUBLIC_ACCESS_BLOCKED",
            "IAM_NO_WILDCARD_ACTIONS",
            "EBS_VOLUME_ENCRYPTED",
            "EBS_BLOCK_DEVICES_ENCRYPTED",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n == "ebs_mappings_encrypted"));
    }

    #[test]
    fn the_built_in_stack_template_passes() {
        let report = check(DEFAULT_TEMPLATE, "stack.yaml").unwrap();
        assert_eq!(report.violations, vec![], "{}", report.summary());
    }

    #[test]
    fn summary_counts_violations_resources_and_rules() {
        let v = |resource: &str, rule: &str| Violation {
            resource: resource.into(),
            rule: rule.into(),
            location: None,
            problem: "p".into(),
            fix: "f".into(),
        };
        let report = Report {
            name: "t.yaml".into(),
            violations: vec![v("A", "R1"), v("A", "R2"), v("B", "R1")],
            rules: vec!["R1".into(), "R2".into(), "R3".into()],
        };
        assert_eq!(
            report.summary(),
            "t.yaml: 3 violations in 2 resources; 2 of 3 policy rules failed: R1, R2"
        );
        assert_eq!(report.exit_code(), EXIT_VIOLATIONS);
        let clean = Report {
            violations: vec![],
            ..report
        };
        assert_eq!(clean.summary(), "t.yaml: passes all 3 policy rules");
        assert_eq!(clean.exit_code(), EXIT_CLEAN);
    }
}
