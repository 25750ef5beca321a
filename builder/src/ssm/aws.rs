//! [`SsmApi`] over aws-sdk-ssm. Thin on purpose: what the answers mean is decided in
//! `ssm/mod.rs` and `ssm/status.rs`.

use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use aws_sdk_ssm::types::{DocumentFormat, DocumentType};

use super::status::InvocationStatus;
use super::{error_kind, SendRequest, SsmApi, SsmError, StoredDocument};
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
        let mut send = self
            .ssm
            .send_command()
            .document_name(&req.document)
            .set_document_version(req.document_version.clone())
            .set_instance_ids(Some(req.instance_ids.clone()));
        if let Some(secs) = req.execution_timeout_secs {
            send = send.parameters("executionTimeout", vec![secs.to_string()]);
        }
        let out = send
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

    async fn get_document(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<StoredDocument>, SsmError> {
        let out = match self
            .ssm
            .get_document()
            .name(name)
            .set_document_version(version.map(str::to_owned))
            .document_format(DocumentFormat::Json)
            .send()
            .await
            .map_err(|e| sort("ssm:GetDocument", e))
        {
            Ok(out) => out,
            Err(SsmError::InvalidDocument(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(StoredDocument {
            version: out.document_version().unwrap_or_default().to_owned(),
            status: out
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            status_information: out.status_information().map(str::to_owned),
            content: out.content().unwrap_or_default().to_owned(),
        }))
    }

    async fn create_document(&self, name: &str, content: &str) -> Result<String, SsmError> {
        let out = self
            .ssm
            .create_document()
            .name(name)
            .content(content)
            .document_type(DocumentType::Command)
            .document_format(DocumentFormat::Json)
            .send()
            .await
            .map_err(|e| sort("ssm:CreateDocument", e))?;
        Ok(out
            .document_description()
            .and_then(|d| d.document_version())
            // A new document's first version.
            .unwrap_or("1")
            .to_owned())
    }

    async fn update_document(&self, name: &str, content: &str) -> Result<String, SsmError> {
        let out = self
            .ssm
            .update_document()
            .name(name)
            .content(content)
            .document_format(DocumentFormat::Json)
            // SSM only takes new versions on top of the latest.
            .document_version("$LATEST")
            .send()
            .await
            .map_err(|e| sort("ssm:UpdateDocument", e))?;
        out.document_description()
            .and_then(|d| d.document_version())
            .map(str::to_owned)
            .ok_or_else(|| {
                SsmError::Aws(crate::aws::AwsError::Other {
                    action: "ssm:UpdateDocument",
                    message: "the answer has no DocumentVersion".into(),
                })
            })
    }

    async fn set_default_version(&self, name: &str, version: &str) -> Result<(), SsmError> {
        self.ssm
            .update_document_default_version()
            .name(name)
            .document_version(version)
            .send()
            .await
            .map_err(|e| sort("ssm:UpdateDocumentDefaultVersion", e))?;
        Ok(())
    }
}
