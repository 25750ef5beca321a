//! The RegisterImage request amictl sends, captured at the HTTP layer: moto ignores most
//! of these parameters, so this is where they are checked.

use amictl::image::aws::AwsImages;
use amictl::image::info::{Arch, BootMode};
use amictl::image::publish::ImageRegistry;
use amictl::image::register::RegisterSpec;
use aws_config::{BehaviorVersion, Region};
use aws_smithy_runtime::client::http::test_util::capture_request;

fn spec(tpm: bool, boot: BootMode, arch: Arch) -> RegisterSpec {
    RegisterSpec {
        name: "p-nixos-x86_64-linux-0123456789ab".into(),
        description: "d".into(),
        arch,
        boot_mode: boot,
        snapshot_id: "snap-0abc".into(),
        volume_size_gib: 3,
        tpm_v2: tpm,
        tags: vec![("amictl:image-digest".into(), "sha256-blocks-512k:00".into())],
    }
}

async fn captured(spec: RegisterSpec) -> String {
    let (http, rx) = capture_request(None);
    let creds = aws_credential_types::Credentials::new("a", "b", None, None, "test");
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(creds.clone())
            .http_client(http.clone())
            .build(),
    );
    let ebs = aws_sdk_ebs::Client::from_conf(
        aws_sdk_ebs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(creds)
            .http_client(http)
            .build(),
    );
    // The canned answer is empty, so the call itself fails; the request is what matters.
    let _ = AwsImages { ebs, ec2 }.register(&spec).await;
    let request = rx.expect_request();
    let body = std::str::from_utf8(request.body().bytes().unwrap())
        .unwrap()
        .to_owned();
    body.replace("%2F", "/").replace("%3A", ":")
}

#[tokio::test]
async fn registers_like_nixos_does() {
    let body = captured(spec(false, BootMode::LegacyBios, Arch::X86_64)).await;
    for part in [
        "Action=RegisterImage",
        "Name=p-nixos-x86_64-linux-0123456789ab",
        "Architecture=x86_64",
        "BootMode=legacy-bios",
        "RootDeviceName=/dev/xvda",
        "BlockDeviceMapping.1.DeviceName=/dev/xvda",
        "BlockDeviceMapping.1.Ebs.SnapshotId=snap-0abc",
        "BlockDeviceMapping.1.Ebs.VolumeType=gp3",
        "BlockDeviceMapping.1.Ebs.VolumeSize=3",
        "BlockDeviceMapping.1.Ebs.DeleteOnTermination=true",
        "VirtualizationType=hvm",
        "EnaSupport=true",
        "SriovNetSupport=simple",
        "ImdsSupport=v2.0",
        "TagSpecification.1.ResourceType=image",
        "TagSpecification.1.Tag.1.Key=amictl:image-digest",
    ] {
        assert!(body.contains(part), "{part} missing from {body}");
    }
    assert!(!body.contains("TpmSupport"), "{body}");
}

#[tokio::test]
async fn uefi_with_tpm_and_arm() {
    let body = captured(spec(true, BootMode::Uefi, Arch::X86_64)).await;
    assert!(
        body.contains("BootMode=uefi") && body.contains("TpmSupport=v2.0"),
        "{body}"
    );
    let body = captured(spec(false, BootMode::UefiPreferred, Arch::Arm64)).await;
    assert!(
        body.contains("BootMode=uefi-preferred") && body.contains("Architecture=arm64"),
        "{body}"
    );
}
