//! `amictl image publish RESULT_DIR`: the AMI id on stdout (its last and only line),
//! progress and logs on stderr.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::image::aws::AwsImages;
use crate::image::cache::DigestCache;
use crate::image::info::{Arch, BootMode, ImageSource};
use crate::image::publish::{
    publish, DirectUpload, Outcome, PublishError, PublishOptions, Services,
};
use crate::image::upload::UploadOptions;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The result of `nix build .#ami` (a directory with nix-support/image-info.json).
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub result: Option<PathBuf>,
    /// A bare raw disk image instead (needs --boot-mode and --arch).
    #[arg(long, requires_all = ["boot_mode", "arch"])]
    pub image: Option<PathBuf>,
    /// Boot mode; overrides image-info.json (`uefi-preferred` boots UEFI where it can).
    #[arg(long, value_enum)]
    pub boot_mode: Option<BootMode>,
    /// Architecture of a bare image.
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Label of a bare image (image-info.json's `label` otherwise).
    #[arg(long, default_value = "nixos")]
    pub label: String,
    /// Prefix of the AMI's name (resource names carry it).
    #[arg(long, env = "AMICTL_PREFIX", default_value = "amictl-")]
    pub prefix: String,
    /// Block uploads in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Encrypt the snapshot (with the account's default EBS key unless --kms-key-id).
    #[arg(long)]
    pub encrypted: bool,
    /// KMS key ARN for an encrypted snapshot.
    #[arg(long, requires = "encrypted")]
    pub kms_key_id: Option<String>,
    /// Register with NitroTPM v2.0 (UEFI x86_64 images only).
    #[arg(long)]
    pub tpm: bool,
    /// Keep a partial snapshot (or a failed AMI) for inspection instead of deleting it.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// Do not remember this file's digest locally (a second publish then re-reads it).
    #[arg(long)]
    pub no_cache: bool,
    /// Seconds to wait for the snapshot to complete and the AMI to become available.
    #[arg(long, default_value_t = 1800)]
    pub wait_timeout: u64,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let image = match (&args.result, &args.image) {
        (Some(dir), _) => ImageSource::from_result_dir(dir, args.boot_mode)?,
        (None, Some(file)) => ImageSource::from_file(
            file,
            args.boot_mode.context("--image needs --boot-mode")?,
            args.arch.context("--image needs --arch")?,
            args.label.clone(),
            None,
        )?,
        (None, None) => anyhow::bail!("pass RESULT_DIR (from `nix build .#ami`) or --image FILE"),
    };
    info!(path = %image.path.display(), size = image.size, arch = %image.arch, boot_mode = image.boot_mode.as_aws(), "image");

    let config = crate::aws::load(args.region.as_deref()).await?;
    let aws = AwsImages::new(&config);
    let cancel = CancellationToken::new();
    crate::cmd::cancel_on_signal(cancel.clone());

    let progress = progress_bar(image.size);
    let wait = Duration::from_secs(args.wait_timeout);
    let uploader = DirectUpload {
        store: Arc::new(aws.clone()),
        options: UploadOptions {
            concurrency: args.concurrency as usize,
            encrypted: args.encrypted,
            kms_key_arn: args.kms_key_id.clone(),
            description: format!("amictl: {} {}", image.label, image.arch.nix_system()),
            tags: vec![
                ("Name".into(), format!("{}{}", args.prefix, image.label)),
                ("amictl:managed-by".into(), "amictl".into()),
                ("amictl:prefix".into(), args.prefix.clone()),
            ],
            // One token per run: the SDK's retries of StartSnapshot reuse it, so a retried
            // call cannot start a second snapshot.
            client_token: format!(
                "amictl-{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            ),
            completion_deadline: wait,
            ..UploadOptions::default()
        },
    };
    let opts = PublishOptions {
        prefix: args.prefix.clone(),
        tpm_v2: args.tpm,
        keep_on_failure: args.keep_on_failure,
        available_deadline: wait,
    };
    let cache = (!args.no_cache)
        .then(DigestCache::default_location)
        .flatten();
    let services = Services {
        store: Arc::new(aws.clone()),
        registry: &aws,
        uploader: &uploader,
        cache: cache.as_ref(),
    };
    let outcome = publish(&services, &image, &opts, &progress, &cancel).await;
    progress.finish_and_clear();
    match outcome {
        Ok(Outcome::Existing {
            ami_id,
            matched_by,
            uploaded,
        }) => {
            if uploaded {
                eprintln!("{ami_id} already has this image (same {matched_by}); the new snapshot was deleted");
            } else {
                eprintln!("{ami_id} already has this image (same {matched_by}); nothing uploaded");
            }
            println!("{ami_id}");
            Ok(0)
        }
        Ok(Outcome::Created { ami_id, uploaded }) => {
            eprintln!(
                "registered {ami_id}: snapshot {}, {} of {} blocks uploaded, digest {}",
                uploaded.snapshot_id,
                uploaded.blocks_uploaded,
                uploaded.blocks_total,
                uploaded.digest
            );
            println!("{ami_id}");
            Ok(0)
        }
        Err(e @ PublishError::Interrupted { .. }) => {
            eprintln!("error: {e}");
            Ok(130)
        }
        Err(e) => Err(e.into()),
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    // Only for a person watching: logs and CI get no bar characters.
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    bar
}
