//! [`Compute`] on EC2: a fleet is the instances tagged `amictl:fleet=NAME`.
//!
//! Launches are idempotent through ClientToken (a retried or resumed rollout gets the
//! instance the first attempt made), require IMDSv2 (tokens required, one hop: a container
//! on the instance cannot reach the metadata service through it), carry no key pair (SSM is
//! the way in) and boot from an encrypted gp3 root volume. The tags name the fleet, image,
//! launch-settings digest and rollout on both the instance and its volume.

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    ResourceType, Tag, TagSpecification, VolumeType,
};
use sha2::{Digest, Sha256};

use super::{
    CloudError, Compute, Instance, InstanceState, Launch, Placement, TAG_FLEET, TAG_GROUP,
    TAG_IMAGE, TAG_RETIRING, TAG_ROLLOUT, TAG_SPEC,
};
use crate::aws::{classify, error_code, AwsError};

pub const TAG_MANAGED_BY: &str = "amictl:managed-by";
/// The root device when DescribeImages does not say (Amazon Linux and NixOS AMIs use it).
pub const DEFAULT_ROOT_DEVICE: &str = "/dev/xvda";
/// ClientToken's limit (64 ASCII characters).
const MAX_TOKEN_LEN: usize = 64;
/// Instances per TerminateInstances/CreateTags call: well under the API's limits, so one
/// request never carries a page-sized error.
const IDS_PER_CALL: usize = 100;

/// What every instance of a fleet is launched with, besides the image and the subnet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ec2LaunchSettings {
    pub instance_type: String,
    pub security_group_ids: Vec<String>,
    /// An instance profile name or ARN (SSM needs one with AmazonSSMManagedInstanceCore).
    pub instance_profile: Option<String>,
}

/// The `amictl:spec` digest of `settings` in `placement` (pure): 12 hex digits of a
/// SHA-256 over a versioned, canonical text, so the same settings always give the same
/// digest and any change (type, groups in any order, profile, subnet) gives another.
pub fn spec_digest(settings: &Ec2LaunchSettings, placement: &Placement) -> String {
    let mut groups: Vec<&str> = settings
        .security_group_ids
        .iter()
        .map(String::as_str)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let canonical = format!(
        "amictl-spec-v1\ninstance-type={}\nsecurity-groups={}\ninstance-profile={}\nsubnet={}\n",
        settings.instance_type,
        groups.join(","),
        settings.instance_profile.as_deref().unwrap_or(""),
        placement.subnet,
    );
    hex::encode(&Sha256::digest(canonical.as_bytes())[..6])
}

/// The ClientToken for a launch token (pure): the token itself when EC2 takes it, else a
/// digest of it (still one token per launch).
pub fn client_token(token: &str) -> String {
    if !token.is_empty() && token.len() <= MAX_TOKEN_LEN && token.is_ascii() {
        token.to_owned()
    } else {
        hex::encode(Sha256::digest(token.as_bytes()))
    }
}

/// The tags of a launched instance and its volumes (pure).
pub fn launch_tags(launch: &Launch) -> Vec<(&'static str, String)> {
    vec![
        ("Name", launch.name.clone()),
        (TAG_FLEET, launch.fleet.clone()),
        (TAG_IMAGE, launch.image.clone()),
        (TAG_SPEC, launch.spec.clone()),
        (TAG_ROLLOUT, launch.rollout.clone()),
        (TAG_MANAGED_BY, "amictl".to_owned()),
    ]
}

/// RunInstances error codes that mean "not here, not now": try another AZ or later.
pub fn is_capacity_error(code: &str) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity" | "InsufficientCapacity" | "Unsupported"
    )
}

/// An EC2 instance as the fleet model sees it (pure); None without an id.
pub fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let tag = |key: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Down,
    };
    let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    Some(Instance {
        id: i.instance_id()?.to_owned(),
        az: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_owned(),
        image: i.image_id().unwrap_or_default().to_owned(),
        spec: tag(TAG_SPEC).unwrap_or_default(),
        state,
        rollout: tag(TAG_ROLLOUT),
        retiring: tag(TAG_RETIRING),
        address: non_empty(i.public_dns_name())
            .or_else(|| non_empty(i.public_ip_address()))
            .or_else(|| non_empty(i.private_ip_address())),
        group: tag(TAG_GROUP),
    })
}

pub struct Ec2Compute {
    ec2: aws_sdk_ec2::Client,
    settings: Ec2LaunchSettings,
}

impl Ec2Compute {
    /// `settings` may be the default for read-only uses (listing, tagging, terminating):
    /// `launch` refuses to launch without an instance type.
    pub fn new(config: &aws_config::SdkConfig, settings: Ec2LaunchSettings) -> Self {
        Self::with_client(aws_sdk_ec2::Client::new(config), settings)
    }

    pub fn with_client(ec2: aws_sdk_ec2::Client, settings: Ec2LaunchSettings) -> Self {
        Ec2Compute { ec2, settings }
    }

    pub fn settings(&self) -> &Ec2LaunchSettings {
        &self.settings
    }

    pub fn ec2(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    /// The image's root device name (where the encrypted gp3 mapping goes) and its size
    /// in GiB, when the image says.
    pub(crate) async fn root_device(
        &self,
        image: &str,
    ) -> Result<(String, Option<i32>), CloudError> {
        let out = self
            .ec2
            .describe_images()
            .image_ids(image)
            .send()
            .await
            .map_err(|e| classify("ec2:DescribeImages", e))?;
        let found = out.images().first().ok_or_else(|| {
            CloudError::NotFound(format!(
                "image {image} does not exist (or is not visible to this account)"
            ))
        })?;
        // The root volume below is always encrypted: a sparse snapshot's missing blocks
        // would read as random bytes there. `rollout` refuses this earlier; a replacement
        // launched later (`health --heal`) must not slip through either.
        if let Some(why) = crate::image::register::sparse_refusal(image, &image_tags(found)) {
            return Err(CloudError::Other(why));
        }
        let device = found
            .root_device_name()
            .filter(|d| !d.is_empty())
            .unwrap_or(DEFAULT_ROOT_DEVICE)
            .to_owned();
        let size = found
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(device.as_str()))
            .and_then(|m| m.ebs())
            .and_then(|e| e.volume_size());
        Ok((device, size))
    }

    async fn terminate_chunk(&self, ids: &[String]) -> Result<(), AwsError> {
        self.ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("ec2:TerminateInstances", e))
    }
}

/// An image's tags as pairs.
pub fn image_tags(image: &aws_sdk_ec2::types::Image) -> Vec<(String, String)> {
    image
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
        .collect()
}

fn ec2_tags(tags: &[(&str, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(*k).value(v).build())
        .collect()
}

impl Compute for Ec2Compute {
    #[tracing::instrument(skip(self))]
    async fn instances(&self, fleet: &str) -> Result<Vec<Instance>, CloudError> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = self
                .ec2
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{TAG_FLEET}"))
                        .values(fleet)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(
                            ["pending", "running", "stopping", "stopped", "shutting-down"]
                                .map(String::from)
                                .to_vec(),
                        ))
                        .build(),
                )
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| classify("ec2:DescribeInstances", e))?;
            found.extend(
                out.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(to_instance)
                    .filter(|i| i.state != InstanceState::Terminated),
            );
            match out.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => break,
            }
        }
        found.sort_by(|a, b| (&a.az, &a.id).cmp(&(&b.az, &b.id)));
        Ok(found)
    }

    #[tracing::instrument(skip(self), fields(fleet = %launch.fleet, az = %launch.placement.az))]
    async fn launch(&self, launch: &Launch) -> Result<String, CloudError> {
        let s = &self.settings;
        if s.instance_type.is_empty() {
            return Err(CloudError::Other(
                "no instance type configured for launches".into(),
            ));
        }
        let (root, size) = self.root_device(&launch.image).await?;
        let tags = ec2_tags(&launch_tags(launch));
        let profile = s.instance_profile.as_ref().map(|p| {
            let spec = IamInstanceProfileSpecification::builder();
            if p.starts_with("arn:") {
                spec.arn(p).build()
            } else {
                spec.name(p).build()
            }
        });
        let out = self
            .ec2
            .run_instances()
            .image_id(&launch.image)
            .instance_type(InstanceType::from(s.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .subnet_id(&launch.placement.subnet)
            .set_security_group_ids(
                (!s.security_group_ids.is_empty()).then(|| s.security_group_ids.clone()),
            )
            .set_iam_instance_profile(profile)
            .client_token(client_token(&launch.token))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&root)
                    .ebs(
                        EbsBlockDevice::builder()
                            .encrypted(true)
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            // The image's own size, stated: EC2 takes it as the default,
                            // but an explicit mapping is unambiguous.
                            .set_volume_size(size)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags))
                    .build(),
            )
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                if let Some(code) = error_code(&e).filter(|c| is_capacity_error(c)) {
                    let code = code.to_owned();
                    let message = match classify("ec2:RunInstances", e) {
                        AwsError::Other { message, .. } => message,
                        other => other.to_string(),
                    };
                    return Err(CloudError::NoCapacity {
                        az: launch.placement.az.clone(),
                        message: if message.starts_with(&code) {
                            message
                        } else {
                            format!("{code}: {message}")
                        },
                    });
                }
                if error_code(&e) == Some("IdempotentParameterMismatch") {
                    return Err(CloudError::Other(format!(
                        "launch token {} was used before with other settings: a rollout's launch must not change while it runs",
                        launch.token
                    )));
                }
                return Err(classify("ec2:RunInstances", e).into());
            }
        };
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| CloudError::Other("ec2:RunInstances: the answer has no instance".into()))
    }

    #[tracing::instrument(skip(self))]
    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
        for chunk in ids.chunks(IDS_PER_CALL) {
            match self.terminate_chunk(chunk).await {
                Ok(()) => {}
                // Gone already is what was wanted; but one unknown id fails the whole call,
                // so the others go one by one.
                Err(AwsError::NotFound(_)) if chunk.len() > 1 => {
                    for id in chunk {
                        match self.terminate_chunk(std::slice::from_ref(id)).await {
                            Ok(()) | Err(AwsError::NotFound(_)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(AwsError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn set_retiring(&self, ids: &[String], rollout: Option<&str>) -> Result<(), CloudError> {
        for chunk in ids.chunks(IDS_PER_CALL) {
            match rollout {
                Some(r) => self
                    .ec2
                    .create_tags()
                    .set_resources(Some(chunk.to_vec()))
                    .tags(Tag::builder().key(TAG_RETIRING).value(r).build())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("ec2:CreateTags", e))?,
                None => self
                    .ec2
                    .delete_tags()
                    .set_resources(Some(chunk.to_vec()))
                    // No value: the tag goes whatever its value.
                    .tags(Tag::builder().key(TAG_RETIRING).build())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("ec2:DeleteTags", e))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{InstanceState as Ec2State, Placement as Ec2Placement};

    fn settings() -> Ec2LaunchSettings {
        Ec2LaunchSettings {
            instance_type: "t3.micro".into(),
            security_group_ids: vec!["sg-1".into(), "sg-2".into()],
            instance_profile: Some("web".into()),
        }
    }

    fn placement() -> Placement {
        Placement {
            az: "us-east-1a".into(),
            subnet: "subnet-1".into(),
        }
    }

    #[test]
    fn spec_digest_is_stable_short_hex() {
        let d = spec_digest(&settings(), &placement());
        assert_eq!(d.len(), 12);
        assert!(d.chars().all(|c| c.is_ascii_hexdigit()));
        // Pinned: a change here relaunches every instance of every fleet.
        assert_eq!(d, spec_digest(&settings(), &placement()));
        assert_eq!(d, "b7efb00c6702");
    }

    #[test]
    fn spec_digest_ignores_group_order_and_repeats() {
        let mut s = settings();
        s.security_group_ids = vec!["sg-2".into(), "sg-1".into(), "sg-2".into()];
        assert_eq!(
            spec_digest(&s, &placement()),
            spec_digest(&settings(), &placement())
        );
    }

    #[test]
    fn spec_digest_changes_with_every_setting() {
        let base = spec_digest(&settings(), &placement());
        let mut s = settings();
        s.instance_type = "t3.small".into();
        assert_ne!(spec_digest(&s, &placement()), base);
        let mut s = settings();
        s.security_group_ids.push("sg-3".into());
        assert_ne!(spec_digest(&s, &placement()), base);
        let mut s = settings();
        s.instance_profile = None;
        assert_ne!(spec_digest(&s, &placement()), base);
        let mut p = placement();
        p.subnet = "subnet-2".into();
        assert_ne!(spec_digest(&settings(), &p), base);
    }

    #[test]
    fn client_tokens_fit_ec2() {
        assert_eq!(client_token("r1-us-east-1a-0"), "r1-us-east-1a-0");
        let long = "x".repeat(100);
        let t = client_token(&long);
        assert_eq!(t.len(), 64);
        assert_eq!(t, client_token(&long));
        assert_ne!(client_token("ü"), "ü");
    }

    #[test]
    fn capacity_errors() {
        for c in [
            "InsufficientInstanceCapacity",
            "InsufficientCapacity",
            "Unsupported",
        ] {
            assert!(is_capacity_error(c), "{c}");
        }
        assert!(!is_capacity_error("InvalidParameterValue"));
    }

    #[test]
    fn tags_of_a_launch() {
        let launch = Launch {
            fleet: "web".into(),
            placement: placement(),
            image: "ami-1".into(),
            spec: "abc".into(),
            rollout: "r1".into(),
            token: "t".into(),
            name: "web-r1-a".into(),
        };
        let tags = launch_tags(&launch);
        assert!(tags.contains(&("Name", "web-r1-a".into())));
        assert!(tags.contains(&(TAG_FLEET, "web".into())));
        assert!(tags.contains(&(TAG_IMAGE, "ami-1".into())));
        assert!(tags.contains(&(TAG_SPEC, "abc".into())));
        assert!(tags.contains(&(TAG_ROLLOUT, "r1".into())));
        assert!(tags.contains(&(TAG_MANAGED_BY, "amictl".into())));
    }

    fn ec2_instance(state: InstanceStateName) -> aws_sdk_ec2::types::Instance {
        ec2_instance_with(state, None)
    }

    fn ec2_instance_with(
        state: InstanceStateName,
        public_ip: Option<&str>,
    ) -> aws_sdk_ec2::types::Instance {
        aws_sdk_ec2::types::Instance::builder()
            .set_public_ip_address(public_ip.map(str::to_owned))
            .instance_id("i-1")
            .image_id("ami-1")
            .placement(
                Ec2Placement::builder()
                    .availability_zone("us-east-1b")
                    .build(),
            )
            .state(Ec2State::builder().name(state).build())
            .private_ip_address("10.0.0.5")
            .public_dns_name("")
            .tags(Tag::builder().key(TAG_SPEC).value("abc").build())
            .tags(Tag::builder().key(TAG_ROLLOUT).value("r1").build())
            .build()
    }

    #[test]
    fn instance_from_ec2() {
        let i = to_instance(&ec2_instance(InstanceStateName::Running)).unwrap();
        assert_eq!(
            i,
            Instance {
                id: "i-1".into(),
                az: "us-east-1b".into(),
                image: "ami-1".into(),
                spec: "abc".into(),
                state: InstanceState::Running,
                rollout: Some("r1".into()),
                retiring: None,
                // No public DNS name (empty) and no public IP: the private one.
                address: Some("10.0.0.5".into()),
                group: None,
            }
        );
        let public = ec2_instance_with(InstanceStateName::Pending, Some("3.3.3.3"));
        let i = to_instance(&public).unwrap();
        assert_eq!(i.address.as_deref(), Some("3.3.3.3"));
        assert_eq!(i.state, InstanceState::Pending);
    }

    #[test]
    fn states() {
        for (s, want) in [
            (InstanceStateName::Stopping, InstanceState::Down),
            (InstanceStateName::Stopped, InstanceState::Down),
            (InstanceStateName::ShuttingDown, InstanceState::Down),
            (InstanceStateName::Terminated, InstanceState::Terminated),
        ] {
            assert_eq!(to_instance(&ec2_instance(s)).unwrap().state, want);
        }
    }
}
