//! `image publish --via s3` against moto. moto has S3's multipart upload (with part
//! checksums) but no ImportSnapshot, so the S3 half runs through the real SDK clients and
//! the import is an in-test stand-in that reads the staged object back and makes a real
//! snapshot in moto; the import's own logic (task states, cancel, the role hint) is unit
//! tested in `image::s3`. The CLI is driven against moto too, where ImportSnapshot fails:
//! that tests the wiring and the clean-up after a failed import.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amictl::aws::AwsError;
use amictl::image::aws::AwsImages;
use amictl::image::info::{Arch, BootMode, ImageSource};
use amictl::image::publish::{publish, Outcome, PublishOptions, Services};
use amictl::image::s3::{
    ImportSpec, S3Import, S3Options, SnapshotImporter, TaskStatus, MIN_PART_SIZE,
};
use amictl::image::s3_aws::AwsStaging;
use common::moto::{sparse_image, Moto};
use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const BUCKET: &str = "amictl-staging";

/// ImportSnapshot as moto lacks it: checks that the staged object is the image, byte for
/// byte, and makes a snapshot in moto (CreateVolume + CreateSnapshot) to stand for the
/// imported one. The task is `active` once, then `completed`.
struct MotoImport {
    s3: aws_sdk_s3::Client,
    ec2: aws_sdk_ec2::Client,
    image: std::path::PathBuf,
    state: Mutex<(Vec<ImportSpec>, Option<String>, usize)>,
}

impl SnapshotImporter for MotoImport {
    async fn import(&self, spec: &ImportSpec) -> Result<String, AwsError> {
        let object = self
            .s3
            .get_object()
            .bucket(&spec.bucket)
            .key(&spec.key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        assert!(
            object == std::fs::read(&self.image).unwrap(),
            "the staged object is the image"
        );
        let volume = self
            .ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .unwrap();
        let volume_id = volume.volume_id().unwrap();
        let snapshot = self
            .ec2
            .create_snapshot()
            .volume_id(volume_id)
            .description(&spec.description)
            .send()
            .await
            .unwrap();
        self.ec2
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
            .unwrap();
        let mut state = self.state.lock().unwrap();
        state.0.push(spec.clone());
        state.1 = snapshot.snapshot_id().map(str::to_owned);
        Ok("import-snap-0123456789abcdef0".into())
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskStatus>, AwsError> {
        assert_eq!(task_id, "import-snap-0123456789abcdef0");
        let mut state = self.state.lock().unwrap();
        state.2 += 1;
        Ok(Some(if state.2 == 1 {
            TaskStatus {
                status: "active".into(),
                message: Some("converting".into()),
                progress: Some("42".into()),
                snapshot_id: None,
            }
        } else {
            TaskStatus {
                status: "completed".into(),
                message: None,
                progress: None,
                snapshot_id: state.1.clone(),
            }
        }))
    }

    async fn cancel(&self, task_id: &str) -> Result<(), AwsError> {
        panic!("a completing import is not cancelled ({task_id})");
    }
}

async fn staged_objects(s3: &aws_sdk_s3::Client) -> Vec<String> {
    s3.list_objects_v2()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

async fn open_uploads(s3: &aws_sdk_s3::Client) -> usize {
    s3.list_multipart_uploads()
        .bucket(BUCKET)
        .send()
        .await
        .unwrap()
        .uploads()
        .len()
}

async fn own_snapshots(ec2: &aws_sdk_ec2::Client) -> usize {
    ec2.describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap()
        .snapshots()
        .len()
}

fn publish_cli(moto: &Moto, image: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    moto.publish_bare(image, "test-", extra)
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_through_an_s3_staging_object_with_the_same_digest_as_ebs() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let s3 = aws_sdk_s3::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();

    // 12 MiB and a bit: three 5 MiB parts (S3's smallest), data in each, holes elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let size = 12 * MIB + 1000;
    sparse_image(
        &path,
        size,
        &[(4096, 10_000), (5 * MIB - 100, 300), (12 * MIB, 1000)],
    );
    let image =
        ImageSource::from_file(&path, BootMode::Uefi, Arch::X86_64, "nixos".into(), None).unwrap();

    let uploader = S3Import {
        staging: Arc::new(AwsStaging::new(&config)),
        importer: Arc::new(MotoImport {
            s3: s3.clone(),
            ec2: ec2.clone(),
            image: path.clone(),
            state: Mutex::new((Vec::new(), None, 0)),
        }),
        options: S3Options {
            bucket: BUCKET.into(),
            part_size: MIN_PART_SIZE,
            client_token: "amictl-test-token".into(),
            tags: vec![("amictl:managed-by".into(), "amictl".into())],
            description: "amictl: nixos x86_64-linux".into(),
            ..S3Options::default()
        },
    };
    let aws = AwsImages::new(&config);
    let services = Services {
        store: Arc::new(aws.clone()),
        registry: &aws,
        uploader: &uploader,
        cache: None,
    };
    let opts = PublishOptions {
        prefix: "test-".into(),
        tpm_v2: false,
        keep_on_failure: false,
        omit_zero_blocks: false,
        available_deadline: Duration::from_secs(60),
    };
    let progress = ProgressBar::hidden();
    progress.set_length(size);
    let outcome = publish(
        &services,
        &image,
        &opts,
        &progress,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let Outcome::Created { ami_id, uploaded } = outcome else {
        panic!("a new AMI: {outcome:?}")
    };
    assert!(ami_id.starts_with("ami-"), "{ami_id}");
    assert_eq!(progress.position(), size);
    let digest = amictl::image::digest::digest_file(&path).unwrap();
    assert_eq!(uploaded.digest, digest);

    let images = ec2
        .describe_images()
        .image_ids(&ami_id)
        .send()
        .await
        .unwrap();
    let tags: BTreeMap<_, _> = images.images()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    assert_eq!(
        tags["amictl:image-digest"],
        format!("sha256-blocks-512k:{digest}")
    );
    assert_eq!(tags["amictl:snapshot-id"], uploaded.snapshot_id);
    let imports = uploader.importer.state.lock().unwrap().0.clone();
    assert_eq!(imports.len(), 1);
    assert!(imports[0].key.starts_with("amictl/nixos-x86_64-linux-"));
    assert!(imports[0].key.ends_with(".raw"));
    assert_eq!(imports[0].client_token, "amictl-test-token");

    // The staging area is empty again: no object, no multipart upload.
    assert_eq!(staged_objects(&s3).await, Vec::<String>::new());
    assert_eq!(open_uploads(&s3).await, 0);

    // Content addressing does not depend on the path: the EBS path finds this AMI by the
    // digest it computes itself, and keeps nothing of its own upload.
    let snapshots = own_snapshots(&ec2).await;
    let (code, stdout, stderr) = publish_cli(&moto, &path, &["--no-cache"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), ami_id);
    assert!(stderr.contains("same content digest"), "{stderr}");
    assert_eq!(own_snapshots(&ec2).await, snapshots);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_stages_in_s3_and_cleans_up_when_the_import_fails() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let s3 = aws_sdk_s3::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    sparse_image(&path, 3 * MIB + 100, &[(0, 5000), (2 * MIB, 100)]);
    let snapshots = own_snapshots(&ec2).await;

    // moto has no ImportSnapshot (it answers HTTP 500): the upload succeeds, the import
    // fails, and the staging object is deleted.
    let (code, stdout, stderr) = publish_cli(&moto, &path, &["--via", "s3", "--bucket", BUCKET]);
    assert_ne!(code, 0, "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("ImportSnapshot of s3://amictl-staging/amictl/nixos-x86_64-linux-"),
        "{stderr}"
    );
    assert!(
        stderr.contains("deleted s3://amictl-staging/amictl/"),
        "{stderr}"
    );
    assert_eq!(staged_objects(&s3).await, Vec::<String>::new());
    assert_eq!(open_uploads(&s3).await, 0);
    assert_eq!(own_snapshots(&ec2).await, snapshots);

    // --keep-on-failure keeps the object, whole, under --key-prefix.
    let (code, _, stderr) = publish_cli(
        &moto,
        &path,
        &[
            "--via",
            "s3",
            "--bucket",
            BUCKET,
            "--key-prefix",
            "staging/",
            "--keep-on-failure",
        ],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("kept s3://amictl-staging/staging/"),
        "{stderr}"
    );
    let kept = staged_objects(&s3).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("staging/nixos-x86_64-linux-"));
    let object = s3
        .get_object()
        .bucket(BUCKET)
        .key(&kept[0])
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert!(object == std::fs::read(&path).unwrap());
    assert_eq!(open_uploads(&s3).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bucket_is_named_and_nothing_is_left_behind() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let s3 = aws_sdk_s3::Client::new(&config);
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    sparse_image(&path, 2 * MIB, &[(0, 5000)]);
    // moto's own sample AMIs come with snapshots: count, do not expect none.
    let snapshots = own_snapshots(&ec2).await;

    let (code, stdout, stderr) = publish_cli(
        &moto,
        &path,
        &["--via", "s3", "--bucket", "no-such-bucket-here"],
    );
    assert_ne!(code, 0);
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("\"no-such-bucket-here\"") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert_eq!(s3.list_buckets().send().await.unwrap().buckets().len(), 0);
    assert_eq!(own_snapshots(&ec2).await, snapshots);

    // The flags say what they need.
    let (code, _, stderr) = publish_cli(&moto, &path, &["--via", "s3"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--bucket"), "{stderr}");
    let (code, _, stderr) = publish_cli(&moto, &path, &["--bucket", BUCKET]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--via s3"), "{stderr}");
    assert_eq!(own_snapshots(&ec2).await, snapshots);
}
