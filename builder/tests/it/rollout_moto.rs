//! `amictl rollout` end to end against moto, through the real SDK clients: create a
//! 2 AZ x 2 fleet behind a target group, one Auto Scaling group per AZ, repeat (a no-op),
//! roll it to a new AMI (new groups, the old ones deleted), lose an instance (its group
//! replaces it), roll back on an alarm (the same groups and instances back), destroy; and
//! refuse a missing AMI before launching anything. (moto's Run Command always succeeds and
//! its targets are healthy at once: gate failures are covered by `rollout_sim.rs` and
//! `rollout_groups_sim.rs`. moto replaces a terminated group instance even with Launch
//! suspended and does not register the replacement in the target group, where EC2 Auto
//! Scaling does neither and both; the simulated cloud models AWS there.)

use crate::common;

use common::moto::{fleet_instances, vpc_with_two_azs, Moto};

struct Setup {
    subnets: String,
    sg: String,
    amis: [String; 2],
    tg: String,
}

async fn setup(moto: &Moto) -> Setup {
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config);
    let (vpc, subnets) = vpc_with_two_azs(&ec2, 9).await;
    let subnets: Vec<String> = subnets.into_iter().map(|(_, subnet)| subnet).collect();
    let sg = ec2
        .create_security_group()
        .group_name("web")
        .description("web")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .group_id
        .unwrap();
    let mut amis = Vec::new();
    for name in ["web-v1", "web-v2"] {
        amis.push(
            ec2.register_image()
                .name(name)
                .root_device_name("/dev/xvda")
                .send()
                .await
                .unwrap()
                .image_id
                .unwrap(),
        );
    }
    let lb = elb
        .create_load_balancer()
        .name("web-lb")
        .set_subnets(Some(subnets.clone()))
        .security_groups(&sg)
        .send()
        .await
        .unwrap();
    let lb_arn = lb.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_owned();
    let tg = elb
        .create_target_group()
        .name("web-tg")
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
        .port(80)
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap();
    let tg = tg.target_groups()[0].target_group_arn().unwrap().to_owned();
    elb.create_listener()
        .load_balancer_arn(lb_arn)
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
        .port(80)
        .default_actions(
            aws_sdk_elasticloadbalancingv2::types::Action::builder()
                .r#type(aws_sdk_elasticloadbalancingv2::types::ActionTypeEnum::Forward)
                .target_group_arn(&tg)
                .build(),
        )
        .send()
        .await
        .unwrap();
    Setup {
        subnets: subnets.join(","),
        sg,
        amis: [amis[0].clone(), amis[1].clone()],
        tg,
    }
}

fn rollout(moto: &Moto, state: &std::path::Path, s: &Setup, ami: &str) -> (i32, String, String) {
    rollout_with(
        moto,
        state,
        s,
        ami,
        &["--timeout", "120", "--health-passes", "1"],
    )
}

fn rollout_with(
    moto: &Moto,
    state: &std::path::Path,
    s: &Setup,
    ami: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let out = moto
        .amictl()
        .env("XDG_STATE_HOME", state)
        .args(["rollout", "--fleet", "web", "--per-az", "2"])
        .args([
            "--ami",
            ami,
            "--subnets",
            &s.subnets,
            "--security-groups",
            &s.sg,
            "--target-group",
            &s.tg,
        ])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn fleet(moto: &Moto) -> Vec<(String, String, String)> {
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let mut v: Vec<_> = fleet_instances(&ec2, "web", &["pending", "running"])
        .await
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.placement()
                    .and_then(|p| p.availability_zone())
                    .unwrap_or_default()
                    .to_owned(),
                i.image_id().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The fleet's Auto Scaling groups: (name, AZ, target groups, desired, suspended
/// processes, instance ids), by name.
async fn groups(moto: &Moto) -> Vec<(String, String, Vec<String>, i32, usize, Vec<String>)> {
    let asg = aws_sdk_autoscaling::Client::new(&moto.sdk_config().await);
    let out = asg.describe_auto_scaling_groups().send().await.unwrap();
    let mut v: Vec<_> = out
        .auto_scaling_groups()
        .iter()
        .filter(|g| {
            g.tags()
                .iter()
                .any(|t| t.key() == Some("amictl:fleet") && t.value() == Some("web"))
        })
        .map(|g| {
            let mut ids: Vec<String> = g
                .instances()
                .iter()
                .filter_map(|i| i.instance_id().map(str::to_owned))
                .collect();
            ids.sort();
            (
                g.auto_scaling_group_name().unwrap().to_owned(),
                g.availability_zones()[0].clone(),
                g.target_group_arns().to_vec(),
                g.desired_capacity().unwrap(),
                g.suspended_processes().len(),
                ids,
            )
        })
        .collect();
    v.sort();
    v
}

fn registered_now(fleet: &[(String, String, String)], id: &str) -> bool {
    fleet.iter().any(|(i, _, _)| i == id)
}

async fn launch_templates(moto: &Moto) -> Vec<String> {
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let out = ec2.describe_launch_templates().send().await.unwrap();
    let mut v: Vec<String> = out
        .launch_templates()
        .iter()
        .filter_map(|t| t.launch_template_name().map(str::to_owned))
        .collect();
    v.sort();
    v
}

async fn registered(moto: &Moto, tg: &str) -> Vec<String> {
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&moto.sdk_config().await);
    let out = elb
        .describe_target_health()
        .target_group_arn(tg)
        .send()
        .await
        .unwrap();
    let mut ids: Vec<String> = out
        .target_health_descriptions()
        .iter()
        .filter(|d| {
            d.target_health()
                .and_then(|h| h.state())
                .is_some_and(|s| s.as_str() != "unused" && s.as_str() != "draining")
        })
        .filter_map(|d| d.target().and_then(|t| t.id()).map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_repeats_and_rolls_a_fleet_behind_a_target_group() {
    let Some(moto) = Moto::start() else { return };
    let s = setup(&moto).await;
    let state = tempfile::tempdir().unwrap();

    // A missing AMI is refused before anything is launched.
    let (code, _, err) = rollout(&moto, state.path(), &s, "ami-0000000000000000f");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(fleet(&moto).await.is_empty());

    // A sparse AMI (published with --omit-zero-blocks) is refused too: every instance gets
    // an encrypted root volume, where its missing blocks would read as random bytes.
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let sparse = aws_sdk_ec2::types::Tag::builder()
        .key("amictl:sparse")
        .value("true")
        .build();
    ec2.create_tags()
        .resources(&s.amis[1])
        .tags(sparse.clone())
        .send()
        .await
        .unwrap();
    let (code, _, err) = rollout(&moto, state.path(), &s, &s.amis[1]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&s.amis[1]) && err.contains("without --omit-zero-blocks"),
        "{err}"
    );
    assert!(fleet(&moto).await.is_empty());
    ec2.delete_tags()
        .resources(&s.amis[1])
        .tags(sparse)
        .send()
        .await
        .unwrap();

    let (code, out, err) = rollout(&moto, state.path(), &s, &s.amis[0]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("http://web-lb"),
        "{out}"
    );
    let v1 = fleet(&moto).await;
    assert_eq!(v1.len(), 4);
    assert_eq!(v1.iter().filter(|(_, az, _)| az == "us-east-1a").count(), 2);
    assert!(v1.iter().all(|(_, _, ami)| ami == &s.amis[0]));
    assert_eq!(
        registered(&moto, &s.tg).await,
        v1.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>()
    );

    // The same again: nothing launched, nothing retired.
    let (code, _, err) = rollout(&moto, state.path(), &s, &s.amis[0]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    assert_eq!(fleet(&moto).await, v1);

    // To v2: four new instances, the old four terminated and out of the target group.
    let (code, _, err) = rollout(&moto, state.path(), &s, &s.amis[1]);
    assert_eq!(code, 0, "{err}");
    let v2 = fleet(&moto).await;
    assert_eq!(v2.len(), 4, "{v2:?}");
    assert!(v2.iter().all(|(_, _, ami)| ami == &s.amis[1]), "{v2:?}");
    assert!(v2
        .iter()
        .all(|(id, _, _)| !v1.iter().any(|(old, _, _)| old == id)));
    assert_eq!(
        registered(&moto, &s.tg).await,
        v2.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>()
    );
    // One group per AZ and release, attached, holding the release's instances; nothing
    // of v1's groups is left, launch templates included.
    let g2 = groups(&moto).await;
    assert_eq!(g2.len(), 2, "{g2:?}");
    for (name, az, tgs, desired, suspended, ids) in &g2 {
        assert!(name.starts_with(&format!("amictl-web-{az}-r-")), "{name}");
        assert_eq!(tgs, &vec![s.tg.clone()], "{name}");
        assert_eq!((*desired, *suspended, ids.len()), (2, 0, 2), "{name}");
        assert!(ids
            .iter()
            .all(|id| v2.iter().any(|(i, a, _)| i == id && a == az)));
    }
    let names: Vec<String> = g2.iter().map(|g| g.0.clone()).collect();
    assert_eq!(launch_templates(&moto).await, names);

    // An instance lost between rollouts is replaced by its group, in its AZ, with no
    // amictl running.
    let lost = &v2[0];
    ec2.terminate_instances()
        .instance_ids(&lost.0)
        .send()
        .await
        .unwrap();
    let healed = fleet(&moto).await;
    assert_eq!(healed.len(), 4, "{healed:?}");
    assert!(!healed.iter().any(|(id, _, _)| id == &lost.0));
    assert_eq!(
        healed.iter().filter(|(_, az, _)| az == &lost.1).count(),
        2,
        "{healed:?}"
    );

    // EC2 Auto Scaling registers a replacement in the group's target groups; moto does not.
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&moto.sdk_config().await);
    for (_, _, _, _, _, ids) in groups(&moto).await {
        for id in ids.iter().filter(|id| !registered_now(&v2, id)) {
            elb.register_targets()
                .target_group_arn(&s.tg)
                .targets(
                    aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
                        .id(id)
                        .build(),
                )
                .send()
                .await
                .unwrap();
        }
    }

    // A rollout whose gate cannot pass in time rolls back to the very same groups and
    // instances. (moto's Run Command passes every command, and moto cannot serve the
    // alarms aws-sdk-cloudwatch reads: a gate of 1000 passes in 3 s fails at its deadline.)
    let before = groups(&moto).await;
    let (code, _, err) = rollout_with(
        &moto,
        state.path(),
        &s,
        &s.amis[0],
        &["--health-passes", "1000", "--timeout", "3"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("rolled back") && err.contains("health gate failed"),
        "{err}"
    );
    assert_eq!(
        groups(&moto).await,
        before,
        "the same groups, attached and released"
    );
    assert_eq!(fleet(&moto).await, healed);
    assert_eq!(launch_templates(&moto).await, names);

    // Scaling: new groups start at the old ones' size, within new bounds, with a target
    // tracking policy on the load balancer's requests per target.
    let (code, _, err) = rollout_with(
        &moto,
        state.path(),
        &s,
        &s.amis[1],
        &[
            "--timeout",
            "120",
            "--health-passes",
            "1",
            "--min-per-az",
            "1",
            "--max-per-az",
            "3",
            "--target-requests-per-instance",
            "500",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let asg = aws_sdk_autoscaling::Client::new(&moto.sdk_config().await);
    let described = asg.describe_auto_scaling_groups().send().await.unwrap();
    let scaled: Vec<_> = described
        .auto_scaling_groups()
        .iter()
        .map(|g| (g.min_size(), g.max_size(), g.desired_capacity()))
        .collect();
    assert_eq!(scaled, vec![(Some(1), Some(3), Some(2)); 2], "{err}");
    let policies = asg.describe_policies().send().await.unwrap();
    let tracking: Vec<_> = policies
        .scaling_policies()
        .iter()
        .filter_map(|p| p.target_tracking_configuration())
        .map(|t| {
            (
                t.target_value(),
                t.predefined_metric_specification()
                    .and_then(|m| m.resource_label())
                    .is_some_and(|l| {
                        l.starts_with("app/web-lb/") && l.contains("/targetgroup/web-tg/")
                    }),
            )
        })
        .collect();
    // One per group on AWS; moto keys policies by name alone, so it keeps the last one put.
    assert_eq!(tracking, vec![(Some(500.0), true)], "{policies:?}");

    // A group edited by hand into a shape amictl did not make is refused by name, before
    // anything changes.
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&moto.sdk_config().await);
    let vpc = ec2
        .describe_subnets()
        .subnet_ids(s.subnets.split(',').next().unwrap())
        .send()
        .await
        .unwrap()
        .subnets()[0]
        .vpc_id()
        .unwrap()
        .to_owned();
    let other = elb
        .create_target_group()
        .name("other-tg")
        .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
        .port(8080)
        .vpc_id(vpc)
        .send()
        .await
        .unwrap()
        .target_groups()[0]
        .target_group_arn()
        .unwrap()
        .to_owned();
    let edited = groups(&moto).await[0].0.clone();
    asg.attach_load_balancer_target_groups()
        .auto_scaling_group_name(&edited)
        .target_group_arns(&other)
        .send()
        .await
        .unwrap();
    let before = groups(&moto).await;
    let (code, _, err) = rollout(&moto, state.path(), &s, &s.amis[0]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&edited) && err.contains(&other) && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(groups(&moto).await, before);

    // Destroy deletes the groups first (else they would replace what it terminates).
    let out = moto
        .amictl()
        .env("XDG_STATE_HOME", state.path())
        .args(["destroy", "--fleet", "web", "--yes"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("2 Auto Scaling groups deleted"), "{err}");
    assert!(launch_templates(&moto).await.is_empty());
    assert!(groups(&moto).await.is_empty());
    assert!(fleet(&moto).await.is_empty());
}

#[test]
fn a_request_target_without_a_target_group_is_refused_before_anything() {
    // No AWS at all: the refusal comes before the first request.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_amictl"))
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .args([
            "rollout",
            "--fleet",
            "web",
            "--ami",
            "ami-1",
            "--subnets",
            "subnet-a,subnet-b",
            "--security-groups",
            "sg-1",
            "--max-per-az",
            "3",
            "--target-requests-per-instance",
            "500",
            "--config",
            "/nonexistent/amictl.toml",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs a target group"), "{err}");
}
