//! Prefix isolation of `amictl iam-policy`, evaluated here without AWS: a policy made with
//! `--prefix amictl-pr-` must allow no request against what the `amictl-main` stack,
//! fleet and publishes (prefix `amictl-main-`) made: its instances, Run Command targets,
//! AMIs, snapshots, target group, stack, roles, buckets, load balancer, alarms, and its
//! network (VPC, subnets, route table and routes, internet gateway, security groups and
//! their rules). The `amictl-main` policy allows each of those requests, so each is one the
//! policy is really about, not one denied for another reason. And the other way round: the
//! preview policy allows what a preview's own stack and publish do.
//!
//! Where AWS's documentation leaves open which context keys a request carries, the
//! requests here assume the worst for isolation: a create request's tags
//! (`aws:RequestTag/...`) are in the context of every resource it is authorized against,
//! its parent VPC included.
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
    let group = "arn:aws:autoscaling:us-east-1:123456789012:autoScalingGroup:0123:autoScalingGroupName/amictl-main-web-us-east-1a-r-1";
    let group_tag: &[(&str, &[&str])] =
        &[("autoscaling:ResourceTag/amictl:prefix", &["amictl-main-"])];
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
            what: "take over or release main's fleet lock",
            requests: vec![
                req(
                    "s3:PutObject",
                    "arn:aws:s3:::amictl-main-import-123456789012-us-east-1/amictl/locks/amictl-main-web.json",
                    &[],
                ),
                req(
                    "s3:DeleteObject",
                    "arn:aws:s3:::amictl-main-import-123456789012-us-east-1/amictl/locks/amictl-main-web.json",
                    &[],
                ),
            ],
        },
        Operation {
            what: "delete, detach, hold or resize main's Auto Scaling group",
            requests: ["autoscaling:DeleteAutoScalingGroup", "autoscaling:DetachLoadBalancerTargetGroups", "autoscaling:AttachLoadBalancerTargetGroups", "autoscaling:SuspendProcesses", "autoscaling:ResumeProcesses", "autoscaling:UpdateAutoScalingGroup", "autoscaling:PutScalingPolicy"]
                .into_iter()
                .map(|action| req(action, group, group_tag))
                .collect(),
        },
        Operation {
            what: "mark main's Auto Scaling group retiring",
            requests: vec![req(
                "autoscaling:CreateOrUpdateTags",
                group,
                &[
                    ("autoscaling:ResourceTag/amictl:prefix", &["amictl-main-"]),
                    ("aws:TagKeys", &["amictl:retiring"]),
                ],
            )],
        },
        Operation {
            what: "make a group in main's name, or run instances from main's launch template",
            requests: vec![
                req(
                    "autoscaling:CreateAutoScalingGroup",
                    group,
                    &[("aws:RequestTag/amictl:prefix", &["amictl-main-"])],
                ),
                req(
                    "ec2:RunInstances",
                    &format!("{ARN}:launch-template/lt-0main"),
                    &[("aws:ResourceTag/amictl:prefix", &["amictl-main-"])],
                ),
            ],
        },
        Operation {
            what: "delete main's launch template",
            requests: vec![req(
                "ec2:DeleteLaunchTemplate",
                &format!("{ARN}:launch-template/lt-0main"),
                &[("aws:ResourceTag/amictl:prefix", &["amictl-main-"])],
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

/// The stack's network resources of a prefix, as the template tags them.
struct Network {
    tag: &'static [(&'static str, &'static [&'static str])],
    vpc: String,
    subnet: String,
    route_table: String,
    gateway: String,
    security_group: String,
}

fn network(prefix: &'static str, id: &str) -> Network {
    let tag: &'static [(&str, &[&str])] = match prefix {
        "amictl-main-" => &[("aws:ResourceTag/amictl:prefix", &["amictl-main-"])],
        "amictl-pr-7-" => &[("aws:ResourceTag/amictl:prefix", &["amictl-pr-7-"])],
        other => panic!("no network for {other}"),
    };
    Network {
        tag,
        vpc: format!("{ARN}:vpc/vpc-0{id}"),
        subnet: format!("{ARN}:subnet/subnet-0{id}"),
        route_table: format!("{ARN}:route-table/rtb-0{id}"),
        gateway: format!("{ARN}:internet-gateway/igw-0{id}"),
        security_group: format!("{ARN}:security-group/sg-0{id}"),
    }
}

/// Requests against main's network, as CloudFormation's handlers make them.
fn against_mains_network() -> Vec<Operation> {
    let n = network("amictl-main-", "main");
    let new_rule = format!("{ARN}:security-group-rule/sgr-0new");
    let new_vpc = format!("{ARN}:vpc/vpc-0new");
    // One action, authorized against each of main's tagged resources it names.
    let on = |what, action: &'static str, resources: &[&String]| Operation {
        what,
        requests: resources.iter().map(|r| req(action, r, n.tag)).collect(),
    };
    let mut ops = vec![
        on(
            "revoke a rule of main's security group",
            "ec2:RevokeSecurityGroupIngress",
            &[&n.security_group],
        ),
        on(
            "rewrite a rule description of main's security group",
            "ec2:UpdateSecurityGroupRuleDescriptionsIngress",
            &[&n.security_group],
        ),
        on(
            "delete main's security group",
            "ec2:DeleteSecurityGroup",
            &[&n.security_group],
        ),
        on(
            "add a route to main's route table",
            "ec2:CreateRoute",
            &[&n.route_table],
        ),
        on(
            "replace main's default route",
            "ec2:ReplaceRoute",
            &[&n.route_table],
        ),
        on(
            "delete main's default route",
            "ec2:DeleteRoute",
            &[&n.route_table],
        ),
        on(
            "delete main's route table",
            "ec2:DeleteRouteTable",
            &[&n.route_table],
        ),
        on(
            "associate main's subnet with main's route table",
            "ec2:AssociateRouteTable",
            &[&n.route_table, &n.subnet],
        ),
        on(
            "move main's subnet to another route table",
            "ec2:ReplaceRouteTableAssociation",
            &[&n.route_table, &n.subnet],
        ),
        on(
            "disassociate main's subnet",
            "ec2:DisassociateRouteTable",
            &[&n.route_table, &n.subnet],
        ),
        on(
            "detach main's internet gateway",
            "ec2:DetachInternetGateway",
            &[&n.gateway, &n.vpc],
        ),
        on(
            "delete main's internet gateway",
            "ec2:DeleteInternetGateway",
            &[&n.gateway],
        ),
        on(
            "stop main's subnet giving public addresses",
            "ec2:ModifySubnetAttribute",
            &[&n.subnet],
        ),
        on("delete main's subnet", "ec2:DeleteSubnet", &[&n.subnet]),
        on(
            "turn off main's VPC DNS",
            "ec2:ModifyVpcAttribute",
            &[&n.vpc],
        ),
        on("delete main's VPC", "ec2:DeleteVpc", &[&n.vpc]),
        on(
            "launch an instance into main's subnet behind main's security group",
            "ec2:RunInstances",
            &[&n.subnet, &n.security_group],
        ),
    ];
    // A new rule is a resource of its own, without tags: its group is what is main's.
    for (what, action) in [
        (
            "open a port on main's security group",
            "ec2:AuthorizeSecurityGroupIngress",
        ),
        (
            "open an egress on main's security group",
            "ec2:AuthorizeSecurityGroupEgress",
        ),
    ] {
        ops.push(Operation {
            what,
            requests: vec![
                req(action, &n.security_group, n.tag),
                req(action, &new_rule, &[]),
            ],
        });
    }
    ops.extend([
        Operation {
            what: "remove the prefix tag from main's VPC",
            requests: vec![req(
                "ec2:DeleteTags",
                &n.vpc,
                &[
                    ("aws:ResourceTag/amictl:prefix", &["amictl-main-"]),
                    ("aws:TagKeys", &["amictl:prefix"]),
                ],
            )],
        },
        Operation {
            what: "retag main's security group",
            requests: vec![req(
                "ec2:CreateTags",
                &n.security_group,
                &[
                    ("aws:ResourceTag/amictl:prefix", &["amictl-main-"]),
                    ("aws:RequestTag/Name", &["amictl-main-lb"]),
                    ("aws:TagKeys", &["Name"]),
                ],
            )],
        },
        Operation {
            what: "create a VPC tagged as main's",
            requests: vec![
                req(
                    "ec2:CreateVpc",
                    &new_vpc,
                    &[("aws:RequestTag/amictl:prefix", &["amictl-main-"])],
                ),
                req(
                    "ec2:CreateTags",
                    &new_vpc,
                    &[
                        ("ec2:CreateAction", &["CreateVpc"]),
                        ("aws:RequestTag/amictl:prefix", &["amictl-main-"]),
                    ],
                ),
            ],
        },
    ]);
    ops
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
    for op in against_main().into_iter().chain(against_mains_network()) {
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

/// A create request carrying the preview's own tag, against main's VPC as the parent: the
/// tag on the request must not stand in for the tag on the VPC.
#[test]
fn a_preview_cannot_build_into_mains_network() {
    let preview = policy_for("amictl-pr-");
    let main = network("amictl-main-", "main");
    let own = network("amictl-pr-7-", "pr7");
    let request_tag: (&str, &[&str]) = ("aws:RequestTag/amictl:prefix", &["amictl-pr-7-"]);
    // (action, the new resource) of each create whose parent is a VPC.
    let creates = [
        ("ec2:CreateSubnet", format!("{ARN}:subnet/subnet-0new")),
        (
            "ec2:CreateRouteTable",
            format!("{ARN}:route-table/rtb-0new"),
        ),
        (
            "ec2:CreateSecurityGroup",
            format!("{ARN}:security-group/sg-0new"),
        ),
    ];
    for (action, new) in &creates {
        let into = |parent: &Network| {
            let mut on_parent: Vec<(&str, &[&str])> = parent.tag.to_vec();
            on_parent.push(request_tag);
            vec![
                req(action, new, &[request_tag]),
                req(action, &parent.vpc, &on_parent),
            ]
        };
        let allowed = |requests: Vec<Request>| requests.iter().all(|r| allows(&preview, r));
        assert!(allowed(into(&own)), "{action} into the preview's own VPC");
        assert!(!allowed(into(&main)), "{action} into main's VPC");
    }
    // The gateway goes only onto the preview's own VPC, and only its own gateway.
    let attach = |gateway: &Network, vpc: &Network| {
        [
            req("ec2:AttachInternetGateway", &gateway.gateway, gateway.tag),
            req("ec2:AttachInternetGateway", &vpc.vpc, vpc.tag),
        ]
        .iter()
        .all(|r| allows(&preview, r))
    };
    assert!(attach(&own, &own));
    assert!(!attach(&own, &main) && !attach(&main, &own));
    // Its route table takes only its own subnets, and its subnets only its own table.
    let associate = |table: &Network, subnet: &Network| {
        [
            req("ec2:AssociateRouteTable", &table.route_table, table.tag),
            req("ec2:AssociateRouteTable", &subnet.subnet, subnet.tag),
        ]
        .iter()
        .all(|r| allows(&preview, r))
    };
    assert!(associate(&own, &own));
    assert!(!associate(&own, &main) && !associate(&main, &own));
}

/// No prefix can claim a network resource by tagging it: not main's (its tag would be
/// overwritten), not an untagged one (the account's default VPC, or a stack deployed before
/// the template tagged its network). Only a create call's own tagging tags what has no tag.
#[test]
fn no_prefix_can_claim_a_network_resource() {
    let main = network("amictl-main-", "main");
    let claim = |resource: &str, resource_tag: Option<&'static [&'static str]>, create: bool| {
        let mut context: Vec<(&str, &[&str])> = vec![
            ("aws:RequestTag/amictl:prefix", &["amictl-pr-7-"]),
            ("aws:TagKeys", &["amictl:prefix"]),
        ];
        if let Some(t) = resource_tag {
            context.push(("aws:ResourceTag/amictl:prefix", t));
        }
        if create {
            // A plain CreateTags carries no ec2:CreateAction; only a create call's tagging does.
            context.push(("ec2:CreateAction", &["CreateSecurityGroup"]));
        }
        req("ec2:CreateTags", resource, &context)
    };
    let preview = policy_for("amictl-pr-");
    for resource in [
        &main.vpc,
        &main.subnet,
        &main.route_table,
        &main.gateway,
        &main.security_group,
    ] {
        assert!(
            !allows(&preview, &claim(resource, Some(&["amictl-main-"]), false)),
            "{resource}"
        );
        for prefix in ["amictl-pr-", "amictl-main", "amictl-"] {
            assert!(
                !allows(&policy_for(prefix), &claim(resource, None, false)),
                "{prefix} claims the untagged {resource}"
            );
        }
    }
    // Only a create call's own tagging carries ec2:CreateAction: that, on the new group, is
    // allowed.
    let new_group = format!("{ARN}:security-group/sg-0new");
    assert!(allows(&preview, &claim(&new_group, None, true)));
    // Handing its own resource to main is refused too.
    let own = network("amictl-pr-7-", "pr7");
    let give = req(
        "ec2:CreateTags",
        &own.vpc,
        &[
            ("aws:ResourceTag/amictl:prefix", &["amictl-pr-7-"]),
            ("aws:RequestTag/amictl:prefix", &["amictl-main-"]),
            ("aws:TagKeys", &["amictl:prefix"]),
        ],
    );
    assert!(!allows(&preview, &give));
}

/// The preview policy is not narrower than what a preview does: its own stack's network
/// through CloudFormation's create, update and delete, and its publish's snapshot.
#[test]
fn a_preview_can_deploy_and_delete_its_own_stack_and_publish() {
    let preview = policy_for("amictl-pr-");
    let own = network("amictl-pr-7-", "pr7");
    let t = own.tag;
    let new_tags: &[(&str, &[&str])] = &[
        ("aws:RequestTag/amictl:prefix", &["amictl-pr-7-"]),
        ("aws:RequestTag/Name", &["amictl-pr-7-vpc"]),
        ("aws:TagKeys", &["Name", "amictl:prefix"]),
    ];
    let tag_on_create = |action: &'static str| -> Vec<(&'static str, &'static [&'static str])> {
        let mut c = new_tags.to_vec();
        c.push((
            "ec2:CreateAction",
            match action {
                "ec2:CreateVpc" => &["CreateVpc"],
                "ec2:CreateSubnet" => &["CreateSubnet"],
                "ec2:CreateRouteTable" => &["CreateRouteTable"],
                "ec2:CreateInternetGateway" => &["CreateInternetGateway"],
                "ec2:CreateSecurityGroup" => &["CreateSecurityGroup"],
                other => panic!("{other}"),
            },
        ));
        c
    };
    let mut on_parent: Vec<(&str, &[&str])> = t.to_vec();
    on_parent.extend_from_slice(new_tags);
    let rule = format!("{ARN}:security-group-rule/sgr-0pr7");
    let mut requests = Vec::new();
    for (action, new, parent) in [
        ("ec2:CreateVpc", &own.vpc, None),
        ("ec2:CreateInternetGateway", &own.gateway, None),
        ("ec2:CreateSubnet", &own.subnet, Some(&own.vpc)),
        ("ec2:CreateRouteTable", &own.route_table, Some(&own.vpc)),
        (
            "ec2:CreateSecurityGroup",
            &own.security_group,
            Some(&own.vpc),
        ),
    ] {
        requests.push(req(action, new, new_tags));
        requests.push(req("ec2:CreateTags", new, &tag_on_create(action)));
        if let Some(vpc) = parent {
            requests.push(req(action, vpc, &on_parent));
        }
    }
    for (action, resource) in [
        ("ec2:ModifyVpcAttribute", &own.vpc),
        ("ec2:DescribeVpcAttribute", &own.vpc),
        ("ec2:AttachInternetGateway", &own.gateway),
        ("ec2:AttachInternetGateway", &own.vpc),
        ("ec2:ModifySubnetAttribute", &own.subnet),
        ("ec2:CreateRoute", &own.route_table),
        ("ec2:ReplaceRoute", &own.route_table),
        ("ec2:AssociateRouteTable", &own.route_table),
        ("ec2:AssociateRouteTable", &own.subnet),
        ("ec2:AuthorizeSecurityGroupIngress", &own.security_group),
        ("ec2:AuthorizeSecurityGroupIngress", &rule),
        ("ec2:AuthorizeSecurityGroupEgress", &own.security_group),
        ("ec2:AuthorizeSecurityGroupEgress", &rule),
        ("ec2:RevokeSecurityGroupEgress", &own.security_group),
        ("ec2:DisassociateRouteTable", &own.route_table),
        ("ec2:DisassociateRouteTable", &own.subnet),
        ("ec2:DeleteRoute", &own.route_table),
        ("ec2:DeleteRouteTable", &own.route_table),
        ("ec2:DetachInternetGateway", &own.gateway),
        ("ec2:DetachInternetGateway", &own.vpc),
        ("ec2:DeleteInternetGateway", &own.gateway),
        ("ec2:DeleteSecurityGroup", &own.security_group),
        ("ec2:DeleteSubnet", &own.subnet),
        ("ec2:DeleteVpc", &own.vpc),
    ] {
        let context = if resource == &rule { &[][..] } else { t };
        requests.push(req(action, resource, context));
    }
    // A stack update that changes a Name tag.
    requests.push(req(
        "ec2:CreateTags",
        &own.security_group,
        &[
            ("aws:ResourceTag/amictl:prefix", &["amictl-pr-7-"]),
            ("aws:RequestTag/Name", &["amictl-pr-7-lb"]),
            ("aws:TagKeys", &["Name"]),
        ],
    ));
    // The upload's snapshot: StartSnapshot with its tags, the ec2:CreateTags the Service
    // Authorization Reference lists as its dependent action, then its blocks.
    let snapshot = "arn:aws:ec2:us-east-1::snapshot/snap-0pr7";
    let snapshot_tags: &[(&str, &[&str])] = &[
        ("aws:RequestTag/amictl:prefix", &["amictl-pr-7-"]),
        (
            "aws:TagKeys",
            &[
                "Name",
                "amictl:image-digest",
                "amictl:managed-by",
                "amictl:prefix",
                "amictl:label",
            ],
        ),
    ];
    requests.push(req("ebs:StartSnapshot", snapshot, snapshot_tags));
    requests.push(req("ec2:CreateTags", snapshot, snapshot_tags));
    let mut with_create_action = snapshot_tags.to_vec();
    with_create_action.push(("ec2:CreateAction", &["StartSnapshot"]));
    requests.push(req("ec2:CreateTags", snapshot, &with_create_action));
    for action in ["ebs:PutSnapshotBlock", "ebs:CompleteSnapshot"] {
        requests.push(req(
            action,
            snapshot,
            &[("aws:ResourceTag/amictl:prefix", &["amictl-pr-7-"])],
        ));
    }
    let denied: Vec<String> = requests
        .iter()
        .filter(|r| !allows(&preview, r))
        .map(|r| format!("{} on {} {:?}", r.action, r.resource, r.context))
        .collect();
    assert!(denied.is_empty(), "denied:\n{}", denied.join("\n"));
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

#[test]
fn a_fleet_without_a_stack_launches_into_a_network_amictl_did_not_tag() {
    let preview = policy_for("amictl-pr-");
    for resource in [
        format!("{ARN}:subnet/subnet-0mine"),
        format!("{ARN}:security-group/sg-0mine"),
    ] {
        let untagged = req("ec2:RunInstances", &resource, &[]);
        assert!(allows(&preview, &untagged), "{resource}");
        let own = req(
            "ec2:RunInstances",
            &resource,
            &[("aws:ResourceTag/amictl:prefix", &["amictl-pr-7-"])],
        );
        assert!(allows(&preview, &own), "{resource}");
    }
}
