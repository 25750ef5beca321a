//! [`SsmApi`] over aws-sdk-ssm. Thin on purpose: what the answers mean is decided in
//! `ssm/mod.rs` and `ssm/status.rs`.

use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::status::InvocationStatus;
use super::{error_kind, SendRequest, SsmApi, SsmError};
use crate::aws::classify;

#[derive(Clone)]
pub struct AwsSsm {
    pub ssm: aws_sdk_ssm::Client,
}

impl AwsSsm {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        AwsSsm {
            ssm: aws_sdk_ssm::Client::new(config),
        }
    }
}

/// Sorts an SDK error: the codes the waiting logic acts on, everything else classified.
fn sort<E, R>(
    action: &'static str,
    err: aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> SsmError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let message = err
        .message()
        .map(str::to_owned)
        .unwrap_or_else(|| DisplayErrorContext(&err).to_string());
    error_kind(err.code(), message).unwrap_or_else(|| SsmError::Aws(classify(action, err)))
}

impl SsmApi for AwsSsm {
    async fn send(&self, req: &SendRequest) -> Result<String, SsmError> {
        let out = self
            .ssm
            .send_command()
            .document_name(req.document)
            .set_instance_ids(Some(req.instance_ids.clone()))
            .parameters("commands", req.commands.clone())
            .parameters(
                "executionTimeout",
                vec![req.execution_timeout_secs.to_string()],
            )
            .timeout_seconds(req.delivery_timeout_secs)
            .max_errors(&req.max_errors)
            .max_concurrency(&req.max_concurrency)
            .comment(&req.comment)
            .send()
            .await
            .map_err(|e| sort("ssm:SendCommand", e))?;
        out.command()
            .and_then(|c| c.command_id())
            .map(str::to_owned)
            .ok_or_else(|| {
                SsmError::Aws(crate::aws::AwsError::Other {
                    action: "ssm:SendCommand",
                    message: "the answer has no CommandId".into(),
                })
            })
    }

    async fn get(&self, command_id: &str, instance_id: &str) -> Result<InvocationStatus, SsmError> {
        let out = self
            .ssm
            .get_command_invocation()
            .command_id(command_id)
            .instance_id(instance_id)
            .send()
            .await
            .map_err(|e| sort("ssm:GetCommandInvocation", e))?;
        let text = |s: Option<&str>| s.unwrap_or_default().to_owned();
        let url = |s: Option<&str>| s.filter(|u| !u.is_empty()).map(str::to_owned);
        Ok(InvocationStatus {
            status: out
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            details: text(out.status_details()),
            response_code: out.response_code(),
            stdout: text(out.standard_output_content()),
            stdout_url: url(out.standard_output_url()),
            stderr: text(out.standard_error_content()),
            stderr_url: url(out.standard_error_url()),
        })
    }

    async fn cancel(&self, command_id: &str, instance_ids: &[String]) -> Result<(), SsmError> {
        self.ssm
            .cancel_command()
            .command_id(command_id)
            .set_instance_ids(Some(instance_ids.to_vec()))
            .send()
            .await
            .map_err(|e| sort("ssm:CancelCommand", e))?;
        Ok(())
    }
}
