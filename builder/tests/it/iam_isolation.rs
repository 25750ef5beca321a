//! Prefix isolation of `amictl iam-policy`, evaluated here without AWS: a policy made with
//! `--prefix amictl-pr-` must allow no request against what the `amictl-main` stack,
//! fleet and publishes (prefix `amictl-main-`) made: its instances, Run Command targets,
//! AMIs, snapshots, target group, stack, roles, buckets, load balancer and alarms. The
//! `amictl-main` policy allows each of those requests, so each is one the policy is really
//! about, not one denied for another reason.
//!
//! The evaluator implements the part of IAM's policy language the policy uses: Allow
//! statements, action names, resource globs, and the condition operators below (an
//! operator it does not know fails the test, so a new one cannot slip past it).

use std::collections::{BTreeMap, BTreeSet};

use amictl::iam::{policy, Scope, Target};
use serde_json::Value;

/// One authorization: an action on a resource, with the request's context keys.
#[derive(Debug, Clone)]
struct Request {
    action: &'static str,
    resource: String,
    context: BTreeMap<String, Vec<String>>,
}

/// An operation: every resource it is authorized against must be allowed.
struct Operation {
    what: &'static str,
    requests: Vec<Request>,
}

fn glob(pattern: &str, value: &str) -> bool {
    fn go(p: &[u8], v: &[u8]) -> bool {
        match (p.first(), v.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], v) || (!v.is_empty() && go(p, &v[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &v[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &v[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), value.as_bytes())
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_owned()).collect(),
        other => panic!("not a string or a list: {other}"),
    }
}

/// Whether one condition block entry holds for the request's context.
fn condition_holds(
    op: &str,
    key: &str,
    expected: &[String],
    context: &BTreeMap<String, Vec<String>>,
) -> bool {
    let actual = context.get(&key.to_ascii_lowercase());
    let (op, if_exists) = match op.strip_suffix("IfExists") {
        Some(base) => (base, true),
        None => (op, false),
    };
    if let Some(base) = op.strip_prefix("ForAllValues:") {
        // Every value of the request's key matches one of the expected ones (true when
        // the request has none).
        return actual.is_none_or(|values| {
            values
                .iter()
                .all(|v| expected.iter().any(|e| matches(base, e, v)))
        });
    }
    if op == "Null" {
        let want_absent = expected == ["true"];
        return actual.is_none() == want_absent;
    }
    match actual {
        None => if_exists,
        Some(values) => values
            .iter()
            .any(|v| expected.iter().any(|e| matches(op, e, v))),
    }
}

fn matches(op: &str, expected: &str, actual: &str) -> bool {
    match op {
        "StringEquals" | "ArnEquals" => expected == actual,
        "StringLike" | "ArnLike" => glob(expected, actual),
        other => panic!("the evaluator does not know the condition operator {other}"),
    }
}

fn statement_allows(statement: &Value, request: &Request) -> bool {
    assert_eq!(statement["Effect"], "Allow");
    if !strings(&statement["Action"])
        .iter()
        .any(|a| a == request.action)
    {
        return false;
    }
    if !strings(&statement["Resource"])
        .iter()
        .any(|r| glob(r, &request.resource))
    {
        return false;
    }
    let Some(conditions) = statement.get("Condition").and_then(Value::as_object) else {
        return true;
    };
    conditions.iter().all(|(op, entries)| {
        entries
            .as_object()
            .unwrap()
            .iter()
            .all(|(key, expected)| condition_holds(op, key, &strings(expected), &request.context))
    })
}

fn allows(policy: &Value, request: &Request) -> bool {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| statement_allows(s, request))
}

fn policy_for(prefix: &str) -> Value {
    let scopes: BTreeSet<Scope> = Scope::ALL.into_iter().collect();
    let target = Target::new(
        "aws",
        Some("123456789012"),
        &["us-east-1".to_owned()],
        prefix,
    )
    .unwrap();
    serde_json::to_value(policy(&scopes, &target)).unwrap()
}

fn req(action: &'static str, resource: &str, context: &[(&str, &[&str])]) -> Request {
    Request {
        action,
        resource: resource.to_owned(),
        context: context
            .iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    v.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect(),
    }
}

const ARN: &str = "arn:aws:ec2:us-east-1:123456789012";

/// What `amictl-main-` made, and requests against it.
fn against_main() -> Vec<Operation> {
    let instance = format!("{ARN}:instance/i-0main");
    let volume = format!("{ARN}:volume/vol-0main");
    let image = "arn:aws:ec2:us-east-1::image/ami-0main".to_owned();
    let snapshot = "arn:aws:ec2:us-east-1::snapshot/snap-0main".to_owned();
    let fleet_tag: &[(&str, &[&str])] = &[("aws:ResourceTag/amictl:fleet", &["amictl-main-web"])];
    let image_tags: &[(&str, &[&str])] = &[
        ("aws:ResourceTag/amictl:managed-by", &["amictl"]),
        ("aws:ResourceTag/amictl:prefix", &["amictl-main-"]),
    ];
    let tg = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/amictl-main-tg/0123";
    let alb =
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/amictl-main-alb/0123";
    let stack = "arn:aws:cloudformation:us-east-1:123456789012:stack/amictl-main/0123";
    let role = "arn:aws:iam::123456789012:role/amictl-main-instance";
    let launch_tags: &[(&str, &[&str])] = &[("aws:RequestTag/amictl:fleet", &["amictl-main-web"])];
    vec![
        Operation {
            what: "terminate main's instance",
            requests: vec![req("ec2:TerminateInstances", &instance, fleet_tag)],
        },
        Operation {
            what: "mark main's instance retiring",
            requests: vec![req(
                "ec2:CreateTags",
                &instance,
                &[
                    ("aws:ResourceTag/amictl:fleet", &["amictl-main-web"]),
                    ("aws:TagKeys", &["amictl:retiring"]),
                ],
            )],
        },
        Operation {
            what: "launch an instance into main's fleet",
            requests: vec![
                req("ec2:RunInstances", &instance, launch_tags),
                req("ec2:RunInstances", &volume, launch_tags),
                req("ec2:RunInstances", &image, &[]),
                req(
                    "ec2:RunInstances",
                    &format!("{ARN}:subnet/subnet-0main"),
                    &[],
                ),
                req(
                    "ec2:RunInstances",
                    &format!("{ARN}:security-group/sg-0main"),
                    &[],
                ),
                req(
                    "ec2:RunInstances",
                    &format!("{ARN}:network-interface/eni-0main"),
                    &[],
                ),
            ],
        },
        Operation {
            what: "tag an instance of main's fleet at launch",
            requests: vec![req(
                "ec2:CreateTags",
                &instance,
                &[
                    ("ec2:CreateAction", &["RunInstances"]),
                    ("aws:RequestTag/amictl:fleet", &["amictl-main-web"]),
                ],
            )],
        },
        Operation {
            what: "run a command on main's instance",
            requests: vec![
                req(
                    "ssm:SendCommand",
                    &instance,
                    &[("ssm:resourceTag/amictl:fleet", &["amictl-main-web"])],
                ),
                req(
                    "ssm:SendCommand",
                    "arn:aws:ssm:us-east-1:123456789012:document/amictl-main-HealthCheck",
                    &[],
                ),
            ],
        },
        Operation {
            what: "deregister main's AMI",
            requests: vec![req("ec2:DeregisterImage", &image, image_tags)],
        },
        Operation {
            what: "make main's AMI public",
            requests: vec![req("ec2:ModifyImageAttribute", &image, image_tags)],
        },
        Operation {
            what: "deprecate main's AMI",
            requests: vec![req("ec2:EnableImageDeprecation", &image, image_tags)],
        },
        Operation {
            what: "retag main's AMI",
            requests: vec![req(
                "ec2:CreateTags",
                &image,
                &[
                    ("aws:ResourceTag/amictl:prefix", &["amictl-main-"]),
                    ("aws:TagKeys", &["amictl:label"]),
                ],
            )],
        },
        Operation {
            what: "delete main's snapshot",
            requests: vec![req(
                "ec2:DeleteSnapshot",
                &snapshot,
                &[("aws:ResourceTag/amictl:prefix", &["amictl-main-"])],
            )],
        },
        Operation {
            what: "write blocks into main's snapshot",
            requests: vec![req(
                "ebs:PutSnapshotBlock",
                &snapshot,
                &[("aws:ResourceTag/amictl:prefix", &["amictl-main-"])],
            )],
        },
        Operation {
            what: "start a snapshot for main",
            requests: vec![req(
                "ebs:StartSnapshot",
                &snapshot,
                &[("aws:RequestTag/amictl:prefix", &["amictl-main-"])],
            )],
        },
        Operation {
            what: "move main's traffic",
            requests: vec![req("elasticloadbalancing:DeregisterTargets", tg, &[])],
        },
        Operation {
            what: "delete main's load balancer",
            requests: vec![req("elasticloadbalancing:DeleteLoadBalancer", alb, &[])],
        },
        Operation {
            what: "delete main's stack",
            requests: vec![req("cloudformation:DeleteStack", stack, &[])],
        },
        Operation {
            what: "pass main's instance role",
            requests: vec![req(
                "iam:PassRole",
                role,
                &[("iam:PassedToService", &["ec2.amazonaws.com"])],
            )],
        },
        Operation {
            what: "delete main's instance role",
            requests: vec![req("iam:DeleteRole", role, &[])],
        },
        Operation {
            what: "delete main's alarm",
            requests: vec![req(
                "cloudwatch:DeleteAlarms",
                "arn:aws:cloudwatch:us-east-1:123456789012:alarm:amictl-main-5xx",
                &[],
            )],
        },
        Operation {
            what: "delete main's log bucket",
            requests: vec![req(
                "s3:DeleteBucket",
                "arn:aws:s3:::amictl-main-logs-123456789012-us-east-1",
                &[],
            )],
        },
        Operation {
            what: "overwrite an object in main's import bucket",
            requests: vec![req(
                "s3:PutObject",
                "arn:aws:s3:::amictl-main-import-123456789012-us-east-1/image.raw",
                &[],
            )],
        },
    ]
}

fn operation_allowed(policy: &Value, op: &Operation) -> Result<(), String> {
    for r in &op.requests {
        if !allows(policy, r) {
            return Err(format!("{} on {} is not allowed", r.action, r.resource));
        }
    }
    Ok(())
}

#[test]
fn a_preview_prefix_cannot_touch_what_main_made() {
    // As the deploy workflow's role has it (docs/design.md): `--prefix amictl-main`.
    let main = policy_for("amictl-main");
    let preview = policy_for("amictl-pr-");
    let mut wrong = Vec::new();
    for op in against_main() {
        // The request is one main's own policy allows: it is well formed and on topic.
        if let Err(e) = operation_allowed(&main, &op) {
            wrong.push(format!("main's policy should allow \"{}\": {e}", op.what));
        }
        if operation_allowed(&preview, &op).is_ok() {
            wrong.push(format!("the amictl-pr- policy allows \"{}\"", op.what));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_prefix_may_claim_an_ami_it_did_not_make() {
    // Tagging someone else's AMI as amictl's would let the image statements reach it.
    let foreign = req(
        "ec2:CreateTags",
        "arn:aws:ec2:us-east-1::image/ami-0other",
        &[
            ("aws:TagKeys", &["amictl:managed-by", "amictl:prefix"]),
            ("aws:RequestTag/amictl:prefix", &["amictl-main-"]),
        ],
    );
    for prefix in ["amictl-main", "amictl-pr-", "amictl-"] {
        assert!(!allows(&policy_for(prefix), &foreign), "{prefix}");
    }
    // As it registers one, it may tag it.
    let mut on_create = foreign.clone();
    on_create
        .context
        .insert("ec2:createaction".into(), vec!["RegisterImage".into()]);
    assert!(allows(&policy_for("amictl-main"), &on_create));
    assert!(!allows(&policy_for("amictl-pr-"), &on_create));
}

#[test]
fn the_evaluator_knows_globs_ifexists_and_null() {
    assert!(glob("amictl-pr-*", "amictl-pr-7-web"));
    assert!(!glob("amictl-pr-*", "amictl-main-web"));
    assert!(glob(
        "arn:aws:ec2:*:*:instance/*",
        "arn:aws:ec2:r:1:instance/i-1"
    ));
    let ctx: BTreeMap<String, Vec<String>> = [("a".to_owned(), vec!["x".to_owned()])].into();
    assert!(condition_holds(
        "StringEqualsIfExists",
        "b",
        &["y".into()],
        &ctx
    ));
    assert!(!condition_holds("StringEquals", "b", &["y".into()], &ctx));
    assert!(condition_holds("Null", "b", &["true".into()], &ctx));
    assert!(
        !condition_holds("Null", "A", &["true".into()], &ctx),
        "keys are case-insensitive"
    );
    assert!(condition_holds(
        "ForAllValues:StringLike",
        "a",
        &["x*".into()],
        &ctx
    ));
    assert!(!condition_holds(
        "ForAllValues:StringLike",
        "a",
        &["y*".into()],
        &ctx
    ));
}
