//! amictl's SSM documents against moto, through the binary: a rollout creates them, every
//! command goes out as one of them (never `AWS-RunShellScript`), a second run creates
//! nothing, a changed document is put back, and a shell command is refused before
//! anything is sent. moto stores documents and the commands sent (ListCommands), though it
//! runs nothing: each command "succeeds" with empty output.

use crate::common;

use amictl::ssm::Document;
use common::moto::{output, vpc_with_two_azs, Moto};

const PREFIX: &str = "web-";

struct Setup {
    subnets: String,
    sg: String,
    ami: String,
}

/// `amictl rollout` of the fleet `web` into the set-up network, one instance per AZ.
fn rollout_args(s: &Setup) -> Vec<&str> {
    vec![
        "rollout",
        "--fleet",
        "web",
        "--prefix",
        PREFIX,
        "--per-az",
        "1",
        "--health-passes",
        "1",
        "--timeout",
        "120",
        "--ami",
        &s.ami,
        "--subnets",
        &s.subnets,
        "--security-groups",
        &s.sg,
    ]
}

async fn setup(moto: &Moto) -> Setup {
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let (vpc, subnets) = vpc_with_two_azs(&ec2, 31).await;
    let subnets: Vec<String> = subnets.into_iter().map(|(_, s)| s).collect();
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
    let ami = ec2
        .register_image()
        .name("web-v1")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id
        .unwrap();
    Setup {
        subnets: subnets.join(","),
        sg,
        ami,
    }
}

fn amictl(moto: &Moto, state: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    output(moto.amictl().env("XDG_STATE_HOME", state).args(args))
}

/// Every command moto was sent: its document names, oldest first (moto lists them in the
/// order they came).
async fn sent(ssm: &aws_sdk_ssm::Client) -> Vec<String> {
    let out = ssm.list_commands().send().await.unwrap();
    out.commands()
        .iter()
        .map(|c| c.document_name().unwrap_or_default().to_owned())
        .collect()
}

/// (latest version, default version) of each of amictl's documents that exists.
async fn versions(ssm: &aws_sdk_ssm::Client) -> Vec<(String, String, String)> {
    let mut v = Vec::new();
    for d in Document::ALL {
        let name = d.name(PREFIX);
        if let Ok(out) = ssm.describe_document().name(&name).send().await {
            let doc = out.document().unwrap();
            v.push((
                name,
                doc.latest_version().unwrap_or_default().to_owned(),
                doc.default_version().unwrap_or_default().to_owned(),
            ));
        }
    }
    v
}

async fn content(ssm: &aws_sdk_ssm::Client, d: Document) -> String {
    ssm.get_document()
        .name(d.name(PREFIX))
        .send()
        .await
        .unwrap()
        .content()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_go_out_as_amictls_documents_made_once() {
    let Some(moto) = Moto::start() else { return };
    let s = setup(&moto).await;
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let ssm = aws_sdk_ssm::Client::new(&moto.sdk_config().await);

    let (code, _, err) = amictl(&moto, st, &rollout_args(&s));
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("created SSM document").count(), 3, "{err}");
    let made = versions(&ssm).await;
    let one = |name: &str| (format!("{PREFIX}{name}"), "1".into(), "1".into());
    assert_eq!(
        made,
        [one("HealthCheck"), one("DriftReport"), one("RestartAgent")]
    );
    for d in Document::ALL {
        assert!(d.is_content(&content(&ssm, d).await), "{d:?}");
    }
    // The health gates: one command per new instance's check, all amictl's document.
    let gates = sent(&ssm).await;
    assert!(gates.len() >= 2, "{gates:?}");
    assert!(gates.iter().all(|d| d == "web-HealthCheck"), "{gates:?}");

    // health and drift send amictl's documents too, and create nothing.
    let (code, out, err) = amictl(&moto, st, &["health", "--fleet", "web", "--prefix", PREFIX]);
    assert_eq!(code, 0, "{out}\n{err}");
    // moto's empty output is no clock measurement: unknown, exit 3.
    let (code, _, err2) = amictl(&moto, st, &["drift", "--fleet", "web", "--prefix", PREFIX]);
    assert_eq!(code, 3, "{err2}");
    for e in [&err, &err2] {
        assert!(!e.contains("created SSM document"), "{e}");
        assert!(!e.contains("writing a new version"), "{e}");
    }
    let all = sent(&ssm).await;
    let later: Vec<&str> = all[gates.len()..].iter().map(String::as_str).collect();
    let mut later_sorted = later.clone();
    later_sorted.sort_unstable();
    assert_eq!(
        later_sorted,
        ["web-DriftReport", "web-HealthCheck", "web-HealthCheck"],
        "{all:?}"
    );
    assert!(all.iter().all(|d| d != "AWS-RunShellScript"), "{all:?}");
    assert_eq!(versions(&ssm).await, made, "nothing was written again");

    // Someone changes the health check: the next rollout puts amictl's back (SSM keeps
    // version 1 with amictl's bytes, so that one becomes the default again).
    ssm.update_document()
        .name("web-HealthCheck")
        .content(r#"{"schemaVersion":"2.2","description":"x","mainSteps":[{"action":"aws:runShellScript","name":"x","inputs":{"runCommand":["id"]}}]}"#)
        .document_version("$LATEST")
        .send()
        .await
        .unwrap();
    ssm.update_document_default_version()
        .name("web-HealthCheck")
        .document_version("2")
        .send()
        .await
        .unwrap();
    let (code, _, err) = amictl(&moto, st, &rollout_args(&s));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to do"), "{err}");
    assert!(err.contains("differs from amictl's"), "{err}");
    assert_eq!(
        versions(&ssm).await[0],
        ("web-HealthCheck".into(), "2".into(), "1".into())
    );
    assert!(Document::HealthCheck.is_content(&content(&ssm, Document::HealthCheck).await));

    // A shell command is refused on AWS, naming the fix, and nothing is sent.
    let before = sent(&ssm).await.len();
    let (code, _, err) = amictl(
        &moto,
        st,
        &[
            "health",
            "--fleet",
            "web",
            "--prefix",
            PREFIX,
            "--health-command",
            "id",
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--provider local") && err.contains("--health-document NAME"),
        "{err}"
    );
    let (code, _, err) = amictl(
        &moto,
        st,
        &[
            "rollout",
            "--fleet",
            "web",
            "--prefix",
            PREFIX,
            "--ami",
            &s.ami,
            "--subnets",
            &s.subnets,
            "--security-groups",
            &s.sg,
            "--health-command",
            "curl -f localhost",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("root shell"), "{err}");
    assert_eq!(sent(&ssm).await.len(), before);

    // A document of the operator's goes out as it is named, unread and unchanged.
    ssm.create_document()
        .name("web-MyCheck")
        .document_type(aws_sdk_ssm::types::DocumentType::Command)
        .content(Document::HealthCheck.text())
        .send()
        .await
        .unwrap();
    let (code, _, err) = amictl(
        &moto,
        st,
        &[
            "health",
            "--fleet",
            "web",
            "--prefix",
            PREFIX,
            "--health-document",
            "web-MyCheck",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(sent(&ssm).await.last().unwrap(), "web-MyCheck");
}
