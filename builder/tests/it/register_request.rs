//! The RegisterImage request amictl sends, captured at the HTTP layer: moto ignores most
//! of these parameters, so this is where they are checked.

use amictl::image::aws::AwsImages;
use amictl::image::info::{Arch, BootMode};
use amictl::image::publish::ImageRegistry;
use amictl::image::register::RegisterSpec;
use std::io::{BufRead, BufReader, Read, Write};

use aws_config::{BehaviorVersion, Region};

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

/// Answers one HTTP request on loopback with a 400 (not retried) and returns its body.
fn capture_one() -> (String, std::thread::JoinHandle<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let answer = "<Response><Errors><Error><Code>InvalidParameterValue</Code>\
                      <Message>captured</Message></Error></Errors></Response>";
        write!(
            &stream,
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        )
        .unwrap();
        String::from_utf8(body).unwrap()
    });
    (url, handle)
}

async fn captured(spec: RegisterSpec) -> String {
    let (url, request) = capture_one();
    let creds = aws_credential_types::Credentials::new("a", "b", None, None, "test");
    let config = |url: &str| {
        aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(creds.clone()),
            )
            .endpoint_url(url)
            .build()
    };
    let ec2 = aws_sdk_ec2::Client::new(&config(&url));
    let ebs = aws_sdk_ebs::Client::new(&config(&url));
    // The answer is an error, so the call itself fails; the request is what matters.
    let _ = AwsImages::from_clients(ebs, ec2).register(&spec).await;
    let body = request.join().unwrap();
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
