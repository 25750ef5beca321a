//! The AWS side of `image`: EBS direct APIs for the upload, EC2 for snapshot state and
//! AMIs. Thin on purpose: every decision lives in the modules that call these traits.

use std::sync::{Arc, RwLock};

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter,
    ImdsSupportValues, ResourceType, Tag, TagSpecification, TpmSupportValues, VolumeType,
};
use aws_smithy_types::byte_stream::ByteStream;
use bytes::Bytes;

use crate::aws::{classify, error_code, AwsError};

use super::blocks::{BlockWriter, Capture};
use super::publish::{AmiRecord, ImageRegistry, RegisterError};
use super::register::{RegisterSpec, ROOT_DEVICE};
use super::upload::{SnapshotState, SnapshotStore, StartSpec};

#[derive(Clone)]
pub struct AwsImages {
    pub ebs: aws_sdk_ebs::Client,
    pub ec2: aws_sdk_ec2::Client,
    /// What the last StartSnapshot resolved, for the block puts (see `blocks`).
    blocks: Arc<RwLock<Option<Arc<BlockWriter>>>>,
}

impl AwsImages {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_clients(
            aws_sdk_ebs::Client::new(config),
            aws_sdk_ec2::Client::new(config),
        )
    }

    pub fn from_clients(ebs: aws_sdk_ebs::Client, ec2: aws_sdk_ec2::Client) -> Self {
        AwsImages {
            ebs,
            ec2,
            blocks: Arc::default(),
        }
    }

    fn block_writer(&self) -> Option<Arc<BlockWriter>> {
        self.blocks.read().ok()?.clone()
    }

    /// Whether the account encrypts every new EBS volume in this region: then no volume
    /// made from a snapshot is unencrypted, and a sparse snapshot is never safe.
    pub async fn encrypts_by_default(&self) -> Result<bool, AwsError> {
        let out = self
            .ec2
            .get_ebs_encryption_by_default()
            .send()
            .await
            .map_err(|e| classify("ec2:GetEbsEncryptionByDefault", e))?;
        Ok(out.ebs_encryption_by_default().unwrap_or(false))
    }
}

fn ec2_tags(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

impl SnapshotStore for AwsImages {
    async fn start(&self, spec: &StartSpec) -> Result<String, AwsError> {
        let mut req = self
            .ebs
            .start_snapshot()
            .volume_size(spec.volume_size_gib as i64)
            .description(&spec.description)
            .client_token(&spec.client_token)
            .encrypted(spec.encrypted)
            .timeout(spec.timeout_minutes)
            .set_kms_key_arn(spec.kms_key_arn.clone());
        for (k, v) in &spec.tags {
            req = req.tags(aws_sdk_ebs::types::Tag::builder().key(k).value(v).build());
        }
        let capture = Capture::default();
        let sent = req.customize().interceptor(capture.clone()).send().await;
        let writer = capture.writer();
        let out = sent.map_err(|e| classify("ebs:StartSnapshot", e))?;
        if let Ok(mut slot) = self.blocks.write() {
            *slot = writer.map(Arc::new);
        }
        // BlockSize in the answer is ignored on purpose: EBS takes 524288-byte blocks.
        out.snapshot_id.ok_or_else(|| AwsError::Other {
            action: "ebs:StartSnapshot",
            message: "the answer has no SnapshotId".into(),
        })
    }

    async fn put_block(
        &self,
        snapshot_id: &str,
        index: i32,
        data: Bytes,
        checksum_b64: String,
    ) -> Result<(), AwsError> {
        if let Some(writer) = self.block_writer() {
            return writer.put(snapshot_id, index, data, &checksum_b64).await;
        }
        let len = data.len() as i32;
        self.ebs
            .put_snapshot_block()
            .snapshot_id(snapshot_id)
            .block_index(index)
            .data_length(len)
            .block_data(ByteStream::from(data))
            .checksum(checksum_b64)
            .checksum_algorithm(aws_sdk_ebs::types::ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .map_err(|e| classify("ebs:PutSnapshotBlock", e))?;
        Ok(())
    }

    async fn complete(
        &self,
        snapshot_id: &str,
        changed_blocks: i32,
        linear_b64: String,
    ) -> Result<(), AwsError> {
        self.ebs
            .complete_snapshot()
            .snapshot_id(snapshot_id)
            .changed_blocks_count(changed_blocks)
            .checksum(linear_b64)
            .checksum_algorithm(aws_sdk_ebs::types::ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(
                aws_sdk_ebs::types::ChecksumAggregationMethod::ChecksumAggregationLinear,
            )
            .send()
            .await
            .map_err(|e| classify("ebs:CompleteSnapshot", e))?;
        Ok(())
    }

    async fn state(&self, snapshot_id: &str) -> Result<SnapshotState, AwsError> {
        let out = match self
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if error_code(&e) == Some("InvalidSnapshot.NotFound") => {
                return Ok(SnapshotState::Missing)
            }
            Err(e) => return Err(classify("ec2:DescribeSnapshots", e)),
        };
        let Some(snap) = out.snapshots().first() else {
            return Ok(SnapshotState::Missing);
        };
        use aws_sdk_ec2::types::SnapshotState as S;
        Ok(match snap.state() {
            Some(S::Completed) => SnapshotState::Completed,
            Some(S::Error) => {
                SnapshotState::Error(snap.state_message().unwrap_or("no reason given").to_owned())
            }
            _ => SnapshotState::Pending,
        })
    }

    async fn delete(&self, snapshot_id: &str) -> Result<(), AwsError> {
        match self
            .ec2
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e) == Some("InvalidSnapshot.NotFound") => Ok(()),
            Err(e) => Err(classify("ec2:DeleteSnapshot", e)),
        }
    }
}

/// An AMI as DescribeImages reports it, in amictl's terms.
pub(crate) fn record(image: &aws_sdk_ec2::types::Image) -> AmiRecord {
    AmiRecord {
        id: image.image_id().unwrap_or_default().to_owned(),
        name: image.name().unwrap_or_default().to_owned(),
        state: image
            .state()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        tags: image
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        snapshot_ids: image
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect(),
        created: image.creation_date().unwrap_or_default().to_owned(),
        public: image.public().unwrap_or(false),
    }
}

/// DescribeImages filters for "carries every one of these tags".
pub(crate) fn tag_filters(tags: &[(&str, &str)]) -> Vec<Filter> {
    tags.iter()
        .map(|(k, v)| {
            Filter::builder()
                .name(format!("tag:{k}"))
                .values(*v)
                .build()
        })
        .collect()
}

impl AwsImages {
    /// This account's AMIs matching `filters`, every page, each mapped by `map`.
    pub(crate) async fn describe_own<T>(
        &self,
        filters: Vec<Filter>,
        map: fn(&aws_sdk_ec2::types::Image) -> T,
    ) -> Result<Vec<T>, AwsError> {
        let mut out = Vec::new();
        let mut pages = self
            .ec2
            .describe_images()
            .owners("self")
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ec2:DescribeImages", e))?;
            out.extend(page.images().iter().map(map));
        }
        Ok(out)
    }
}

impl ImageRegistry for AwsImages {
    async fn find(&self, tags: &[(&str, &str)]) -> Result<Vec<AmiRecord>, AwsError> {
        self.describe_own(tag_filters(tags), record).await
    }

    async fn find_by_name(&self, name: &str) -> Result<Option<AmiRecord>, AwsError> {
        let found = self
            .describe_own(
                vec![Filter::builder().name("name").values(name).build()],
                record,
            )
            .await?;
        Ok(found.into_iter().next())
    }

    async fn get(&self, ami_id: &str) -> Result<Option<AmiRecord>, AwsError> {
        match self.ec2.describe_images().image_ids(ami_id).send().await {
            Ok(out) => Ok(out.images().first().map(record)),
            Err(e) if error_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => Ok(None),
            Err(e) => Err(classify("ec2:DescribeImages", e)),
        }
    }

    async fn register(&self, spec: &RegisterSpec) -> Result<String, RegisterError> {
        let root = BlockDeviceMapping::builder()
            .device_name(ROOT_DEVICE)
            .ebs(
                EbsBlockDevice::builder()
                    .snapshot_id(&spec.snapshot_id)
                    .volume_size(spec.volume_size_gib)
                    .volume_type(VolumeType::Gp3)
                    .delete_on_termination(true)
                    .build(),
            )
            .build();
        let mut req = self
            .ec2
            .register_image()
            .name(&spec.name)
            .description(&spec.description)
            .architecture(ArchitectureValues::from(spec.arch.as_aws()))
            .boot_mode(BootModeValues::from(spec.boot_mode.as_aws()))
            .root_device_name(ROOT_DEVICE)
            .block_device_mappings(root)
            .virtualization_type("hvm")
            .ena_support(true)
            .sriov_net_support("simple")
            .imds_support(ImdsSupportValues::V20)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(ec2_tags(&spec.tags)))
                    .build(),
            );
        if spec.tpm_v2 {
            req = req.tpm_support(TpmSupportValues::V20);
        }
        match req.send().await {
            Ok(out) => out.image_id.ok_or_else(|| {
                RegisterError::Aws(AwsError::Other {
                    action: "ec2:RegisterImage",
                    message: "the answer has no ImageId".into(),
                })
            }),
            Err(e) if error_code(&e) == Some("InvalidAMIName.Duplicate") => {
                Err(RegisterError::DuplicateName(spec.name.clone()))
            }
            Err(e) => Err(RegisterError::Aws(classify("ec2:RegisterImage", e))),
        }
    }

    async fn tag(
        &self,
        resource_ids: &[String],
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        self.ec2
            .create_tags()
            .set_resources(Some(resource_ids.to_vec()))
            .set_tags(Some(ec2_tags(tags)))
            .send()
            .await
            .map_err(|e| classify("ec2:CreateTags", e))?;
        Ok(())
    }

    async fn deregister(&self, ami_id: &str) -> Result<(), AwsError> {
        match self.ec2.deregister_image().image_id(ami_id).send().await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => Ok(()),
            Err(e) => Err(classify("ec2:DeregisterImage", e)),
        }
    }
}
