//! `image publish`, the orchestration: look the image up by store path and by content
//! digest, upload only when no AMI has it, register, wait until available, and leave
//! nothing half-made behind on failure or Ctrl-C.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::aws::AwsError;

use super::cache::DigestCache;
use super::info::ImageSource;
use super::register::{
    build_spec, digest_tag, RegisterSpec, SpecError, TAG_DIGEST, TAG_SPARSE, TAG_STORE_PATH,
};
use super::upload::{
    jitter, upload, SnapshotStore, UploadError, UploadOptions, Uploaded, Uploader,
};

/// An AMI of this account, as DescribeImages tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiRecord {
    pub id: String,
    pub name: String,
    /// `pending`, `available`, `failed`, ...
    pub state: String,
    pub tags: Vec<(String, String)>,
    pub snapshot_ids: Vec<String>,
    pub created: String,
    pub public: bool,
}

impl AmiRecord {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Published with `--omit-zero-blocks`: never to back an encrypted volume.
    pub fn sparse(&self) -> bool {
        self.tag(TAG_SPARSE) == Some("true")
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    #[error("an AMI named {0:?} already exists")]
    DuplicateName(String),
    #[error(transparent)]
    Aws(#[from] AwsError),
}

/// EC2's AMI calls.
pub trait ImageRegistry: Send + Sync + 'static {
    /// This account's AMIs carrying every given tag.
    fn find(
        &self,
        tags: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<AmiRecord>, AwsError>> + Send;
    fn find_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<AmiRecord>, AwsError>> + Send;
    fn get(&self, ami_id: &str)
        -> impl Future<Output = Result<Option<AmiRecord>, AwsError>> + Send;
    fn register(
        &self,
        spec: &RegisterSpec,
    ) -> impl Future<Output = Result<String, RegisterError>> + Send;
    fn tag(
        &self,
        resource_ids: &[String],
        tags: &[(String, String)],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    fn deregister(&self, ami_id: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
}

/// The EBS direct APIs uploader.
pub struct DirectUpload<S> {
    pub store: Arc<S>,
    pub options: UploadOptions,
}

impl<S: SnapshotStore> Uploader for DirectUpload<S> {
    async fn upload(
        &self,
        image: &ImageSource,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        started: &mut Option<String>,
    ) -> Result<Uploaded, UploadError> {
        upload(
            self.store.clone(),
            image,
            &self.options,
            progress,
            cancel,
            started,
        )
        .await
    }
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub prefix: String,
    pub tpm_v2: bool,
    pub keep_on_failure: bool,
    /// The uploader leaves zero blocks out (a sparse snapshot): tag and name it so. A
    /// sparse publish may reuse a whole AMI of the same content; a whole one never reuses
    /// a sparse one.
    pub omit_zero_blocks: bool,
    /// How long a new AMI may stay `pending`.
    pub available_deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An AMI with this content already existed; nothing was left created. `uploaded`
    /// says whether the image was uploaded before the match was found (its snapshot was
    /// then deleted).
    Existing {
        ami_id: String,
        matched_by: &'static str,
        uploaded: bool,
    },
    Created {
        ami_id: String,
        uploaded: Uploaded,
    },
}

impl Outcome {
    pub fn ami_id(&self) -> &str {
        match self {
            Outcome::Existing { ami_id, .. } | Outcome::Created { ami_id, .. } => ami_id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("looking for an existing AMI: {0}")]
    Lookup(AwsError),
    #[error("{cause}{cleanup}")]
    Upload { cause: UploadError, cleanup: String },
    #[error("registering the AMI: {cause}{cleanup}")]
    Register {
        cause: RegisterError,
        cleanup: String,
    },
    #[error("tagging {what}: {cause}{cleanup}")]
    Tag {
        what: String,
        cause: AwsError,
        cleanup: String,
    },
    #[error("AMI {ami_id} did not become available: {reason}{cleanup}")]
    NotAvailable {
        ami_id: String,
        reason: String,
        cleanup: String,
    },
    #[error("an AMI named {name:?} already exists ({ami_id}) with other content; choose another --prefix{cleanup}")]
    NameTaken {
        name: String,
        ami_id: String,
        cleanup: String,
    },
    #[error("interrupted{cleanup}")]
    Interrupted { cleanup: String },
}

/// The newest available AMI carrying `key=value`, a whole one before a sparse one; a sparse
/// one only if `sparse_ok`.
async fn find_available<R: ImageRegistry>(
    registry: &R,
    key: &str,
    value: &str,
    sparse_ok: bool,
) -> Result<Option<AmiRecord>, AwsError> {
    let mut found = registry.find(&[(key, value)]).await?;
    found.retain(|a| a.state == "available" && (sparse_ok || !a.sparse()));
    found.sort_by(|a, b| (a.sparse(), &b.created).cmp(&(b.sparse(), &a.created)));
    Ok(found.into_iter().next())
}

/// The effects `publish` works through.
pub struct Services<'a, S, R, U> {
    /// Deletes snapshots this run made, when it must clean up.
    pub store: Arc<S>,
    pub registry: &'a R,
    pub uploader: &'a U,
    pub cache: Option<&'a DigestCache>,
}

pub async fn publish<S: SnapshotStore, R: ImageRegistry, U: Uploader>(
    services: &Services<'_, S, R, U>,
    image: &ImageSource,
    opts: &PublishOptions,
    progress: &ProgressBar,
    cancel: &CancellationToken,
) -> Result<Outcome, PublishError> {
    let Services {
        store,
        registry,
        uploader,
        cache,
    } = services;
    let (store, registry, uploader, cache) = (&**store, *registry, *uploader, *cache);
    // Everything RegisterImage will be asked is checked before a byte is uploaded (the
    // digest and snapshot here are stand-ins), so a bad flag leaves nothing behind.
    build_spec(
        image,
        &"0".repeat(64),
        "snap-check",
        &opts.prefix,
        opts.tpm_v2,
        opts.omit_zero_blocks,
    )?;

    // Content addressing, before reading a byte: the Nix store path, then a remembered digest.
    if let Some(store_path) = &image.store_path {
        if let Some(ami) =
            find_available(registry, TAG_STORE_PATH, store_path, opts.omit_zero_blocks)
                .await
                .map_err(PublishError::Lookup)?
        {
            info!(ami = %ami.id, %store_path, "an AMI of this store path exists; nothing to upload");
            return Ok(Outcome::Existing {
                ami_id: ami.id,
                matched_by: "store path",
                uploaded: false,
            });
        }
    }
    if let Some(digest) = cache.and_then(|c| c.get(&image.path)) {
        if let Some(ami) = find_available(
            registry,
            TAG_DIGEST,
            &digest_tag(&digest),
            opts.omit_zero_blocks,
        )
        .await
        .map_err(PublishError::Lookup)?
        {
            info!(ami = %ami.id, %digest, "an AMI with this content exists; nothing to upload");
            return Ok(Outcome::Existing {
                ami_id: ami.id,
                matched_by: "content digest",
                uploaded: false,
            });
        }
    }

    let mut started = None;
    let uploaded = match uploader.upload(image, progress, cancel, &mut started).await {
        Ok(u) => u,
        Err(source) => {
            let cleanup = clean_up(
                store,
                registry,
                None,
                started.as_deref(),
                opts.keep_on_failure,
            )
            .await;
            return Err(match source {
                UploadError::Interrupted => PublishError::Interrupted { cleanup },
                source => PublishError::Upload {
                    cause: source,
                    cleanup,
                },
            });
        }
    };
    progress.finish_and_clear();
    if let Some(c) = cache {
        c.put(&image.path, &uploaded.digest);
    }
    let snapshot_id = uploaded.snapshot_id.clone();
    // Every failure from here on deletes this run's snapshot (or keeps it, as asked).
    let drop_snapshot = || {
        clean_up(
            store,
            registry,
            None,
            Some(&snapshot_id),
            opts.keep_on_failure,
        )
    };
    info!(%snapshot_id, digest = %uploaded.digest, blocks = uploaded.blocks_uploaded, "snapshot completed");

    // Tagged (with the prefix) before anything else can fail: an imported snapshot has no
    // tags until now, and the IAM policy lets a prefix delete only what carries its tag.
    let spec = build_spec(
        image,
        &uploaded.digest,
        &snapshot_id,
        &opts.prefix,
        opts.tpm_v2,
        opts.omit_zero_blocks,
    )?;
    if let Err(source) = registry
        .tag(std::slice::from_ref(&snapshot_id), &spec.tags)
        .await
    {
        let cleanup = drop_snapshot().await;
        return Err(PublishError::Tag {
            what: snapshot_id.clone(),
            cause: source,
            cleanup,
        });
    }
    // The same content under another path (or a race with another publish).
    match find_available(
        registry,
        TAG_DIGEST,
        &digest_tag(&uploaded.digest),
        opts.omit_zero_blocks,
    )
    .await
    {
        Ok(Some(ami)) => {
            let cleanup = clean_up(store, registry, None, Some(&snapshot_id), false).await;
            info!(ami = %ami.id, "an AMI with this content already exists{cleanup}");
            return Ok(Outcome::Existing {
                ami_id: ami.id,
                matched_by: "content digest",
                uploaded: true,
            });
        }
        Ok(None) => {}
        Err(e) => {
            let cleanup = drop_snapshot().await;
            return Err(PublishError::Tag {
                what: "(lookup)".into(),
                cause: e,
                cleanup,
            });
        }
    }

    if cancel.is_cancelled() {
        let cleanup = drop_snapshot().await;
        return Err(PublishError::Interrupted { cleanup });
    }

    let ami_id = match registry.register(&spec).await {
        Ok(id) => id,
        Err(RegisterError::DuplicateName(name)) => {
            let existing = registry.find_by_name(&name).await.ok().flatten();
            let cleanup = drop_snapshot().await;
            return match existing {
                Some(ami) if ami.tag(TAG_DIGEST) == Some(digest_tag(&uploaded.digest).as_str()) => {
                    Ok(Outcome::Existing {
                        ami_id: ami.id,
                        matched_by: "content digest",
                        uploaded: true,
                    })
                }
                Some(ami) => Err(PublishError::NameTaken {
                    name,
                    ami_id: ami.id,
                    cleanup,
                }),
                None => Err(PublishError::Register {
                    cause: RegisterError::DuplicateName(name),
                    cleanup,
                }),
            };
        }
        Err(source) => {
            let cleanup = drop_snapshot().await;
            return Err(PublishError::Register {
                cause: source,
                cleanup,
            });
        }
    };
    info!(%ami_id, name = %spec.name, "registered, waiting until available");
    // RegisterImage's TagSpecifications tag the AMI atomically on AWS; tagging again is
    // idempotent there and covers EC2-compatible endpoints that ignore TagSpecifications,
    // without which the content lookups above could never find this AMI.
    if let Err(source) = registry
        .tag(std::slice::from_ref(&ami_id), &spec.tags)
        .await
    {
        let cleanup = clean_up(
            store,
            registry,
            Some(&ami_id),
            Some(&snapshot_id),
            opts.keep_on_failure,
        )
        .await;
        return Err(PublishError::Tag {
            what: ami_id,
            cause: source,
            cleanup,
        });
    }

    let waited = tokio::select! {
        r = wait_available(registry, &ami_id, opts.available_deadline) => r,
        _ = cancel.cancelled() => Err("interrupted".to_owned()),
    };
    if let Err(reason) = waited {
        let cleanup = clean_up(
            store,
            registry,
            Some(&ami_id),
            Some(&snapshot_id),
            opts.keep_on_failure,
        )
        .await;
        if cancel.is_cancelled() {
            return Err(PublishError::Interrupted { cleanup });
        }
        return Err(PublishError::NotAvailable {
            ami_id,
            reason,
            cleanup,
        });
    }
    Ok(Outcome::Created { ami_id, uploaded })
}

async fn wait_available<R: ImageRegistry>(
    registry: &R,
    ami_id: &str,
    deadline: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let mut delay = Duration::from_secs(2);
    loop {
        match registry.get(ami_id).await {
            Ok(Some(ami)) if ami.state == "available" => return Ok(()),
            Ok(Some(ami))
                if matches!(
                    ami.state.as_str(),
                    "failed" | "error" | "invalid" | "deregistered"
                ) =>
            {
                return Err(format!("its state is {}", ami.state))
            }
            Ok(_) => {}
            Err(e) => warn!(%ami_id, error = %e, "cannot read the AMI's state, retrying"),
        }
        if started.elapsed() + delay > deadline {
            return Err(format!(
                "still not available after {} s",
                started.elapsed().as_secs()
            ));
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

/// Deregisters the AMI and deletes the snapshot this run made; says what it did, for the
/// error message. Never leaves a resource unmentioned.
async fn clean_up<S: SnapshotStore, R: ImageRegistry>(
    store: &S,
    registry: &R,
    ami_id: Option<&str>,
    snapshot_id: Option<&str>,
    keep: bool,
) -> String {
    let mut said = Vec::new();
    if keep {
        if let Some(a) = ami_id {
            said.push(format!("kept AMI {a} (--keep-on-failure)"));
        }
        if let Some(s) = snapshot_id {
            said.push(format!("kept snapshot {s} (--keep-on-failure)"));
        }
    } else {
        if let Some(a) = ami_id {
            match registry.deregister(a).await {
                Ok(()) => said.push(format!("deregistered AMI {a}")),
                Err(e) => said.push(format!(
                    "could not deregister AMI {a} ({e}): run `aws ec2 deregister-image --image-id {a}`"
                )),
            }
        }
        if let Some(s) = snapshot_id {
            match store.delete(s).await {
                Ok(()) => said.push(format!("deleted snapshot {s}")),
                Err(e) => said.push(format!(
                    "could not delete snapshot {s} ({e}): run `aws ec2 delete-snapshot --snapshot-id {s}`"
                )),
            }
        }
    }
    if said.is_empty() {
        String::new()
    } else {
        format!("; {}", said.join(", "))
    }
}
