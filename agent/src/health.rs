//! The health loop: every interval, verify the content on disk (healing it from the
//! pristine in-memory copy), fetch content back through the agent's own listener (binding
//! it again if it is gone), record the outcome, and tell systemd: `READY=1` after the
//! first passing check, `WATCHDOG=1` only after passing checks. When the agent cannot heal
//! itself it stops pinging, and systemd's watchdog restarts it.
//!
//! Busy is not dead. A listener whose accept loop runs but whose every slot is taken (or
//! that cannot accept for want of descriptors) is overloaded: binding it again would reset
//! every connection waiting in its backlog, and restarting the process would drop the rest.
//! An overloaded check is reported as such and still feeds the watchdog, which is there
//! for a hung process.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::http::{bind, Acceptor, Server};
use crate::manifest::{is_resource_exhaustion, ContentHasher, FileEntry, Mismatch};
use crate::notify::{Notice, Notifier};
use crate::state::{now_unix, AgentState, Load, SelfCheck};

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    /// Bytes fetched back through the listener per check; a large site is covered over
    /// several checks so one check stays cheap.
    pub fetch_budget: u64,
    /// Bytes re-hashed on disk per check even when size and mtime look unchanged (an
    /// edit that preserved both); files whose stat changed are always hashed.
    pub hash_budget: u64,
    pub request_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            fetch_budget: 32 << 20,
            hash_budget: 64 << 20,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The agent's own listener, as the health loop sees it.
pub trait Listener: Send + 'static {
    /// Where the agent can reach itself.
    fn self_addr(&self) -> SocketAddr;
    fn is_alive(&self) -> bool;
    fn rebind(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// The server's load now (a listener that cannot tell reports none).
    fn load(&self) -> Load {
        Load::default()
    }
}

/// A [`Server`] acceptor that can be replaced by a fresh bind of the same address.
pub struct ServerListener {
    server: Server,
    addr: SocketAddr,
    reuse_port: bool,
    acceptor: Acceptor,
}

impl ServerListener {
    pub fn new(
        server: Server,
        listener: tokio::net::TcpListener,
        reuse_port: bool,
    ) -> io::Result<Self> {
        let acceptor = server.spawn_acceptor(listener)?;
        Ok(ServerListener {
            server,
            addr: acceptor.local_addr(),
            reuse_port,
            acceptor,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the current accept loop as if the listener had died: for fault-injection
    /// tests of the rebind path.
    pub fn acceptor(&self) -> &Acceptor {
        &self.acceptor
    }
}

impl Listener for ServerListener {
    fn self_addr(&self) -> SocketAddr {
        loopback_for(self.addr)
    }

    fn is_alive(&self) -> bool {
        !self.acceptor.is_finished()
    }

    fn load(&self) -> Load {
        self.server.load()
    }

    async fn rebind(&mut self) -> io::Result<()> {
        self.acceptor.stop();
        // The old socket must be closed before the same address can be bound again
        // (without SO_REUSEPORT two listeners cannot share it).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.acceptor.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let listener = bind(self.addr, self.reuse_port)?;
        self.acceptor = self.server.spawn_acceptor(listener)?;
        Ok(())
    }
}

/// `0.0.0.0:80` is reached at `127.0.0.1:80`, `[::]:80` at `[::1]:80`.
pub fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// What a file looked like when it was last verified, to skip re-hashing unchanged files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

pub struct HealthLoop<N, L> {
    state: Arc<AgentState>,
    root: PathBuf,
    notifier: N,
    listener: L,
    client: reqwest::Client,
    config: HealthConfig,
    fetch_cursor: usize,
    hash_cursor: usize,
    verified: HashMap<String, Stamp>,
    ready: bool,
}

#[derive(Debug)]
enum FetchError {
    /// The agent itself ran out of descriptors or memory for the fetch: overloaded.
    Starved(String),
    /// The listener did not answer at all: bind it again.
    Unreachable(String),
    /// It answered with the wrong thing.
    Wrong(String),
}

impl<N: Notifier, L: Listener> HealthLoop<N, L> {
    pub fn new(
        state: Arc<AgentState>,
        root: PathBuf,
        notifier: N,
        listener: L,
        config: HealthConfig,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            // `fetch_path` bounds each fetch's waiting; a total timeout here would also
            // count the hashing of the body as it arrives.
            .connect_timeout(config.request_timeout)
            // A fresh connection per fetch: a kept-alive one could hide a dead listener.
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(HealthLoop {
            state,
            root,
            notifier,
            listener,
            client,
            config,
            fetch_cursor: 0,
            hash_cursor: 0,
            verified: HashMap::new(),
            ready: false,
        })
    }

    pub fn listener(&self) -> &L {
        &self.listener
    }

    /// Checks now, then every interval, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            self.tick().await;
        }
    }

    /// One self-check; returns its outcome (also recorded in the state and metrics).
    #[instrument(skip(self), level = "debug")]
    pub async fn tick(&mut self) -> SelfCheck {
        let started = Instant::now();
        let mut problems = Vec::new();
        let mut overloaded = Vec::new();

        if !self.listener.is_alive() {
            warn!("the accept loop has stopped, binding the listener again");
            self.rebind(&mut problems).await;
        }

        let (drift, verified_on_disk, unchecked) = self.check_disk().await;
        if let Some(e) = unchecked {
            overloaded.push(format!("files left unchecked: {e}"));
        }
        let unhealed: Vec<_> = drift.iter().filter(|(_, _, healed)| !healed).collect();
        if !unhealed.is_empty() {
            problems.push(format!(
                "cannot heal {}",
                unhealed
                    .iter()
                    .map(|(path, m, _)| format!("{path} ({m})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        self.state.record_drift(&drift);

        let fetched = match self.fetch_window().await {
            Ok(n) => n,
            Err(FetchError::Starved(e)) => {
                overloaded.push(format!("self-fetch: {e}"));
                0
            }
            Err(FetchError::Unreachable(e))
                if self.listener.is_alive() && self.listener.load().is_overloaded() =>
            {
                // The accept loop runs and the server is full: the fetch waits in line
                // with every other client. Nothing to rebind.
                overloaded.push(format!("self-fetch did not get through: {e}"));
                0
            }
            Err(FetchError::Unreachable(e)) => {
                warn!(error = %e, "the agent's own listener does not answer, binding it again");
                self.rebind(&mut problems).await;
                match self.fetch_window().await {
                    Ok(n) => n,
                    Err(FetchError::Starved(e)) => {
                        overloaded.push(format!("self-fetch: {e}"));
                        0
                    }
                    Err(FetchError::Unreachable(e) | FetchError::Wrong(e)) => {
                        problems.push(format!("self-fetch failed after rebinding: {e}"));
                        0
                    }
                }
            }
            Err(FetchError::Wrong(e)) => {
                problems.push(format!("self-fetch: {e}"));
                0
            }
        };

        let ok = problems.is_empty();
        let load = self.listener.load();
        let overloaded = (!overloaded.is_empty())
            .then(|| format!("overloaded ({load}): {}", overloaded.join("; ")));
        let check = SelfCheck {
            at_unix: now_unix(),
            ok,
            duration_ms: started.elapsed().as_millis() as u64,
            files_fetched: fetched,
            files_verified_on_disk: verified_on_disk,
            error: (!ok).then(|| problems.join("; ")),
            overloaded,
            load: Some(load),
        };
        self.state
            .update(|s| s.last_self_check = Some(check.clone()));
        self.report(&check);
        check
    }

    async fn rebind(&mut self, problems: &mut Vec<String>) {
        match self.listener.rebind().await {
            Ok(()) => {
                self.state.metrics.rebinds.inc();
                info!(addr = %self.listener.self_addr(), "listener bound again");
            }
            Err(e) => problems.push(format!("cannot bind the listener again: {e}")),
        }
    }

    fn report(&mut self, check: &SelfCheck) {
        let version = self.state.site.version();
        if let Some(overloaded) = &check.overloaded {
            self.state.metrics.self_checks_overloaded.inc();
            warn!(%overloaded, "self-check could not finish its fetches; still serving");
        }
        if check.ok {
            let mut notices = vec![
                Notice::Watchdog,
                Notice::Status(match &check.overloaded {
                    None => format!(
                        "serving release {version}: {} files, last self-check passed",
                        self.state.site.manifest.files.len()
                    ),
                    Some(o) => format!("serving release {version}: {o}"),
                }),
            ];
            if !self.ready {
                self.ready = true;
                notices.insert(0, Notice::Ready);
                info!(%version, "first self-check passed, ready");
            }
            self.notifier.notify(&notices);
        } else {
            self.state.metrics.self_check_failures.inc();
            let error = check.error.as_deref().unwrap_or("unknown");
            warn!(error, "self-check failed; not feeding the watchdog");
            self.notifier.notify(&[Notice::Status(format!(
                "release {version}: self-check failing: {error}"
            ))]);
        }
    }

    /// Verifies files on disk (stat every file, hash changed ones plus a rotating window)
    /// and rewrites any that drifted. Returns (path, problem, healed), how many files were
    /// hashed, and why some could not be checked (out of descriptors or memory).
    async fn check_disk(&mut self) -> (Vec<(String, Mismatch, bool)>, usize, Option<String>) {
        let files = &self.state.site.manifest.files;
        if files.is_empty() {
            return (Vec::new(), 0, None);
        }
        let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
        let (window, next) = rotation(&sizes, self.hash_cursor, self.config.hash_budget);
        self.hash_cursor = next;
        let state = self.state.clone();
        let root = self.root.clone();
        let verified = std::mem::take(&mut self.verified);
        let result =
            tokio::task::spawn_blocking(move || check_and_heal(&state, &root, &window, verified))
                .await;
        match result {
            Ok(outcome) => {
                self.verified = outcome.verified;
                (outcome.drift, outcome.hashed, outcome.unchecked)
            }
            Err(e) => {
                warn!(error = %e, "disk check panicked");
                (Vec::new(), 0, None)
            }
        }
    }

    async fn fetch_window(&mut self) -> Result<usize, FetchError> {
        let files = &self.state.site.manifest.files;
        if files.is_empty() {
            return self.fetch_path("healthz").await.map(|_| 0);
        }
        let sizes: Vec<u64> = files.iter().map(|f| f.size).collect();
        let (window, next) = rotation(&sizes, self.fetch_cursor, self.config.fetch_budget);
        for &i in &window {
            let entry = &self.state.site.manifest.files[i];
            let body = self.fetch_path(&entry.path).await?;
            if let Some(m) = body.mismatch(entry) {
                return Err(FetchError::Wrong(format!("/{} served {m}", entry.path)));
            }
        }
        self.fetch_cursor = next;
        Ok(window.len())
    }

    /// Fetches `path` through the listener, hashing the body as it arrives: a check holds
    /// one chunk at a time, not a whole file (a file of several MiB on the heap stays in
    /// the allocator's pools long after the check). `request_timeout` bounds the time spent
    /// waiting for the server, not the hashing in between.
    async fn fetch_path(&self, path: &str) -> Result<ContentHasher, FetchError> {
        let url = format!("http://{}/{}", self.listener.self_addr(), encode_path(path));
        let timed_out = || FetchError::Unreachable(format!("GET {url}: timed out"));
        let mut wait = self.config.request_timeout;
        let sent = within(&mut wait, self.client.get(&url).send()).await;
        let mut response = sent.ok_or_else(timed_out)?.map_err(|e| {
            if caused_by_exhaustion(&e) {
                FetchError::Starved(format!("GET {url}: {e}"))
            } else if e.is_connect() || e.is_timeout() {
                FetchError::Unreachable(format!("GET {url}: {e}"))
            } else {
                FetchError::Wrong(format!("GET {url}: {e}"))
            }
        })?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Wrong(format!(
                "GET {url}: status {}",
                response.status()
            )));
        }
        let mut body = ContentHasher::default();
        loop {
            let chunk = within(&mut wait, response.chunk())
                .await
                .ok_or_else(timed_out)?
                .map_err(|e| {
                    FetchError::Unreachable(format!("GET {url}: reading the body: {e}"))
                })?;
            let Some(chunk) = chunk else { break };
            body.update(&chunk);
        }
        Ok(body)
    }
}

/// Awaits `step` within what is left of `budget`, and takes the time it waited from it;
/// `None` when the budget ran out.
async fn within<T>(budget: &mut Duration, step: impl Future<Output = T>) -> Option<T> {
    let started = tokio::time::Instant::now();
    let out = tokio::time::timeout(*budget, step).await.ok();
    *budget = budget.saturating_sub(started.elapsed());
    out
}

/// Whether an error comes from running out of descriptors or memory somewhere in its chain.
fn caused_by_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<io::Error>()
            .is_some_and(is_resource_exhaustion)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Percent-encodes each segment of a manifest path for a URL.
pub fn encode_path(path: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
    // RFC 3986 path characters stay; everything else is encoded.
    const SEGMENT: &AsciiSet = &CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}')
        .add(b'/')
        .add(b'\\')
        .add(b'^')
        .add(b'|')
        .add(b'[')
        .add(b']');
    path.split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// The files (indices into `sizes`) one check covers, starting at `cursor` and wrapping,
/// up to `budget` bytes but always at least one file; and the cursor for the next check.
pub fn rotation(sizes: &[u64], cursor: usize, budget: u64) -> (Vec<usize>, usize) {
    let n = sizes.len();
    if n == 0 {
        return (Vec::new(), 0);
    }
    let start = cursor % n;
    let mut taken = Vec::new();
    let mut bytes = 0u64;
    for k in 0..n {
        let i = (start + k) % n;
        if !taken.is_empty() && bytes.saturating_add(sizes[i]) > budget {
            break;
        }
        bytes = bytes.saturating_add(sizes[i]);
        taken.push(i);
    }
    let next = (start + taken.len()) % n;
    (taken, next)
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    }
}

struct DiskOutcome {
    drift: Vec<(String, Mismatch, bool)>,
    verified: HashMap<String, Stamp>,
    hashed: usize,
    /// Why some files could not be checked: the process ran out of descriptors or memory.
    unchecked: Option<String>,
}

fn check_and_heal(
    state: &AgentState,
    root: &Path,
    window: &[usize],
    mut verified: HashMap<String, Stamp>,
) -> DiskOutcome {
    let files = &state.site.manifest.files;
    let mut drift = Vec::new();
    let mut hashed = 0;
    let mut unchecked = None;
    for (i, entry) in files.iter().enumerate() {
        let path = root.join(&entry.path);
        let mismatch = match std::fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Mismatch::Missing),
            Err(e) if is_resource_exhaustion(&e) => {
                unchecked.get_or_insert_with(|| e.to_string());
                continue;
            }
            Err(e) => Some(Mismatch::Unreadable {
                error: e.to_string(),
            }),
            Ok(meta) if !meta.is_file() => Some(Mismatch::Unreadable {
                error: "not a regular file".into(),
            }),
            Ok(meta) if meta.len() != entry.size => Some(Mismatch::Size {
                expected: entry.size,
                actual: meta.len(),
            }),
            Ok(meta) => {
                let now = stamp(&meta);
                if verified.get(&entry.path) == Some(&now) && !window.contains(&i) {
                    None
                } else {
                    match entry.verify_on_disk(root) {
                        Ok(m) => {
                            hashed += 1;
                            if m.is_none() {
                                verified.insert(entry.path.clone(), now);
                            }
                            m
                        }
                        // Not drift, and healing would fail the same way: try next time.
                        Err(e) => {
                            unchecked.get_or_insert_with(|| e.to_string());
                            None
                        }
                    }
                }
            }
        };
        let Some(mismatch) = mismatch else { continue };
        verified.remove(&entry.path);
        let healed = match heal(state, root, entry) {
            Ok(()) => {
                warn!(path = %entry.path, problem = %mismatch, "content drift healed");
                if let Ok(meta) = std::fs::metadata(&path) {
                    verified.insert(entry.path.clone(), stamp(&meta));
                }
                true
            }
            Err(e) => {
                warn!(path = %entry.path, problem = %mismatch, error = %e, "content drift NOT healed");
                false
            }
        };
        drift.push((entry.path.clone(), mismatch, healed));
    }
    debug!(hashed, drifted = drift.len(), "disk check");
    DiskOutcome {
        drift,
        verified,
        hashed,
        unchecked,
    }
}

/// Rewrites one file from the in-memory copy: write a sibling temp file, then rename, so a
/// reader never sees a half-written file.
fn heal(state: &AgentState, root: &Path, entry: &FileEntry) -> io::Result<()> {
    let asset = state
        .site
        .get(&entry.path)
        .ok_or_else(|| io::Error::other("no pristine copy in memory"))?;
    let target = root.join(&entry.path);
    let dir = target.parent().unwrap_or(root);
    std::fs::create_dir_all(dir)?;
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        return Err(io::Error::other(
            "a directory stands where the file belongs",
        ));
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".ami-agent-heal")
        .tempfile_in(dir)?;
    io::Write::write_all(&mut tmp, &asset.body)?;
    tmp.as_file().sync_all()?;
    // Readable by the web-facing world, like the rest of the content.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(&target).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_everything_over_several_checks() {
        let sizes = [10, 10, 10, 10, 10];
        assert_eq!(rotation(&sizes, 0, 25), (vec![0, 1], 2));
        assert_eq!(rotation(&sizes, 2, 25), (vec![2, 3], 4));
        assert_eq!(rotation(&sizes, 4, 25), (vec![4, 0], 1));
        assert_eq!(rotation(&sizes, 0, 1000), (vec![0, 1, 2, 3, 4], 0));
        // A file larger than the budget is still checked, alone.
        assert_eq!(rotation(&[100, 1], 0, 10), (vec![0], 1));
        assert_eq!(rotation(&[], 3, 10), (vec![], 0));
    }

    #[test]
    fn loopback_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(loopback_for(a("0.0.0.0:80")), a("127.0.0.1:80"));
        assert_eq!(loopback_for(a("[::]:80")), a("[::1]:80"));
        assert_eq!(loopback_for(a("10.1.2.3:8080")), a("10.1.2.3:8080"));
    }

    #[test]
    fn encodes_paths() {
        assert_eq!(encode_path("a b/c#d.txt"), "a%20b/c%23d.txt");
        assert_eq!(encode_path("index.html"), "index.html");
    }
}
