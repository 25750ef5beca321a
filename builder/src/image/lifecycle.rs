//! What happens to a published AMI afterwards: deprecation, a public launch permission, and
//! copies in other regions. The decisions (dates, tokens, tags, targets) are pure functions;
//! the EC2 calls sit behind [`ImageLifecycle`].

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::aws::AwsError;

use super::publish::{AmiRecord, ImageRegistry};
use super::register::{TAG_DIGEST, TAG_MANAGED_BY, TAG_SNAPSHOT};
use super::upload::jitter;

/// On a copy: the AMI it was copied from, and that AMI's region.
pub const TAG_SOURCE_AMI: &str = "amictl:source-ami";
pub const TAG_SOURCE_REGION: &str = "amictl:source-region";

const DAY: u64 = 24 * 60 * 60;
/// EnableImageDeprecation refuses dates more than 10 years ahead.
pub const MAX_DEPRECATE_DAYS: u32 = 3650;
/// ... and, for a public AMI, more than 2 years after its creation.
pub const MAX_PUBLIC_DEPRECATE_DAYS: u32 = 730;

/// An AMI with what `image list` shows beyond an [`AmiRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmiDetails {
    pub record: AmiRecord,
    /// DescribeImages' `DeprecationTime`, when one is set.
    pub deprecation_time: Option<String>,
}

/// What CopyImage is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRequest {
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: String,
    pub client_token: String,
    /// Put on the new AMI and its snapshots.
    pub tags: Vec<(String, String)>,
}

/// EC2's calls after registration, in one region; [`ImageLifecycle::in_region`] gives
/// the same account's view of another.
pub trait ImageLifecycle: ImageRegistry + Clone {
    fn region(&self) -> String;
    fn in_region(&self, region: &str) -> Self;
    /// This account's AMIs carrying every given tag, with their deprecation time.
    fn list(
        &self,
        tags: &[(&str, &str)],
    ) -> impl Future<Output = Result<Vec<AmiDetails>, AwsError>> + Send;
    fn deprecate(
        &self,
        ami_id: &str,
        at: SystemTime,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// Adds the launch permission `group=all`.
    fn make_public(&self, ami_id: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// CopyImage into this client's region; the new AMI's id.
    fn copy_image(
        &self,
        request: &CopyRequest,
    ) -> impl Future<Output = Result<String, AwsError>> + Send;
    /// For each of `ami_ids` that instances (pending, running, stopping or stopped) were
    /// launched from: those instances' ids.
    fn instances_using(
        &self,
        ami_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, Vec<String>>, AwsError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("--deprecate-in {days}: at most {max} days ({why})")]
    DeprecateTooFar {
        days: u32,
        max: u32,
        why: &'static str,
    },
    #[error("--public cannot share an encrypted AMI: EC2 does not make AMIs with encrypted snapshots public")]
    PublicEncrypted,
    #[error("--copy-to-regions names {0}, the region the AMI is published in")]
    CopyToSourceRegion(String),
    #[error("--copy-to-regions: {0:?} is not a region name")]
    BadRegion(String),
    #[error("AMI {0} is not visible in this account and region")]
    SourceMissing(String),
    #[error("AMI {0} has no {TAG_DIGEST} tag, so its copies cannot be found again; publish it with amictl")]
    NoDigest(String),
    #[error("deprecating {ami_id} in {region}: the date would be more than {MAX_PUBLIC_DEPRECATE_DAYS} days after the AMI's creation ({created}), which EC2 refuses for public AMIs; pass a smaller --deprecate-in")]
    PublicDeprecationTooLate {
        ami_id: String,
        region: String,
        created: String,
    },
    #[error("deprecating {ami_id} in {region}: {error}")]
    Deprecate {
        ami_id: String,
        region: String,
        error: AwsError,
    },
    #[error("making {ami_id} public in {region}: {error}{hint}")]
    Public {
        ami_id: String,
        region: String,
        error: AwsError,
        hint: &'static str,
    },
    #[error("reading {ami_id} in {region}: {error}")]
    Read {
        ami_id: String,
        region: String,
        error: AwsError,
    },
    #[error("copying {source_id} to {region}: {error}")]
    Copy {
        source_id: String,
        region: String,
        error: AwsError,
    },
    #[error("tagging the copy {ami_id} in {region}: {error}")]
    TagCopy {
        ami_id: String,
        region: String,
        error: AwsError,
    },
    #[error("the copy {ami_id} in {region} is {state}{detail}")]
    CopyFailed {
        ami_id: String,
        region: String,
        state: String,
        detail: &'static str,
    },
    #[error("the copy {ami_id} in {region} is still not available after {seconds} s; it carries on in EC2: run the same command again later (it finds the copy instead of copying again), or raise --copy-timeout")]
    CopyTimeout {
        ami_id: String,
        region: String,
        seconds: u64,
    },
    #[error("interrupted while waiting for the copy {ami_id} in {region}; it carries on in EC2, and the same command run again finds it")]
    Interrupted { ami_id: String, region: String },
}

/// Said after a refused `group=all` launch permission: new accounts block public AMIs.
const PUBLIC_HINT: &str = ". AWS accounts can block public AMIs (\"block public access for AMIs\", on by default for new accounts, set per region): see `aws ec2 get-image-block-public-access-state`, and `aws ec2 disable-image-block-public-access` if this account may share AMIs publicly. AMIs with encrypted snapshots or Marketplace product codes cannot be public either";

/// What to do to a published AMI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LifecycleOptions {
    pub deprecate_in_days: Option<u32>,
    pub public: bool,
    pub copy_to: Vec<String>,
    /// How long each copy may stay `pending`.
    pub copy_deadline: Duration,
}

impl LifecycleOptions {
    pub fn is_empty(&self) -> bool {
        self.deprecate_in_days.is_none() && !self.public && self.copy_to.is_empty()
    }

    /// Checks the flags before anything is uploaded, and normalizes the regions.
    pub fn validated(
        mut self,
        source_region: &str,
        encrypted: bool,
    ) -> Result<Self, LifecycleError> {
        if self.public && encrypted {
            return Err(LifecycleError::PublicEncrypted);
        }
        if let Some(days) = self.deprecate_in_days {
            check_deprecate_days(days, self.public)?;
        }
        self.copy_to = copy_targets(source_region, &self.copy_to)?;
        Ok(self)
    }
}

pub fn check_deprecate_days(days: u32, public: bool) -> Result<(), LifecycleError> {
    if days > MAX_DEPRECATE_DAYS {
        return Err(LifecycleError::DeprecateTooFar {
            days,
            max: MAX_DEPRECATE_DAYS,
            why: "EC2 refuses deprecation dates more than 10 years ahead",
        });
    }
    if public && days > MAX_PUBLIC_DEPRECATE_DAYS {
        return Err(LifecycleError::DeprecateTooFar {
            days,
            max: MAX_PUBLIC_DEPRECATE_DAYS,
            why: "EC2 refuses deprecation dates more than 2 years after a public AMI's creation",
        });
    }
    Ok(())
}

/// `now + days`, rounded up to a whole minute: EC2 rounds the seconds itself, and rounding
/// up never lands in the past.
pub fn deprecate_at(now: SystemTime, days: u32) -> SystemTime {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        .ceil() as u64;
    let at = secs + u64::from(days) * DAY;
    UNIX_EPOCH + Duration::from_secs(at.div_ceil(60) * 60)
}

/// Whether EC2 takes `at` as a public AMI's deprecation date (at most 2 years after its
/// creation). An unreadable creation date is left to EC2 to judge.
pub fn public_deprecation_allowed(at: SystemTime, created: &str) -> bool {
    match parse_time(created) {
        Some(created) => {
            at <= created + Duration::from_secs(u64::from(MAX_PUBLIC_DEPRECATE_DAYS) * DAY)
        }
        None => true,
    }
}

/// An EC2 timestamp (`2026-08-01T12:00:00.000Z`).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let t = aws_smithy_types::DateTime::from_str(s, aws_smithy_types::date_time::Format::DateTime)
        .ok()?;
    SystemTime::try_from(t).ok()
}

pub fn format_time(t: SystemTime) -> String {
    aws_smithy_types::DateTime::from(t)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

/// CopyImage's ClientToken: the same source AMI copied to the same region always sends the
/// same token, so a retried or repeated publish gets the first copy back instead of a
/// second one. At most 64 ASCII characters.
pub fn copy_token(source_ami: &str, region: &str) -> String {
    let hash = Sha256::digest(format!("{source_ami}\n{region}").as_bytes());
    format!("amictl-copy-{}", &hex::encode(hash)[..40])
}

/// The regions to copy to: trimmed, deduplicated, in the order given; the source region
/// itself is an error (an AMI cannot be its own copy).
pub fn copy_targets(
    source_region: &str,
    requested: &[String],
) -> Result<Vec<String>, LifecycleError> {
    let mut out: Vec<String> = Vec::new();
    for r in requested {
        let r = r.trim();
        if r.is_empty() {
            continue;
        }
        if !r
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(LifecycleError::BadRegion(r.to_owned()));
        }
        if r == source_region {
            return Err(LifecycleError::CopyToSourceRegion(r.to_owned()));
        }
        if !out.iter().any(|o| o == r) {
            out.push(r.to_owned());
        }
    }
    Ok(out)
}

/// The copy's tags: the source's, except its snapshot id (the copy has its own snapshot,
/// tagged once it is known) and system tags, plus where it came from.
pub fn copy_tags(source: &AmiRecord, source_region: &str) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = source
        .tags
        .iter()
        .filter(|(k, _)| {
            k != TAG_SNAPSHOT
                && k != TAG_SOURCE_AMI
                && k != TAG_SOURCE_REGION
                && !k.starts_with("aws:")
        })
        .cloned()
        .collect();
    tags.push((TAG_SOURCE_AMI.to_owned(), source.id.clone()));
    tags.push((TAG_SOURCE_REGION.to_owned(), source_region.to_owned()));
    tags
}

/// Of the AMIs carrying the digest in a region, the one to use as the copy: an available
/// one first, else one still pending (a copy under way), newest first.
pub fn pick_copy(mut found: Vec<AmiRecord>) -> Option<AmiRecord> {
    found.retain(|a| a.state == "available" || a.state == "pending");
    found.sort_by(|a, b| {
        (b.state == "available", &b.created, &b.id).cmp(&(
            a.state == "available",
            &a.created,
            &a.id,
        ))
    });
    found.into_iter().next()
}

/// One region's copy, as `apply` left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyDone {
    pub region: String,
    pub ami_id: String,
    /// False when the copy already existed.
    pub copied: bool,
}

#[derive(Debug, Default)]
pub struct LifecycleReport {
    pub copies: Vec<CopyDone>,
    pub failed: Vec<(String, LifecycleError)>,
}

/// Deprecation and the public permission on the AMI, then its copies, in parallel. Safe to
/// run again: an existing copy is found by the image digest (and CopyImage's ClientToken
/// returns the first copy if the lookup missed it), and the other calls set state.
pub async fn apply<L: ImageLifecycle>(
    aws: &L,
    ami_id: &str,
    opts: &LifecycleOptions,
    now: SystemTime,
    cancel: &CancellationToken,
) -> Result<LifecycleReport, LifecycleError> {
    let mut report = LifecycleReport::default();
    if opts.is_empty() {
        return Ok(report);
    }
    let region = aws.region();
    let source = aws
        .get(ami_id)
        .await
        .map_err(|error| LifecycleError::Read {
            ami_id: ami_id.to_owned(),
            region: region.clone(),
            error,
        })?
        .ok_or_else(|| LifecycleError::SourceMissing(ami_id.to_owned()))?;
    finish(aws, &source, &region, opts, now).await?;
    if opts.copy_to.is_empty() {
        return Ok(report);
    }

    let mut tasks = tokio::task::JoinSet::new();
    for target in &opts.copy_to {
        let (client, source, region, target, opts, cancel) = (
            aws.in_region(target),
            source.clone(),
            region.clone(),
            target.clone(),
            opts.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            let r = copy_one(&client, &source, &region, &opts, now, &cancel).await;
            (target, r)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(done))) => report.copies.push(done),
            Ok((target, Err(e))) => report.failed.push((target, e)),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    // In the order asked for, whatever order they finished in.
    let order = |r: &str| opts.copy_to.iter().position(|t| t == r);
    report.copies.sort_by_key(|c| order(&c.region));
    report.failed.sort_by_key(|(r, _)| order(r));
    Ok(report)
}

/// Deprecation and the public launch permission, on one AMI.
async fn finish<L: ImageLifecycle>(
    aws: &L,
    ami: &AmiRecord,
    region: &str,
    opts: &LifecycleOptions,
    now: SystemTime,
) -> Result<(), LifecycleError> {
    if let Some(days) = opts.deprecate_in_days {
        let at = deprecate_at(now, days);
        if (opts.public || ami.public) && !public_deprecation_allowed(at, &ami.created) {
            return Err(LifecycleError::PublicDeprecationTooLate {
                ami_id: ami.id.clone(),
                region: region.to_owned(),
                created: ami.created.clone(),
            });
        }
        aws.deprecate(&ami.id, at)
            .await
            .map_err(|error| LifecycleError::Deprecate {
                ami_id: ami.id.clone(),
                region: region.to_owned(),
                error,
            })?;
        info!(ami = %ami.id, %region, at = %format_time(at), "deprecation set");
    }
    if opts.public && !ami.public {
        aws.make_public(&ami.id).await.map_err(|error| {
            let hint = match error {
                AwsError::Denied { .. } => "",
                _ => PUBLIC_HINT,
            };
            LifecycleError::Public {
                ami_id: ami.id.clone(),
                region: region.to_owned(),
                error,
                hint,
            }
        })?;
        info!(ami = %ami.id, %region, "public");
    }
    Ok(())
}

async fn copy_one<L: ImageLifecycle>(
    target: &L,
    source: &AmiRecord,
    source_region: &str,
    opts: &LifecycleOptions,
    now: SystemTime,
    cancel: &CancellationToken,
) -> Result<CopyDone, LifecycleError> {
    let region = target.region();
    let digest = source
        .tag(TAG_DIGEST)
        .ok_or_else(|| LifecycleError::NoDigest(source.id.clone()))?;
    let copy_err = |error| LifecycleError::Copy {
        source_id: source.id.clone(),
        region: region.clone(),
        error,
    };
    let found = target
        .find(&[(TAG_DIGEST, digest), (TAG_MANAGED_BY, "amictl")])
        .await
        .map_err(copy_err)?;
    let tags = copy_tags(source, source_region);
    let (ami_id, copied) = match pick_copy(found) {
        Some(existing) => {
            info!(%region, ami = %existing.id, "a copy with this image digest exists");
            (existing.id, false)
        }
        None => {
            let mut description = format!(
                "{} (copied from {} in {source_region})",
                source.name, source.id
            );
            description.truncate(255);
            let request = CopyRequest {
                source_region: source_region.to_owned(),
                source_image_id: source.id.clone(),
                name: source.name.clone(),
                description,
                client_token: copy_token(&source.id, &region),
                tags: tags.clone(),
            };
            let id = target.copy_image(&request).await.map_err(copy_err)?;
            info!(%region, ami = %id, "copying");
            // CopyImage's TagSpecifications tag it atomically on AWS; again here for
            // EC2-compatible endpoints that ignore them, as publish does.
            target
                .tag(std::slice::from_ref(&id), &tags)
                .await
                .map_err(|error| LifecycleError::TagCopy {
                    ami_id: id.clone(),
                    region: region.clone(),
                    error,
                })?;
            (id, true)
        }
    };

    let copy = tokio::select! {
        r = wait_available(target, &ami_id, &region, opts.copy_deadline) => r?,
        _ = cancel.cancelled() => return Err(LifecycleError::Interrupted { ami_id, region }),
    };
    // The copy's own snapshot: named on the AMI (for `image gc` there), and tagged.
    if let Some(snapshot) = copy.snapshot_ids.first() {
        if copy.tag(TAG_SNAPSHOT) != Some(snapshot.as_str()) {
            let tag_err = |error| LifecycleError::TagCopy {
                ami_id: ami_id.clone(),
                region: region.clone(),
                error,
            };
            target
                .tag(&copy.snapshot_ids, &tags)
                .await
                .map_err(tag_err)?;
            target
                .tag(
                    std::slice::from_ref(&ami_id),
                    &[(TAG_SNAPSHOT.to_owned(), snapshot.clone())],
                )
                .await
                .map_err(tag_err)?;
        }
    }
    finish(target, &copy, &region, opts, now).await?;
    Ok(CopyDone {
        region,
        ami_id,
        copied,
    })
}

async fn wait_available<L: ImageLifecycle>(
    target: &L,
    ami_id: &str,
    region: &str,
    deadline: Duration,
) -> Result<AmiRecord, LifecycleError> {
    let started = Instant::now();
    // Copies take minutes (the snapshot crosses regions): poll gently.
    let mut delay = Duration::from_secs(5);
    loop {
        match target.get(ami_id).await {
            Ok(Some(ami)) if ami.state == "available" => return Ok(ami),
            Ok(Some(ami)) if ami.state != "pending" => {
                return Err(LifecycleError::CopyFailed {
                    ami_id: ami_id.to_owned(),
                    region: region.to_owned(),
                    state: ami.state,
                    detail: "; deregister it (`aws ec2 deregister-image`) and publish again",
                })
            }
            // Just after CopyImage the new id can be briefly unknown; after that, gone
            // means deregistered (a ClientToken EC2 still remembers returns the old id).
            Ok(None) if started.elapsed() > Duration::from_secs(60) => {
                return Err(LifecycleError::CopyFailed {
                    ami_id: ami_id.to_owned(),
                    region: region.to_owned(),
                    state: "gone".into(),
                    detail: " (deregistered); EC2 remembers CopyImage's ClientToken for a while, so wait before copying this AMI there again",
                })
            }
            Ok(_) => {}
            Err(e) => warn!(%ami_id, %region, error = %e, "cannot read the copy's state, retrying"),
        }
        if started.elapsed() + delay > deadline {
            return Err(LifecycleError::CopyTimeout {
                ami_id: ami_id.to_owned(),
                region: region.to_owned(),
                seconds: started.elapsed().as_secs(),
            });
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The hex part of a digest tag value, cut to `len`: `sha256-blocks-512k:abcd…` → `abcd…`.
pub fn short_digest(tag_value: &str, len: usize) -> String {
    let hex = tag_value.rsplit(':').next().unwrap_or(tag_value);
    hex.chars().take(len).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn at(s: &str) -> SystemTime {
        parse_time(s).unwrap()
    }

    #[test]
    fn deprecation_is_days_ahead_rounded_up_to_the_minute() {
        let now = at("2026-08-01T12:00:00Z") + Duration::from_millis(1500);
        assert_eq!(format_time(deprecate_at(now, 30)), "2026-08-31T12:01:00Z");
        let exact = at("2026-08-01T12:00:00Z");
        assert_eq!(format_time(deprecate_at(exact, 1)), "2026-08-02T12:00:00Z");
        assert!(deprecate_at(now, 1) > now + Duration::from_secs(DAY));
    }

    #[test]
    fn deprecation_limits() {
        assert!(check_deprecate_days(3650, false).is_ok());
        assert!(matches!(
            check_deprecate_days(3651, false),
            Err(LifecycleError::DeprecateTooFar { max: 3650, .. })
        ));
        assert!(check_deprecate_days(730, true).is_ok());
        assert!(matches!(
            check_deprecate_days(731, true),
            Err(LifecycleError::DeprecateTooFar { max: 730, .. })
        ));
        // A public AMI made a year ago cannot be deprecated 400 days from now.
        let now = at("2026-08-01T00:00:00Z");
        assert!(public_deprecation_allowed(
            deprecate_at(now, 400),
            "2026-07-01T00:00:00.000Z"
        ));
        assert!(!public_deprecation_allowed(
            deprecate_at(now, 400),
            "2025-08-01T00:00:00.000Z"
        ));
        assert!(public_deprecation_allowed(
            deprecate_at(now, 400),
            "garbage"
        ));
    }

    #[test]
    fn copy_tokens_are_stable_distinct_and_short() {
        let a = copy_token("ami-0123456789abcdef0", "us-west-2");
        assert_eq!(a, copy_token("ami-0123456789abcdef0", "us-west-2"));
        assert_ne!(a, copy_token("ami-0123456789abcdef0", "eu-west-1"));
        assert_ne!(a, copy_token("ami-0123456789abcdef1", "us-west-2"));
        assert!(a.len() <= 64 && a.is_ascii(), "{a}");
    }

    #[test]
    fn copy_targets_are_deduplicated_and_never_the_source() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            copy_targets(
                "us-east-1",
                &r(&["us-west-2", " eu-west-1", "us-west-2", ""])
            )
            .unwrap(),
            r(&["us-west-2", "eu-west-1"])
        );
        assert!(matches!(
            copy_targets("us-east-1", &r(&["us-east-1"])),
            Err(LifecycleError::CopyToSourceRegion(_))
        ));
        assert!(matches!(
            copy_targets("us-east-1", &r(&["US West"])),
            Err(LifecycleError::BadRegion(_))
        ));
    }

    fn source() -> AmiRecord {
        AmiRecord {
            id: "ami-src".into(),
            name: "p-nixos-x86_64-linux-0123456789ab".into(),
            state: "available".into(),
            tags: vec![
                ("Name".into(), "p-nixos".into()),
                (
                    TAG_DIGEST.into(),
                    "sha256-blocks-512k:0123456789abcdef".into(),
                ),
                (TAG_MANAGED_BY.into(), "amictl".into()),
                (TAG_SNAPSHOT.into(), "snap-src".into()),
                ("aws:cloudformation:stack-name".into(), "x".into()),
            ],
            snapshot_ids: vec!["snap-src".into()],
            created: "2026-08-01T00:00:00.000Z".into(),
            public: false,
        }
    }

    #[test]
    fn copy_tags_drop_the_source_snapshot_and_say_where_from() {
        let tags = copy_tags(&source(), "us-east-1");
        let get = |k: &str| tags.iter().find(|(t, _)| t == k).map(|(_, v)| v.as_str());
        assert_eq!(get(TAG_DIGEST), Some("sha256-blocks-512k:0123456789abcdef"));
        assert_eq!(get(TAG_SNAPSHOT), None);
        assert_eq!(get("aws:cloudformation:stack-name"), None);
        assert_eq!(get(TAG_SOURCE_AMI), Some("ami-src"));
        assert_eq!(get(TAG_SOURCE_REGION), Some("us-east-1"));
    }

    #[test]
    fn an_available_copy_is_preferred_to_a_pending_one() {
        let mut a = source();
        a.id = "ami-pending".into();
        a.state = "pending".into();
        a.created = "2026-08-02T00:00:00.000Z".into();
        let mut b = source();
        b.id = "ami-old".into();
        let mut c = source();
        c.id = "ami-failed".into();
        c.state = "failed".into();
        assert_eq!(
            pick_copy(vec![a.clone(), b.clone(), c.clone()]).unwrap().id,
            "ami-old"
        );
        assert_eq!(pick_copy(vec![a, c.clone()]).unwrap().id, "ami-pending");
        assert_eq!(pick_copy(vec![c]), None);
    }

    #[test]
    fn short_digests() {
        assert_eq!(
            short_digest("sha256-blocks-512k:0123456789abcdef", 12),
            "0123456789ab"
        );
        assert_eq!(short_digest("", 12), "");
    }

    /// One account: AMIs per region, and a log of the calls.
    #[derive(Clone, Default)]
    struct Fake {
        region: String,
        amis: Arc<Mutex<Vec<(String, AmiRecord)>>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl ImageRegistry for Fake {
        async fn find(&self, tags: &[(&str, &str)]) -> Result<Vec<AmiRecord>, AwsError> {
            Ok(self
                .amis
                .lock()
                .unwrap()
                .iter()
                .filter(|(r, a)| {
                    *r == self.region && tags.iter().all(|(k, v)| a.tag(k) == Some(*v))
                })
                .map(|(_, a)| a.clone())
                .collect())
        }
        async fn find_by_name(&self, _: &str) -> Result<Option<AmiRecord>, AwsError> {
            unimplemented!()
        }
        async fn get(&self, id: &str) -> Result<Option<AmiRecord>, AwsError> {
            Ok(self
                .amis
                .lock()
                .unwrap()
                .iter()
                .find(|(r, a)| *r == self.region && a.id == id)
                .map(|(_, a)| a.clone()))
        }
        async fn register(
            &self,
            _: &super::super::register::RegisterSpec,
        ) -> Result<String, super::super::publish::RegisterError> {
            unimplemented!()
        }
        async fn tag(&self, ids: &[String], tags: &[(String, String)]) -> Result<(), AwsError> {
            self.log(format!("{} tag {}", self.region, ids.join(",")));
            for (r, a) in self.amis.lock().unwrap().iter_mut() {
                if *r == self.region && ids.contains(&a.id) {
                    for (k, v) in tags {
                        a.tags.retain(|(t, _)| t != k);
                        a.tags.push((k.clone(), v.clone()));
                    }
                }
            }
            Ok(())
        }
        async fn deregister(&self, _: &str) -> Result<(), AwsError> {
            unimplemented!()
        }
    }

    impl ImageLifecycle for Fake {
        fn region(&self) -> String {
            self.region.clone()
        }
        fn in_region(&self, region: &str) -> Self {
            Fake {
                region: region.to_owned(),
                ..self.clone()
            }
        }
        async fn list(&self, _: &[(&str, &str)]) -> Result<Vec<AmiDetails>, AwsError> {
            unimplemented!()
        }
        async fn deprecate(&self, id: &str, at: SystemTime) -> Result<(), AwsError> {
            self.log(format!(
                "{} deprecate {id} {}",
                self.region,
                format_time(at)
            ));
            Ok(())
        }
        async fn make_public(&self, id: &str) -> Result<(), AwsError> {
            self.log(format!("{} public {id}", self.region));
            if self.region == "blocked-1" {
                return Err(AwsError::Other {
                    action: "ec2:ModifyImageAttribute",
                    message: "OperationNotPermitted".into(),
                });
            }
            Ok(())
        }
        async fn copy_image(&self, req: &CopyRequest) -> Result<String, AwsError> {
            let id = format!("ami-copy-{}", self.region);
            self.log(format!(
                "{} copy {} {}",
                self.region, req.source_image_id, req.client_token
            ));
            let mut copy = source();
            copy.id = id.clone();
            copy.tags = vec![]; // as an endpoint that ignores TagSpecifications
            copy.snapshot_ids = vec![format!("snap-copy-{}", self.region)];
            self.amis.lock().unwrap().push((self.region.clone(), copy));
            Ok(id)
        }
        async fn instances_using(
            &self,
            _: &[String],
        ) -> Result<BTreeMap<String, Vec<String>>, AwsError> {
            unimplemented!()
        }
    }

    #[tokio::test]
    async fn copies_once_tags_and_finishes_each_copy() {
        let fake = Fake {
            region: "us-east-1".into(),
            ..Fake::default()
        };
        fake.amis
            .lock()
            .unwrap()
            .push(("us-east-1".into(), source()));
        let opts = LifecycleOptions {
            deprecate_in_days: Some(30),
            public: true,
            copy_to: vec!["us-west-2".into(), "eu-west-1".into()],
            copy_deadline: Duration::from_secs(60),
        };
        let now = at("2026-08-01T00:00:00Z");
        let cancel = CancellationToken::new();
        let report = apply(&fake, "ami-src", &opts, now, &cancel).await.unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(
            report.copies,
            vec![
                CopyDone {
                    region: "us-west-2".into(),
                    ami_id: "ami-copy-us-west-2".into(),
                    copied: true
                },
                CopyDone {
                    region: "eu-west-1".into(),
                    ami_id: "ami-copy-eu-west-1".into(),
                    copied: true
                },
            ]
        );
        let calls = fake.calls.lock().unwrap().clone();
        assert!(calls.contains(&"us-east-1 deprecate ami-src 2026-08-31T00:00:00Z".to_owned()));
        assert!(calls.contains(&"us-east-1 public ami-src".to_owned()));
        assert!(calls.contains(&format!(
            "us-west-2 copy ami-src {}",
            copy_token("ami-src", "us-west-2")
        )));
        assert!(calls.contains(&"us-west-2 public ami-copy-us-west-2".to_owned()));
        assert!(calls
            .contains(&"eu-west-1 deprecate ami-copy-eu-west-1 2026-08-31T00:00:00Z".to_owned()));
        let copy = fake
            .in_region("us-west-2")
            .get("ami-copy-us-west-2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(copy.tag(TAG_DIGEST), source().tag(TAG_DIGEST));
        assert_eq!(copy.tag(TAG_SNAPSHOT), Some("snap-copy-us-west-2"));
        assert_eq!(copy.tag(TAG_SOURCE_AMI), Some("ami-src"));

        // Again: found by digest, nothing copied.
        fake.calls.lock().unwrap().clear();
        let report = apply(&fake, "ami-src", &opts, now, &cancel).await.unwrap();
        assert!(report.copies.iter().all(|c| !c.copied));
        assert!(!fake
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.contains(" copy ")));
    }

    #[tokio::test]
    async fn a_blocked_public_share_says_why_and_other_regions_still_finish() {
        let fake = Fake {
            region: "us-east-1".into(),
            ..Fake::default()
        };
        fake.amis
            .lock()
            .unwrap()
            .push(("us-east-1".into(), source()));
        let mut opts = LifecycleOptions {
            public: true,
            copy_to: vec!["blocked-1".into(), "us-west-2".into()],
            copy_deadline: Duration::from_secs(60),
            ..LifecycleOptions::default()
        };
        let cancel = CancellationToken::new();
        let report = apply(&fake, "ami-src", &opts, SystemTime::now(), &cancel)
            .await
            .unwrap();
        assert_eq!(report.copies.len(), 1);
        assert_eq!(report.failed.len(), 1);
        let message = report.failed[0].1.to_string();
        assert!(
            message.contains("block public access for AMIs"),
            "{message}"
        );

        opts.copy_to.clear();
        let blocked = fake.in_region("blocked-1");
        let err = apply(
            &blocked,
            "ami-copy-blocked-1",
            &opts,
            SystemTime::now(),
            &cancel,
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("disable-image-block-public-access"),
            "{err}"
        );
    }
}
