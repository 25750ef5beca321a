//! `amictl up` end to end against moto: from an empty account to a URL, then again as a
//! no-op, with a real image published through the EBS direct APIs.

use crate::common;

use std::path::Path;
use std::process::Output;

use common::moto::{fleet_instances, moto_rebuild_outputs, sparse_image, stack_outputs, Moto};

const NAME: &str = "amictl-up";

fn up(moto: &Moto, state: &Path, result: &Path) -> Output {
    let out = moto
        .amictl()
        .current_dir(state)
        .env("AMICTL_POLL_MS", "20")
        .env("XDG_STATE_HOME", state)
        .env("XDG_CACHE_HOME", state.join("cache"))
        .args(["up", "--name", NAME, "--prefix", "amictl-", "--image"])
        .arg(result)
        .args(["--per-az", "1", "--health-passes", "1"])
        .output()
        .unwrap();
    eprintln!(
        "up -> {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn up_goes_from_nothing_to_a_url_and_again_changes_nothing() {
    let Some(moto) = Moto::start() else { return };
    let state = tempfile::tempdir().unwrap();
    let st = state.path();
    let config = moto.sdk_config().await;
    let cf = aws_sdk_cloudformation::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);

    // What `nix build .#ami` leaves: nix-support/image-info.json and a raw disk.
    let result = st.join("result");
    std::fs::create_dir_all(result.join("nix-support")).unwrap();
    sparse_image(
        &result.join("nixos.img"),
        4 << 20,
        &[(0, 4096), (1 << 20, 8192)],
    );
    std::fs::write(
        result.join("nix-support/image-info.json"),
        r#"{"label":"up-test","boot_mode":"uefi","system":"x86_64-linux","file":"nixos.img"}"#,
    )
    .unwrap();
    // moto's CloudWatch answers in XML and aws-sdk-cloudwatch speaks rpc-v2-cbor: no alarm
    // can be read there, so the fleet's table turns the stack's alarms off.
    std::fs::write(
        st.join("amictl.toml"),
        format!("[fleets.{NAME}]\nalarms = []\n"),
    )
    .unwrap();

    // A bad result directory is refused before anything is created.
    let out = up(&moto, st, &st.join("no-such-result"));
    assert_eq!(out.status.code(), Some(2));
    let stacks = cf.describe_stacks().send().await.unwrap();
    assert!(stacks.stacks().iter().all(|s| s.stack_name() != Some(NAME)));

    let mut out = up(&moto, st, &result);
    if out.status.code() != Some(0) && stack_outputs(&cf, NAME).await.is_empty() {
        // moto: the stack has no outputs yet (see moto_rebuild_outputs). The rollout
        // refused to run without them; `up` again picks up from there.
        assert_eq!(out.status.code(), Some(2));
        moto_rebuild_outputs(&cf, NAME, amictl::stack::TEMPLATE).await;
        out = up(&moto, st, &result);
    }
    assert_eq!(out.status.code(), Some(0));
    let url = stack_outputs(&cf, NAME).await["Url"].clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim_end().lines().last(), Some(url.as_str()));

    // The fleet runs the published image, one instance in each AZ, in the stack's subnets.
    let images = ec2.describe_images().owners("self").send().await.unwrap();
    let ours: Vec<_> = images
        .images()
        .iter()
        .filter(|i| i.name().is_some_and(|n| n.starts_with("amictl-")))
        .collect();
    assert_eq!(ours.len(), 1, "published once: {ours:?}");
    let ami = ours[0].image_id().unwrap();
    let instances = fleet_instances(&ec2, NAME, &["running"]).await;
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().all(|i| i.image_id() == Some(ami)));
    let azs: std::collections::BTreeSet<_> = instances
        .iter()
        .filter_map(|i| i.placement().and_then(|p| p.availability_zone()))
        .collect();
    assert_eq!(azs.len(), 2);

    // Again: the stack is up to date, the image is already an AMI, the fleet is on it.
    let out = up(&moto, st, &result);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is up to date"), "{err}");
    assert!(err.contains("already has this image"), "{err}");
    assert!(err.contains("nothing to do"), "{err}");

    // A fleet another amictl is changing: `up` refuses before it touches the stack or the
    // image, and names the holder.
    let bucket = stack_outputs(&cf, NAME).await["ImportBucket"].clone();
    let store = amictl::lock::s3::S3Store::new(&config, &bucket, NAME);
    let lease = amictl::lock::acquire(
        std::sync::Arc::new(store),
        NAME,
        amictl::lock::Holder::here(
            "rollout of fleet amictl-up to ami-other",
            std::time::Duration::from_secs(300),
        ),
        amictl::lock::Takeover::Never,
    )
    .await
    .unwrap();
    let out = up(&moto, st, &result);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is locked by rollout of fleet amictl-up to ami-other")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        !err.contains("== image") && !err.contains("is up to date"),
        "{err}"
    );
    lease.release().await.unwrap();
}
