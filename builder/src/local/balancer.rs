//! The local fleet's load balancer: a small HTTP/1.1 proxy at one stable address in front
//! of the fleet's `ami-agent serve` processes, playing the part of an ALB and its target
//! group.
//!
//! It speaks HTTP, as an ALB does, because a TCP proxy cannot drain keep-alive clients: a
//! client connection pinned to an old instance keeps sending requests there until that
//! instance closes it under the client. Here client connections end at the balancer and
//! every request picks a target: a draining target gets no new requests, while the ones it
//! is answering finish (until the deregistration delay). Connections to targets are pooled
//! and closed when idle well before the agent's keep-alive limit, so the balancer is the
//! side that closes first; and a request that a target closed on without answering (it was
//! stopping as the request went out) is retried on another target when its method is
//! idempotent, the one case where an ALB-like balancer may do so safely.
//!
//! amictl and the balancer only talk through files in the balancer's directory, so either
//! can restart without the other:
//! - `targets.json` ([`Targets`]): written by amictl ([`write_targets`]), polled here;
//! - `status.json` ([`Status`]): written here, read by amictl ([`read_status`]);
//! - `lock`: flocked by the running balancer for its lifetime ([`is_running`]).
//!
//! Both JSON files are replaced atomically (a temp file in the directory, then rename), so a
//! reader never sees half a file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustix::fs::{flock, FlockOperation};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Written by amictl: the targets to balance over.
pub const TARGETS_FILE: &str = "targets.json";
/// Written by the balancer: what it applied and how its targets are doing.
pub const STATUS_FILE: &str = "status.json";
/// Flocked by the running balancer.
pub const LOCK_FILE: &str = "lock";

/// How long active connections may finish after shutdown before they are closed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// status.json is rewritten at least this often, so `updated_unix_ms` shows a live balancer.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A failed accept (out of file descriptors, mostly) is retried after this pause rather
/// than in a hot loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// `is_running` holds a shared lock for a few microseconds while probing; a balancer
/// starting at that instant retries for about 100 ms before concluding another one runs.
const LOCK_ATTEMPTS: u32 = 5;
const LOCK_RETRY: Duration = Duration::from_millis(20);
/// A health check reads only the status line; anything longer is not HTTP.
const MAX_STATUS_LINE: usize = 1024;
/// Request bodies are buffered up to this size, so that a request can be retried on
/// another target; larger ones get 413. The agent serves GET and HEAD only.
const MAX_REQUEST_BODY: usize = 1 << 20;
/// A client connection may wait this long for its next request: an ALB's default idle
/// timeout.
const CLIENT_IDLE: Duration = Duration::from_secs(60);
/// Pooled connections to a target are closed after this long unused: well under the
/// agent's keep-alive limit (75 s), so the balancer, not the target, closes an idle one.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

/// One instance behind the balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The instance id: targets are matched across generations by id and address.
    pub id: String,
    pub addr: SocketAddr,
}

/// `targets.json`: the balancer's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Increases with every change; echoed in [`Status::generation`] once applied.
    pub generation: u64,
    pub targets: Vec<Target>,
}

/// A target as an ALB target group would report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Registered, not yet `healthy_threshold` successful checks.
    Initial,
    Healthy,
    Unhealthy,
    /// Removed from targets.json, still carrying connections.
    Draining,
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Initial => "initial",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub addr: SocketAddr,
    pub state: BackendState,
    /// Requests in progress (sent, or being answered).
    pub active: u64,
}

/// `status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub listen: SocketAddr,
    /// The targets.json generation applied; 0 before any.
    pub generation: u64,
    /// When this was written: at least every second while the balancer runs.
    pub updated_unix_ms: u64,
    /// Client connections accepted.
    pub connections_total: u64,
    /// Requests received from clients.
    #[serde(default)]
    pub requests_total: u64,
    /// Requests answered by the balancer itself (502, 503) because no target answered.
    pub failed_total: u64,
    /// Requests sent again to another target after one closed on them unanswered.
    #[serde(default)]
    pub retried_total: u64,
    /// By target id: registered targets and draining ones.
    pub targets: BTreeMap<String, TargetStatus>,
}

/// Timings of the health checks, connections and deregistration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerSettings {
    pub health_interval: Duration,
    /// For a whole check: connect, request, status line.
    pub health_timeout: Duration,
    /// Consecutive successes that make a target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a target unhealthy.
    pub unhealthy_threshold: u32,
    /// For connecting to a target; on failure the next one is tried.
    pub connect_timeout: Duration,
    /// How long a removed target's requests may go on before they are cut.
    pub deregistration_delay: Duration,
    /// How often targets.json is checked and status.json refreshed.
    pub poll: Duration,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_millis(250),
            health_timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            connect_timeout: Duration::from_secs(1),
            deregistration_delay: Duration::from_secs(10),
            poll: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("a balancer is already running for {}", dir.display())]
    AlreadyRunning { dir: PathBuf },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the listener's address")]
    LocalAddr(#[source] io::Error),
}

/// Why a targets.json was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetsError {
    #[error("not a targets document")]
    Json(#[from] serde_json::Error),
    #[error("target {0:?} is listed twice")]
    DuplicateId(String),
}

impl From<TargetsError> for io::Error {
    fn from(err: TargetsError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

/// Parses and validates a targets.json.
pub fn parse_targets(bytes: &[u8]) -> Result<Targets, TargetsError> {
    let targets: Targets = serde_json::from_slice(bytes)?;
    let mut ids = std::collections::BTreeSet::new();
    for t in &targets.targets {
        if !ids.insert(t.id.as_str()) {
            return Err(TargetsError::DuplicateId(t.id.clone()));
        }
    }
    Ok(targets)
}

/// Replaces `dir/targets.json` atomically.
pub fn write_targets(dir: &Path, t: &Targets) -> io::Result<()> {
    write_json(dir, TARGETS_FILE, t)
}

/// `dir/targets.json`, or None when there is none.
pub fn read_targets(dir: &Path) -> io::Result<Option<Targets>> {
    match std::fs::read(dir.join(TARGETS_FILE)) {
        Ok(bytes) => Ok(Some(parse_targets(&bytes)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `dir/status.json`, or None when there is none. It may be left by a balancer that has
/// stopped: [`is_running`] tells.
pub fn read_status(dir: &Path) -> io::Result<Option<Status>> {
    read_json(&dir.join(STATUS_FILE))
}

/// Whether a balancer holds `dir/lock`.
pub fn is_running(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // Shared, so probes do not exclude each other; dropping `file` releases it.
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(e) => e == rustix::io::Errno::WOULDBLOCK,
    }
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)?;
    serde_json::to_writer_pretty(&mut tmp, value)?;
    tmp.write_all(b"\n")?;
    // No fsync: these files describe running processes and mean nothing after a reboot.
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A target's health as its checks see it: the state and the current run of equal results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Health {
    state: BackendState,
    successes: u32,
    failures: u32,
}

impl Health {
    const fn new() -> Self {
        Self {
            state: BackendState::Initial,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one check; returns the new state when it changed. Thresholds below 1 mean 1.
    fn observe(
        &mut self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<BackendState> {
        let next = if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.state != BackendState::Healthy && self.successes >= healthy_threshold.max(1))
                .then_some(BackendState::Healthy)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.state != BackendState::Unhealthy && self.failures >= unhealthy_threshold.max(1))
                .then_some(BackendState::Unhealthy)
        };
        if let Some(state) = next {
            self.state = state;
        }
        next
    }
}

/// The order in which to try targets for the `turn`-th connection: the healthy ones,
/// round-robin from `turn`, or all of them when none is healthy (fail open, like an ALB).
fn candidate_order(healthy: &[bool], turn: usize) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..healthy.len()).filter(|&i| healthy[i]).collect();
    if pool.is_empty() {
        pool = (0..healthy.len()).collect();
    }
    if !pool.is_empty() {
        let start = turn % pool.len();
        pool.rotate_left(start);
    }
    pool
}

/// One registered (or draining) target.
struct Backend {
    id: String,
    addr: SocketAddr,
    health: Arc<Mutex<Health>>,
    active: AtomicU64,
    /// Set once the target left targets.json: it gets no new requests.
    removed: AtomicBool,
    /// Stops the target's health checks.
    stop_checks: CancellationToken,
    /// Cuts the target's requests: its deregistration delay ran out.
    close: CancellationToken,
    /// Pooled keep-alive connections to this target; closed when the target is dropped.
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Draining {
    backend: Arc<Backend>,
    since: Instant,
}

struct Registry {
    /// Swapped whole on every change: a connection picks from the list it cloned.
    registered: Arc<Vec<Arc<Backend>>>,
    draining: Vec<Draining>,
    generation: u64,
}

struct Shared {
    settings: BalancerSettings,
    listen: SocketAddr,
    registry: Mutex<Registry>,
    turn: AtomicUsize,
    connections_total: AtomicU64,
    requests_total: AtomicU64,
    failed_total: AtomicU64,
    retried_total: AtomicU64,
    /// Cancelled when `serve` ends (or is dropped): stops every health check.
    halt: CancellationToken,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few assignments).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn apply(&self, targets: Targets) {
        let mut reg = lock(&self.registry);
        let old = Arc::clone(&reg.registered);
        let mut next = Vec::with_capacity(targets.targets.len());
        for t in &targets.targets {
            // An id whose address changed is a new target; the old one drains.
            match old.iter().find(|b| b.id == t.id && b.addr == t.addr) {
                Some(b) => next.push(Arc::clone(b)),
                None => {
                    info!(id = %t.id, addr = %t.addr, "target registered");
                    next.push(self.register(t));
                }
            }
        }
        for b in old.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.removed.store(true, Ordering::SeqCst);
                b.stop_checks.cancel();
                let active = b.active.load(Ordering::SeqCst);
                info!(id = %b.id, addr = %b.addr, active, "target draining");
                reg.draining.push(Draining {
                    backend: Arc::clone(b),
                    since: Instant::now(),
                });
            }
        }
        reg.registered = Arc::new(next);
        reg.generation = targets.generation;
        info!(
            generation = targets.generation,
            targets = targets.targets.len(),
            "applied targets.json"
        );
    }

    fn register(&self, t: &Target) -> Arc<Backend> {
        let backend = Arc::new(Backend {
            id: t.id.clone(),
            addr: t.addr,
            health: Arc::new(Mutex::new(Health::new())),
            active: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            stop_checks: self.halt.child_token(),
            close: CancellationToken::new(),
            client: upstream_client(self.settings.connect_timeout),
        });
        // The check task holds no Arc<Backend>: an Arc held elsewhere means a connection.
        tokio::spawn(check_loop(
            t.id.clone(),
            t.addr,
            Arc::clone(&backend.health),
            self.settings.clone(),
            backend.stop_checks.clone(),
        ));
        backend
    }

    /// Forgets draining targets nobody uses any more, and closes the connections of those
    /// whose deregistration delay ran out.
    fn sweep(&self) {
        let delay = self.settings.deregistration_delay;
        let mut reg = lock(&self.registry);
        reg.draining.retain(|d| {
            let b = &d.backend;
            // Connections get Arcs only from `registered` under this lock, and a removed
            // target is no longer there: a count of 1 stays 1, so it is gone for good.
            if Arc::strong_count(b) == 1 {
                info!(id = %b.id, addr = %b.addr, "target gone");
                return false;
            }
            if d.since.elapsed() >= delay && !b.close.is_cancelled() {
                let active = b.active.load(Ordering::SeqCst);
                info!(id = %b.id, addr = %b.addr, active, "deregistration delay over: closing the target's connections");
                b.close.cancel();
            }
            true
        });
    }

    /// The targets to try for a new connection, best first.
    fn candidates(&self) -> Vec<Arc<Backend>> {
        let registered = Arc::clone(&lock(&self.registry).registered);
        let healthy: Vec<bool> = registered
            .iter()
            .map(|b| lock(&b.health).state == BackendState::Healthy)
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        candidate_order(&healthy, turn)
            .into_iter()
            .map(|i| Arc::clone(&registered[i]))
            .collect()
    }

    /// Everything but `updated_unix_ms`.
    fn status(&self) -> Status {
        let reg = lock(&self.registry);
        let mut targets = BTreeMap::new();
        for d in &reg.draining {
            targets.insert(
                d.backend.id.clone(),
                TargetStatus {
                    addr: d.backend.addr,
                    state: BackendState::Draining,
                    active: d.backend.active.load(Ordering::SeqCst),
                },
            );
        }
        // Registered after draining: an id re-registered at a new address shows the new one.
        for b in reg.registered.iter() {
            targets.insert(
                b.id.clone(),
                TargetStatus {
                    addr: b.addr,
                    state: lock(&b.health).state,
                    active: b.active.load(Ordering::SeqCst),
                },
            );
        }
        Status {
            pid: std::process::id(),
            listen: self.listen,
            generation: reg.generation,
            updated_unix_ms: 0,
            connections_total: self.connections_total.load(Ordering::SeqCst),
            requests_total: self.requests_total.load(Ordering::SeqCst),
            failed_total: self.failed_total.load(Ordering::SeqCst),
            retried_total: self.retried_total.load(Ordering::SeqCst),
            targets,
        }
    }

    fn active_total(&self) -> u64 {
        let reg = lock(&self.registry);
        reg.registered
            .iter()
            .chain(reg.draining.iter().map(|d| &d.backend))
            .map(|b| b.active.load(Ordering::SeqCst))
            .sum()
    }
}

/// Notices changes to targets.json by content (mtimes are too coarse for quick rewrites).
struct Watcher {
    path: PathBuf,
    /// The bytes last seen (None: no file), or None before the first look.
    last: Option<Option<Vec<u8>>>,
}

impl Watcher {
    /// A configuration to apply, when the file changed into a valid one.
    fn poll(&mut self) -> Option<Targets> {
        let current = match std::fs::read(&self.path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot read targets.json: keeping the last targets");
                return None;
            }
        };
        if self.last.as_ref() == Some(&current) {
            return None;
        }
        let parsed = match &current {
            None => Some(Targets {
                generation: 0,
                targets: Vec::new(),
            }),
            Some(bytes) => match parse_targets(bytes) {
                Ok(targets) => Some(targets),
                Err(e) => {
                    warn!(path = %self.path.display(), error = %e, "ignoring a bad targets.json: keeping the last good one");
                    None
                }
            },
        };
        // Remembered even when bad, so it is reported once, not every poll.
        self.last = Some(current);
        parsed
    }
}

/// Writes status.json when it changed, and at least every [`HEARTBEAT`].
struct Reporter {
    dir: PathBuf,
    last: Option<Status>,
    written_at: Option<Instant>,
    failing: bool,
}

impl Reporter {
    fn report(&mut self, status: Status) {
        let due = self.last.as_ref() != Some(&status)
            || self.written_at.is_none_or(|t| t.elapsed() >= HEARTBEAT);
        if !due {
            return;
        }
        let mut stamped = status.clone();
        stamped.updated_unix_ms = unix_ms();
        match write_json(&self.dir, STATUS_FILE, &stamped) {
            Ok(()) => {
                self.last = Some(status);
                self.written_at = Some(Instant::now());
                self.failing = false;
            }
            Err(e) => {
                // Once per outage: a full disk should not also fill the log.
                if !self.failing {
                    warn!(dir = %self.dir.display(), error = %e, "cannot write status.json");
                }
                self.failing = true;
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn take_lock(dir: &Path) -> Result<File, ServeError> {
    let path = dir.join(LOCK_FILE);
    let lock_err = |source: io::Error| ServeError::Lock {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_err)?;
    for attempt in 1..=LOCK_ATTEMPTS {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if attempt < LOCK_ATTEMPTS => {
                tokio::time::sleep(LOCK_RETRY).await;
            }
            Err(rustix::io::Errno::WOULDBLOCK) => break,
            Err(e) => return Err(lock_err(e.into())),
        }
    }
    Err(ServeError::AlreadyRunning {
        dir: dir.to_path_buf(),
    })
}

/// Runs the balancer for `dir` on `listener` until `shutdown` is cancelled, then lets open
/// connections finish for up to 5 s. Fails at once if another balancer runs for `dir`.
pub async fn serve(
    dir: &Path,
    listener: TcpListener,
    settings: BalancerSettings,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let _lock = take_lock(dir).await?;
    let listen = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let halt = CancellationToken::new();
    let _halt_on_return = halt.clone().drop_guard();
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        listen,
        registry: Mutex::new(Registry {
            registered: Arc::new(Vec::new()),
            draining: Vec::new(),
            generation: 0,
        }),
        turn: AtomicUsize::new(0),
        connections_total: AtomicU64::new(0),
        requests_total: AtomicU64::new(0),
        failed_total: AtomicU64::new(0),
        retried_total: AtomicU64::new(0),
        halt: halt.clone(),
    });
    let mut watcher = Watcher {
        path: dir.join(TARGETS_FILE),
        last: None,
    };
    let mut reporter = Reporter {
        dir: dir.to_path_buf(),
        last: None,
        written_at: None,
        failing: false,
    };
    if let Some(targets) = watcher.poll() {
        shared.apply(targets);
    }
    reporter.report(shared.status());
    info!(%listen, dir = %dir.display(), "balancer serving");

    // Closes connections still open when the shutdown grace runs out.
    let kill = halt.child_token();
    let connections = TaskTracker::new();
    let accepting = accept_loop(
        listener,
        Arc::clone(&shared),
        connections.clone(),
        shutdown.clone(),
        kill.clone(),
    );
    tokio::pin!(accepting);
    let mut tick = tokio::time::interval(settings.poll);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut accepting => break,
            _ = tick.tick() => {
                if let Some(targets) = watcher.poll() {
                    shared.apply(targets);
                }
                shared.sweep();
                reporter.report(shared.status());
            }
        }
    }

    // The listener is closed: new clients are refused, idle connections are closed, and
    // requests in progress finish.
    connections.close();
    info!(
        active = shared.active_total(),
        "shutting down: letting open connections finish"
    );
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    loop {
        tokio::select! {
            () = connections.wait() => break,
            () = tokio::time::sleep_until(deadline) => {
                warn!(active = shared.active_total(), "closing the connections still open");
                kill.cancel();
                connections.wait().await;
                break;
            }
            _ = tick.tick() => {
                shared.sweep();
                reporter.report(shared.status());
            }
        }
    }
    shared.sweep();
    reporter.report(shared.status());
    info!("balancer stopped");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    loop {
        let (client, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let kill = kill.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            tokio::select! {
                () = kill.cancelled() => {}
                () = serve_client(shared, client, peer, shutdown) => {}
            }
        });
    }
}

/// Serves one client connection: HTTP/1.1 with keep-alive, each request proxied on its own.
async fn serve_client(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    shared.connections_total.fetch_add(1, Ordering::SeqCst);
    let _ = client.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| proxy(Arc::clone(&shared), req, peer));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(CLIENT_IDLE)
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(client), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            // Closes an idle connection now, a busy one after its response.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "client connection ended");
    }
}

/// Sends one request to a target: the first candidate that answers. A request no target
/// answered gets 502 (503 when there is no target at all), as from an ALB.
async fn proxy(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    shared.requests_total.fetch_add(1, Ordering::SeqCst);
    let (mut parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            debug!(%peer, error = %e, "request body refused");
            return Ok(answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
            ));
        }
    };
    forwarded_headers(&mut parts.headers, peer, shared.listen);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let retryable = parts.method.is_idempotent();
    let candidates = shared
        .candidates()
        .into_iter()
        .filter(|b| !b.removed.load(Ordering::SeqCst));
    let mut tried = 0;
    // The loop owns the candidates: their Arcs go with it, so a target left behind does
    // not look in use while the answer streams.
    for backend in candidates {
        let mut upstream = Request::from_parts(parts.clone(), Full::new(body.clone()));
        *upstream.uri_mut() = match format!("http://{}{path}", backend.addr).parse() {
            Ok(uri) => uri,
            Err(_) => return Ok(answer(StatusCode::BAD_REQUEST, "bad request target\n")),
        };
        if tried > 0 {
            shared.retried_total.fetch_add(1, Ordering::SeqCst);
        }
        tried += 1;
        let active = Active::new(Arc::clone(&backend));
        let sent = tokio::select! {
            sent = backend.client.request(upstream) => sent,
            () = backend.close.cancelled() => {
                debug!(%peer, id = %backend.id, "cut: deregistration delay over");
                break;
            }
        };
        match sent {
            Ok(response) => {
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                let body = ProxyBody::Upstream {
                    body,
                    close: Box::pin(backend.close.clone().cancelled_owned()),
                    _active: active,
                };
                return Ok(Response::from_parts(head, body));
            }
            // Nothing came back: the target refused, or closed the connection as the
            // request went out (it was stopping). Another target may answer, if sending
            // the request twice is harmless.
            Err(e) if retryable => {
                debug!(%peer, id = %backend.id, addr = %backend.addr, error = %e, "no answer: trying the next target");
            }
            Err(e) => {
                debug!(%peer, id = %backend.id, error = %e, "no answer, and the method is not idempotent");
                break;
            }
        }
    }
    shared.failed_total.fetch_add(1, Ordering::SeqCst);
    if tried == 0 {
        warn!(%peer, "no target for the request: answering 503");
        Ok(answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "no target available\n",
        ))
    } else {
        warn!(%peer, tried, "no target answered the request: answering 502");
        Ok(answer(StatusCode::BAD_GATEWAY, "no target answered\n"))
    }
}

/// Pooled HTTP/1.1 connections to one target.
fn upstream_client(connect_timeout: Duration) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(UPSTREAM_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// The balancer's own answer.
fn answer(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Own(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// What an ALB adds: the client's address, the scheme and the port it came in on.
fn forwarded_headers(headers: &mut HeaderMap, peer: SocketAddr, listen: SocketAddr) {
    strip_hop_by_hop(headers);
    let xff = HeaderName::from_static("x-forwarded-for");
    let chain = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(chain) {
        headers.insert(xff, value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-port"),
        HeaderValue::from(listen.port()),
    );
}

/// Counts a request as in progress on its target until dropped (with the response body).
struct Active(Arc<Backend>);

impl Active {
    fn new(backend: Arc<Backend>) -> Self {
        backend.active.fetch_add(1, Ordering::SeqCst);
        Active(backend)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: the balancer's own, or a target's, streamed as it comes and cut when
/// the target's deregistration delay runs out.
enum ProxyBody {
    Own(Full<Bytes>),
    Upstream {
        body: Incoming,
        close: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
        _active: Active,
    },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        match self.get_mut() {
            ProxyBody::Own(full) => std::pin::Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ProxyBody::Upstream { body, close, .. } => {
                if close.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(
                        "the target's deregistration delay ran out".into()
                    )));
                }
                std::pin::Pin::new(body).poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Own(full) => full.is_end_stream(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Own(full) => full.size_hint(),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

async fn check_loop(
    id: String,
    addr: SocketAddr,
    health: Arc<Mutex<Health>>,
    settings: BalancerSettings,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.health_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let ok = tokio::select! {
            () = stop.cancelled() => return,
            ok = async {
                tick.tick().await;
                check_health(addr, settings.health_timeout).await
            } => ok,
        };
        let changed =
            lock(&health).observe(ok, settings.healthy_threshold, settings.unhealthy_threshold);
        match changed {
            Some(BackendState::Healthy) => info!(%id, %addr, "target healthy"),
            // `observe` only ever moves to healthy or unhealthy.
            Some(_) => info!(%id, %addr, "target unhealthy"),
            None => {}
        }
    }
}

/// `GET /healthz` over a fresh connection: healthy iff the answer is 200.
async fn check_health(addr: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, healthz_status(addr)).await {
        Ok(Ok(200)) => true,
        Ok(Ok(code)) => {
            debug!(%addr, code, "health check failed");
            false
        }
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "health check failed");
            false
        }
        Err(_) => {
            debug!(%addr, "health check timed out");
            false
        }
    }
}

async fn healthz_status(addr: SocketAddr) -> io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: amictl-local-balancer\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buf[..end]).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "not an HTTP status line")
            });
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "status line too long",
            ));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The code of an `HTTP/1.x NNN reason` line.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendState::{Healthy, Initial, Unhealthy};

    fn run(health: &mut Health, results: &[bool]) -> Vec<Option<BackendState>> {
        results.iter().map(|&ok| health.observe(ok, 2, 3)).collect()
    }

    #[test]
    fn a_new_target_needs_consecutive_successes() {
        let mut h = Health::new();
        assert_eq!(run(&mut h, &[true, false, true]), [None, None, None]);
        assert_eq!(h.state, Initial);
        assert_eq!(run(&mut h, &[true]), [Some(Healthy)]);
        assert_eq!(run(&mut h, &[true, true]), [None, None]);
        assert_eq!(h.state, Healthy);
    }

    #[test]
    fn failures_make_initial_and_healthy_targets_unhealthy_and_successes_bring_them_back() {
        let mut h = Health::new();
        assert_eq!(
            run(&mut h, &[false, false, false]),
            [None, None, Some(Unhealthy)]
        );
        assert_eq!(
            run(&mut h, &[false, true, true]),
            [None, None, Some(Healthy)]
        );
        // A success in between restarts the count of failures.
        assert_eq!(
            run(&mut h, &[false, false, true, false, false, false]),
            [None, None, None, None, None, Some(Unhealthy)]
        );
        assert_eq!(h.state, Unhealthy);
    }

    #[test]
    fn thresholds_of_zero_mean_one() {
        let mut h = Health::new();
        assert_eq!(h.observe(true, 0, 0), Some(Healthy));
        assert_eq!(h.observe(false, 0, 0), Some(Unhealthy));
    }

    #[test]
    fn healthy_targets_take_turns() {
        let healthy = [true, false, true, true];
        let firsts: Vec<usize> = (0..6)
            .map(|turn| candidate_order(&healthy, turn)[0])
            .collect();
        assert_eq!(firsts, [0, 2, 3, 0, 2, 3]);
        // The rest follow in order, so a refused connection moves on to the next one.
        assert_eq!(candidate_order(&healthy, 1), [2, 3, 0]);
    }

    #[test]
    fn with_no_healthy_target_all_are_candidates() {
        assert_eq!(candidate_order(&[false, false, false], 4), [1, 2, 0]);
        assert!(candidate_order(&[], 3).is_empty());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 200"), Some(200));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK"), None);
    }

    #[test]
    fn file_formats() {
        let targets: Targets = parse_targets(
            br#"{"generation": 3, "targets": [{"id": "i-1", "addr": "127.0.0.1:8001"}]}"#,
        )
        .unwrap();
        assert_eq!(targets.generation, 3);
        assert_eq!(targets.targets[0].addr, "127.0.0.1:8001".parse().unwrap());

        let status = Status {
            pid: 7,
            listen: "127.0.0.1:8000".parse().unwrap(),
            generation: 3,
            updated_unix_ms: 1,
            connections_total: 2,
            requests_total: 5,
            failed_total: 0,
            retried_total: 1,
            targets: BTreeMap::from([(
                "i-1".to_owned(),
                TargetStatus {
                    addr: "127.0.0.1:8001".parse().unwrap(),
                    state: BackendState::Draining,
                    active: 1,
                },
            )]),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["targets"]["i-1"],
            serde_json::json!({"addr": "127.0.0.1:8001", "state": "draining", "active": 1})
        );
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), status);
        // A status.json from a balancer of before the request counters still reads.
        let older = r#"{"pid":1,"listen":"127.0.0.1:1","generation":1,"updated_unix_ms":1,
            "connections_total":3,"failed_total":0,"targets":{}}"#;
        let older: Status = serde_json::from_str(older).unwrap();
        assert_eq!((older.connections_total, older.requests_total), (3, 0));
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let err = parse_targets(
            br#"{"generation": 1, "targets": [{"id": "a", "addr": "127.0.0.1:1"}, {"id": "a", "addr": "127.0.0.1:2"}]}"#,
        )
        .unwrap_err();
        assert!(matches!(err, TargetsError::DuplicateId(id) if id == "a"));
    }

    #[test]
    fn targets_round_trip_through_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_targets(dir.path()).unwrap(), None);
        assert_eq!(read_status(dir.path()).unwrap(), None);
        let t = Targets {
            generation: 1,
            targets: vec![Target {
                id: "i-1".into(),
                addr: "127.0.0.1:8001".parse().unwrap(),
            }],
        };
        write_targets(dir.path(), &t).unwrap();
        assert_eq!(read_targets(dir.path()).unwrap(), Some(t));
        // Only the file itself: the temp file was renamed over it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [TARGETS_FILE]);
        std::fs::write(dir.path().join(TARGETS_FILE), "{").unwrap();
        assert_eq!(
            read_targets(dir.path()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn the_watcher_applies_changes_once_and_keeps_the_last_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Watcher {
            path: dir.path().join(TARGETS_FILE),
            last: None,
        };
        let empty = Targets {
            generation: 0,
            targets: vec![],
        };
        assert_eq!(w.poll(), Some(empty.clone()), "no file: no targets");
        assert_eq!(w.poll(), None);
        let t = Targets {
            generation: 5,
            targets: vec![],
        };
        write_targets(dir.path(), &t).unwrap();
        assert_eq!(w.poll(), Some(t));
        assert_eq!(w.poll(), None);
        std::fs::write(dir.path().join(TARGETS_FILE), "not json").unwrap();
        assert_eq!(w.poll(), None, "a bad file is ignored");
        std::fs::remove_file(dir.path().join(TARGETS_FILE)).unwrap();
        assert_eq!(w.poll(), Some(empty));
    }

    #[test]
    fn is_running_follows_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_running(dir.path()), "no lock file");
        let held = File::create(dir.path().join(LOCK_FILE)).unwrap();
        assert!(!is_running(dir.path()), "a lock file nobody holds");
        flock(&held, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert!(is_running(dir.path()));
        drop(held);
        assert!(!is_running(dir.path()));
        // Probing left nothing held behind.
        let again = File::open(dir.path().join(LOCK_FILE)).unwrap();
        flock(&again, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}
