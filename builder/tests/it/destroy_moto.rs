//! `amictl destroy` against moto, through the real binary: it refuses without `--yes` when
//! stdin is not a terminal, terminates only the named fleet's instances, removes the fleet's
//! rollout journal entry, and a second destroy finds nothing to do.

use crate::common;

use std::path::Path;
use std::process::{Output, Stdio};

use amictl::rollout::journal::{Entry, Journal, State};
use aws_sdk_ec2::types::{InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification};
use common::moto::{ec2_filter, instances, vpc_with_two_azs, Moto};

async fn image(ec2: &aws_sdk_ec2::Client) -> String {
    ec2.register_image()
        .name("amictl-test-destroy")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap()
}

/// One instance of `fleet` in `subnet`, tagged as amictl tags them.
async fn launch(ec2: &aws_sdk_ec2::Client, image: &str, subnet: &str, fleet: &str) -> String {
    ec2.run_instances()
        .image_id(image)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(subnet)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("amictl:fleet").value(fleet).build())
                .build(),
        )
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned()
}

/// Each instance's state; an instance EC2 no longer knows is absent.
async fn states(ec2: &aws_sdk_ec2::Client, ids: &[String]) -> Vec<(String, InstanceStateName)> {
    instances(ec2, vec![ec2_filter("instance-id", ids.iter().cloned())])
        .await
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_owned(),
                i.state().unwrap().name().unwrap().clone(),
            )
        })
        .collect()
}

fn destroy(moto: &Moto, state: &Path, extra: &[&str]) -> (i32, String) {
    let Output { status, stderr, .. } = moto
        .amictl()
        .env("XDG_STATE_HOME", state)
        .args(["destroy", "--fleet", "web"])
        .args(extra)
        // Not a terminal: there is no one to ask.
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    (status.code().expect("amictl exited"), stderr)
}

fn entry(fleet: &str) -> Entry {
    Entry {
        rollout: "r-1-0001".into(),
        fleet: fleet.into(),
        image: "ami-12345678".into(),
        started_unix: 1,
        state: State::Done,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_terminates_only_the_fleet_after_consent() {
    let Some(moto) = Moto::start() else { return };
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let (_, subnets) = vpc_with_two_azs(&ec2, 43).await;
    let subnets: Vec<String> = subnets.into_iter().map(|(_, subnet)| subnet).collect();
    let image = image(&ec2).await;
    let mut web = Vec::new();
    for subnet in [&subnets[0], &subnets[1], &subnets[0]] {
        web.push(launch(&ec2, &image, subnet, "web").await);
    }
    let other = launch(&ec2, &image, &subnets[1], "other").await;

    // The rollout journal, where amictl keeps it under XDG_STATE_HOME.
    let state = tempfile::tempdir().unwrap();
    let journal = Journal::at(state.path().join("amictl/rollouts"));
    journal.save(&entry("web")).unwrap();
    journal.save(&entry("other")).unwrap();

    // No --yes and no terminal: refused, nothing changed.
    let (code, stderr) = destroy(&moto, state.path(), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    for id in &web {
        assert!(
            stderr.contains(id.as_str()),
            "the listing names {id}: {stderr}"
        );
    }
    assert!(!stderr.contains(other.as_str()), "{stderr}");
    let all: Vec<String> = web.iter().chain([&other]).cloned().collect();
    for (id, s) in states(&ec2, &all).await {
        assert_eq!(s, InstanceStateName::Running, "{id}");
    }
    assert!(journal.load("web").is_some());

    // With --yes: web's instances are terminated, other's is not.
    let (code, stderr) = destroy(&moto, state.path(), &["--yes"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("fleet web destroyed: 3 instances terminated"),
        "{stderr}"
    );
    let after = states(&ec2, &all).await;
    for id in &web {
        let s = after.iter().find(|(i, _)| i == id).map(|(_, s)| s);
        assert!(
            matches!(
                s,
                None | Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            ),
            "{id}: {s:?}"
        );
    }
    let s = after.iter().find(|(i, _)| *i == other).map(|(_, s)| s);
    assert_eq!(s, Some(&InstanceStateName::Running));
    assert_eq!(journal.load("web"), None, "web's journal entry is removed");
    assert_eq!(journal.load("other"), Some(entry("other")));

    // Again: nothing to do, still a success (even without --yes).
    let (code, stderr) = destroy(&moto, state.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("no instances"), "{stderr}");
    let s = states(&ec2, std::slice::from_ref(&other)).await;
    assert_eq!(s, vec![(other.clone(), InstanceStateName::Running)]);
}
