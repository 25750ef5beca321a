//! After publishing, against moto: `image list`, `image gc`, the lifecycle flags of
//! `image publish` (copies, public, deprecation) and `image build` with a stand-in `nix`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::moto::{output, sparse_image, Moto};

const BLOCK: u64 = 524_288;
const DIGEST: &str = "amictl:image-digest";

fn amictl(moto: &Moto, args: &[&str]) -> (i32, String, String) {
    output(moto.amictl().args(args))
}

/// A small image whose content differs with `seed` (data at a different offset).
fn image(dir: &Path, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("disk-{seed}.raw"));
    sparse_image(&path, 8 * BLOCK, &[(seed * 4096, 5000), (6 * BLOCK, 100)]);
    path
}

fn publish(moto: &Moto, image: &Path, extra: &[&str]) -> (i32, String, String) {
    moto.publish_bare(image, "lc-", extra)
}

fn only_line(stdout: &str) -> String {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must hold only the AMI id: {stdout:?}"
    );
    assert!(lines[0].starts_with("ami-"), "{stdout:?}");
    lines[0].to_owned()
}

fn ec2_in(config: &aws_config::SdkConfig, region: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(config)
            .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
            .build(),
    )
}

async fn own_images(ec2: &aws_sdk_ec2::Client) -> Vec<aws_sdk_ec2::types::Image> {
    ec2.describe_images()
        .owners("self")
        .send()
        .await
        .unwrap()
        .images()
        .to_vec()
}

async fn own_snapshot_ids(ec2: &aws_sdk_ec2::Client) -> BTreeSet<String> {
    ec2.describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect()
}

fn tags(image: &aws_sdk_ec2::types::Image) -> BTreeMap<String, String> {
    image
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect()
}

/// The snapshots gc must delete with an AMI: its block device mapping's and the tagged one.
fn snapshots_of(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    let mut out: Vec<String> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
        .collect();
    out.extend(tags(image).get("amictl:snapshot-id").cloned());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_gc_keep_the_newest_and_what_instances_use() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);

    // Three images, oldest first; EC2 (and moto) report creation times in whole seconds.
    let mut ids = Vec::new();
    for seed in 1..=3 {
        if seed > 1 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let (code, stdout, stderr) = publish(&moto, &image(dir.path(), seed), &[]);
        assert_eq!(code, 0, "{stderr}");
        ids.push(only_line(&stdout));
    }
    let (oldest, middle, newest) = (ids[0].clone(), ids[1].clone(), ids[2].clone());

    // An instance from the oldest AMI, in the default VPC.
    let run = ec2
        .run_instances()
        .image_id(&oldest)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let instance = run.instances()[0].instance_id().unwrap().to_owned();

    let (code, stdout, stderr) = amictl(&moto, &["image", "list", "--json", "--prefix", "lc-"]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let listed_ids: Vec<&str> = listed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(listed_ids, [&newest, &middle, &oldest], "newest first");
    for row in &listed {
        assert!(row["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256-blocks-512k:"));
        assert_eq!(row["public"], false);
        assert_eq!(row["state"], "available");
    }
    assert_eq!(listed[2]["instances"], serde_json::json!([instance]));
    assert_eq!(listed[0]["instances"], serde_json::json!([]));

    // Another prefix lists nothing; the table has a header and one line per AMI.
    let (code, stdout, _) = amictl(&moto, &["image", "list", "--json", "--prefix", "other-"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            .unwrap()
            .len(),
        0
    );
    let (code, stdout, stderr) = amictl(&moto, &["image", "list"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.lines().nth(1).unwrap().starts_with(&newest),
        "{stdout}"
    );

    let before_images = own_images(&ec2).await;
    let middle_snapshots = snapshots_of(
        before_images
            .iter()
            .find(|i| i.image_id() == Some(middle.as_str()))
            .unwrap(),
    );
    assert_eq!(middle_snapshots.len(), 2, "{middle_snapshots:?}");
    let snapshots_before = own_snapshot_ids(&ec2).await;
    assert!(middle_snapshots
        .iter()
        .all(|s| snapshots_before.contains(s)));

    // No terminal and no --yes: the plan, exit 2, nothing deleted. --dry-run: the plan only.
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["image", "gc", "--keep", "1", "--prefix", "lc-"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = amictl(&moto, &args);
        assert_eq!(
            code,
            if extra.is_empty() { 2 } else { 0 },
            "{stdout}{stderr}"
        );
        assert!(stdout.contains(&format!("delete  {middle}")), "{stdout}");
        assert!(stdout.contains(&format!("keep    {newest}")), "{stdout}");
        assert!(
            stdout.contains(&format!("in use by {instance}")),
            "{stdout}"
        );
        if extra.is_empty() {
            assert!(stderr.contains("--yes"), "{stderr}");
        }
        assert_eq!(own_images(&ec2).await.len(), before_images.len());
        assert_eq!(own_snapshot_ids(&ec2).await, snapshots_before);
    }

    let (code, stdout, stderr) = amictl(
        &moto,
        &["image", "gc", "--keep", "1", "--prefix", "lc-", "--yes"],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let left: BTreeSet<String> = own_images(&ec2)
        .await
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect();
    assert_eq!(left, BTreeSet::from([oldest.clone(), newest.clone()]));
    let snapshots_after = own_snapshot_ids(&ec2).await;
    for s in &middle_snapshots {
        assert!(!snapshots_after.contains(s), "{s} of {middle} survived");
    }
    assert_eq!(
        snapshots_after.len(),
        snapshots_before.len() - middle_snapshots.len()
    );

    // Again: nothing left to do.
    let (code, stdout, stderr) = amictl(
        &moto,
        &["image", "gc", "--keep", "1", "--prefix", "lc-", "--yes"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("deregister 0 AMI(s)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_once_shares_publicly_and_deprecates() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = moto.sdk_config().await;
    let east = aws_sdk_ec2::Client::new(&config);
    let west = ec2_in(&config, "us-west-2");
    let disk = image(dir.path(), 7);

    // Flags that cannot work are refused before anything is uploaded.
    let snapshots_before = own_snapshot_ids(&east).await;
    for (extra, says) in [
        (
            &["--copy-to-regions", "us-east-1"][..],
            "the region the AMI is published in",
        ),
        (&["--public", "--encrypted"][..], "encrypted"),
        (
            &["--public", "--deprecate-in", "1000"][..],
            "at most 730 days",
        ),
    ] {
        let (code, stdout, stderr) = publish(&moto, &disk, extra);
        assert_eq!(code, 1, "{extra:?}: {stderr}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
        assert!(stdout.is_empty());
    }
    let (code, _, stderr) = publish(&moto, &disk, &["--deprecate-in", "4000"]);
    assert_eq!(code, 2, "clap refuses it: {stderr}");
    assert!(own_images(&east).await.is_empty());
    assert_eq!(own_snapshot_ids(&east).await, snapshots_before);

    let flags = ["--copy-to-regions", "us-west-2", "--public"];
    let (code, stdout, stderr) = publish(&moto, &disk, &flags);
    assert_eq!(code, 0, "{stderr}");
    let source = only_line(&stdout);
    let copy_line = stderr
        .lines()
        .find(|l| l.starts_with("us-west-2: ami-"))
        .unwrap_or_else(|| panic!("no `us-west-2: ami-…` line: {stderr}"));
    let copy = copy_line.trim_start_matches("us-west-2: ").to_owned();

    let source_image = east
        .describe_images()
        .image_ids(&source)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert_eq!(source_image.public(), Some(true));
    let source_tags = tags(&source_image);
    let copies = own_images(&west).await;
    assert_eq!(copies.len(), 1);
    let copy_image = &copies[0];
    assert_eq!(copy_image.image_id(), Some(copy.as_str()));
    assert_eq!(copy_image.public(), Some(true));
    let copy_tags = tags(copy_image);
    assert_eq!(copy_tags[DIGEST], source_tags[DIGEST]);
    assert_eq!(copy_tags["amictl:managed-by"], "amictl");
    assert_eq!(copy_tags["amictl:prefix"], "lc-");
    assert_eq!(copy_tags["amictl:source-ami"], source);
    assert_eq!(copy_tags["amictl:source-region"], "us-east-1");
    // The copy names its own snapshot, not the source's.
    let copy_snapshot = copy_tags["amictl:snapshot-id"].clone();
    assert_ne!(copy_snapshot, source_tags["amictl:snapshot-id"]);
    assert!(own_snapshot_ids(&west).await.contains(&copy_snapshot));

    // Again: the same AMI, the same copy, nothing copied (moto ignores ClientToken, so
    // this is the digest lookup at work).
    let (code, stdout, stderr) = publish(&moto, &disk, &flags);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(only_line(&stdout), source);
    assert!(stderr.contains(&format!("us-west-2: {copy}")), "{stderr}");
    assert_eq!(own_images(&west).await.len(), 1);

    // moto has no EnableImageDeprecation (it answers HTTP 500), so the call is checked as
    // far as moto goes: it is made, named in the error, and the AMI id is not printed.
    let (code, stdout, stderr) = publish(&moto, &disk, &["--deprecate-in", "30"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("ec2:EnableImageDeprecation"), "{stderr}");
    assert!(
        stderr.contains(&format!("deprecating {source}")),
        "{stderr}"
    );
}

/// A stand-in `nix` that prints a prepared result directory.
fn fake_nix(bin: &Path, version: &str, result: &Path, args_log: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(bin).unwrap();
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'nix (Nix) {version}'; exit 0; fi\n\
         echo \"$@\" > '{}'\n\
         echo \"building '/nix/store/00000000000000000000000000000000-nixos-ami.drv'...\" >&2\n\
         echo '{}'\n",
        args_log.display(),
        result.display()
    );
    let path = bin.join("nix");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn build_runs_nix_and_publishes_its_result() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("result");
    std::fs::create_dir_all(result.join("nix-support")).unwrap();
    let disk = result.join("nixos.img");
    sparse_image(&disk, 8 * BLOCK, &[(0, 3000), (5 * BLOCK, 10)]);
    std::fs::write(
        result.join("nix-support/image-info.json"),
        format!(
            r#"{{"label":"built-by-nix","boot_mode":"uefi","system":"x86_64-linux","logical_bytes":"{}","file":"{}"}}"#,
            8 * BLOCK,
            disk.display()
        ),
    )
    .unwrap();
    let args_log = dir.path().join("nix-args");
    let bin = dir.path().join("bin");
    fake_nix(&bin, "2.24.9", &result, &args_log);

    let (code, stdout, stderr) = output(
        moto.amictl()
            .env("PATH", &bin)
            .args(["image", "build", "--prefix", "bt-"]),
    );
    assert_eq!(code, 0, "{stderr}");
    let ami = only_line(&stdout);
    assert!(
        stderr.contains("building '/nix/store/"),
        "nix's progress goes to stderr: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&args_log).unwrap().trim(),
        "--extra-experimental-features nix-command flakes build .#ami --print-out-paths --no-link"
    );
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let images = own_images(&ec2).await;
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].image_id(), Some(ami.as_str()));
    let t = tags(&images[0]);
    assert_eq!(t["amictl:label"], "built-by-nix");
    assert_eq!(t["amictl:prefix"], "bt-");
    let digest = amictl::image::digest::digest_file(&disk).unwrap();
    assert_eq!(t[DIGEST], format!("sha256-blocks-512k:{digest}"));

    // Built again (another flake ref): the same AMI, exactly as `publish` would say.
    let (code, stdout, stderr) = output(moto.amictl().env("PATH", &bin).args([
        "image",
        "build",
        "--flake",
        "github:example/infra#ami",
        "--prefix",
        "bt-",
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(only_line(&stdout), ami);
    assert!(std::fs::read_to_string(&args_log)
        .unwrap()
        .contains(" build github:example/infra#ami "));

    // No nix at all, and a nix too old: said plainly, nothing published.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, stdout, stderr) = output(moto.amictl().env("PATH", &empty).args(["image", "build"]));
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("Nix 2.18 or newer with flakes"), "{stderr}");
    assert!(
        stderr.contains("experimental-features = nix-command flakes"),
        "{stderr}"
    );
    let old = dir.path().join("old");
    fake_nix(&old, "2.17.1", &result, &args_log);
    let (code, _, stderr) = output(moto.amictl().env("PATH", &old).args(["image", "build"]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("found Nix 2.17.1") && stderr.contains("2.18"),
        "{stderr}"
    );
    assert_eq!(own_images(&ec2).await.len(), 1);
}
