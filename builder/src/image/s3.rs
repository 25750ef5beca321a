//! `--via s3`: for accounts where the EBS direct APIs are not allowed. The image goes to a
//! staging object in S3 (a multipart upload with a SHA-256 checksum on every part, so S3
//! verifies each one), EC2's ImportSnapshot turns the object into a snapshot, and the
//! object is deleted. Slower than `--via ebs` (ImportSnapshot takes 10-20 minutes or more,
//! and S3 needs every byte, holes included), but the content digest is the same: it is
//! computed from the same 512 KiB blocks while the parts are hashed.
//!
//! S3 and the import are two traits, faked in the tests below; `s3_aws` has the AWS side.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::aws::AwsError;

use super::digest::{block_digest, image_digest, zero_block_digest, BlockDigest};
pub use super::error::S3Error;
use super::error::UploadError;
use super::info::ImageSource;
use super::plan::{is_zero, plan, Planned, BLOCK_SIZE};
use super::upload::{data_extents, jitter, Uploaded, Uploader};

const MIB: u64 = 1 << 20;
/// S3's smallest part (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// S3's most parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// S3's largest object.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * MIB;
/// 64 MiB parts: few enough requests that their latency does not matter, small enough
/// that a retried part costs seconds and a few parts in flight fit in memory.
pub const DEFAULT_PART_SIZE: u64 = 64 * MIB;
/// Memory for part buffers: those in flight, the one queued and the one being read. 384
/// MiB allows four 64 MiB parts in flight, which fill an uplink to S3 outside AWS and a
/// few Gbit/s inside it.
const PART_BUFFER_BUDGET: u64 = 384 * MIB;

/// The part size for an image of `size` bytes: `preferred`, within S3's limits, grown to
/// ceil(size / 10,000) when the image would need more than S3's 10,000 parts (64 MiB
/// parts cover 625 GiB; an EBS volume can be larger), and rounded up to whole 512 KiB
/// blocks so that every digest block lies inside one part. None when the image is larger
/// than an S3 object can be.
pub fn part_size(size: u64, preferred: u64) -> Option<u64> {
    if size > MAX_OBJECT_SIZE {
        return None;
    }
    let fit = size.div_ceil(MAX_PARTS);
    let size = preferred.max(MIN_PART_SIZE).max(fit).min(MAX_PART_SIZE);
    Some(size.div_ceil(BLOCK_SIZE) * BLOCK_SIZE)
}

/// The parts' byte ranges, in order (part number = index + 1).
pub fn parts(size: u64, part_size: u64) -> Vec<Range<u64>> {
    (0..size.div_ceil(part_size))
        .map(|i| i * part_size..((i + 1) * part_size).min(size))
        .collect()
}

/// Parts in flight: what was asked, at most what the memory budget allows, at least one.
pub fn parts_in_flight(part_size: u64, wanted: usize) -> usize {
    let budget = (PART_BUFFER_BUDGET / part_size).saturating_sub(2).max(1) as usize;
    wanted.clamp(1, budget)
}

/// `<prefix><label>-<system>-<unix seconds>-<random>.raw`: unique per run, and readable
/// in a bucket listing. The digest is not known before the upload, so it is not in it.
pub fn object_key(prefix: &str, image: &ImageSource) -> String {
    let label: String = image
        .label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{prefix}{label}-{}-{secs}-{:08x}.raw",
        image.arch.nix_system(),
        fastrand::u32(..)
    )
}

/// A part S3 accepted, as CompleteMultipartUpload needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    pub number: i32,
    pub etag: String,
    /// base64 of the part's SHA-256.
    pub sha256_b64: String,
}

/// S3's multipart upload calls.
pub trait Staging: Send + Sync + 'static {
    /// CreateMultipartUpload with SHA-256 part checksums; the upload id. A missing bucket
    /// is `AwsError::NotFound`.
    fn create_upload(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<String, AwsError>> + Send;
    /// UploadPart; the part's ETag. S3 refuses the part unless its SHA-256 is `sha256_b64`.
    fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256_b64: String,
    ) -> impl Future<Output = Result<String, AwsError>> + Send;
    fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// AbortMultipartUpload; an upload that is already gone is not an error.
    fn abort_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// DeleteObject; an object that is already gone is not an error.
    fn delete_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
}

/// What ImportSnapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSpec {
    pub bucket: String,
    pub key: String,
    pub description: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// Makes a retried ImportSnapshot return the same task instead of a second one.
    pub client_token: String,
    /// Tags of the import task.
    pub tags: Vec<(String, String)>,
}

/// An import task, as DescribeImportSnapshotTasks tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskStatus {
    /// `active`, `completed`, `deleting`, `deleted`.
    pub status: String,
    /// E.g. `pending`, `converting`, or why the task failed.
    pub message: Option<String>,
    /// Percent done.
    pub progress: Option<String>,
    pub snapshot_id: Option<String>,
}

/// EC2's import calls.
pub trait SnapshotImporter: Send + Sync + 'static {
    /// ImportSnapshot of a RAW disk; the import task's id.
    fn import(&self, spec: &ImportSpec) -> impl Future<Output = Result<String, AwsError>> + Send;
    /// The task, or None while it is not listed.
    fn task(
        &self,
        task_id: &str,
    ) -> impl Future<Output = Result<Option<TaskStatus>, AwsError>> + Send;
    /// CancelImportTask.
    fn cancel(&self, task_id: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
}

/// What the import task's state means for the waiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Wait,
    Done(String),
    Failed(String),
}

/// Decides on one DescribeImportSnapshotTasks answer. A failed import goes to `deleting`
/// and then `deleted`, with the reason in its status message; anything not known to be
/// final is waited on (until the deadline).
pub fn step(task: &TaskStatus) -> Step {
    let message = || {
        task.message
            .clone()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("its status is {}", task.status))
    };
    match task.status.as_str() {
        "completed" => match &task.snapshot_id {
            Some(s) if !s.is_empty() => Step::Done(s.clone()),
            _ => Step::Failed("it completed without a snapshot id".into()),
        },
        "deleting" | "deleted" | "cancelled" | "canceled" | "cancelling" | "error" | "failed" => {
            Step::Failed(message())
        }
        _ => Step::Wait,
    }
}

/// What ImportSnapshot needs from the account, said wherever an import is refused.
pub const ROLE_HINT: &str = "; ImportSnapshot reads the bucket as the `vmimport` service role: \
     the account needs an IAM role named vmimport that vmie.amazonaws.com may assume, allowed \
     s3:GetBucketLocation, s3:GetObject and s3:ListBucket on the bucket (and, for an encrypted \
     snapshot, kms:CreateGrant, kms:Decrypt, kms:DescribeKey, kms:Encrypt, \
     kms:GenerateDataKey* and kms:ReEncrypt* on the key)";

/// The role hint when a refusal looks like a permission or role problem, else nothing.
pub fn role_hint(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    let about_access = [
        "role",
        "vmimport",
        "access denied",
        "accessdenied",
        "not authorized",
        "unauthorized",
        "permission",
        "forbidden",
    ]
    .iter()
    .any(|w| m.contains(w));
    if about_access {
        ROLE_HINT
    } else {
        ""
    }
}

#[derive(Debug, Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Prepended to the object's name (`amictl/` by default).
    pub key_prefix: String,
    /// Grown for large images (see `part_size`).
    pub part_size: u64,
    /// Capped by the memory budget (see `parts_in_flight`).
    pub parts_in_flight: usize,
    pub description: String,
    /// Tags of the import task.
    pub tags: Vec<(String, String)>,
    pub client_token: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// How long the import may take.
    pub import_deadline: Duration,
    /// Keep the staging object (and a running import task) when the import fails.
    pub keep_on_failure: bool,
    /// How long a new import task may be missing from DescribeImportSnapshotTasks.
    pub missing_grace: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            bucket: String::new(),
            key_prefix: "amictl/".into(),
            part_size: DEFAULT_PART_SIZE,
            parts_in_flight: 4,
            description: String::new(),
            tags: Vec::new(),
            client_token: String::new(),
            encrypted: false,
            kms_key_id: None,
            import_deadline: Duration::from_secs(30 * 60),
            keep_on_failure: false,
            // EC2 lists a new resource within seconds; two minutes is generous.
            missing_grace: Duration::from_secs(120),
        }
    }
}

/// The S3 + ImportSnapshot uploader.
pub struct S3Import<S, I> {
    pub staging: Arc<S>,
    pub importer: Arc<I>,
    pub options: S3Options,
}

/// The multipart upload this run made.
#[derive(Debug, Clone)]
struct Staged {
    bucket: String,
    key: String,
    upload_id: String,
}

impl<S: Staging, I: SnapshotImporter> Uploader for S3Import<S, I> {
    async fn upload(
        &self,
        image: &ImageSource,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        started: &mut Option<String>,
    ) -> Result<Uploaded, UploadError> {
        let o = &self.options;
        let part_size =
            part_size(image.size, o.part_size).ok_or(S3Error::TooLarge { size: image.size })?;
        let file = std::fs::File::open(&image.path).map_err(|source| UploadError::Read {
            path: image.path.clone(),
            source,
        })?;
        let bucket = o.bucket.clone();
        let key = object_key(&o.key_prefix, image);
        // Not raced against Ctrl-C: an upload created after the race was lost could not be
        // aborted, and the call is short (and bounded by the SDK's timeouts).
        let upload_id = match self.staging.create_upload(&bucket, &key).await {
            Ok(id) => id,
            Err(error @ AwsError::NotFound(_)) => {
                return Err(S3Error::NoBucket { bucket, error }.into())
            }
            Err(error) => {
                return Err(S3Error::Upload {
                    bucket,
                    key,
                    error,
                    cleanup: String::new(),
                }
                .into())
            }
        };
        let staged = Staged {
            bucket,
            key,
            upload_id,
        };
        info!(bucket = %staged.bucket, key = %staged.key, part_size, "multipart upload started");

        let in_flight = parts_in_flight(part_size, o.parts_in_flight);
        let sent = send_parts(
            self.staging.clone(),
            &staged,
            file,
            image.size,
            part_size,
            in_flight,
            progress,
            cancel,
        )
        .await;
        let (parts, digests, bytes_read) = match sent {
            Ok(sent) if !cancel.is_cancelled() => sent,
            Ok(_) | Err(PartsFailure::Interrupted) => {
                let cleanup = self.abort(&staged, false).await;
                warn!("interrupted{cleanup}");
                return Err(UploadError::Interrupted);
            }
            Err(PartsFailure::Read(error)) => {
                let cleanup = self.abort(&staged, false).await;
                return Err(S3Error::Read {
                    path: image.path.clone(),
                    error,
                    cleanup,
                }
                .into());
            }
            Err(PartsFailure::Put { number, source }) => {
                let cleanup = self.abort(&staged, false).await;
                return Err(S3Error::Upload {
                    bucket: staged.bucket.clone(),
                    key: format!("{} (part {number})", staged.key),
                    error: source,
                    cleanup,
                }
                .into());
            }
        };
        if let Err(error) = self
            .staging
            .complete_upload(&staged.bucket, &staged.key, &staged.upload_id, &parts)
            .await
        {
            // The completion may have happened and its answer been lost: delete too.
            let cleanup = self.abort(&staged, true).await;
            return Err(S3Error::Upload {
                bucket: staged.bucket.clone(),
                key: staged.key.clone(),
                error,
                cleanup,
            }
            .into());
        }
        let blocks_total = image.size.div_ceil(BLOCK_SIZE);
        let digest = image_digest(image.size, digests);
        info!(bucket = %staged.bucket, key = %staged.key, parts = parts.len(), %digest, "uploaded; importing");
        if cancel.is_cancelled() {
            let cleanup = self.remove_object(&staged, false).await;
            warn!("interrupted{cleanup}");
            return Err(UploadError::Interrupted);
        }

        let snapshot_id = self.import(&staged, progress, cancel, started).await?;
        let cleanup = self.remove_object(&staged, false).await;
        info!(%snapshot_id, "imported{cleanup}");
        Ok(Uploaded {
            snapshot_id,
            digest,
            blocks_total,
            // S3 needs every byte: every block went up.
            blocks_uploaded: blocks_total,
            bytes_read,
        })
    }
}

impl<S: Staging, I: SnapshotImporter> S3Import<S, I> {
    /// Aborts the multipart upload (and deletes the object, when it may have been
    /// completed); says what it did.
    async fn abort(&self, staged: &Staged, delete: bool) -> String {
        let Staged {
            bucket,
            key,
            upload_id,
        } = staged;
        let mut said = match self.staging.abort_upload(bucket, key, upload_id).await {
            Ok(()) => format!("; aborted the multipart upload to s3://{bucket}/{key}"),
            Err(e) => format!(
                "; could not abort the multipart upload to s3://{bucket}/{key} ({e}): run `aws s3api abort-multipart-upload --bucket {bucket} --key {key} --upload-id {upload_id}`"
            ),
        };
        if delete {
            said.push_str(&self.remove_object(staged, false).await);
        }
        said
    }

    /// Deletes the staging object, unless `keep`; says what it did.
    async fn remove_object(&self, staged: &Staged, keep: bool) -> String {
        let Staged { bucket, key, .. } = staged;
        if keep {
            return format!("; kept s3://{bucket}/{key} (--keep-on-failure)");
        }
        match self.staging.delete_object(bucket, key).await {
            Ok(()) => format!("; deleted s3://{bucket}/{key}"),
            Err(e) => {
                let said = format!("; could not delete s3://{bucket}/{key} ({e}): run `aws s3 rm s3://{bucket}/{key}`");
                warn!("{}", &said[2..]);
                said
            }
        }
    }

    /// ImportSnapshot, then waits for the snapshot; cleans up the task and the object on
    /// failure.
    async fn import(
        &self,
        staged: &Staged,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        started: &mut Option<String>,
    ) -> Result<String, UploadError> {
        let o = &self.options;
        let keep = o.keep_on_failure;
        let spec = ImportSpec {
            bucket: staged.bucket.clone(),
            key: staged.key.clone(),
            description: o.description.clone(),
            encrypted: o.encrypted,
            kms_key_id: o.kms_key_id.clone(),
            client_token: o.client_token.clone(),
            tags: o.tags.clone(),
        };
        // Not raced against Ctrl-C, for the same reason as CreateMultipartUpload.
        let task_id = match self.importer.import(&spec).await {
            Ok(id) => id,
            Err(error) => {
                let hint = match &error {
                    AwsError::Denied { .. } => ROLE_HINT,
                    other => role_hint(&other.to_string()),
                };
                let cleanup = self.remove_object(staged, keep).await;
                return Err(S3Error::Import {
                    bucket: staged.bucket.clone(),
                    key: staged.key.clone(),
                    error,
                    hint,
                    cleanup,
                }
                .into());
            }
        };
        info!(%task_id, "ImportSnapshot started; it takes 10-20 minutes or more");
        progress.set_message(format!("importing ({task_id})"));
        let waited = wait_imported(
            &*self.importer,
            &task_id,
            o.import_deadline,
            o.missing_grace,
            cancel,
            started,
        )
        .await;
        let failure = match waited {
            Ok(snapshot_id) => return Ok(snapshot_id),
            Err(f) => f,
        };
        // A task that failed is gone already; one still running is cancelled, so that no
        // snapshot appears after this run, unless the caller wants it kept.
        let mut cleanup = String::new();
        if !matches!(failure, ImportWait::Failed(_)) {
            if keep {
                cleanup = format!("; left import task {task_id} running (--keep-on-failure)");
            } else {
                cleanup = match self.importer.cancel(&task_id).await {
                    Ok(()) => format!("; cancelled import task {task_id}"),
                    Err(e) => format!("; could not cancel import task {task_id} ({e}): run `aws ec2 cancel-import-task --import-task-id {task_id}`"),
                };
            }
        }
        cleanup.push_str(&self.remove_object(staged, keep).await);
        Err(match failure {
            ImportWait::Interrupted => {
                warn!("interrupted{cleanup}");
                UploadError::Interrupted
            }
            ImportWait::Timeout(waited) => S3Error::TaskTimeout {
                task_id,
                waited,
                cleanup,
            }
            .into(),
            ImportWait::Failed(message) => S3Error::TaskFailed {
                task_id,
                bucket: staged.bucket.clone(),
                key: staged.key.clone(),
                hint: role_hint(&message),
                message,
                cleanup,
            }
            .into(),
            ImportWait::Aws(source) => S3Error::TaskFailed {
                task_id,
                bucket: staged.bucket.clone(),
                key: staged.key.clone(),
                message: source.to_string(),
                hint: "",
                cleanup,
            }
            .into(),
        })
    }
}

/// Why the wait for an import ended without a snapshot.
#[derive(Debug)]
pub enum ImportWait {
    /// The task failed (or vanished); the reason.
    Failed(String),
    Timeout(Duration),
    Interrupted,
    /// DescribeImportSnapshotTasks is refused.
    Aws(AwsError),
}

/// Polls the import task until it completes; writes its snapshot id to `started` as soon
/// as the task names one.
pub async fn wait_imported<I: SnapshotImporter>(
    importer: &I,
    task_id: &str,
    deadline: Duration,
    missing_grace: Duration,
    cancel: &CancellationToken,
    started: &mut Option<String>,
) -> Result<String, ImportWait> {
    let t0 = Instant::now();
    // DescribeImportSnapshotTasks is rate limited per account and an import takes 10-20
    // minutes or more: poll after 5 s (a small disk in a quiet region), backing off to
    // 30 s, which delays a 15-minute import by at most half a minute.
    let mut delay = Duration::from_secs(5);
    let mut last = None;
    loop {
        let seen = tokio::select! {
            r = importer.task(task_id) => r,
            _ = cancel.cancelled() => return Err(ImportWait::Interrupted),
        };
        match seen {
            Ok(Some(task)) => {
                if let Some(s) = task.snapshot_id.as_ref().filter(|s| !s.is_empty()) {
                    if started.as_ref() != Some(s) {
                        info!(%task_id, snapshot_id = %s, "the import names its snapshot");
                        *started = Some(s.clone());
                    }
                }
                match step(&task) {
                    Step::Done(s) => return Ok(s),
                    Step::Failed(m) => return Err(ImportWait::Failed(m)),
                    Step::Wait => {
                        let now = (task.message.clone(), task.progress.clone());
                        if last.as_ref() != Some(&now) {
                            info!(%task_id, status = %task.status, message = ?now.0, progress = ?now.1, "importing");
                            last = Some(now);
                        }
                    }
                }
            }
            Ok(None) if t0.elapsed() > missing_grace => {
                return Err(ImportWait::Failed(format!(
                    "DescribeImportSnapshotTasks has not listed it for {} s",
                    t0.elapsed().as_secs()
                )))
            }
            // EC2 is eventually consistent: a new task can take a moment to be listed.
            Ok(None) => debug!(%task_id, "the import task is not listed yet"),
            Err(e @ AwsError::Denied { .. }) => return Err(ImportWait::Aws(e)),
            Err(e) => warn!(%task_id, error = %e, "cannot read the import task, retrying"),
        }
        if t0.elapsed() + delay > deadline {
            return Err(ImportWait::Timeout(t0.elapsed()));
        }
        tokio::select! {
            _ = tokio::time::sleep(jitter(delay)) => {}
            _ = cancel.cancelled() => return Err(ImportWait::Interrupted),
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// One part, read.
struct Part {
    number: i32,
    data: Bytes,
}

enum PartsFailure {
    Interrupted,
    Read(io::Error),
    Put { number: i32, source: AwsError },
}

/// A part S3 accepted, with the digests of its 512 KiB blocks.
struct SentPart {
    done: CompletedPart,
    blocks: Vec<BlockDigest>,
}

/// Reads the parts on a thread and uploads up to `in_flight` at once; returns the parts
/// in order, every block's digest in order, and the bytes read.
#[allow(clippy::too_many_arguments)]
async fn send_parts<S: Staging>(
    staging: Arc<S>,
    staged: &Staged,
    file: std::fs::File,
    size: u64,
    part_size: u64,
    in_flight: usize,
    progress: &ProgressBar,
    cancel: &CancellationToken,
) -> Result<(Vec<CompletedPart>, Vec<BlockDigest>, u64), PartsFailure> {
    // Capacity 1: one part waits while `in_flight` are sent (the memory budget counts it).
    let (tx, rx) = mpsc::channel::<Part>(1);
    let reader = std::thread::spawn(move || read_parts(&file, size, part_size, &tx));
    let stop = cancel.child_token();
    let rx = Arc::new(Mutex::new(rx));
    let staged = Arc::new(staged.clone());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        workers.spawn(part_worker(
            staging.clone(),
            staged.clone(),
            rx.clone(),
            stop.clone(),
            progress.clone(),
        ));
    }
    let mut sent = Vec::new();
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(done)) => sent.extend(done),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                stop.cancel();
            }
            Err(e) => {
                failure.get_or_insert(PartsFailure::Read(io::Error::other(format!(
                    "a part worker failed: {e}"
                ))));
                stop.cancel();
            }
        }
    }
    // The workers are gone, so the reader's sends fail and it stops.
    drop(rx);
    let read = reader.join().expect("the reader thread does not panic");
    if cancel.is_cancelled() {
        return Err(PartsFailure::Interrupted);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let bytes_read = read.map_err(PartsFailure::Read)?;
    sent.sort_by_key(|p| p.done.number);
    let expected = parts(size, part_size).len();
    if sent.len() != expected || sent.iter().zip(1..).any(|(p, n)| p.done.number != n) {
        return Err(PartsFailure::Read(io::Error::other(format!(
            "{} of {expected} parts were sent",
            sent.len()
        ))));
    }
    let mut digests = Vec::with_capacity(size.div_ceil(BLOCK_SIZE) as usize);
    let mut done = Vec::with_capacity(sent.len());
    for p in sent {
        digests.extend(p.blocks);
        done.push(p.done);
    }
    Ok((done, digests, bytes_read))
}

async fn part_worker<S: Staging>(
    staging: Arc<S>,
    staged: Arc<Staged>,
    rx: Arc<Mutex<mpsc::Receiver<Part>>>,
    stop: CancellationToken,
    progress: ProgressBar,
) -> Result<Vec<SentPart>, PartsFailure> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut done = Vec::new();
    loop {
        let part = tokio::select! {
            part = async { rx.lock().await.recv().await } => part,
            _ = stop.cancelled() => return Ok(done),
        };
        let Some(part) = part else { return Ok(done) };
        let len = part.data.len() as u64;
        // Hashing 64 MiB takes a core for a moment: off the async workers, and in parallel
        // for the parts in flight.
        let data = part.data.clone();
        let (blocks, sha256) = tokio::task::spawn_blocking(move || hash_part(&data))
            .await
            .map_err(|e| PartsFailure::Read(io::Error::other(format!("hashing failed: {e}"))))?;
        let sha256_b64 = b64.encode(sha256);
        let put = staging.upload_part(
            &staged.bucket,
            &staged.key,
            &staged.upload_id,
            part.number,
            part.data,
            sha256_b64.clone(),
        );
        let etag = tokio::select! {
            r = put => r.map_err(|source| PartsFailure::Put { number: part.number, source })?,
            _ = stop.cancelled() => return Ok(done),
        };
        debug!(number = part.number, len, "part uploaded");
        progress.inc(len);
        done.push(SentPart {
            done: CompletedPart {
                number: part.number,
                etag,
                sha256_b64,
            },
            blocks,
        });
    }
}

/// The part's 512 KiB blocks' digests (the image's last block zero-padded, as `digest`
/// defines it) and the part's SHA-256 (S3's checksum).
fn hash_part(data: &[u8]) -> (Vec<BlockDigest>, [u8; 32]) {
    let blocks = data
        .chunks(BLOCK_SIZE as usize)
        .map(|b| {
            if is_zero(b) {
                zero_block_digest()
            } else if b.len() < BLOCK_SIZE as usize {
                let mut padded = vec![0u8; BLOCK_SIZE as usize];
                padded[..b.len()].copy_from_slice(b);
                block_digest(&padded)
            } else {
                block_digest(b)
            }
        })
        .collect();
    (blocks, Sha256::digest(data).into())
}

/// Reads the image part by part (holes are not read: their bytes stay zero) and sends the
/// parts in order. Returns the bytes actually read.
fn read_parts(
    file: &std::fs::File,
    size: u64,
    part_size: u64,
    tx: &mpsc::Sender<Part>,
) -> io::Result<u64> {
    let blocks = plan(size, &data_extents(file, size)?);
    let per_part = (part_size / BLOCK_SIZE) as usize;
    let mut bytes_read = 0;
    for (i, (chunk, range)) in blocks
        .chunks(per_part)
        .zip(parts(size, part_size))
        .enumerate()
    {
        let mut buf = BytesMut::zeroed((range.end - range.start) as usize);
        for planned in chunk {
            if let Planned::Read { index, len } = *planned {
                let at = (index * BLOCK_SIZE - range.start) as usize;
                file.read_exact_at(&mut buf[at..at + len as usize], index * BLOCK_SIZE)?;
                bytes_read += len;
            }
        }
        let number = i32::try_from(i + 1).expect("S3 allows 10,000 parts");
        if tx
            .blocking_send(Part {
                number,
                data: buf.freeze(),
            })
            .is_err()
        {
            // The upload stopped (an error or Ctrl-C): nothing more to read.
            break;
        }
    }
    Ok(bytes_read)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::image::digest::digest_file;
    use crate::image::info::{Arch, BootMode};

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn part_sizes_fit_s3s_limits() {
        assert_eq!(part_size(3 * MIB, DEFAULT_PART_SIZE).unwrap(), 64 * MIB);
        assert_eq!(
            part_size(625 * 1024 * MIB, DEFAULT_PART_SIZE).unwrap(),
            64 * MIB
        );
        // Below S3's minimum part size, and not a whole number of blocks: clamped, rounded.
        assert_eq!(part_size(100 * MIB, 1).unwrap(), MIN_PART_SIZE);
        assert_eq!(part_size(100 * MIB, 5 * MIB + 1).unwrap(), 5 * MIB + B);
        for size in [
            625 * 1024 * MIB + 1,
            2 * 1024 * 1024 * MIB + 12_345,
            MAX_OBJECT_SIZE,
        ] {
            let p = part_size(size, DEFAULT_PART_SIZE).unwrap();
            assert_eq!(p % B, 0);
            assert!((DEFAULT_PART_SIZE..=MAX_PART_SIZE).contains(&p));
            assert!(size.div_ceil(p) <= MAX_PARTS, "{size}: {p}");
        }
        assert_eq!(part_size(MAX_OBJECT_SIZE + 1, DEFAULT_PART_SIZE), None);
        assert_eq!(
            parts(10 * MIB + 7, 5 * MIB),
            vec![0..5 * MIB, 5 * MIB..10 * MIB, 10 * MIB..10 * MIB + 7]
        );
        assert_eq!(parts(5 * MIB, 5 * MIB), vec![0..5 * MIB]);
        assert_eq!(parts_in_flight(64 * MIB, 64), 4);
        assert_eq!(parts_in_flight(64 * MIB, 2), 2);
        assert_eq!(parts_in_flight(5 * 1024 * MIB, 64), 1);
        assert_eq!(parts_in_flight(5 * MIB, 0), 1);
    }

    #[test]
    fn task_states() {
        let t = |status: &str, message: Option<&str>, snap: Option<&str>| TaskStatus {
            status: status.into(),
            message: message.map(Into::into),
            progress: None,
            snapshot_id: snap.map(Into::into),
        };
        assert_eq!(step(&t("active", Some("pending"), None)), Step::Wait);
        assert_eq!(step(&t("active", None, Some("snap-1"))), Step::Wait);
        assert_eq!(step(&t("", None, None)), Step::Wait);
        assert_eq!(
            step(&t("completed", None, Some("snap-1"))),
            Step::Done("snap-1".into())
        );
        assert!(matches!(step(&t("completed", None, None)), Step::Failed(_)));
        assert_eq!(
            step(&t(
                "deleted",
                Some("ClientError: Disk validation failed"),
                None
            )),
            Step::Failed("ClientError: Disk validation failed".into())
        );
        assert_eq!(
            step(&t("deleting", None, None)),
            Step::Failed("its status is deleting".into())
        );
        assert!(
            role_hint("ServerError: The service role vmimport does not exist").contains("vmimport")
        );
        assert!(role_hint("ClientError: Access Denied to the S3 bucket").contains("vmimport"));
        assert_eq!(role_hint("ClientError: Disk validation failed"), "");
    }

    #[test]
    fn object_keys_are_unique_and_tidy() {
        let image = ImageSource {
            path: "/x".into(),
            size: 1,
            boot_mode: BootMode::Uefi,
            arch: Arch::Arm64,
            label: "nixos 26.05/x".into(),
            store_path: None,
        };
        let a = object_key("p/", &image);
        assert!(a.starts_with("p/nixos-26.05-x-aarch64-linux-"), "{a}");
        assert!(a.ends_with(".raw"));
        assert_ne!(a, object_key("p/", &image));
    }

    /// S3 and EC2's import in memory, with fault injection.
    #[derive(Default)]
    struct Fake {
        state: StdMutex<FakeState>,
        /// Fail UploadPart of this part number.
        fail_part: Option<i32>,
        /// Cancel this token when this part is uploaded.
        cancel_at_part: Option<(i32, CancellationToken)>,
        no_bucket: bool,
        /// The import task's answers, one per DescribeImportSnapshotTasks (the last repeats).
        answers: Vec<Option<TaskStatus>>,
        refuse_import: Option<AwsError>,
    }

    #[derive(Default)]
    struct FakeState {
        uploads: BTreeMap<String, (String, BTreeMap<i32, Bytes>)>,
        objects: BTreeMap<String, Bytes>,
        calls: Vec<String>,
        imported: Vec<(ImportSpec, Bytes)>,
        polls: usize,
        cancelled: Vec<String>,
    }

    impl Fake {
        fn calls(&self) -> Vec<String> {
            self.state.lock().unwrap().calls.clone()
        }
        fn log(&self, call: impl Into<String>) {
            self.state.lock().unwrap().calls.push(call.into());
        }
    }

    impl Staging for Fake {
        async fn create_upload(&self, bucket: &str, key: &str) -> Result<String, AwsError> {
            self.log("create");
            if self.no_bucket {
                return Err(AwsError::NotFound(format!(
                    "s3:PutObject: NoSuchBucket: {bucket}"
                )));
            }
            let mut s = self.state.lock().unwrap();
            let id = format!("upload-{}", s.uploads.len());
            s.uploads
                .insert(id.clone(), (format!("{bucket}/{key}"), BTreeMap::new()));
            Ok(id)
        }

        async fn upload_part(
            &self,
            _bucket: &str,
            _key: &str,
            upload_id: &str,
            number: i32,
            data: Bytes,
            sha256_b64: String,
        ) -> Result<String, AwsError> {
            self.log(format!("part {number}"));
            if let Some((n, token)) = &self.cancel_at_part {
                if *n == number {
                    token.cancel();
                }
            }
            if self.fail_part == Some(number) {
                return Err(AwsError::Other {
                    action: "s3:PutObject",
                    message: "InternalError".into(),
                });
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            if b64.encode(Sha256::digest(&data)) != sha256_b64 {
                return Err(AwsError::Other {
                    action: "s3:PutObject",
                    message: "BadDigest".into(),
                });
            }
            let mut s = self.state.lock().unwrap();
            let upload = s.uploads.get_mut(upload_id).expect("a live upload");
            upload.1.insert(number, data);
            Ok(format!("\"etag-{number}\""))
        }

        async fn complete_upload(
            &self,
            _bucket: &str,
            _key: &str,
            upload_id: &str,
            parts: &[CompletedPart],
        ) -> Result<(), AwsError> {
            self.log("complete");
            let mut s = self.state.lock().unwrap();
            let (object, stored) = s.uploads.remove(upload_id).expect("a live upload");
            let mut body = Vec::new();
            for (p, n) in parts.iter().zip(1..) {
                assert_eq!(p.number, n);
                assert_eq!(p.etag, format!("\"etag-{n}\""));
                let b64 = base64::engine::general_purpose::STANDARD;
                assert_eq!(p.sha256_b64, b64.encode(Sha256::digest(&stored[&n])));
                body.extend_from_slice(&stored[&n]);
            }
            assert_eq!(parts.len(), stored.len());
            s.objects.insert(object, body.into());
            Ok(())
        }

        async fn abort_upload(
            &self,
            _bucket: &str,
            _key: &str,
            upload_id: &str,
        ) -> Result<(), AwsError> {
            self.log("abort");
            self.state.lock().unwrap().uploads.remove(upload_id);
            Ok(())
        }

        async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), AwsError> {
            self.log("delete");
            self.state
                .lock()
                .unwrap()
                .objects
                .remove(&format!("{bucket}/{key}"));
            Ok(())
        }
    }

    impl SnapshotImporter for Fake {
        async fn import(&self, spec: &ImportSpec) -> Result<String, AwsError> {
            self.log("import");
            if let Some(e) = &self.refuse_import {
                return Err(e.clone());
            }
            let mut s = self.state.lock().unwrap();
            let object = s
                .objects
                .get(&format!("{}/{}", spec.bucket, spec.key))
                .expect("the object exists when the import starts")
                .clone();
            s.imported.push((spec.clone(), object));
            Ok("import-snap-1".into())
        }

        async fn task(&self, task_id: &str) -> Result<Option<TaskStatus>, AwsError> {
            assert_eq!(task_id, "import-snap-1");
            let mut s = self.state.lock().unwrap();
            let i = s.polls.min(self.answers.len() - 1);
            s.polls += 1;
            Ok(self.answers[i].clone())
        }

        async fn cancel(&self, task_id: &str) -> Result<(), AwsError> {
            self.log("cancel-task");
            self.state
                .lock()
                .unwrap()
                .cancelled
                .push(task_id.to_owned());
            Ok(())
        }
    }

    fn active(message: &str, snapshot: Option<&str>) -> Option<TaskStatus> {
        Some(TaskStatus {
            status: "active".into(),
            message: Some(message.into()),
            progress: Some("30".into()),
            snapshot_id: snapshot.map(Into::into),
        })
    }

    fn completed() -> Option<TaskStatus> {
        Some(TaskStatus {
            status: "completed".into(),
            message: None,
            progress: None,
            snapshot_id: Some("snap-1".into()),
        })
    }

    /// A 12 MiB + 100 B image (three 5 MiB parts), data in two places, holes elsewhere.
    fn image(dir: &std::path::Path) -> ImageSource {
        let path = dir.join("disk.raw");
        let file = std::fs::File::create(&path).unwrap();
        let size = 12 * MIB + 100;
        file.set_len(size).unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 1) as u8).collect();
        file.write_all_at(&data, 5 * MIB - 1000).unwrap();
        file.write_all_at(b"tail", size - 4).unwrap();
        ImageSource::from_file(&path, BootMode::Uefi, Arch::X86_64, "nixos".into(), None).unwrap()
    }

    fn uploader(fake: Fake, keep: bool) -> S3Import<Fake, Fake> {
        let fake = Arc::new(fake);
        S3Import {
            staging: fake.clone(),
            importer: fake,
            options: S3Options {
                bucket: "staging".into(),
                part_size: MIN_PART_SIZE,
                client_token: "token".into(),
                tags: vec![("amictl:managed-by".into(), "amictl".into())],
                keep_on_failure: keep,
                import_deadline: Duration::from_secs(600),
                ..S3Options::default()
            },
        }
    }

    async fn run(
        u: &S3Import<Fake, Fake>,
        image: &ImageSource,
    ) -> (Result<Uploaded, UploadError>, Option<String>, ProgressBar) {
        let progress = ProgressBar::hidden();
        progress.set_length(image.size);
        let mut started = None;
        let r = u
            .upload(image, &progress, &CancellationToken::new(), &mut started)
            .await;
        (r, started, progress)
    }

    #[tokio::test(start_paused = true)]
    async fn uploads_in_checked_parts_imports_and_deletes_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                answers: vec![
                    None,
                    active("pending", None),
                    active("converting", Some("snap-1")),
                    completed(),
                ],
                ..Fake::default()
            },
            false,
        );
        let (r, started, progress) = run(&u, &image).await;
        let up = r.unwrap();
        assert_eq!(up.snapshot_id, "snap-1");
        assert_eq!(started.as_deref(), Some("snap-1"));
        assert_eq!(up.digest, digest_file(&image.path).unwrap());
        assert_eq!(up.blocks_total, 25);
        assert_eq!(up.blocks_uploaded, 25);
        // Only the two blocks with data were read; the holes stayed holes.
        assert_eq!(up.bytes_read, 2 * B + 100);
        assert_eq!(progress.position(), image.size);

        let s = u.staging.state.lock().unwrap();
        let (spec, object) = &s.imported[0];
        assert_eq!(object.as_ref(), std::fs::read(&image.path).unwrap());
        assert_eq!(spec.bucket, "staging");
        assert!(spec.key.starts_with("amictl/nixos-x86_64-linux-"));
        assert_eq!(spec.client_token, "token");
        assert!(s.objects.is_empty(), "the staging object is deleted");
        assert!(s.uploads.is_empty());
        assert_eq!(s.polls, 4);
        let calls = s.calls.clone();
        drop(s);
        let mut parts: Vec<_> = calls.iter().filter(|c| c.starts_with("part")).collect();
        parts.sort();
        assert_eq!(parts, ["part 1", "part 2", "part 3"]);
        assert_eq!(calls.last().map(String::as_str), Some("delete"));
        assert!(!calls.contains(&"abort".to_owned()));
    }

    #[tokio::test]
    async fn a_missing_bucket_is_named_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                no_bucket: true,
                ..Fake::default()
            },
            false,
        );
        let (r, started, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("\"staging\"") && e.contains("does not exist"),
            "{e}"
        );
        assert!(started.is_none());
        assert_eq!(u.staging.calls(), ["create"]);
    }

    #[tokio::test]
    async fn a_failed_part_aborts_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                fail_part: Some(2),
                answers: vec![completed()],
                ..Fake::default()
            },
            false,
        );
        let (r, started, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("part 2") && e.contains("aborted the multipart upload"),
            "{e}"
        );
        assert!(started.is_none());
        let calls = u.staging.calls();
        assert_eq!(calls.last().map(String::as_str), Some("abort"));
        assert!(!calls.iter().any(|c| c == "complete" || c == "import"));
        assert!(u.staging.state.lock().unwrap().uploads.is_empty());
    }

    #[tokio::test]
    async fn ctrl_c_during_the_upload_aborts_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let cancel = CancellationToken::new();
        let u = uploader(
            Fake {
                cancel_at_part: Some((1, cancel.clone())),
                answers: vec![completed()],
                ..Fake::default()
            },
            false,
        );
        let mut started = None;
        let r = u
            .upload(&image, &ProgressBar::hidden(), &cancel, &mut started)
            .await;
        assert!(matches!(r, Err(UploadError::Interrupted)), "{r:?}");
        let calls = u.staging.calls();
        assert_eq!(calls.last().map(String::as_str), Some("abort"));
        assert!(!calls.iter().any(|c| c == "complete" || c == "import"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_import_names_the_reason_and_the_role_and_deletes_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let failed = Some(TaskStatus {
            status: "deleted".into(),
            message: Some("ClientError: The service role vmimport provided does not exist or does not have sufficient permissions".into()),
            progress: None,
            snapshot_id: None,
        });
        let u = uploader(
            Fake {
                answers: vec![active("pending", None), failed.clone()],
                ..Fake::default()
            },
            false,
        );
        let (r, started, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("import task import-snap-1")
                && e.contains("does not exist or does not have"),
            "{e}"
        );
        assert!(e.contains("IAM role named vmimport"), "{e}");
        assert!(e.contains("deleted s3://staging/amictl/"), "{e}");
        assert!(started.is_none());
        {
            let s = u.staging.state.lock().unwrap();
            assert!(s.objects.is_empty());
            assert!(s.cancelled.is_empty(), "a failed task is gone already");
        }

        // --keep-on-failure keeps the object for inspection.
        let u = uploader(
            Fake {
                answers: vec![failed],
                ..Fake::default()
            },
            true,
        );
        let (r, _, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("kept s3://staging/amictl/"), "{e}");
        assert_eq!(u.staging.state.lock().unwrap().objects.len(), 1);
    }

    #[tokio::test]
    async fn a_refused_import_mentions_the_service_role() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                refuse_import: Some(AwsError::Denied {
                    action: "ec2:ImportSnapshot",
                    message: "You are not authorized to perform this operation.".into(),
                }),
                answers: vec![completed()],
                ..Fake::default()
            },
            false,
        );
        let (r, _, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("ec2:ImportSnapshot") && e.contains("vmimport"),
            "{e}"
        );
        assert!(e.contains("deleted s3://staging/"), "{e}");
        assert!(u.staging.state.lock().unwrap().objects.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_import_times_out_and_is_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                answers: vec![active("converting", Some("snap-9"))],
                ..Fake::default()
            },
            false,
        );
        let t0 = Instant::now();
        let (r, started, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("did not complete within") && e.contains("--wait-timeout"),
            "{e}"
        );
        assert!(e.contains("cancelled import task import-snap-1"), "{e}");
        // The snapshot it named is the caller's to delete.
        assert_eq!(started.as_deref(), Some("snap-9"));
        assert!(t0.elapsed() <= Duration::from_secs(600));
        let s = u.staging.state.lock().unwrap();
        assert_eq!(s.cancelled, ["import-snap-1"]);
        assert!(s.objects.is_empty());
        // 5, 10, 20, then every 30 s (jittered down to half): a few dozen polls, not hundreds.
        assert!(s.polls > 15 && s.polls < 80, "{}", s.polls);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_never_shows_up_fails_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let image = image(dir.path());
        let u = uploader(
            Fake {
                answers: vec![None],
                ..Fake::default()
            },
            false,
        );
        let (r, _, _) = run(&u, &image).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("has not listed it"), "{e}");
        assert!(u.staging.state.lock().unwrap().objects.is_empty());
    }
}
