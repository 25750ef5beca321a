//! The EC2 side of [`ImageLifecycle`] for [`AwsImages`]: thin, every decision lives in
//! `lifecycle.rs` and `gc.rs`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::types::{
    Filter, LaunchPermission, LaunchPermissionModifications, PermissionGroup, ResourceType, Tag,
    TagSpecification,
};

use crate::aws::{classify, AwsError};

use super::aws::{tag_filters, AwsImages};
use super::lifecycle::{AmiDetails, CopyRequest, ImageLifecycle};

/// Instances in these states hold on to their AMI (a stopped one can start again).
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];
/// DescribeInstances takes up to 200 values per filter; 100 leaves room.
const IDS_PER_CALL: usize = 100;

fn details(image: &aws_sdk_ec2::types::Image) -> AmiDetails {
    AmiDetails {
        record: super::aws::record(image),
        deprecation_time: image.deprecation_time().map(str::to_owned),
    }
}

fn tag_spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

impl ImageLifecycle for AwsImages {
    fn region(&self) -> String {
        self.ec2
            .config()
            .region()
            .map(|r| r.to_string())
            .unwrap_or_default()
    }

    fn in_region(&self, region: &str) -> Self {
        let region = Region::new(region.to_owned());
        AwsImages::from_clients(
            aws_sdk_ebs::Client::from_conf(
                self.ebs
                    .config()
                    .to_builder()
                    .region(region.clone())
                    .build(),
            ),
            aws_sdk_ec2::Client::from_conf(self.ec2.config().to_builder().region(region).build()),
        )
    }

    async fn list(&self, tags: &[(&str, &str)]) -> Result<Vec<AmiDetails>, AwsError> {
        self.describe_own(tag_filters(tags), details).await
    }

    async fn deprecate(&self, ami_id: &str, at: SystemTime) -> Result<(), AwsError> {
        self.ec2
            .enable_image_deprecation()
            .image_id(ami_id)
            .deprecate_at(aws_smithy_types::DateTime::from(at))
            .send()
            .await
            .map_err(|e| classify("ec2:EnableImageDeprecation", e))?;
        Ok(())
    }

    async fn make_public(&self, ami_id: &str) -> Result<(), AwsError> {
        self.ec2
            .modify_image_attribute()
            .image_id(ami_id)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .add(
                        LaunchPermission::builder()
                            .group(PermissionGroup::All)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("ec2:ModifyImageAttribute", e))?;
        Ok(())
    }

    async fn copy_image(&self, request: &CopyRequest) -> Result<String, AwsError> {
        let out = self
            .ec2
            .copy_image()
            .source_region(&request.source_region)
            .source_image_id(&request.source_image_id)
            .name(&request.name)
            .description(&request.description)
            .client_token(&request.client_token)
            // The tags are given explicitly rather than with CopyImageTags: the source's
            // snapshot-id tag would be wrong on the copy.
            .tag_specifications(tag_spec(ResourceType::Image, &request.tags))
            .tag_specifications(tag_spec(ResourceType::Snapshot, &request.tags))
            .send()
            .await
            .map_err(|e| classify("ec2:CopyImage", e))?;
        out.image_id.ok_or_else(|| AwsError::Other {
            action: "ec2:CopyImage",
            message: "the answer has no ImageId".into(),
        })
    }

    async fn instances_using(
        &self,
        ami_ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, AwsError> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for chunk in ami_ids.chunks(IDS_PER_CALL) {
            let mut pages = self
                .ec2
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name("image-id")
                        .set_values(Some(chunk.to_vec()))
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(LIVE_STATES.map(str::to_owned).to_vec()))
                        .build(),
                )
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| classify("ec2:DescribeInstances", e))?;
                for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                    if let (Some(ami), Some(id)) = (instance.image_id(), instance.instance_id()) {
                        out.entry(ami.to_owned()).or_default().push(id.to_owned());
                    }
                }
            }
        }
        for ids in out.values_mut() {
            ids.sort();
            ids.dedup();
        }
        Ok(out)
    }
}
