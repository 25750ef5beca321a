use super::*;
use crate::ssm::tests::FakeSsm;

#[test]
fn each_document_runs_one_fixed_command_and_takes_no_other_input() {
    for d in Document::ALL {
        let c = d.content();
        assert_eq!(c["schemaVersion"], "2.2");
        let steps = c["mainSteps"].as_array().unwrap();
        assert_eq!(steps.len(), 1, "{d:?}");
        assert_eq!(steps[0]["action"], "aws:runShellScript");
        assert_eq!(steps[0]["inputs"]["runCommand"], json!([d.command()]));
        assert!(
            !d.command().contains("{{"),
            "{d:?}: no parameter in the command"
        );
        // The one parameter is a timeout of digits.
        let params = c["parameters"].as_object().unwrap();
        assert_eq!(
            params.keys().collect::<Vec<_>>(),
            ["executionTimeout"],
            "{d:?}"
        );
        assert_eq!(
            params["executionTimeout"]["allowedPattern"],
            TIMEOUT_PATTERN
        );
    }
    assert!(TIMEOUT_PATTERN.starts_with('^') && TIMEOUT_PATTERN.ends_with('$'));
    assert!(TIMEOUT_PATTERN
        .chars()
        .all(|c| c.is_ascii_digit() || "^$()|[]{},-".contains(c)));
    assert_eq!(
        Document::HealthCheck.command(),
        "/run/current-system/sw/bin/ami-agent check --json"
    );
    assert_eq!(
        Document::DriftReport.command(),
        "/run/current-system/sw/bin/ami-agent drift"
    );
    assert_eq!(
        Document::HealthCheck.name("amictl-pr-7-"),
        "amictl-pr-7-HealthCheck"
    );
}

#[test]
fn the_text_is_stable_and_either_format_reads_back() {
    let d = Document::HealthCheck;
    assert_eq!(d.text(), d.text());
    assert!(d.is_content(&d.text()));
    let yaml = serde_yaml::to_string(&d.content()).unwrap();
    assert!(d.is_content(&yaml), "{yaml}");
    assert!(!Document::DriftReport.is_content(&d.text()));
    assert!(!d.is_content("not: [a document"));
}

/// The stack's documents are amictl's: same names, same content, updated in place.
#[test]
fn the_stack_declares_each_document_with_the_same_content() {
    let template: serde_yaml::Value = serde_yaml::from_str(crate::stack::TEMPLATE).unwrap();
    let resources = template["Resources"].as_mapping().unwrap();
    let declared: Vec<&serde_yaml::Value> = resources
        .values()
        .filter(|r| r["Type"] == "AWS::SSM::Document")
        .collect();
    assert_eq!(declared.len(), Document::ALL.len());
    for d in Document::ALL {
        let want = format!("${{Prefix}}{}", d.suffix());
        let r = declared
            .iter()
            .find(|r| match &r["Properties"]["Name"] {
                serde_yaml::Value::Tagged(t) => t.tag == "Sub" && t.value == want.as_str(),
                _ => false,
            })
            .unwrap_or_else(|| panic!("stack.yaml has no document named !Sub \"{want}\""));
        let p = &r["Properties"];
        assert_eq!(p["DocumentType"], "Command", "{want}");
        assert_eq!(p["UpdateMethod"], "NewVersion", "{want}");
        let content: Value = serde_json::to_value(&p["Content"]).unwrap();
        assert_eq!(
            content,
            d.content(),
            "stack.yaml's {want} differs from ssm/documents.rs: change both"
        );
    }
}

#[test]
fn on_aws_checks_are_documents_and_shell_commands_are_refused() {
    let p = "amictl-";
    assert_eq!(
        on_aws(Document::HealthCheck, None, None, p),
        Ok(Command::Health)
    );
    assert_eq!(
        on_aws(Document::DriftReport, None, None, p),
        Ok(Command::Drift)
    );
    // The default spelled out (an amictl.toml may hold it) is the document.
    assert_eq!(
        on_aws(Document::HealthCheck, Some(DEFAULT_HEALTH_COMMAND), None, p),
        Ok(Command::Health)
    );
    assert_eq!(
        on_aws(Document::HealthCheck, None, Some("amictl-MyCheck"), p),
        Ok(Command::Document("amictl-MyCheck".into()))
    );
    let e = on_aws(
        Document::HealthCheck,
        Some("curl -f localhost"),
        None,
        "web-",
    )
    .unwrap_err();
    let text = e.to_string();
    for part in [
        "--health-command \"curl -f localhost\"",
        "--provider local",
        "--health-document NAME",
        "web-MyCheck",
        "root shell",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    let e = on_aws(Document::DriftReport, Some("date"), None, p).unwrap_err();
    assert!(e.to_string().contains("--drift-document NAME"), "{e}");
    for theirs in [
        "AWS-RunShellScript",
        "aws-foo",
        "AmazonCloudWatch-X",
        "AMZN-1",
    ] {
        assert!(
            matches!(
                on_aws(Document::HealthCheck, None, Some(theirs), p),
                Err(Refusal::AwsDocument { .. })
            ),
            "{theirs}"
        );
    }
    assert!(matches!(
        on_aws(Document::HealthCheck, Some("true"), Some("mine"), p),
        Err(Refusal::Both { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_missing_document_is_created_once() {
    let fake = FakeSsm::default();
    let v = ensure(&&fake, Document::HealthCheck, "amictl-")
        .await
        .unwrap();
    assert_eq!(v, "1");
    let again = ensure(&&fake, Document::HealthCheck, "amictl-")
        .await
        .unwrap();
    assert_eq!(again, "1");
    assert_eq!(
        fake.calls(),
        [
            "get amictl-HealthCheck default",
            "create amictl-HealthCheck",
            "get amictl-HealthCheck 1",
            "get amictl-HealthCheck default",
        ]
    );
    let docs = fake.documents.lock().unwrap();
    assert!(Document::HealthCheck.is_content(&docs["amictl-HealthCheck"].versions[0].0));
}

#[tokio::test(start_paused = true)]
async fn other_content_gets_a_new_default_version() {
    let fake = FakeSsm::default().with_document("amictl-DriftReport", &["{\"x\":1}"], 1);
    let v = ensure(&&fake, Document::DriftReport, "amictl-")
        .await
        .unwrap();
    assert_eq!(v, "2");
    assert!(fake
        .calls()
        .contains(&"update amictl-DriftReport".to_owned()));
    assert_eq!(fake.calls().last().unwrap(), "default amictl-DriftReport 2");
    assert_eq!(
        fake.documents.lock().unwrap()["amictl-DriftReport"].default,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn an_older_version_with_amictls_content_becomes_the_default_again() {
    // Version 2 is amictl's, but someone made version 3 the default.
    let ours = Document::HealthCheck.text();
    let fake = FakeSsm::default().with_document("amictl-HealthCheck", &["{}", &ours, "[]"], 3);
    let v = ensure(&&fake, Document::HealthCheck, "amictl-")
        .await
        .unwrap();
    assert_eq!(v, "2");
    assert_eq!(
        fake.documents.lock().unwrap()["amictl-HealthCheck"].default,
        2
    );
}

#[tokio::test(start_paused = true)]
async fn losing_the_create_race_is_fine() {
    // Another amictl created it first, with the same content.
    let fake = FakeSsm {
        created_meanwhile: std::sync::Mutex::new(Some(Document::HealthCheck.text())),
        ..FakeSsm::default()
    };
    assert_eq!(
        ensure(&&fake, Document::HealthCheck, "amictl-")
            .await
            .unwrap(),
        "1"
    );
    // Someone created it first with other content: amictl's content goes on top.
    let fake = FakeSsm {
        created_meanwhile: std::sync::Mutex::new(Some("{}".into())),
        ..FakeSsm::default()
    };
    assert_eq!(
        ensure(&&fake, Document::HealthCheck, "amictl-")
            .await
            .unwrap(),
        "2"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_version_is_waited_for_until_active() {
    let fake = FakeSsm {
        creating_for: 3,
        ..FakeSsm::default()
    };
    let start = Instant::now();
    ensure(&&fake, Document::RestartAgent, "amictl-")
        .await
        .unwrap();
    assert!(start.elapsed() >= READY_POLL * 3, "{:?}", start.elapsed());
    let fake = FakeSsm {
        creating_for: 1000,
        ..FakeSsm::default()
    };
    let e = ensure(&&fake, Document::RestartAgent, "amictl-")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("still Creating"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_read_only_identity_uses_amictls_document_and_says_who_writes_a_missing_one() {
    let ours = Document::HealthCheck.text();
    let fake = FakeSsm {
        read_only: true,
        ..FakeSsm::default()
    }
    .with_document("amictl-HealthCheck", &[&ours], 1);
    assert_eq!(
        ensure(&&fake, Document::HealthCheck, "amictl-")
            .await
            .unwrap(),
        "1"
    );
    let e = ensure(&&fake, Document::DriftReport, "amictl-")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("amictl-DriftReport")
            && e.contains("ssm:CreateDocument")
            && e.contains("`amictl rollout`"),
        "{e}"
    );
}
