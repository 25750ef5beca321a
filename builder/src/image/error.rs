//! How a publish's upload fails, by either path: the EBS direct APIs (`upload`) or S3 and
//! ImportSnapshot (`s3`). Both report `UploadError`; its own module, so that neither
//! uploader depends on the other.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::aws::AwsError;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} changed while it was uploaded ({what}): the snapshot would not hold the image; publish it again once nothing writes to it", path.display())]
    Changed { path: PathBuf, what: String },
    #[error("{snapshot_id} got {uploaded} blocks where the plan has {planned}: not completing it")]
    BlockCount {
        snapshot_id: String,
        planned: u64,
        uploaded: u64,
    },
    #[error("starting the snapshot: {0}")]
    Start(AwsError),
    #[error("uploading block {index} of {snapshot_id}: {source}")]
    Put {
        snapshot_id: String,
        index: u64,
        source: AwsError,
    },
    #[error("completing {snapshot_id}: {source}")]
    Complete {
        snapshot_id: String,
        source: AwsError,
    },
    #[error("{snapshot_id} failed in EBS: {message}")]
    Failed {
        snapshot_id: String,
        message: String,
    },
    #[error("{snapshot_id} was not completed within {} s; it may still complete: look at it with `aws ec2 describe-snapshots --snapshot-ids {snapshot_id}`", .waited.as_secs())]
    CompletionTimeout {
        snapshot_id: String,
        waited: Duration,
    },
    #[error("interrupted")]
    Interrupted,
    /// `--via s3`: staging in S3 or ImportSnapshot.
    #[error(transparent)]
    S3(Box<S3Error>),
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("the image is {size} bytes, more than an S3 object can hold (5 TiB): use --via ebs")]
    TooLarge { size: u64 },
    #[error("S3 bucket {bucket:?} does not exist or these credentials cannot see it ({error}); create it in the region of the import, or pass another --bucket")]
    NoBucket { bucket: String, error: AwsError },
    #[error("uploading s3://{bucket}/{key}: {error}{cleanup}")]
    Upload {
        bucket: String,
        key: String,
        error: AwsError,
        cleanup: String,
    },
    #[error("reading {}: {error}{cleanup}", path.display())]
    Read {
        path: PathBuf,
        error: io::Error,
        cleanup: String,
    },
    #[error("ImportSnapshot of s3://{bucket}/{key}: {error}{hint}{cleanup}")]
    Import {
        bucket: String,
        key: String,
        error: AwsError,
        hint: &'static str,
        cleanup: String,
    },
    #[error("import task {task_id} (s3://{bucket}/{key}) failed: {message}{hint}{cleanup}")]
    TaskFailed {
        task_id: String,
        bucket: String,
        key: String,
        message: String,
        hint: &'static str,
        cleanup: String,
    },
    #[error("import task {task_id} did not complete within {} s (raise --wait-timeout: ImportSnapshot takes 10-20 minutes or more){cleanup}", .waited.as_secs())]
    TaskTimeout {
        task_id: String,
        waited: Duration,
        cleanup: String,
    },
}

impl From<S3Error> for UploadError {
    fn from(e: S3Error) -> Self {
        UploadError::S3(Box::new(e))
    }
}
