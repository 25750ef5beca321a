//! The lifecycle flags of `image publish` and `image build`: deprecation, public launch
//! permission, copies in other regions. Applied to the AMI whether it was just made or
//! already existed.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::image::aws::AwsImages;
use crate::image::lifecycle::{apply, ImageLifecycle, LifecycleOptions, MAX_DEPRECATE_DAYS};

#[derive(Debug, Clone, clap::Args)]
pub struct LifecycleArgs {
    /// Deprecate the AMI (and its copies) DAYS days from now. Set on every run, so an AMI
    /// published again keeps moving its date forward.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=MAX_DEPRECATE_DAYS as i64))]
    pub deprecate_in: Option<u32>,
    /// Let every AWS account launch the AMI (and its copies). Accounts block this by default
    /// ("block public access for AMIs"), and encrypted AMIs cannot be public.
    #[arg(long)]
    pub public: bool,
    /// Copy the AMI into these regions (comma-separated), in parallel, once each: an
    /// existing copy (same image digest) is reused. Prints `region: ami-id` on stderr.
    #[arg(long, value_name = "REGION,...", value_delimiter = ',')]
    pub copy_to_regions: Vec<String>,
    /// Seconds to wait for each copy to become available.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub copy_timeout: u64,
}

/// The flags, checked, with the clients to apply them.
pub struct Lifecycle {
    aws: AwsImages,
    options: LifecycleOptions,
}

impl LifecycleArgs {
    /// Checks the flags before anything is uploaded.
    pub fn prepare(
        &self,
        config: &aws_config::SdkConfig,
        encrypted: bool,
    ) -> anyhow::Result<Lifecycle> {
        let aws = AwsImages::new(config);
        let options = LifecycleOptions {
            deprecate_in_days: self.deprecate_in,
            public: self.public,
            copy_to: self.copy_to_regions.clone(),
            copy_deadline: Duration::from_secs(self.copy_timeout),
        }
        .validated(&aws.region(), encrypted)?;
        Ok(Lifecycle { aws, options })
    }
}

impl Lifecycle {
    pub async fn apply(&self, ami_id: &str, cancel: &CancellationToken) -> anyhow::Result<()> {
        let report = apply(&self.aws, ami_id, &self.options, SystemTime::now(), cancel)
            .await
            .with_context(|| format!("{ami_id} is published"))?;
        for copy in &report.copies {
            eprintln!("{}: {}", copy.region, copy.ami_id);
        }
        if report.failed.is_empty() {
            return Ok(());
        }
        let failures: Vec<String> = report
            .failed
            .iter()
            .map(|(region, e)| format!("{region}: {e}"))
            .collect();
        anyhow::bail!(
            "{ami_id} is published, but copying it failed in {} region(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
    }
}
