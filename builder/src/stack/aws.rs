//! [`Stacks`] on CloudFormation and [`Occupants`] on EC2. Thin: the decisions live in
//! `plan`, `events` and `outputs`.

use std::collections::BTreeMap;

use aws_sdk_cloudformation::types::{Capability, ChangeSetType, Parameter, Tag};
use aws_sdk_ec2::types::Filter;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::events::StackEvent;
use super::plan::{Kind, ParameterValue};
use super::{
    ChangeSetCreated, ChangeSetRequest, ChangeSetState, EventPage, Occupant, Occupants, StackError,
    StackInfo, Stacks,
};
use crate::aws::classify;
use crate::fleet::TAG_FLEET;

#[derive(Clone)]
pub struct CloudFormation {
    pub client: aws_sdk_cloudformation::Client,
}

impl CloudFormation {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        CloudFormation {
            client: aws_sdk_cloudformation::Client::new(config),
        }
    }
}

/// A DescribeStacks entry in amictl's words.
fn to_info(s: &aws_sdk_cloudformation::types::Stack) -> StackInfo {
    StackInfo {
        id: s.stack_id().unwrap_or_default().to_owned(),
        name: s.stack_name().unwrap_or_default().to_owned(),
        status: s
            .stack_status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        reason: s.stack_status_reason().map(str::to_owned),
        parameters: s
            .parameters()
            .iter()
            .filter_map(|p| {
                Some((
                    p.parameter_key()?.to_owned(),
                    p.parameter_value().unwrap_or_default().to_owned(),
                ))
            })
            .collect(),
        outputs: s
            .outputs()
            .iter()
            .filter_map(|o| {
                Some((
                    o.output_key()?.to_owned(),
                    o.output_value().unwrap_or_default().to_owned(),
                ))
            })
            .collect::<BTreeMap<_, _>>(),
    }
}

fn to_event(e: &aws_sdk_cloudformation::types::StackEvent) -> StackEvent {
    StackEvent {
        id: e.event_id().unwrap_or_default().to_owned(),
        time: e.timestamp().map(|t| t.secs()).unwrap_or_default(),
        resource: e.logical_resource_id().unwrap_or_default().to_owned(),
        resource_type: e.resource_type().unwrap_or_default().to_owned(),
        status: e
            .resource_status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        reason: e.resource_status_reason().map(str::to_owned),
    }
}

impl Stacks for CloudFormation {
    async fn describe(&self, stack: &str) -> Result<Option<StackInfo>, StackError> {
        match self.client.describe_stacks().stack_name(stack).send().await {
            Ok(out) => Ok(out.stacks().first().map(to_info)),
            // CloudFormation has no NotFound code: "Stack with id X does not exist".
            Err(e)
                if e.code() == Some("ValidationError")
                    && e.message().is_some_and(|m| m.contains("does not exist")) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify("cloudformation:DescribeStacks", e).into()),
        }
    }

    #[tracing::instrument(skip_all, fields(stack = %request.stack, change_set = %request.name))]
    async fn create_change_set(
        &self,
        request: &ChangeSetRequest,
    ) -> Result<ChangeSetCreated, StackError> {
        let parameters = request
            .parameters
            .iter()
            .map(|(k, v)| match v {
                ParameterValue::Value(v) => Parameter::builder()
                    .parameter_key(k)
                    .parameter_value(v)
                    .build(),
                ParameterValue::UsePrevious => Parameter::builder()
                    .parameter_key(k)
                    .use_previous_value(true)
                    .build(),
            })
            .collect();
        let tags = request
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .client
            .create_change_set()
            .stack_name(&request.stack)
            .change_set_name(&request.name)
            .client_token(&request.name)
            .change_set_type(match request.kind {
                Kind::Create => ChangeSetType::Create,
                Kind::Update => ChangeSetType::Update,
            })
            .template_body(&request.template)
            .set_parameters(Some(parameters))
            .set_tags(Some(tags))
            // The template names its IAM role (NAMED_IAM covers IAM too).
            .capabilities(Capability::CapabilityNamedIam)
            .description("amictl stack deploy")
            .send()
            .await
            .map_err(|e| classify("cloudformation:CreateChangeSet", e))?;
        Ok(ChangeSetCreated {
            id: out.id().unwrap_or_default().to_owned(),
            stack_id: out.stack_id().unwrap_or_default().to_owned(),
        })
    }

    async fn change_set(&self, id: &str) -> Result<ChangeSetState, StackError> {
        let out = self
            .client
            .describe_change_set()
            .change_set_name(id)
            .send()
            .await
            .map_err(|e| classify("cloudformation:DescribeChangeSet", e))?;
        Ok(ChangeSetState {
            status: out
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            execution: out.execution_status().map(|s| s.as_str().to_owned()),
            reason: out.status_reason().map(str::to_owned),
        })
    }

    #[tracing::instrument(skip(self))]
    async fn execute_change_set(&self, id: &str, token: &str) -> Result<(), StackError> {
        self.client
            .execute_change_set()
            .change_set_name(id)
            .client_request_token(token)
            .send()
            .await
            .map_err(|e| classify("cloudformation:ExecuteChangeSet", e))?;
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn delete_change_set(&self, id: &str) -> Result<(), StackError> {
        self.client
            .delete_change_set()
            .change_set_name(id)
            .send()
            .await
            .map_err(|e| classify("cloudformation:DeleteChangeSet", e))?;
        Ok(())
    }

    async fn events(&self, stack_id: &str, next: Option<String>) -> Result<EventPage, StackError> {
        let out = self
            .client
            .describe_stack_events()
            .stack_name(stack_id)
            .set_next_token(next)
            .send()
            .await
            .map_err(|e| classify("cloudformation:DescribeStackEvents", e))?;
        Ok(EventPage {
            events: out.stack_events().iter().map(to_event).collect(),
            next: out.next_token().map(str::to_owned),
        })
    }

    #[tracing::instrument(skip(self))]
    async fn delete_stack(&self, stack_id: &str, token: &str) -> Result<(), StackError> {
        self.client
            .delete_stack()
            .stack_name(stack_id)
            .client_request_token(token)
            .send()
            .await
            .map_err(|e| classify("cloudformation:DeleteStack", e))?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct Ec2Occupants {
    pub client: aws_sdk_ec2::Client,
}

impl Ec2Occupants {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Ec2Occupants {
            client: aws_sdk_ec2::Client::new(config),
        }
    }
}

impl Occupants for Ec2Occupants {
    async fn instances_in_vpc(&self, vpc: &str) -> Result<Vec<Occupant>, StackError> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_instances()
                .filters(Filter::builder().name("vpc-id").values(vpc).build())
                // Everything but terminated: a stopped instance still holds its
                // network interface, so its subnet and security group.
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("shutting-down")
                        .values("stopping")
                        .values("stopped")
                        .build(),
                )
                .set_next_token(next)
                .send()
                .await
                .map_err(|e| classify("ec2:DescribeInstances", e))?;
            for i in out.reservations().iter().flat_map(|r| r.instances()) {
                if let Some(id) = i.instance_id() {
                    found.push(Occupant {
                        id: id.to_owned(),
                        fleet: i
                            .tags()
                            .iter()
                            .find(|t| t.key() == Some(TAG_FLEET))
                            .and_then(|t| t.value())
                            .map(str::to_owned),
                    });
                }
            }
            next = out.next_token().map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        Ok(found)
    }
}
