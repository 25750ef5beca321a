//! `amictl rollout` end to end against moto, through the real SDK clients: create a
//! 2 AZ x 2 fleet behind a target group, repeat (a no-op), roll it to a new AMI, and refuse
//! a missing AMI before launching anything. (moto's Run Command always succeeds and its
//! targets are healthy at once: the failure paths are covered by `rollout_sim.rs`.)

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
    let out = moto
        .amictl()
        .env("XDG_STATE_HOME", state)
        .args([
            "rollout",
            "--fleet",
            "web",
            "--per-az",
            "2",
            "--health-passes",
            "1",
            "--timeout",
            "120",
        ])
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
}
