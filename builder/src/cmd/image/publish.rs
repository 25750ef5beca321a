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
use crate::image::register::TAG_SPARSE;
use crate::image::s3::{S3Import, S3Options};
use crate::image::s3_aws::{AwsImporter, AwsStaging};
use crate::image::upload::UploadOptions;
use crate::image::upload::Uploader;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The result of `nix build .#ami` (a directory with nix-support/image-info.json).
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    pub result: Option<PathBuf>,
    /// A bare raw disk image instead (needs --boot-mode and --arch).
    #[arg(long, requires_all = ["boot_mode", "arch"])]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub flags: Flags,
}

/// How to publish an image, whatever made it: `image publish` and `image build` share these.
#[derive(Debug, clap::Args)]
pub struct Flags {
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
    /// Leave all-zero blocks and holes out of the snapshot (less to send, a sparse
    /// snapshot). Unsafe on encrypted volumes, where omitted blocks read back as random
    /// bytes: refused with --encrypted or where the account encrypts new volumes by default,
    /// and `rollout`/`up` refuse the AMI (their root volumes are always encrypted). For
    /// AMIs launched unencrypted by other tools only.
    #[arg(long)]
    pub omit_zero_blocks: bool,
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
    /// How the image becomes a snapshot: `ebs` (EBS direct APIs, fast) or `s3` (a staging
    /// object in --bucket and ImportSnapshot, 10-20+ minutes, for accounts that do not allow
    /// EBS direct APIs; it needs the `vmimport` service role).
    #[arg(long, value_enum, default_value_t = Via::Ebs)]
    pub via: Via,
    /// Staging bucket for --via s3, in the region of the import (the object is deleted
    /// after the import).
    #[arg(long, required_if_eq("via", "s3"))]
    pub bucket: Option<String>,
    /// Key prefix of the staging object in --bucket.
    #[arg(long, default_value = "amictl/")]
    pub key_prefix: String,
    #[command(flatten)]
    pub lifecycle: super::lifecycle::LifecycleArgs,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let flags = args.flags;
    let image = match (&args.result, &args.image) {
        (Some(dir), _) => ImageSource::from_result_dir(dir, flags.boot_mode)?,
        (None, Some(file)) => ImageSource::from_file(
            file,
            flags.boot_mode.context("--image needs --boot-mode")?,
            flags.arch.context("--image needs --arch")?,
            flags.label.clone(),
            None,
        )?,
        (None, None) => anyhow::bail!("pass RESULT_DIR (from `nix build .#ami`) or --image FILE"),
    };
    publish_image(image, flags).await
}

/// Publishes an image already resolved (by `image publish` or `image build`), then applies
/// the lifecycle flags; the AMI id is printed only when all of it succeeded.
pub async fn publish_image(image: ImageSource, args: Flags) -> anyhow::Result<i32> {
    Ok(match publish_ami(image, args).await? {
        Some(ami_id) => {
            println!("{ami_id}");
            0
        }
        None => 130,
    })
}

/// [`publish_image`] without the printing: the AMI id, or None when interrupted (what was
/// uploaded is cleaned up).
pub async fn publish_ami(image: ImageSource, args: Flags) -> anyhow::Result<Option<String>> {
    if args.via != Via::S3 && args.bucket.is_some() {
        anyhow::bail!("--bucket is for --via s3 (the staging bucket of ImportSnapshot)");
    }
    if args.omit_zero_blocks && args.encrypted {
        anyhow::bail!(
            "--omit-zero-blocks with --encrypted: blocks left out of an encrypted snapshot read \
             back as random bytes, not zeros; drop --omit-zero-blocks"
        );
    }
    if args.omit_zero_blocks && args.via == Via::S3 {
        anyhow::bail!(
            "--omit-zero-blocks is for the EBS direct upload: ImportSnapshot (--via s3) decides \
             itself which blocks to write; drop one of the two"
        );
    }
    info!(path = %image.path.display(), size = image.size, arch = %image.arch, boot_mode = image.boot_mode.as_aws(), "image");

    let config = crate::aws::load(args.region.as_deref()).await?;
    let lifecycle = args.lifecycle.prepare(&config, args.encrypted)?;
    let aws = AwsImages::new(&config);
    if args.omit_zero_blocks && aws.encrypts_by_default().await? {
        anyhow::bail!(
            "--omit-zero-blocks: this account encrypts new EBS volumes by default in this region \
             (ec2:GetEbsEncryptionByDefault), so every volume made from a sparse snapshot would \
             read random bytes where blocks were left out; publish without --omit-zero-blocks"
        );
    }
    let cancel = CancellationToken::new();
    crate::cmd::cancel_on_signal(cancel.clone());

    let progress = progress_bar(image.size);
    let wait = Duration::from_secs(args.wait_timeout);
    let direct = DirectUpload {
        store: Arc::new(aws.clone()),
        options: UploadOptions {
            concurrency: args.concurrency as usize,
            encrypted: args.encrypted,
            omit_zero_blocks: args.omit_zero_blocks,
            kms_key_arn: args.kms_key_id.clone(),
            description: format!("amictl: {} {}", image.label, image.arch.nix_system()),
            tags: vec![
                ("Name".into(), format!("{}{}", args.prefix, image.label)),
                ("amictl:managed-by".into(), "amictl".into()),
                ("amictl:prefix".into(), args.prefix.clone()),
            ]
            .into_iter()
            .chain(
                args.omit_zero_blocks
                    .then(|| (TAG_SPARSE.to_owned(), "true".to_owned())),
            )
            .collect(),
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
    let uploader = choose_uploader(&args, &config, direct)?;
    let opts = PublishOptions {
        prefix: args.prefix.clone(),
        tpm_v2: args.tpm,
        keep_on_failure: args.keep_on_failure,
        omit_zero_blocks: args.omit_zero_blocks,
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
            lifecycle.apply(&ami_id, &cancel).await?;
            Ok(Some(ami_id))
        }
        Ok(Outcome::Created { ami_id, uploaded }) => {
            eprintln!(
                "registered {ami_id}: snapshot {}, {} of {} blocks uploaded, digest {}",
                uploaded.snapshot_id,
                uploaded.blocks_uploaded,
                uploaded.blocks_total,
                uploaded.digest
            );
            lifecycle.apply(&ami_id, &cancel).await?;
            Ok(Some(ami_id))
        }
        Err(e @ PublishError::Interrupted { .. }) => {
            eprintln!("error: {e}");
            Ok(None)
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
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("a valid template"),
    );
    bar
}

/// How the image's bytes reach EBS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// EBS direct APIs: block by block, holes sent as zeros without reading them.
    Ebs,
    /// A staging object in S3, then EC2 ImportSnapshot.
    S3,
}

/// The uploader `--via` names; the S3 one takes the EBS one's description, tags, token,
/// encryption and deadline.
enum Chosen<S> {
    Ebs(DirectUpload<S>),
    S3(S3Import<AwsStaging, AwsImporter>),
}

fn choose_uploader<S>(
    args: &Flags,
    config: &aws_config::SdkConfig,
    direct: DirectUpload<S>,
) -> anyhow::Result<Chosen<S>> {
    if args.via == Via::Ebs {
        return Ok(Chosen::Ebs(direct));
    }
    let bucket = args.bucket.clone().context("--via s3 needs --bucket")?;
    let o = direct.options;
    Ok(Chosen::S3(S3Import {
        staging: Arc::new(AwsStaging::new(config)),
        importer: Arc::new(AwsImporter::new(config)),
        options: S3Options {
            bucket,
            key_prefix: args.key_prefix.clone(),
            parts_in_flight: o.concurrency,
            description: o.description,
            tags: o.tags,
            client_token: o.client_token,
            encrypted: o.encrypted,
            kms_key_id: o.kms_key_arn,
            import_deadline: o.completion_deadline,
            keep_on_failure: args.keep_on_failure,
            ..S3Options::default()
        },
    }))
}

impl<S: crate::image::upload::SnapshotStore> Uploader for Chosen<S> {
    async fn upload(
        &self,
        image: &ImageSource,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        started: &mut Option<String>,
    ) -> Result<crate::image::upload::Uploaded, crate::image::upload::UploadError> {
        match self {
            Chosen::Ebs(u) => u.upload(image, progress, cancel, started).await,
            Chosen::S3(u) => u.upload(image, progress, cancel, started).await,
        }
    }
}
