//! The AWS side of `--via s3`: S3's multipart upload calls and EC2's ImportSnapshot. Thin
//! on purpose: every decision lives in `s3`.

use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, SnapshotDiskContainer, Tag, TagSpecification, UserBucket};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload};
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;

use crate::aws::{classify, error_code, AwsError};

use super::s3::{CompletedPart, ImportSpec, SnapshotImporter, Staging, TaskStatus};

/// S3, for the staging object.
#[derive(Clone)]
pub struct AwsStaging {
    pub s3: aws_sdk_s3::Client,
}

impl AwsStaging {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        AwsStaging {
            s3: aws_sdk_s3::Client::new(config),
        }
    }
}

/// EC2's import calls.
#[derive(Clone)]
pub struct AwsImporter {
    pub ec2: aws_sdk_ec2::Client,
}

impl AwsImporter {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        AwsImporter {
            ec2: aws_sdk_ec2::Client::new(config),
        }
    }
}

/// `classify`, plus S3's own codes: a missing bucket or upload is `NotFound`, and a bucket
/// in another region says so.
fn s3_error<E, R>(action: &'static str, err: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let message = err.message().unwrap_or_default().to_owned();
    match error_code(&err) {
        Some(c @ ("NoSuchBucket" | "NoSuchUpload" | "NoSuchKey")) => {
            AwsError::NotFound(format!("{action}: {c}: {message}"))
        }
        Some(c @ ("PermanentRedirect" | "AuthorizationHeaderMalformed")) => AwsError::Other {
            action,
            message: format!("{c}: {message} (the bucket is in another region; ImportSnapshot reads only a bucket in its own region: pass --region or another --bucket)"),
        },
        _ => classify(action, err),
    }
}

/// One part's request timeouts. The clients' 60 s attempt timeout fits a 512 KiB block,
/// not a 64 MiB part: an attempt gets a minute plus the part at 256 KiB/s (a slow uplink
/// shared by the parts in flight; 64 MiB gets five minutes), the call with the SDK's
/// retries three attempts. A connection that stalls is caught sooner by the SDK's
/// stalled-stream protection.
pub fn part_timeouts(base: Option<&TimeoutConfig>, len: u64) -> TimeoutConfig {
    let attempt = Duration::from_secs(60 + len / (256 * 1024));
    base.map(TimeoutConfig::to_builder)
        .unwrap_or_default()
        .operation_attempt_timeout(attempt)
        .operation_timeout(attempt * 3)
        .build()
}

impl Staging for AwsStaging {
    async fn create_upload(&self, bucket: &str, key: &str) -> Result<String, AwsError> {
        let out = self
            .s3
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .content_type("application/octet-stream")
            .send()
            .await
            .map_err(|e| s3_error("s3:PutObject", e))?;
        out.upload_id.ok_or_else(|| AwsError::Other {
            action: "s3:PutObject",
            message: "CreateMultipartUpload answered no UploadId".into(),
        })
    }

    async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
        sha256_b64: String,
    ) -> Result<String, AwsError> {
        let timeouts = part_timeouts(self.s3.config().timeout_config(), data.len() as u64);
        let out = self
            .s3
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(data.len() as i64)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            // Given, so the SDK sends it instead of computing another: S3 refuses the part
            // unless the bytes it got have this SHA-256.
            .checksum_sha256(sha256_b64)
            .body(ByteStream::from(data))
            .customize()
            .config_override(aws_sdk_s3::config::Builder::default().timeout_config(timeouts))
            .send()
            .await
            .map_err(|e| s3_error("s3:PutObject", e))?;
        out.e_tag.ok_or_else(|| AwsError::Other {
            action: "s3:PutObject",
            message: format!("UploadPart {number} answered no ETag"),
        })
    }

    async fn complete_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<(), AwsError> {
        let parts = parts
            .iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(&p.etag)
                    .checksum_sha256(&p.sha256_b64)
                    .build()
            })
            .collect();
        self.s3
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error("s3:PutObject", e))?;
        Ok(())
    }

    async fn abort_upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<(), AwsError> {
        match self
            .s3
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| s3_error("s3:AbortMultipartUpload", e))
        {
            Ok(_) | Err(AwsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), AwsError> {
        match self
            .s3
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error("s3:DeleteObject", e))
        {
            Ok(_) | Err(AwsError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl SnapshotImporter for AwsImporter {
    async fn import(&self, spec: &ImportSpec) -> Result<String, AwsError> {
        let container = SnapshotDiskContainer::builder()
            .format("RAW")
            .description(&spec.description)
            .user_bucket(
                UserBucket::builder()
                    .s3_bucket(&spec.bucket)
                    .s3_key(&spec.key)
                    .build(),
            )
            .build();
        let tags = (!spec.tags.is_empty()).then(|| {
            TagSpecification::builder()
                .resource_type(ResourceType::ImportSnapshotTask)
                .set_tags(Some(
                    spec.tags
                        .iter()
                        .map(|(k, v)| Tag::builder().key(k).value(v).build())
                        .collect(),
                ))
                .build()
        });
        let out = self
            .ec2
            .import_snapshot()
            .description(&spec.description)
            .disk_container(container)
            .set_encrypted(spec.encrypted.then_some(true))
            .set_kms_key_id(spec.kms_key_id.clone())
            .client_token(&spec.client_token)
            .set_tag_specifications(tags.map(|t| vec![t]))
            .send()
            .await
            .map_err(|e| classify("ec2:ImportSnapshot", e))?;
        out.import_task_id.ok_or_else(|| AwsError::Other {
            action: "ec2:ImportSnapshot",
            message: "the answer has no ImportTaskId".into(),
        })
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskStatus>, AwsError> {
        let out = match self
            .ec2
            .describe_import_snapshot_tasks()
            .import_task_ids(task_id)
            .send()
            .await
        {
            Ok(out) => out,
            // A task not listed yet (eventual consistency) is waited for, within a grace.
            Err(e)
                if error_code(&e).is_some_and(|c| {
                    c.starts_with("InvalidConversionTaskId") || c.ends_with("NotFound")
                }) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(classify("ec2:DescribeImportSnapshotTasks", e)),
        };
        let Some(task) = out
            .import_snapshot_tasks()
            .iter()
            .find(|t| t.import_task_id() == Some(task_id))
        else {
            return Ok(None);
        };
        let detail = task.snapshot_task_detail();
        let text = |f: fn(&aws_sdk_ec2::types::SnapshotTaskDetail) -> Option<&str>| {
            detail.and_then(f).map(str::to_owned)
        };
        Ok(Some(TaskStatus {
            status: text(|d| d.status()).unwrap_or_default(),
            message: text(|d| d.status_message()),
            progress: text(|d| d.progress()),
            snapshot_id: text(|d| d.snapshot_id()).filter(|s| !s.is_empty()),
        }))
    }

    async fn cancel(&self, task_id: &str) -> Result<(), AwsError> {
        self.ec2
            .cancel_import_task()
            .import_task_id(task_id)
            .cancel_reason("amictl: interrupted or timed out")
            .send()
            .await
            .map_err(|e| classify("ec2:CancelImportTask", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_get_time_in_proportion_and_keep_the_connect_timeout() {
        let base = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .operation_attempt_timeout(Duration::from_secs(60))
            .build();
        let t = part_timeouts(Some(&base), 64 << 20);
        assert_eq!(t.connect_timeout(), Some(Duration::from_secs(10)));
        assert_eq!(
            t.operation_attempt_timeout(),
            Some(Duration::from_secs(60 + 256))
        );
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(3 * 316)));
        assert_eq!(
            part_timeouts(None, 5 << 20).operation_attempt_timeout(),
            Some(Duration::from_secs(80))
        );
    }
}
