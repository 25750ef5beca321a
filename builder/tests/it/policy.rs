//! `amictl stack check`: each policy rule against a template that breaks it and one that
//! complies (fixtures in tests/policy/, all valid CloudFormation per cfn-lint), the wording of
//! the violations, and the exit codes of the real binary.

use amictl::policy::{self, Report};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/policy")
        .join(name)
}

fn check(name: &str) -> Report {
    policy::check_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// (resource, rule) of every violation.
fn pairs(report: &Report) -> BTreeSet<(String, String)> {
    report
        .violations
        .iter()
        .map(|v| (v.resource.clone(), v.rule.clone()))
        .collect()
}

/// (resource, rule, location) of every violation.
fn triples(report: &Report) -> BTreeSet<(String, String, Option<String>)> {
    report
        .violations
        .iter()
        .map(|v| (v.resource.clone(), v.rule.clone(), v.location.clone()))
        .collect()
}

fn set<const N: usize>(items: [(&str, &str); N]) -> BTreeSet<(String, String)> {
    items
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn assert_clean(name: &str) {
    let report = check(name);
    assert!(
        report.violations.is_empty(),
        "{name} should pass:\n{}",
        report
            .violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(report.exit_code(), 0);
}

const SG: &str = "SG_PUBLIC_INGRESS_WEB_ONLY";

#[test]
fn public_ingress_beyond_web_ports_is_caught_entry_by_entry() {
    let report = check("sg_bad.yaml");
    let entry =
        |i: usize, field: &str| Some(format!("Properties.SecurityGroupIngress[{i}].{field}"));
    let expected: BTreeSet<_> = [
        // tcp 0-65535 from 0.0.0.0/0: the range starts below 80.
        ("WebSecurityGroup", entry(1, "FromPort")),
        // IpProtocol -1 from ::/0: every protocol, every port.
        ("WebSecurityGroup", entry(2, "IpProtocol")),
        // tcp 80-443: starts at a web port but reaches 81..442.
        ("WebSecurityGroup", entry(3, "ToPort")),
        // A standalone ingress resource: SSH from anywhere.
        ("SshFromAnywhere", Some("Properties.FromPort".to_string())),
    ]
    .into_iter()
    .map(|(r, l)| (r.to_string(), SG.to_string(), l))
    .collect();
    assert_eq!(triples(&report), expected);
}

#[test]
fn web_ports_from_anywhere_and_other_ports_from_inside_pass() {
    assert_clean("sg_good.yaml");
}

#[test]
fn json_templates_are_checked_too() {
    // Indented with tabs: valid JSON, not valid YAML.
    let report = check("sg_bad.json");
    assert_eq!(pairs(&report), set([("OpenSsh", SG)]));
}

#[test]
fn imdsv1_is_caught_on_launch_templates_configurations_and_instances() {
    let report = check("imdsv2_bad.yaml");
    assert_eq!(
        pairs(&report),
        set([
            ("OptionalTokens", "LAUNCH_TEMPLATE_IMDSV2_REQUIRED"),
            ("NoMetadataOptions", "LAUNCH_TEMPLATE_IMDSV2_REQUIRED"),
            (
                "LegacyConfiguration",
                "LAUNCH_CONFIGURATION_IMDSV2_REQUIRED"
            ),
            (
                "WithoutLaunchTemplate",
                "INSTANCE_IMDSV2_VIA_LAUNCH_TEMPLATE"
            ),
            // A parameter or a literal lt-... id cannot be verified to require IMDSv2.
            ("FromParameter", "INSTANCE_IMDSV2_VIA_LAUNCH_TEMPLATE"),
            ("FromLiteral", "INSTANCE_IMDSV2_VIA_LAUNCH_TEMPLATE"),
        ])
    );
}

#[test]
fn instances_from_a_launch_template_that_requires_imdsv2_pass() {
    // Both `!Ref LaunchTemplate` and `!GetAtt LaunchTemplate.LaunchTemplateId`.
    assert_clean("imdsv2_good.yaml");
}

#[test]
fn buckets_unencrypted_not_fully_closed_or_without_tls_are_caught() {
    let report = check("s3_bad.yaml");
    assert_eq!(
        pairs(&report),
        set([
            ("ThreeOfFourFlags", "S3_BUCKET_PUBLIC_ACCESS_BLOCKED"),
            ("Unencrypted", "S3_BUCKET_ENCRYPTED"),
            (
                "UnencryptedPolicy",
                "S3_BUCKET_POLICY_DENIES_INSECURE_TRANSPORT"
            ),
            ("WithoutPolicy", "S3_BUCKET_PUBLIC_ACCESS_BLOCKED"),
            ("WithoutPolicy", "S3_BUCKET_HAS_TLS_POLICY"),
        ])
    );
    // Three of four flags: the missing one is named.
    let three = report
        .violations
        .iter()
        .find(|v| v.resource == "ThreeOfFourFlags")
        .unwrap();
    assert!(three.problem.contains("RestrictPublicBuckets"), "{three}");
}

#[test]
fn an_encrypted_closed_tls_only_bucket_passes() {
    assert_clean("s3_good.yaml");
}

#[test]
fn allow_wildcards_are_caught_as_strings_in_lists_and_as_not_action() {
    let report = check("iam_bad.yaml");
    let rule = "IAM_NO_WILDCARD_ACTIONS".to_string();
    let expected: BTreeSet<_> = [
        // Action: "*" in a single (not listed) statement.
        ("Admin", "Properties.PolicyDocument.Statement.Action"),
        // ec2:* second in a list of actions.
        (
            "AllOfEc2",
            "Properties.PolicyDocument.Statement[0].Action[1]",
        ),
        // Allow with NotAction, in a role's inline policy.
        (
            "Role",
            "Properties.Policies[0].PolicyDocument.Statement[0].NotAction",
        ),
    ]
    .into_iter()
    .map(|(r, l)| (r.to_string(), rule.clone(), Some(l.to_string())))
    .collect();
    assert_eq!(triples(&report), expected);
}

#[test]
fn named_actions_partial_wildcards_and_deny_wildcards_pass() {
    assert_clean("iam_good.yaml");
}

#[test]
fn unencrypted_ebs_volumes_and_mappings_are_caught() {
    let report = check("ebs_bad.yaml");
    assert_eq!(
        pairs(&report),
        set([
            ("Volume", "EBS_VOLUME_ENCRYPTED"),
            ("LaunchTemplate", "EBS_BLOCK_DEVICES_ENCRYPTED"),
            ("Instance", "EBS_BLOCK_DEVICES_ENCRYPTED"),
        ])
    );
}

#[test]
fn encrypted_ebs_volumes_and_mappings_pass() {
    assert_clean("ebs_good.yaml");
}

#[test]
fn load_balancers_without_logs_header_hygiene_strict_desync_or_modern_tls_are_caught() {
    let report = check("alb_bad.yaml");
    let (logs, headers, desync) = (
        "ALB_ACCESS_LOGS_ENABLED",
        "ALB_DROPS_INVALID_HEADERS",
        "ALB_DESYNC_MITIGATION_STRICTEST",
    );
    assert_eq!(
        pairs(&report),
        set([
            ("Bare", logs),
            ("Bare", headers),
            ("Bare", desync),
            ("Lax", logs),
            ("Lax", headers),
            ("Lax", desync),
            ("OldTls", "ALB_HTTPS_TLS13_POLICY"),
            // Clear text next to HTTPS, and a conditional listener that forwards when the
            // certificate is there.
            ("ClearText", "ALB_HTTP_REDIRECTS_TO_HTTPS"),
            ("ClearTextWithCertificate", "ALB_HTTP_REDIRECTS_TO_HTTPS"),
        ]),
        "a network load balancer is not held to ALB rules"
    );
}

#[test]
fn a_logged_strict_tls13_load_balancer_with_a_redirect_passes() {
    assert_clean("alb_good.yaml");
}

#[test]
fn every_rule_has_a_fixture_that_breaks_it() {
    let mut caught = BTreeSet::new();
    for name in [
        "sg_bad.yaml",
        "imdsv2_bad.yaml",
        "s3_bad.yaml",
        "iam_bad.yaml",
        "ebs_bad.yaml",
        "alb_bad.yaml",
    ] {
        caught.extend(check(name).violations.into_iter().map(|v| v.rule));
    }
    let all: BTreeSet<String> = policy::rule_names(policy::RULES).into_iter().collect();
    assert_eq!(caught, all);
}

#[test]
fn violations_name_resource_rule_problem_and_fix() {
    let report = check("sg_bad.yaml");
    let ssh = report
        .violations
        .iter()
        .find(|v| v.resource == "SshFromAnywhere")
        .unwrap();
    assert_eq!(
        ssh.to_string(),
        "SshFromAnywhere [SG_PUBLIC_INGRESS_WEB_ONLY] ingress from the internet (/0) reaches \
         ports other than 80 and 443 (at Properties.FromPort). Fix: set FromPort and ToPort \
         both to 80 or both to 443, or narrow the source to a known CIDR, prefix list or \
         security group; use SSM Session Manager instead of SSH"
    );
    for v in &report.violations {
        let line = v.to_string();
        assert!(!line.contains('\n'), "one line: {line:?}");
        assert!(
            line.starts_with(&format!("{} [{}] ", v.resource, v.rule)),
            "{line}"
        );
        assert!(line.contains(". Fix: "), "{line}");
    }
    assert_eq!(
        report.summary(),
        format!(
            "{}: 4 violations in 2 resources; 1 of {} policy rules failed: {SG}",
            fixture("sg_bad.yaml").display(),
            policy::rule_names(policy::RULES).len()
        )
    );
}

#[test]
fn what_cannot_be_read_is_an_error_not_a_verdict() {
    for (name, expected) in [
        ("not_a_template.yaml", "not valid JSON or YAML"),
        ("no_resources.json", "no Resources section"),
        ("does_not_exist.yaml", "cannot read"),
    ] {
        let err = policy::check_file(&fixture(name)).unwrap_err().to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

fn amictl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amictl"))
        .args(args)
        .output()
        .expect("run amictl")
}

fn stack_check(name: &str) -> Output {
    amictl(&["stack", "check", fixture(name).to_str().unwrap()])
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_binary_exits_0_on_a_clean_template() {
    let out = stack_check("s3_good.yaml");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("passes all"), "{out:?}");
}

#[test]
fn the_binary_exits_1_and_prints_one_line_per_violation_then_the_summary() {
    let out = stack_check("iam_bad.yaml");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for line in &lines[..3] {
        assert!(line.contains("[IAM_NO_WILDCARD_ACTIONS]"), "{line}");
        assert!(line.contains(". Fix: "), "{line}");
    }
    assert!(lines[0].starts_with("Admin "), "sorted by resource: {text}");
    assert!(lines[3].contains("3 violations in 3 resources"), "{text}");
}

#[test]
fn the_binary_exits_2_when_the_template_cannot_be_read_or_parsed() {
    for name in [
        "not_a_template.yaml",
        "no_resources.json",
        "does_not_exist.yaml",
    ] {
        let out = stack_check(name);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        assert!(
            out.stdout.is_empty(),
            "{name}: no verdict on stdout: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: "), "{name}: {err}");
        assert!(
            err.contains(name),
            "{name}: the error names the file: {err}"
        );
    }
}

#[test]
fn the_binary_checks_the_built_in_stack_template_by_default() {
    let out = amictl(&["stack", "check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).contains("the built-in stack template"),
        "{out:?}"
    );
}

#[test]
fn every_rules_file_in_the_repository_is_built_in() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".guard"))
        .collect();
    let built_in: BTreeSet<String> = policy::RULES.iter().map(|r| r.name.to_string()).collect();
    assert_eq!(on_disk, built_in);
}
