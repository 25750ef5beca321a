//! `amictl stack` end to end against moto, through the real SDK clients: deploy the
//! template, deploy it again (a no-op), read the outputs, roll a fleet out into the stack
//! with `rollout --stack`, refuse to delete the stack while the fleet runs in it, then
//! delete it, twice. And: names and prefixes are refused before any request is made.
//!
//! Where moto 5.x falls short (each place is marked "moto:" below):
//! - it has no CloudFormation support for AWS::CloudWatch::Alarm and AWS::S3::BucketPolicy:
//!   it skips them, and a `Ref` to them reads "None" (so the Alarms output is "None,None");
//! - a stack made or changed through a change set gets no outputs (ExecuteChangeSet never
//!   rebuilds them; CreateStack and UpdateStack do);
//! - deleting the stack's route table, route and subnet associations is a no-op, so the
//!   VPC's deletion fails with DependencyViolation;
//! - its CloudWatch does not speak rpc-v2-cbor, aws-sdk-cloudwatch's protocol, so the
//!   rollout here watches no alarms.

use crate::common;

use std::path::Path;

use common::moto::{
    fleet_instances, moto_rebuild_outputs, moto_rebuild_outputs_with, output, stack_outputs, Moto,
};

const STACK: &str = "amictl-test";
/// Short polls: moto finishes every operation at once.
const POLL_MS: &str = "20";

fn run(moto: &Moto, state: &Path, args: &[&str]) -> (i32, String, String) {
    output(
        moto.amictl()
            .env("AMICTL_POLL_MS", POLL_MS)
            .env("XDG_STATE_HOME", state)
            .args(args),
    )
}

fn last_line(s: &str) -> &str {
    s.trim_end().lines().last().unwrap_or_default()
}

/// The fleet's live instances: (id, subnet, security groups, instance profile ARN).
async fn fleet(ec2: &aws_sdk_ec2::Client) -> Vec<(String, String, Vec<String>, String)> {
    let mut v: Vec<_> = fleet_instances(ec2, "web", &["pending", "running"])
        .await
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.subnet_id().unwrap_or_default().to_owned(),
                i.security_groups()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_owned))
                    .collect(),
                i.iam_instance_profile()
                    .and_then(|p| p.arn())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// One of the fleet's launch templates (one per Auto Scaling group).
async fn launch_template_of(ec2: &aws_sdk_ec2::Client) -> String {
    let out = ec2.describe_launch_templates().send().await.unwrap();
    out.launch_templates()
        .iter()
        .filter_map(|t| t.launch_template_name())
        .find(|n| n.contains("-web-"))
        .expect("a launch template of fleet web")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploys_rolls_out_into_and_deletes_a_stack() {
    let Some(moto) = Moto::start() else { return };
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let config = moto.sdk_config().await;
    let cf = aws_sdk_cloudformation::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);

    let (code, template, _) = run(&moto, st, &["stack", "template"]);
    assert_eq!(code, 0);
    assert_eq!(
        template,
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/stack/stack.yaml")).unwrap()
    );

    let (code, _, err) = run(
        &moto,
        st,
        &["stack", "deploy", "--name", STACK, "--prefix", "t1-"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("stack {STACK} created")), "{err}");
    assert!(
        err.contains("CREATE_COMPLETE"),
        "the events are printed: {err}"
    );
    let described = cf.describe_stacks().stack_name(STACK).send().await.unwrap();
    let s = &described.stacks()[0];
    assert_eq!(s.stack_status().unwrap().as_str(), "CREATE_COMPLETE");
    assert!(s
        .tags()
        .iter()
        .any(|t| t.key() == Some("amictl:managed-by")));

    if stack_outputs(&cf, STACK).await.is_empty() {
        // moto: no outputs yet (see moto_rebuild_outputs).
        moto_rebuild_outputs(&cf, STACK, &template).await;
    }
    let raw = stack_outputs(&cf, STACK).await;

    // The same again: nothing to change.
    let (code, out, err) = run(&moto, st, &["stack", "deploy", "--name", STACK]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("stack {STACK} is up to date")),
        "{err}"
    );
    assert_eq!(last_line(&out), raw["Url"], "{out}");

    // The outputs, complete and typed.
    let (code, out, err) = run(&moto, st, &["stack", "outputs", "--name", STACK, "--json"]);
    assert_eq!(code, 0, "{err}");
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(o["vpc"].as_str().unwrap().starts_with("vpc-"), "{o}");
    let subnets: Vec<&str> = o["subnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(subnets.len(), 2, "{o}");
    assert!(
        o["instance_security_group"]
            .as_str()
            .unwrap()
            .starts_with("sg-"),
        "{o}"
    );
    assert_eq!(o["instance_profile"], "t1-instance", "{o}");
    assert!(
        o["target_group"]
            .as_str()
            .unwrap()
            .contains(":targetgroup/t1-tg/"),
        "{o}"
    );
    // moto: two alarm names, each "None" (moto has no AWS::CloudWatch::Alarm).
    assert_eq!(o["alarms"].as_array().unwrap().len(), 2, "{o}");
    assert!(
        o["url"].as_str().unwrap().starts_with("http://t1-alb"),
        "{o}"
    );
    assert_eq!(
        o["import_bucket"], "t1-import-123456789012-us-east-1",
        "{o}"
    );
    let (code, out, _) = run(&moto, st, &["stack", "outputs", "--name", STACK]);
    assert_eq!(code, 0);
    assert_eq!(last_line(&out), o["url"], "{out}");

    // The two subnets are in two availability zones of one VPC.
    let described = ec2
        .describe_subnets()
        .set_subnet_ids(Some(subnets.iter().map(|s| s.to_string()).collect()))
        .send()
        .await
        .unwrap();
    let azs: std::collections::BTreeSet<&str> = described
        .subnets()
        .iter()
        .filter_map(|s| s.availability_zone())
        .collect();
    assert_eq!(azs.len(), 2, "{described:?}");

    // The network carries the prefix's tag, which the IAM policy's network grants test.
    // (moto: it drops the tags of AWS::EC2::RouteTable and AWS::EC2::InternetGateway; the
    // template's are checked in iam.rs.)
    let prefix_tag = |tags: &[aws_sdk_ec2::types::Tag]| {
        tags.iter()
            .find(|t| t.key() == Some(amictl::image::register::TAG_PREFIX))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    for s in described.subnets() {
        assert_eq!(prefix_tag(s.tags()).as_deref(), Some("t1-"), "{s:?}");
    }
    let vpcs = ec2
        .describe_vpcs()
        .vpc_ids(o["vpc"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        prefix_tag(vpcs.vpcs()[0].tags()).as_deref(),
        Some("t1-"),
        "{vpcs:?}"
    );
    let groups = ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(o["vpc"].as_str().unwrap())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut tagged: Vec<&str> = groups
        .security_groups()
        .iter()
        .filter(|g| prefix_tag(g.tags()).as_deref() == Some("t1-"))
        .filter_map(|g| g.group_name())
        .collect();
    tagged.sort_unstable();
    assert_eq!(tagged, ["t1-instance", "t1-lb"], "{groups:?}");

    // A fleet into the stack, from its outputs alone.
    let ami = ec2
        .register_image()
        .name("web-v1")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    // moto: its CloudWatch answers in XML, and aws-sdk-cloudwatch speaks rpc-v2-cbor, so
    // no alarm can be read from moto. amictl.toml's table wins over the stack's outputs:
    // `alarms = []` there keeps the rollout from reading them.
    let toml = state.path().join("amictl.toml");
    std::fs::write(&toml, "[fleets.web]\nalarms = []\n").unwrap();
    let (code, out, err) = run(
        &moto,
        st,
        &[
            "rollout",
            "--fleet",
            "web",
            "--stack",
            STACK,
            "--ami",
            &ami,
            "--per-az",
            "1",
            "--health-passes",
            "1",
            "--timeout",
            "120",
            "--config",
            toml.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        last_line(&out),
        o["url"],
        "the URL last is the ALB's: {out}"
    );
    let instances = fleet(&ec2).await;
    assert_eq!(instances.len(), 2, "{instances:?}");
    let sg = o["instance_security_group"].as_str().unwrap().to_owned();
    for (_, subnet, groups, _) in &instances {
        assert!(subnets.contains(&subnet.as_str()), "{instances:?}");
        assert_eq!(groups, &vec![sg.clone()], "{instances:?}");
    }
    // The instance profile is the launch templates' (moto does not carry a template's
    // profile on to the instances launched from it; EC2 does).
    let templates = ec2
        .describe_launch_template_versions()
        .versions("$Latest")
        .launch_template_name(launch_template_of(&ec2).await)
        .send()
        .await
        .unwrap();
    let profiles: Vec<&str> = templates
        .launch_template_versions()
        .iter()
        .filter_map(|v| v.launch_template_data())
        .filter_map(|d| d.iam_instance_profile())
        .filter_map(|p| p.name().or(p.arn()))
        .collect();
    assert!(
        !profiles.is_empty() && profiles.iter().all(|p| p.ends_with("t1-instance")),
        "{profiles:?}"
    );
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config);
    let health = elb
        .describe_target_health()
        .target_group_arn(o["target_group"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let mut registered: Vec<&str> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target().and_then(|t| t.id()))
        .collect();
    registered.sort_unstable();
    let ids: Vec<&str> = instances.iter().map(|i| i.0.as_str()).collect();
    assert_eq!(registered, ids);

    // The stack made amictl's SSM documents with amictl's content: `health` with the
    // stack's prefix sends them and writes nothing. (moto: GetDocument must ask for JSON;
    // in the YAML the template stores, it answers an object where a string belongs.)
    let ssm = aws_sdk_ssm::Client::new(&config);
    for d in amictl::ssm::Document::ALL {
        let got = ssm
            .get_document()
            .name(d.name("t1-"))
            .document_format(aws_sdk_ssm::types::DocumentFormat::Json)
            .send()
            .await
            .unwrap();
        assert!(d.is_content(got.content().unwrap()), "{d:?}: {got:?}");
    }
    let (code, _, err) = run(&moto, st, &["health", "--fleet", "web", "--prefix", "t1-"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("created SSM document") && !err.contains("writing a new version"),
        "{err}"
    );

    // The fleet keeps the stack: nothing is deleted, and the error says what to do.
    let (code, _, err) = run(&moto, st, &["stack", "delete", "--name", STACK, "--yes"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("amictl destroy --fleet web"), "{err}");
    assert!(err.contains(ids[0]), "{err}");
    let (code, _, err) = run(&moto, st, &["destroy", "--fleet", "web", "--yes"]);
    assert_eq!(code, 0, "{err}");

    // No --yes and no terminal: refused, nothing changed.
    let (code, _, err) = run(&moto, st, &["stack", "delete", "--name", STACK]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pass --yes"), "{err}");
    assert!(!stack_outputs(&cf, STACK).await.is_empty());

    // moto: CloudFormation's deletion of the route table (and its route and subnet
    // associations) is a no-op in moto, and the VPC's deletion then fails; remove them
    // here, as AWS's CloudFormation does itself.
    let vpc = o["vpc"].as_str().unwrap();
    let tables = ec2
        .describe_route_tables()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("vpc-id")
                .values(vpc)
                .build(),
        )
        .send()
        .await
        .unwrap();
    for table in tables.route_tables() {
        if table.associations().iter().any(|a| a.main() == Some(true)) {
            continue;
        }
        for a in table.associations() {
            ec2.disassociate_route_table()
                .association_id(a.route_table_association_id().unwrap())
                .send()
                .await
                .unwrap();
        }
        ec2.delete_route_table()
            .route_table_id(table.route_table_id().unwrap())
            .send()
            .await
            .unwrap();
    }

    let (code, _, err) = run(&moto, st, &["stack", "delete", "--name", STACK, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("stack {STACK} deleted")), "{err}");
    assert!(
        err.contains("DELETE_COMPLETE"),
        "the events are printed: {err}"
    );
    assert!(cf.describe_stacks().stack_name(STACK).send().await.is_err());
    let vpcs = ec2.describe_vpcs().vpc_ids(vpc).send().await;
    assert!(
        vpcs.as_ref().map(|v| v.vpcs().is_empty()).unwrap_or(true),
        "{vpcs:?}"
    );

    // Again: nothing to delete.
    let (code, _, err) = run(&moto, st, &["stack", "delete", "--name", STACK, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = run(&moto, st, &["stack", "outputs", "--name", STACK]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("amictl stack deploy"), "{err}");
}

/// Asks moto's ACM for a certificate (amictl itself never calls ACM, so the SDK has no
/// client for it here): a JSON 1.1 call, signed in name only.
async fn moto_certificate(moto: &Moto, domain: &str) -> String {
    let response = reqwest::Client::new()
        .post(&moto.endpoint)
        .header("Content-Type", "application/x-amz-json-1.1")
        .header("X-Amz-Target", "CertificateManager.RequestCertificate")
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/acm/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(format!(r#"{{"DomainName":"{domain}"}}"#))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    body["CertificateArn"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_adds_https_and_turns_port_80_into_a_redirect() {
    let Some(moto) = Moto::start() else { return };
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let config = moto.sdk_config().await;
    let cf = aws_sdk_cloudformation::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config);
    let arn = moto_certificate(&moto, "fleet.example.com").await;

    let (code, _, err) = run(
        &moto,
        st,
        &[
            "stack",
            "deploy",
            "--name",
            "amictl-tls",
            "--prefix",
            "tls-",
            "--certificate-arn",
            &arn,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lb = elb
        .describe_load_balancers()
        .names("tls-alb")
        .send()
        .await
        .unwrap();
    let lb = &lb.load_balancers()[0];
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lb.load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    let mut by_port: Vec<_> = listeners
        .listeners()
        .iter()
        .map(|l| (l.port().unwrap(), l))
        .collect();
    by_port.sort_by_key(|(port, _)| *port);
    assert_eq!(by_port.len(), 2, "{listeners:?}");
    let (_, http) = by_port[0];
    let redirect = &http.default_actions()[0];
    assert_eq!(redirect.r#type().unwrap().as_str(), "redirect", "{http:?}");
    let to = redirect.redirect_config().unwrap();
    assert_eq!((to.protocol(), to.port()), (Some("HTTPS"), Some("443")));
    assert_eq!(to.status_code().unwrap().as_str(), "HTTP_301");
    let (port, https) = by_port[1];
    assert_eq!(port, 443);
    assert_eq!(https.protocol().unwrap().as_str(), "HTTPS");
    assert_eq!(
        https.ssl_policy(),
        Some("ELBSecurityPolicy-TLS13-1-2-Res-2021-06")
    );
    assert_eq!(
        https.certificates()[0].certificate_arn(),
        Some(arn.as_str())
    );
    assert_eq!(
        https.default_actions()[0].r#type().unwrap().as_str(),
        "forward"
    );
    // 443 is open on the load balancer's security group, next to 80.
    let groups = ec2
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values("tls-lb")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut ports: Vec<i32> = groups.security_groups()[0]
        .ip_permissions()
        .iter()
        .filter_map(|p| p.from_port())
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [80, 443]);
    // The URL is https.
    if stack_outputs(&cf, "amictl-tls").await.is_empty() {
        let template = include_str!("../../stack/stack.yaml");
        let parameters = [("Prefix", "tls-"), ("CertificateArn", arn.as_str())];
        moto_rebuild_outputs_with(&cf, "amictl-tls", template, &parameters).await;
    }
    assert!(
        stack_outputs(&cf, "amictl-tls").await["Url"].starts_with("https://tls-alb"),
        "{:?}",
        stack_outputs(&cf, "amictl-tls").await
    );
    // The same deploy without the flag keeps HTTPS: nothing to change.
    let (code, _, err) = run(&moto, st, &["stack", "deploy", "--name", "amictl-tls"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("is up to date"), "{err}");
}

/// Bad names and prefixes are refused before any request: the endpoint is a socket that
/// would see any connection.
#[test]
fn bad_names_are_refused_before_any_request() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let state = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "stack",
                "deploy",
                "--name",
                "web",
                "--certificate-arn",
                "arn:aws:acm:eu-west-1:123456789012:certificate/1a2b",
            ],
            "is in eu-west-1, the stack in us-east-1",
        ),
        (
            &[
                "stack",
                "deploy",
                "--name",
                "web",
                "--certificate-arn",
                "my-cert",
            ],
            "is not an ARN",
        ),
        (
            &[
                "up",
                "--name",
                "amictl-web",
                "--ami",
                "ami-1",
                "--certificate-arn",
                "arn:aws:iam::123456789012:server-certificate/web",
            ],
            "not an ACM certificate",
        ),
        (
            &["stack", "deploy", "--name", "1web"],
            "starts with a letter",
        ),
        (
            &["stack", "deploy", "--name", "web_1"],
            "starts with a letter",
        ),
        (
            &["stack", "deploy", "--name", "web", "--prefix", "Web-"],
            "--prefix",
        ),
        (
            &["stack", "delete", "--name", "web.1", "--yes"],
            "starts with a letter",
        ),
        (
            &["stack", "outputs", "--name", "a b"],
            "starts with a letter",
        ),
        (
            &[
                "rollout", "--fleet", "web", "--stack", "web.1", "--ami", "ami-1",
            ],
            "starts with a letter",
        ),
    ];
    for (args, fix) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_amictl"))
            .env("AWS_ENDPOINT_URL", &endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("XDG_STATE_HOME", state.path())
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(fix), "{args:?}: {err}");
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a request reached the endpoint: {other:?}"),
    }
}
