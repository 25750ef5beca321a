//! The fleet's AWS effects against moto, through the real SDK clients: `Ec2Compute`
//! (launch, list, retire, terminate), `SsmRunCommand`, and `amictl health` / `amictl drift`.
//! moto's Run Command runs nothing and answers Success with empty output, so these tests
//! cover the wiring; the failure paths are tested against scripted fakes in the crate.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use amictl::fleet::ec2::{spec_digest, Ec2Compute, Ec2LaunchSettings, TAG_MANAGED_BY};
use amictl::fleet::{
    CloudError, Command, Compute, InstanceState, Invocation, Launch, Placement, RunCommand,
    TAG_FLEET, TAG_IMAGE, TAG_ROLLOUT, TAG_SPEC,
};
use amictl::ssm::SsmRunCommand;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, InstanceMetadataEndpointState,
    ResourceType, Tag, TagSpecification, VolumeType,
};
use common::moto::{output, vpc_with_two_azs, Moto};

struct World {
    ec2: aws_sdk_ec2::Client,
    image: String,
    placements: Vec<Placement>,
    settings: Ec2LaunchSettings,
}

/// A VPC with a subnet in each of two AZs, a security group and an AMI.
async fn world(moto: &Moto) -> World {
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let (vpc, subnets) = vpc_with_two_azs(&ec2, 42).await;
    let placements: Vec<Placement> = subnets
        .into_iter()
        .map(|(az, subnet)| Placement { az, subnet })
        .collect();
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
    let image = ec2
        .register_image()
        .name("amictl-test-nixos")
        .root_device_name("/dev/xvda")
        .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name("/dev/xvda")
                .ebs(EbsBlockDevice::builder().volume_size(8).build())
                .build(),
        )
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    World {
        ec2,
        image,
        placements,
        settings: Ec2LaunchSettings {
            instance_type: "t3.micro".into(),
            security_group_ids: vec![sg],
            instance_profile: None,
        },
    }
}

fn launch(w: &World, fleet: &str, p: &Placement, rollout: &str) -> Launch {
    Launch {
        fleet: fleet.into(),
        placement: p.clone(),
        image: w.image.clone(),
        spec: spec_digest(&w.settings, p),
        rollout: rollout.into(),
        token: format!("{rollout}-{}", p.az),
        name: format!("{fleet}-{rollout}-{}", p.az),
    }
}

fn tags(list: &[Tag]) -> BTreeMap<String, String> {
    list.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn launch_fleet(w: &World, compute: &Ec2Compute, fleet: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for p in &w.placements {
        ids.push(compute.launch(&launch(w, fleet, p, "r1")).await.unwrap());
    }
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn ec2_compute_launches_lists_retires_and_terminates() {
    let Some(moto) = Moto::start() else { return };
    let w = world(&moto).await;
    let compute = Ec2Compute::with_client(w.ec2.clone(), w.settings.clone());
    let ids = launch_fleet(&w, &compute, "web").await;
    // Another fleet's instance is not listed.
    compute
        .launch(&launch(&w, "other", &w.placements[0], "r9"))
        .await
        .unwrap();

    let out = w
        .ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .unwrap();
    let described: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(described.len(), 2);
    let root_device = w
        .ec2
        .describe_images()
        .image_ids(&w.image)
        .send()
        .await
        .unwrap()
        .images()[0]
        .root_device_name()
        .unwrap()
        .to_owned();
    for (i, p) in described.iter().zip(&w.placements) {
        let t = tags(i.tags());
        assert_eq!(t["Name"], format!("web-r1-{}", p.az));
        assert_eq!(t[TAG_FLEET], "web");
        assert_eq!(t[TAG_IMAGE], w.image);
        assert_eq!(t[TAG_SPEC], spec_digest(&w.settings, p));
        assert_eq!(t[TAG_ROLLOUT], "r1");
        assert_eq!(t[TAG_MANAGED_BY], "amictl");
        assert_eq!(i.subnet_id(), Some(p.subnet.as_str()));
        assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t3.micro"));
        assert_eq!(i.key_name(), None);
        let sgs: Vec<_> = i
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect();
        assert_eq!(sgs, vec![w.settings.security_group_ids[0].as_str()]);
        let md = i.metadata_options().expect("metadata options");
        assert_eq!(md.http_tokens(), Some(&HttpTokensState::Required));
        assert_eq!(md.http_put_response_hop_limit(), Some(1));
        assert_eq!(
            md.http_endpoint(),
            Some(&InstanceMetadataEndpointState::Enabled)
        );
        // The root volume (on the image's root device: moto's RegisterImage keeps its
        // default /dev/sda1): encrypted gp3, tagged like the instance.
        assert_eq!(i.root_device_name(), Some(root_device.as_str()));
        let root = i
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root_device.as_str()))
            .unwrap_or_else(|| panic!("no root device mapping: {:?}", i.block_device_mappings()));
        let volume_id = root.ebs().unwrap().volume_id().unwrap();
        let volumes = w
            .ec2
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
            .unwrap();
        let v = &volumes.volumes()[0];
        assert_eq!(v.encrypted(), Some(true), "{v:?}");
        assert_eq!(v.volume_type(), Some(&VolumeType::Gp3), "{v:?}");
        assert_eq!(tags(v.tags())[TAG_FLEET], "web", "{v:?}");
    }

    let listed = compute.instances("web").await.unwrap();
    assert_eq!(
        listed.iter().map(|i| i.id.clone()).collect::<Vec<_>>(),
        ids,
        "sorted by AZ"
    );
    for (i, p) in listed.iter().zip(&w.placements) {
        assert_eq!(i.az, p.az);
        assert_eq!(i.image, w.image);
        assert_eq!(i.spec, spec_digest(&w.settings, p));
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.rollout.as_deref(), Some("r1"));
        assert_eq!(i.retiring, None);
        assert!(i.address.is_some(), "{i:?}");
        assert!(i.matches(&w.image, &spec_digest(&w.settings, p)));
    }

    compute.set_retiring(&ids[..1], Some("r2")).await.unwrap();
    let listed = compute.instances("web").await.unwrap();
    assert_eq!(listed[0].retiring.as_deref(), Some("r2"));
    assert_eq!(listed[1].retiring, None);
    compute.set_retiring(&ids[..1], None).await.unwrap();
    assert_eq!(compute.instances("web").await.unwrap()[0].retiring, None);

    compute.terminate(&ids[..1]).await.unwrap();
    let left = compute.instances("web").await.unwrap();
    assert_eq!(
        left.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&ids[1]]
    );
    // Terminated already, or never there: fine.
    let mut again = ids.clone();
    again.push("i-0123456789abcdef0".into());
    compute.terminate(&again).await.unwrap();
    assert!(compute.instances("web").await.unwrap().is_empty());
    assert_eq!(compute.instances("other").await.unwrap().len(), 1);
    compute.terminate(&[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn launching_an_unknown_image_is_not_found() {
    let Some(moto) = Moto::start() else { return };
    let w = world(&moto).await;
    let compute = Ec2Compute::with_client(w.ec2.clone(), w.settings.clone());
    let mut l = launch(&w, "web", &w.placements[0], "r1");
    l.image = "ami-0123456789abcdef0".into();
    match compute.launch(&l).await {
        Err(CloudError::NotFound(m)) => assert!(m.contains("ami-0123456789abcdef0"), "{m}"),
        other => panic!("{other:?}"),
    }
    let empty = Ec2Compute::with_client(w.ec2.clone(), Ec2LaunchSettings::default());
    assert!(matches!(
        empty
            .launch(&launch(&w, "web", &w.placements[0], "r1"))
            .await,
        Err(CloudError::Other(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn ssm_run_command_answers_for_every_instance() {
    let Some(moto) = Moto::start() else { return };
    let w = world(&moto).await;
    let compute = Ec2Compute::with_client(w.ec2.clone(), w.settings.clone());
    let ids = launch_fleet(&w, &compute, "web").await;
    let runner = SsmRunCommand::new(&moto.sdk_config().await, "amictl-");
    let out = runner
        .run(&ids, &Command::Health, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    for id in &ids {
        // moto runs nothing: Success, exit 0, no output.
        assert!(
            matches!(&out[id], Invocation::Exited { code: 0, .. }),
            "{:?}",
            out[id]
        );
    }
}

fn run(moto: &Moto, args: &[&str]) -> (i32, String, String) {
    output(moto.amictl().args(args))
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_drift_of_a_fleet() {
    let Some(moto) = Moto::start() else { return };
    let w = world(&moto).await;
    let compute = Ec2Compute::with_client(w.ec2.clone(), w.settings.clone());
    let ids = launch_fleet(&w, &compute, "web").await;

    // moto's empty stdout with exit 0: healthy by the exit code, no detail.
    let (code, stdout, stderr) = run(&moto, &["health", "--fleet", "web"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("INSTANCE"), "{stdout}");
    for (line, (id, p)) in lines[1..].iter().zip(ids.iter().zip(&w.placements)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words[..4],
            [id.as_str(), p.az.as_str(), w.image.as_str(), "healthy"],
            "{stdout}"
        );
    }

    let (code, stdout, stderr) = run(&moto, &["health", "--fleet", "web", "--json", "--heal"]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["instances"].as_array().unwrap().len(), 2);
    assert_eq!(json["heals"].as_array().unwrap().len(), 0);

    // An empty fleet is unknown.
    let (code, _, stderr) = run(&moto, &["health", "--fleet", "nobody"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("no running instances"), "{stderr}");

    // moto's empty stdout is no clock measurement: unknown, not a clean bill.
    let (code, stdout, stderr) = run(&moto, &["drift", "--fleet", "web", "--ami", &w.image]);
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("unknown: no measurement on stdout"),
        "{stdout}"
    );
    // Another AMI expected: drift, exit 1.
    let (code, stdout, _) = run(
        &moto,
        &[
            "drift",
            "--fleet",
            "web",
            "--ami",
            "ami-0123456789abcdef0",
            "--json",
        ],
    );
    assert_eq!(code, 1, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["instances"][0]["ami"]["state"], "drift");

    // An instance in the fleet that amictl did not launch drifts.
    w.ec2
        .run_instances()
        .image_id(&w.image)
        .min_count(1)
        .max_count(1)
        .subnet_id(&w.placements[0].subnet)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(TAG_FLEET).value("web").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (code, stdout, _) = run(&moto, &["drift", "--fleet", "web"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("not launched by amictl"), "{stdout}");
}
