//! Everything the AWS clients share: one SDK configuration from the standard chain (with an
//! endpoint override through `AWS_ENDPOINT_URL`, timeouts and bounded retries), and errors
//! that say what to do about them.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AwsError {
    /// The resource does not exist (or is not visible yet).
    #[error("{0}")]
    NotFound(String),
    #[error("access denied: {message} (the IAM policy needs {action}; `amictl iam-policy` prints one that has it)")]
    Denied {
        action: &'static str,
        message: String,
    },
    #[error("no AWS credentials: {0}. amictl uses the standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/config, SSO, web identity, ECS or EC2 instance roles")]
    Credentials(String),
    #[error("no AWS region: set AWS_REGION (or a profile's region) or pass --region")]
    NoRegion,
    #[error("{action}: {message}")]
    Other {
        action: &'static str,
        message: String,
    },
}

/// Every request gets these: coldsnap's worst bugs were silent hangs (awslabs/coldsnap
/// #437), so nothing waits without a deadline.
fn timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// One attempt of a call. One 512 KiB block over a slow uplink takes seconds, not a minute.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// A call with all its attempts and backoffs.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Attempts of a call: 6 spans about a minute of an API's bad moment.
pub const MAX_ATTEMPTS: u32 = 6;
/// The first retry's backoff; it doubles up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Throttling and 5xx are retried with exponential backoff and full jitter by the SDK's
/// standard strategy.
fn retries() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(INITIAL_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

/// Loads the standard chain and checks that credentials and a region are there, before
/// anything is created.
pub async fn load(region: Option<&str>) -> Result<SdkConfig, AwsError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts())
        .retry_config(retries());
    if let Some(r) = region {
        loader = loader.region(Region::new(r.to_owned()));
    }
    let config = loader.load().await;
    if config.region().is_none() {
        return Err(AwsError::NoRegion);
    }
    let provider = config
        .credentials_provider()
        .ok_or_else(|| AwsError::Credentials("no credentials provider is configured".into()))?;
    provider
        .provide_credentials()
        .await
        .map_err(|e| AwsError::Credentials(DisplayErrorContext(e).to_string()))?;
    Ok(config)
}

/// Turns an SDK error into what an operator can act on. `action` is the IAM action of the
/// call (`ec2:RegisterImage`), named in access-denied errors.
pub fn classify<E, R>(
    action: &'static str,
    err: aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    // Without a service message (an HTML error page, a dropped connection) the SDK's
    // context is all there is; keep its first part, not the whole raw response.
    let message = err.message().map(str::to_owned).unwrap_or_else(|| {
        let full = DisplayErrorContext(&err).to_string();
        match full.char_indices().nth(300) {
            Some((cut, _)) => format!("{}…", &full[..cut]),
            None => full,
        }
    });
    classify_code(action, &code, message)
}

/// [`classify`] for an error read off the wire: its code (`""` if it had none) and message.
pub fn classify_code(action: &'static str, code: &str, message: String) -> AwsError {
    match code {
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "UnauthorizedAccess"
        | "AuthFailure" => AwsError::Denied { action, message },
        c if c.ends_with("NotFound") || c == "ResourceNotFoundException" => {
            AwsError::NotFound(format!("{action}: {c}: {message}"))
        }
        "" => AwsError::Other { action, message },
        c => AwsError::Other {
            action,
            message: format!("{c}: {message}"),
        },
    }
}

/// The error's code, for callers that branch on one (e.g. `InvalidAMIName.Duplicate`).
pub fn error_code<E, R>(
    err: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    err.code()
}
