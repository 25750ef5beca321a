//! The lease in S3: one object under `amictl/locks/` in the stack's bucket, written with
//! S3's conditional writes (`If-None-Match: *` and `If-Match` on PutObject, since 2024) and
//! deleted with a conditional DeleteObject (general purpose buckets, since September 2025).
//! S3 answers a failed precondition with 412 PreconditionFailed, an `If-Match` on a missing
//! key with 404 NoSuchKey, and two conditional writes that race with 409
//! ConditionalRequestConflict, which is retried. A conditional delete also needs
//! s3:GetObject on the key, and a GetObject of a missing key is 404 only with
//! s3:ListBucket on the bucket (403 without): the IAM policy grants both.

use aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{LeaseStore, StoreError};
use crate::aws::{classify, error_code};

/// Where fleet leases live in the bucket; the IAM policy grants this prefix only.
pub const KEY_PREFIX: &str = "amictl/locks/";

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
}

impl S3Store {
    pub fn new(config: &aws_config::SdkConfig, bucket: &str, fleet: &str) -> S3Store {
        S3Store {
            client: aws_sdk_s3::Client::new(config),
            bucket: bucket.to_owned(),
            key: key(fleet),
        }
    }
}

impl S3Store {
    /// PutObject of the lease under `precondition`: its ETag.
    async fn put(
        &self,
        body: Vec<u8>,
        precondition: impl FnOnce(PutObjectFluentBuilder) -> PutObjectFluentBuilder,
    ) -> Result<String, StoreError> {
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_type("application/json")
            .body(ByteStream::from(body));
        let out = precondition(put)
            .send()
            .await
            .map_err(|e| store_error("s3:PutObject", e))?;
        etag(out.e_tag())
    }
}

/// The fleet's key: its name, percent-encoded where S3 keys would be awkward (pure).
pub fn key(fleet: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');
    format!("{KEY_PREFIX}{}.json", utf8_percent_encode(fleet, KEEP))
}

/// S3's answers to a conditional request, by code.
fn store_error<E, R>(action: &'static str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match error_code(&err) {
        Some("PreconditionFailed") => StoreError::Changed,
        Some("NoSuchKey") => StoreError::Gone,
        Some("ConditionalRequestConflict") => StoreError::Conflict,
        Some("NoSuchBucket") => StoreError::Other(anyhow::anyhow!(
            "{action}: the bucket does not exist (deploy the stack, or name another with --lock-bucket)"
        )),
        _ => StoreError::Other(classify(action, err).into()),
    }
}

impl LeaseStore for S3Store {
    async fn create(&self, body: Vec<u8>) -> Result<String, StoreError> {
        self.put(body, |put| put.if_none_match("*")).await
    }

    async fn read(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .send()
            .await
            .map_err(|e| store_error("s3:GetObject", e))
        {
            Ok(out) => out,
            Err(StoreError::Gone) => return Ok(None),
            Err(e) => return Err(e),
        };
        let tag = etag(out.e_tag())?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("s3:GetObject: reading the lease: {e}"))?;
        Ok(Some((body.to_vec(), tag)))
    }

    async fn replace(&self, body: Vec<u8>, if_match: &str) -> Result<String, StoreError> {
        self.put(body, |put| put.if_match(if_match)).await
    }

    async fn delete(&self, if_match: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .if_match(if_match)
            .send()
            .await
            .map_err(|e| store_error("s3:DeleteObject", e))?;
        Ok(())
    }

    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

fn etag(tag: Option<&str>) -> Result<String, StoreError> {
    tag.map(str::to_owned)
        .ok_or_else(|| StoreError::Other(anyhow::anyhow!("S3 answered without an ETag")))
}
