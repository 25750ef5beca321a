//! PutSnapshotBlock, the upload's hot call, sent without the SDK's per-call machinery.
//!
//! A publish makes 2,048 PutSnapshotBlock calls per GiB. The SDK's orchestrator
//! (interceptors, config-bag layers, retry, timeout and throughput wrappers) costs about
//! 130 µs of CPU per call on the benchmark's machine: 0.27 CPU-s per GiB, a fifth of a
//! publish's CPU and more than anything in it but SHA-256 (bench/publish.sh; README).
//!
//! Only that machinery is left out; what the SDK resolved is kept. StartSnapshot goes
//! through the SDK client with [`Capture`] attached, which takes from that call the runtime
//! the SDK built for this client (its HTTP connector: the same connection pool, TLS, proxy
//! and timeouts; its identity cache and credentials chain; its time source), the endpoint
//! it called, and the region and service it signed for. Each block is then signed by
//! aws-sigv4, the SDK's own signer, with the settings the SDK uses for this operation: the
//! payload unsigned (the body carries its SHA-256 in `x-amz-Checksum`) and said so in a
//! signed `x-amz-content-sha256: UNSIGNED-PAYLOAD`, without which EBS hashes the body and
//! refuses every block (awslabs/aws-sdk-rust #930, smithy-lang/smithy-rs #3126). It is sent
//! on that connector. What is ours is small and follows the SDK: its standard retries
//! (throttling, 500/502/503/504, I/O errors and timeouts; the same attempts and backoff as
//! every other call), closing a connection that answered a transient error (the SDK's
//! connection poisoning), and the restJson1 error shape. One thing goes further than the
//! SDK, which signs with the local clock: the skew learned from each answer's Date header
//! corrects the signing time, and a put refused for its time is retried once the skew is
//! known. The tests sign the requests again with botocore, written by other people.
//!
//! What the SDK's stalled-stream protection would add here is nothing: it watches the body
//! while it is read, and a block is one chunk the HTTP client takes at once. A stalled
//! connection ends at the attempt timeout, as in the SDK.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::auth::AuthSchemeId;
use aws_smithy_runtime_api::client::connection::CaptureSmithyConnection;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::identity::{ResolveCachedIdentity, SharedIdentityResolver};
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::{GetIdentityResolver, RuntimeComponents};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;
use tracing::debug;

use super::upload::jitter;
use crate::aws::{
    classify_code, AwsError, ATTEMPT_TIMEOUT, INITIAL_BACKOFF, MAX_ATTEMPTS, MAX_BACKOFF,
    OPERATION_TIMEOUT,
};

const ACTION: &str = "ebs:PutSnapshotBlock";

/// Sends blocks to snapshots, on what the SDK resolved for StartSnapshot.
#[derive(Debug, Clone)]
pub struct BlockWriter {
    components: RuntimeComponents,
    connector: SharedHttpConnector,
    identity: SharedIdentityResolver,
    /// The endpoint StartSnapshot was sent to, without its `/snapshots` path.
    base: String,
    region: String,
    service: String,
    skew: Arc<ClockSkew>,
}

/// An interceptor for one StartSnapshot call: it records what [`BlockWriter`] needs. It
/// never fails the call; if something is missing, [`Capture::writer`] is `None` and the
/// blocks go through the SDK client.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    writer: Arc<Mutex<Option<BlockWriter>>>,
    skew: Arc<ClockSkew>,
}

impl Capture {
    /// Takes what was captured (the captured runtime holds this interceptor: leaving it
    /// here would be a reference cycle).
    pub fn writer(&self) -> Option<BlockWriter> {
        self.writer.lock().ok()?.take()
    }
}

impl Intercept for Capture {
    fn name(&self) -> &'static str {
        "amictl::image::blocks::Capture"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let writer = BlockWriter::from_call(context.request(), components, cfg, &self.skew);
        if writer.is_none() {
            debug!("StartSnapshot's runtime not captured: blocks go through the SDK client");
        }
        if let Ok(mut slot) = self.writer.lock() {
            *slot = writer;
        }
        Ok(())
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            self.skew.learn(date, now(components));
        }
        Ok(())
    }
}

fn now(components: &RuntimeComponents) -> SystemTime {
    components
        .time_source()
        .map_or_else(SystemTime::now, |t| t.now())
}

/// How far the service's clock is ahead of ours, from the Date header of its answers, so a
/// machine whose clock is off (or steps during an upload) still uploads.
#[derive(Debug, Default)]
struct ClockSkew {
    millis: AtomicI64,
}

impl ClockSkew {
    /// Learns from one answer.
    fn learn(&self, date: &str, local: SystemTime) {
        let Ok(remote) = httpdate::parse_http_date(date) else {
            return;
        };
        let skew = match remote.duration_since(local) {
            Ok(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
            Err(behind) => -i64::try_from(behind.duration().as_millis()).unwrap_or(i64::MAX),
        };
        // A Date has whole seconds: within 1 s it says nothing.
        let skew = if skew.abs() < 1000 { 0 } else { skew };
        self.millis.store(skew, Ordering::Relaxed);
    }

    fn get(&self) -> i64 {
        self.millis.load(Ordering::Relaxed)
    }

    fn apply(skew: i64, local: SystemTime) -> SystemTime {
        let by = Duration::from_millis(skew.unsigned_abs());
        if skew >= 0 {
            local + by
        } else {
            local - by
        }
    }
}

/// The region and service of a SigV4 `Authorization` header's credential scope.
fn signing_scope(authorization: &str) -> Option<(String, String)> {
    let credential = authorization
        .split("Credential=")
        .nth(1)?
        .split(',')
        .next()?;
    // access key id / date / region / service / aws4_request
    let mut parts = credential.rsplit('/');
    (parts.next()? == "aws4_request").then_some(())?;
    let service = parts.next()?.to_owned();
    let region = parts.next()?.to_owned();
    Some((region, service))
}

/// Why one attempt failed, and whether another may succeed.
struct Failure {
    error: AwsError,
    retry: bool,
}

impl BlockWriter {
    fn from_call(
        request: &HttpRequest,
        components: &RuntimeComponents,
        cfg: &ConfigBag,
        skew: &Arc<ClockSkew>,
    ) -> Option<Self> {
        let uri = request.uri();
        let path = &uri[..uri.find('?').unwrap_or(uri.len())];
        let base = path.strip_suffix("/snapshots")?.to_owned();
        let (region, service) = signing_scope(request.headers().get("authorization")?)?;
        // The settings the orchestrator asks for, so the connector (and its pool) is the one
        // the SDK's own calls use.
        let timeouts = cfg.load::<TimeoutConfig>();
        let mut settings = HttpConnectorSettings::builder();
        settings.set_connect_timeout(timeouts.and_then(|t| t.connect_timeout()));
        settings.set_read_timeout(timeouts.and_then(|t| t.read_timeout()));
        let connector = components
            .http_client()?
            .http_connector(&settings.build(), components);
        let identity = components.identity_resolver(AuthSchemeId::new("sigv4"))?;
        Some(BlockWriter {
            components: components.clone(),
            connector,
            identity,
            base,
            region,
            service,
            skew: skew.clone(),
        })
    }

    /// Puts one block, retrying what the SDK's standard policy retries, within the same
    /// deadline as every SDK call (`OPERATION_TIMEOUT`, all attempts and backoffs).
    pub async fn put(
        &self,
        snapshot_id: &str,
        index: i32,
        data: Bytes,
        checksum_b64: &str,
    ) -> Result<(), AwsError> {
        tokio::time::timeout(
            OPERATION_TIMEOUT,
            self.put_with_retries(snapshot_id, index, data, checksum_b64),
        )
        .await
        .unwrap_or_else(|_| {
            Err(AwsError::Other {
                action: ACTION,
                message: format!(
                    "block {index} not taken within {} s, retries included",
                    OPERATION_TIMEOUT.as_secs()
                ),
            })
        })
    }

    async fn put_with_retries(
        &self,
        snapshot_id: &str,
        index: i32,
        data: Bytes,
        checksum_b64: &str,
    ) -> Result<(), AwsError> {
        let uri = format!("{}/snapshots/{snapshot_id}/blocks/{index}", self.base);
        let mut backoff = INITIAL_BACKOFF;
        let mut attempt = 1;
        loop {
            let failure = match tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                self.attempt(&uri, &data, checksum_b64),
            )
            .await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(failure)) => failure,
                Err(_) => Failure {
                    error: AwsError::Other {
                        action: ACTION,
                        message: format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
                    },
                    retry: true,
                },
            };
            if !failure.retry || attempt >= MAX_ATTEMPTS {
                return Err(failure.error);
            }
            debug!(index, attempt, error = %failure.error, "block put failed, retrying");
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    async fn attempt(&self, uri: &str, data: &Bytes, checksum_b64: &str) -> Result<(), Failure> {
        // The skew this attempt signs with: other puts may learn a new one meanwhile.
        let skew = self.skew.get();
        let mut request = self.signed(uri, data, checksum_b64, skew).await?;
        let connection = CaptureSmithyConnection::new();
        request.add_extension(connection.clone());
        let response = match self.connector.call(request).await {
            Ok(r) => r,
            Err(e) => {
                return Err(Failure {
                    // A request the client itself refused (a bad URI) fails the same again.
                    retry: !e.is_user(),
                    error: AwsError::Other {
                        action: ACTION,
                        message: format!(
                            "{}",
                            aws_smithy_types::error::display::DisplayErrorContext(&e)
                        ),
                    },
                });
            }
        };
        if let Some(date) = response.headers().get("date") {
            self.skew.learn(date, now(&self.components));
        }
        let skewed = (self.skew.get() - skew).abs() > 60_000;
        let status = response.status().as_u16();
        let type_header = response
            .headers()
            .get("x-amzn-errortype")
            .map(str::to_owned);
        let body = ByteStream::new(response.into_body()).collect().await;
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = body.map(|b| b.into_bytes()).unwrap_or_default();
        let (code, message) = error_of(type_header.as_deref(), &body, status);
        if TRANSIENT_STATUS.contains(&status) {
            // As the SDK does: the retry goes out on another connection, so it can reach
            // another host behind the endpoint.
            if let Some(c) = connection.get() {
                c.poison();
            }
        }
        Err(Failure {
            retry: retryable(status, &code) || (skewed && SKEW_CODES.contains(&code.as_str())),
            error: classify_code(ACTION, &code, message),
        })
    }

    async fn signed(
        &self,
        uri: &str,
        data: &Bytes,
        checksum_b64: &str,
        skew: i64,
    ) -> Result<HttpRequest, Failure> {
        let fail = |message: String, retry: bool| Failure {
            error: AwsError::Credentials(message),
            retry,
        };
        let identity = self
            .components
            .identity_cache()
            .resolve_cached_identity(self.identity.clone(), &self.components, &ConfigBag::base())
            .await
            .map_err(|e| {
                fail(
                    aws_smithy_types::error::display::DisplayErrorContext(&*e).to_string(),
                    false,
                )
            })?;
        let length = data.len().to_string();
        let headers = [
            ("content-type", "application/octet-stream"),
            ("content-length", length.as_str()),
            ("x-amz-checksum", checksum_b64),
            ("x-amz-checksum-algorithm", "SHA256"),
            ("x-amz-data-length", length.as_str()),
        ];
        let time = ClockSkew::apply(skew, now(&self.components));
        // The SDK's settings for this operation (`content_sha256_header` in its
        // put_snapshot_block.rs): everything default but the signed payload header.
        let mut settings = SigningSettings::default();
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(&self.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| fail(e.to_string(), false))?
            .into();
        let signable = SignableRequest::new(
            "PUT",
            uri,
            headers.iter().copied(),
            SignableBody::UnsignedPayload,
        )
        .map_err(|e| fail(e.to_string(), false))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| fail(e.to_string(), false))?
            .into_parts();
        let mut request = http::Request::builder().method("PUT").uri(uri);
        for (name, value) in headers.into_iter().chain(instructions.headers()) {
            request = request.header(name, value);
        }
        request
            .header("user-agent", USER_AGENT)
            .body(SdkBody::from(data.clone()))
            .map_err(|e| e.to_string())
            .and_then(|r| HttpRequest::try_from(r).map_err(|e| e.to_string()))
            .map_err(|message| Failure {
                error: AwsError::Other {
                    action: ACTION,
                    message,
                },
                retry: false,
            })
    }
}

const USER_AGENT: &str = concat!("amictl/", env!("CARGO_PKG_VERSION"));

/// Codes a service sends when the request's time is too far from its clock.
const SKEW_CODES: &[&str] = &[
    "RequestTimeTooSkewed",
    "RequestExpired",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "AuthFailure",
    "RequestInTheFuture",
];

/// What the SDK's standard policy calls a transient error by its status.
const TRANSIENT_STATUS: &[u16] = &[500, 502, 503, 504];

/// The SDK's standard policy: throttling and transient codes and statuses; and 429, which
/// the SDK leaves to the code (every throttling answer here has one).
fn retryable(status: u16, code: &str) -> bool {
    const THROTTLING: &[&str] = &[
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    ];
    const TRANSIENT: &[&str] = &["RequestTimeout", "RequestTimeoutException"];
    status == 429
        || TRANSIENT_STATUS.contains(&status)
        || THROTTLING.contains(&code)
        || TRANSIENT.contains(&code)
}

/// A restJson1 error's code and message: the code from `x-amzn-ErrorType`, else the body's
/// `code` or `__type` (without a namespace or URL); the message from `message` or `Message`.
fn error_of(type_header: Option<&str>, body: &[u8], status: u16) -> (String, String) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| json.get(*n).and_then(|v| v.as_str()))
            .map(str::to_owned)
    };
    let code = type_header
        .map(str::to_owned)
        .or_else(|| field(&["code", "__type"]))
        .unwrap_or_default();
    let code = code.split(':').next().unwrap_or_default();
    let code = code
        .rsplit('#')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let message = field(&["message", "Message", "errorMessage"]).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text: String = text.chars().take(300).collect();
        if text.trim().is_empty() {
            format!("HTTP {status} without a body")
        } else {
            format!("HTTP {status}: {}", text.trim())
        }
    });
    (code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_names_region_and_service() {
        let auth = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/eu-west-1/ebs/aws4_request, \
                    SignedHeaders=host;x-amz-date, Signature=abc";
        assert_eq!(
            signing_scope(auth),
            Some(("eu-west-1".into(), "ebs".into()))
        );
        assert_eq!(signing_scope("Bearer x"), None);
        assert_eq!(
            signing_scope("AWS4-HMAC-SHA256 Credential=A/d/r/s/other, x"),
            None
        );
    }

    #[test]
    fn errors_take_the_code_from_the_header_or_the_body() {
        let (code, message) = error_of(
            Some("ValidationException:http://internal.amazon.com/coral/com.amazon.coral.validate/"),
            br#"{"message":"Invalid checksum","Reason":"INVALID_CHECKSUM"}"#,
            400,
        );
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("ValidationException", "Invalid checksum")
        );
        let (code, message) = error_of(
            None,
            br#"{"__type":"com.amazon.coral.service#RequestThrottledException","Message":"slow down"}"#,
            400,
        );
        assert_eq!(
            (code.as_str(), message.as_str()),
            ("RequestThrottledException", "slow down")
        );
        let (code, message) = error_of(None, b"<html>bad gateway</html>", 502);
        assert_eq!(code, "");
        assert_eq!(message, "HTTP 502: <html>bad gateway</html>");
        assert_eq!(error_of(None, b"", 503).1, "HTTP 503 without a body");
    }

    #[test]
    fn throttling_and_server_faults_are_retried_client_faults_are_not() {
        assert!(retryable(503, ""));
        assert!(retryable(400, "RequestThrottledException"));
        assert!(retryable(429, ""));
        assert!(!retryable(400, "ValidationException"));
        assert!(!retryable(403, "AccessDeniedException"));
        assert!(!retryable(501, ""));
    }

    #[test]
    fn skew_is_learned_from_the_date_header() {
        let skew = ClockSkew::default();
        let local = httpdate::parse_http_date("Fri, 04 Dec 2026 12:00:00 GMT").unwrap();
        skew.learn("Fri, 04 Dec 2026 13:00:00 GMT", local);
        assert_eq!(skew.get(), 3_600_000);
        assert_eq!(
            ClockSkew::apply(skew.get(), local),
            local + Duration::from_secs(3600)
        );
        // Within a second: no skew; a garbled date changes nothing.
        skew.learn("Fri, 04 Dec 2026 12:00:00 GMT", local);
        assert_eq!(skew.get(), 0);
        skew.learn("yesterday", local);
        assert_eq!(skew.get(), 0);
        skew.learn("Fri, 04 Dec 2026 11:50:00 GMT", local);
        assert_eq!(
            ClockSkew::apply(skew.get(), local),
            local - Duration::from_secs(600)
        );
    }
}
