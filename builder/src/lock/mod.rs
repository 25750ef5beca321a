//! One change of a fleet at a time: a lease per fleet, kept in a store that every amictl
//! changing the fleet reaches (the stack's bucket on AWS, the fleet's directory locally).
//!
//! The lease is one small JSON object, written only under a precondition, the way
//! Terraform's S3 backend locks state: created with `If-None-Match: *` (of two creators one
//! wins), renewed with `If-Match: <etag>` (only by its holder, and only while nobody has
//! taken it over), released with a conditional delete. A holder that dies stops renewing;
//! once `ttl` has passed without a renewal the lease has expired, and `--break-lock` takes
//! it over, again with `If-Match`, so of two breakers one wins. A holder whose renewal finds
//! the lease changed has lost it and stops what it was doing.
//!
//! Expiry compares the holder's clock (the renewal time it wrote) with the reader's: the
//! renewal interval is a fifth of the lease, so clocks may differ by minutes before a live
//! lease reads as expired.

pub mod file;
pub mod memory;
pub mod s3;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a lease lives without a renewal. A rollout renews it every minute.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// Who holds a lease, and since when: what a refused command prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// What it is doing: `rollout r-…`, `destroy`, `up`.
    pub operation: String,
    pub user: String,
    pub host: String,
    pub pid: u32,
    /// The CI run it belongs to, if any (a link to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci: Option<String>,
    pub since_unix: u64,
    pub renewed_unix: u64,
    pub ttl_secs: u64,
    /// New at every write: no two writes have the same bytes, so no two have the same
    /// ETag (S3's is their MD5), and a stale `If-Match` can never match by accident.
    pub nonce: String,
}

impl Holder {
    /// This process, about to do `operation`.
    pub fn here(operation: impl Into<String>, ttl: Duration) -> Holder {
        let now = crate::rollout::now_unix();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let ci = match (
            env("GITHUB_SERVER_URL"),
            env("GITHUB_REPOSITORY"),
            env("GITHUB_RUN_ID"),
        ) {
            (Some(server), Some(repo), Some(run)) => {
                Some(format!("{server}/{repo}/actions/runs/{run}"))
            }
            _ => env("CI_JOB_URL").or_else(|| env("BUILD_URL")),
        };
        Holder {
            operation: operation.into(),
            user: env("USER")
                .or_else(|| env("LOGNAME"))
                .unwrap_or_else(|| format!("uid {}", rustix::process::getuid().as_raw())),
            host: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            pid: std::process::id(),
            ci,
            since_unix: now,
            renewed_unix: now,
            ttl_secs: ttl.as_secs().max(1),
            nonce: nonce(),
        }
    }

    pub fn expired(&self, now_unix: u64) -> bool {
        now_unix >= self.renewed_unix.saturating_add(self.ttl_secs)
    }

    /// `rollout r-1 by alice@laptop (pid 42), since 2026-12-03T13:40:00Z (5 min ago), renewed
    /// 20 s ago, expires in 4 min` (pure).
    pub fn describe(&self, now_unix: u64) -> String {
        let mut s = format!(
            "{} by {}@{} (pid {})",
            self.operation, self.user, self.host, self.pid
        );
        if let Some(ci) = &self.ci {
            s.push_str(&format!(", CI run {ci}"));
        }
        let since =
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(self.since_unix));
        s.push_str(&format!(
            ", since {since} ({} ago), renewed {} ago, ",
            ago(now_unix.saturating_sub(self.since_unix)),
            ago(now_unix.saturating_sub(self.renewed_unix)),
        ));
        let expiry = self.renewed_unix.saturating_add(self.ttl_secs);
        if expiry > now_unix {
            s.push_str(&format!("expires in {}", ago(expiry - now_unix)));
        } else {
            s.push_str(&format!("expired {} ago", ago(now_unix - expiry)));
        }
        s
    }

    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a holder serializes")
    }
}

/// `42 s`, `5 min`, `3 h` (pure).
fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

fn nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// Why a conditional write or delete did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The precondition failed: the lease exists (create) or is not the one named (412).
    #[error("the lease changed")]
    Changed,
    /// There is no lease to replace or delete (404).
    #[error("the lease is gone")]
    Gone,
    /// A concurrent conditional write to the same key (S3's 409 ConditionalRequestConflict):
    /// try again.
    #[error("a concurrent write to the lease")]
    Conflict,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where a lease lives: one object, written only under preconditions.
pub trait LeaseStore: Send + Sync + 'static {
    /// Writes `body` where there is none yet (`If-None-Match: *`): its ETag.
    fn create(&self, body: Vec<u8>) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// The lease and its ETag, None where there is none.
    fn read(&self) -> impl Future<Output = Result<Option<(Vec<u8>, String)>, StoreError>> + Send;
    /// Replaces the lease whose ETag is `etag` (`If-Match`): the new ETag.
    fn replace(
        &self,
        body: Vec<u8>,
        etag: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Deletes the lease whose ETag is `etag` (`If-Match`).
    fn delete(&self, etag: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Where it is, for messages (`s3://bucket/key`, a path).
    fn location(&self) -> String;
    /// Whether every holder runs on this machine (the local fleet's store): a holder whose
    /// process is gone then holds nothing, whatever its lease says.
    fn on_this_machine(&self) -> bool {
        false
    }
}

/// What to do with a lease someone else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Refuse.
    Never,
    /// Take it over only once it has expired (`--break-lock`).
    IfExpired,
    /// Take it over at once (`--break-lock` confirmed, or `--break-lock --yes`).
    Now,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("fleet {fleet} is locked by {} (lease at {location}). {}", .holder.describe(*.now_unix), advice(.holder, *.now_unix))]
    Held {
        fleet: String,
        holder: Box<Holder>,
        location: String,
        now_unix: u64,
    },
    #[error("the lock of fleet {fleet} at {location} is not amictl's lease ({why}): remove it if nothing else uses that key")]
    Foreign {
        fleet: String,
        location: String,
        why: String,
    },
    #[error("locking fleet {fleet} at {location}: {source:#}")]
    Store {
        fleet: String,
        location: String,
        source: anyhow::Error,
    },
}

fn advice(holder: &Holder, now_unix: u64) -> &'static str {
    if holder.expired(now_unix) {
        "Its holder stopped renewing it: if that run is dead, take it over with --break-lock"
    } else {
        "Wait for it to finish, or, if that run is dead, take the lock over with --break-lock once the lease expires (or at once with --break-lock --yes)"
    }
}

/// A lease this process holds, renewed in the background until released or dropped.
pub struct Lease<S: LeaseStore> {
    store: Arc<S>,
    current: Arc<Mutex<(Holder, String)>>,
    lost: CancellationToken,
    /// Tells the renewal to stop between two writes, never during one.
    stop: CancellationToken,
    renewal: Option<tokio::task::JoinHandle<()>>,
    fleet: String,
}

/// Tries of a write that S3 answers with 409 (a concurrent conditional write).
const CONFLICT_TRIES: u32 = 5;

/// A lease's holder, or why the object is not amictl's lease.
fn parse_holder<S: LeaseStore>(store: &S, fleet: &str, bytes: &[u8]) -> Result<Holder, LockError> {
    serde_json::from_slice(bytes).map_err(|e| LockError::Foreign {
        fleet: fleet.to_owned(),
        location: store.location(),
        why: e.to_string(),
    })
}

/// Who holds `fleet`'s lease now, without taking it: the live holder, if any (an expired
/// lease, or a local one whose process is gone, is nobody's). For a command that must refuse
/// early, before it changes what comes before its own lock.
pub async fn holder<S: LeaseStore>(store: &S, fleet: &str) -> Result<Option<LockError>, LockError> {
    let Some((bytes, _)) = store.read().await.map_err(|e| LockError::Store {
        fleet: fleet.to_owned(),
        location: store.location(),
        source: e.into(),
    })?
    else {
        return Ok(None);
    };
    let theirs = parse_holder(store, fleet, &bytes)?;
    let now = crate::rollout::now_unix();
    let dead_here = store.on_this_machine() && !process_alive(theirs.pid);
    if dead_here || theirs.expired(now) {
        return Ok(None);
    }
    Ok(Some(LockError::Held {
        fleet: fleet.to_owned(),
        holder: Box::new(theirs),
        location: store.location(),
        now_unix: now,
    }))
}

/// Takes the fleet's lease for `me`, or says who holds it.
pub async fn acquire<S: LeaseStore>(
    store: Arc<S>,
    fleet: &str,
    me: Holder,
    takeover: Takeover,
) -> Result<Lease<S>, LockError> {
    let fail = |source: anyhow::Error| LockError::Store {
        fleet: fleet.to_owned(),
        location: store.location(),
        source,
    };
    let mut tries = 0;
    loop {
        tries += 1;
        if tries > CONFLICT_TRIES {
            return Err(fail(anyhow::anyhow!(
                "the lease kept changing under {CONFLICT_TRIES} tries; try again"
            )));
        }
        let retry = tries < CONFLICT_TRIES;
        let mut mine = me.clone();
        mine.nonce = nonce();
        match store.create(mine.to_bytes()).await {
            Ok(etag) => return Ok(Lease::start(store, fleet, mine, etag)),
            Err(StoreError::Conflict) if retry => backoff(tries).await,
            Err(StoreError::Changed) => {
                // Someone holds it (or held it and died): look.
                let Some((bytes, etag)) = store.read().await.map_err(|e| fail(e.into()))? else {
                    continue; // released between the two calls
                };
                let theirs = parse_holder(&*store, fleet, &bytes)?;
                let now = crate::rollout::now_unix();
                let dead_here = store.on_this_machine() && !process_alive(theirs.pid);
                let take = dead_here
                    || match takeover {
                        Takeover::Never => false,
                        Takeover::IfExpired => theirs.expired(now),
                        Takeover::Now => true,
                    };
                if !take {
                    return Err(LockError::Held {
                        fleet: fleet.to_owned(),
                        holder: Box::new(theirs),
                        location: store.location(),
                        now_unix: now,
                    });
                }
                warn!(fleet, holder = %theirs.describe(now), "taking the lock over");
                match store.replace(mine.to_bytes(), &etag).await {
                    Ok(etag) => return Ok(Lease::start(store, fleet, mine, etag)),
                    // Someone else renewed, released or took it meanwhile: look again.
                    Err(StoreError::Changed | StoreError::Gone) => {}
                    Err(StoreError::Conflict) if retry => backoff(tries).await,
                    Err(e) => return Err(fail(e.into())),
                }
            }
            Err(e) => return Err(fail(e.into())),
        }
    }
}

async fn backoff(tries: u32) {
    tokio::time::sleep(Duration::from_millis(50 * u64::from(tries)) + jitter()).await;
}

fn jitter() -> Duration {
    Duration::from_millis(fastrand::u64(0..50))
}

/// Whether a process of this machine is alive (the local fleet's holders).
fn process_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // EPERM: alive, another user's.
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

impl<S: LeaseStore> Lease<S> {
    fn start(store: Arc<S>, fleet: &str, holder: Holder, etag: String) -> Lease<S> {
        info!(fleet, lease = %store.location(), "locked the fleet");
        let interval = Duration::from_secs(holder.ttl_secs).mul_f64(0.2);
        let current = Arc::new(Mutex::new((holder, etag)));
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let renewal = tokio::spawn(renew(
            store.clone(),
            current.clone(),
            (lost.clone(), stop.clone()),
            interval.max(Duration::from_millis(200)),
            fleet.to_owned(),
        ));
        Lease {
            store,
            current,
            lost,
            stop,
            renewal: Some(renewal),
            fleet: fleet.to_owned(),
        }
    }

    /// Completes when the lease was lost: taken over, deleted, or not renewed within its
    /// lifetime. What holds it must stop changing the fleet.
    pub fn lost(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    /// Cancelled when the lease is lost, for what runs beside the lease's owner.
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Stops renewing and deletes the lease, unless it is no longer ours.
    pub async fn release(mut self) -> Result<(), LockError> {
        // A renewal in flight would change the ETag the delete names: let it finish.
        self.stop.cancel();
        if let Some(renewal) = self.renewal.take() {
            let _ = renewal.await;
        }
        if self.lost.is_cancelled() {
            return Ok(());
        }
        let etag = self.current.lock().expect("lease state").1.clone();
        let mut tries = 0;
        loop {
            tries += 1;
            match self.store.delete(&etag).await {
                Ok(()) => {
                    info!(fleet = %self.fleet, "unlocked the fleet");
                    return Ok(());
                }
                Err(StoreError::Changed) => {
                    warn!(fleet = %self.fleet, "the lock was taken over before it was released");
                    return Ok(());
                }
                // Deleted with what it locked (a local fleet's directory).
                Err(StoreError::Gone) => return Ok(()),
                Err(StoreError::Conflict) if tries < CONFLICT_TRIES => backoff(tries).await,
                Err(e) => {
                    return Err(LockError::Store {
                        fleet: self.fleet.clone(),
                        location: self.store.location(),
                        source: anyhow::Error::from(e)
                            .context("releasing the lock (it expires by itself)"),
                    })
                }
            }
        }
    }
}

impl<S: LeaseStore> Drop for Lease<S> {
    fn drop(&mut self) {
        // Not released: it stops being renewed and expires.
        if let Some(renewal) = &self.renewal {
            renewal.abort();
        }
    }
}

async fn renew<S: LeaseStore>(
    store: Arc<S>,
    current: Arc<Mutex<(Holder, String)>>,
    (lost, stop): (CancellationToken, CancellationToken),
    interval: Duration,
    fleet: String,
) {
    let ttl = Duration::from_secs(current.lock().expect("lease state").0.ttl_secs);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        let (mut holder, etag) = current.lock().expect("lease state").clone();
        holder.renewed_unix = crate::rollout::now_unix();
        holder.nonce = nonce();
        match store.replace(holder.to_bytes(), &etag).await {
            Ok(etag) => {
                *current.lock().expect("lease state") = (holder, etag);
                last_renewed = tokio::time::Instant::now();
            }
            Err(StoreError::Changed | StoreError::Gone) => {
                let by = match store.read().await {
                    Ok(Some((bytes, _))) => serde_json::from_slice::<Holder>(&bytes)
                        .map(|h| h.describe(crate::rollout::now_unix()))
                        .unwrap_or_else(|_| "something that is not amictl".into()),
                    _ => "nobody (it was deleted)".into(),
                };
                warn!(fleet, taken_by = %by, "lost the fleet's lock: it was taken over");
                lost.cancel();
                return;
            }
            Err(e) => {
                // Not ours to give up yet: try again at the next tick, until the lease
                // would have expired anyway.
                warn!(fleet, error = %anyhow::Error::from(e), "cannot renew the fleet's lock");
                if last_renewed.elapsed() >= ttl {
                    warn!(
                        fleet,
                        "lost the fleet's lock: not renewed within its lifetime"
                    );
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
