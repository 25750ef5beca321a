//! The HTTP/1.1 server: hyper with per-connection limits (see `conn`), a listener that can
//! be replaced while connections keep running, and a bounded graceful drain.

pub mod conn;
pub mod first_line;
pub mod headers;
pub mod response;
pub mod sendfile;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::state::{AgentState, Load};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections beyond this wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's head once it started it, and a new
    /// connection to send its first byte: what defeats slowloris.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request. Longer than a load
    /// balancer's idle timeout (an ALB's is 60 s), so the balancer closes first.
    pub keep_alive_timeout: Duration,
    /// How long a response may wait for the client to take more bytes before the
    /// connection is dropped.
    pub send_timeout: Duration,
    /// Largest request head accepted; larger ones get 431 and the connection closes.
    pub max_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            // nginx's defaults for keepalive_timeout and send_timeout.
            keep_alive_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Serves the agent's state on any number of listeners (one at a time in practice, but a
/// replacement can start before the old one is gone).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<AgentState>,
    http: http1::Builder,
    limits: conn::Limits,
    max_connections: usize,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    registry: Arc<conn::Registry>,
    draining: CancellationToken,
    load: LoadState,
}

/// What the accept loops saw lately, for the health loop to tell busy from dead.
#[derive(Default)]
struct LoadState {
    /// Every slot taken and nothing idle to close: new clients wait in the backlog.
    saturated: AtomicBool,
    /// accept() is failing for want of file descriptors or memory.
    starved: AtomicBool,
    accept_errors: AtomicU64,
}

/// Idle connections closed at a time when resources run out (nginx drains 32).
const EVICT_BATCH: usize = 32;

/// One accept loop on one listener.
pub struct Acceptor {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    pub fn new(state: Arc<AgentState>, config: &ServerConfig) -> Self {
        let limits = conn::Limits {
            header: config.header_read_timeout,
            keep_alive: config.keep_alive_timeout,
            send: config.send_timeout,
        };
        let mut http = http1::Builder::new();
        // `conn::Guarded` enforces the header and keep-alive limits. hyper's own timeout
        // runs from the end of the previous response, so it could only be a looser copy of
        // them, and it costs a timer armed and cancelled per request. Off, and no timer:
        // nothing else in hyper's HTTP/1 server uses one.
        http.header_read_timeout(None)
            .max_header_size(config.max_header_bytes)
            // The read buffer holds a head plus pipelined requests; hyper's minimum is 8 KiB.
            .max_buf_size((config.max_header_bytes * 2).max(8192))
            .keep_alive(true);
        Server {
            inner: Arc::new(Inner {
                state,
                http,
                limits,
                max_connections: config.max_connections.max(1),
                slots: Arc::new(Semaphore::new(config.max_connections.max(1))),
                connections: TaskTracker::new(),
                registry: Arc::new(conn::Registry::default()),
                draining: CancellationToken::new(),
                load: LoadState::default(),
            }),
        }
    }

    pub fn state(&self) -> &Arc<AgentState> {
        &self.inner.state
    }

    /// Starts accepting on `listener` until [`Acceptor::stop`] or [`Server::shutdown`].
    pub fn spawn_acceptor(&self, listener: TcpListener) -> io::Result<Acceptor> {
        let addr = listener.local_addr()?;
        let stop = self.inner.draining.child_token();
        let inner = self.inner.clone();
        let task = tokio::spawn(accept_loop(inner, listener, stop.clone()));
        info!(%addr, "listening");
        Ok(Acceptor { addr, stop, task })
    }

    /// Stops every acceptor, lets in-flight requests finish (at most `grace`), then
    /// returns whether every connection closed in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.draining.cancel();
        self.inner.registry.drain_all();
        self.inner.connections.close();
        let drained = tokio::time::timeout(grace, self.inner.connections.wait())
            .await
            .is_ok();
        if !drained {
            warn!(
                remaining = self.inner.connections.len(),
                "connections still open after the shutdown grace period"
            );
        }
        drained
    }

    pub fn open_connections(&self) -> usize {
        self.inner.connections.len()
    }

    pub fn load(&self) -> Load {
        Load {
            open_connections: self.inner.registry.len(),
            max_connections: self.inner.max_connections,
            // The flag is set when the accept loop found no idle connection to close; it
            // is stale as soon as a slot frees.
            saturated: self.inner.slots.available_permits() == 0
                && self.inner.load.saturated.load(Ordering::Relaxed),
            starved: self.inner.load.starved.load(Ordering::Relaxed),
        }
    }
}

impl Acceptor {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting; connections already accepted carry on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// True when the accept loop has ended (stopped, or died).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds a listener the way the agent wants it: SO_REUSEADDR so a restart does not wait
/// for TIME_WAIT; SO_REUSEPORT when several agents share one address (the local fleet).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]:80` should also answer on IPv4, as people expect from `0.0.0.0`.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Takes over a listening TCP socket that the parent process bound and left open at
/// descriptor `fd` (a supervisor, or the local fleet, which binds port 0 itself so that no
/// other process can take the port between choosing it and the agent binding it).
pub fn inherit(fd: std::os::fd::RawFd) -> io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let refuse = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if fd < 3 {
        return Err(refuse(format!(
            "descriptor {fd} is standard input, output or error, not a listening socket"
        )));
    }
    // Check that it is open before owning it: owning a closed number would later close
    // whatever file the agent opens under that number.
    // SAFETY: F_GETFD only reads the descriptor's flags; a closed number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(refuse(format!(
            "descriptor {fd} is not open ({}): the parent must leave its listening socket \
             open at that number",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: the descriptor is open and nothing else in this process owns it: it was
    // inherited, and `serve` takes it before opening any file.
    let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let kind = socket
        .r#type()
        .map_err(|e| refuse(format!("descriptor {fd} is not a socket ({e})")))?;
    let addr = socket.local_addr()?.as_socket();
    if kind != socket2::Type::STREAM || addr.is_none() || !socket.is_listener()? {
        return Err(refuse(format!(
            "descriptor {fd} is not a listening TCP socket"
        )));
    }
    // Not passed on to anything the agent runs.
    rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// The other side of [`inherit`]: makes the agent `cmd` starts serve on `listener`
/// (`--listen-fd`, after the arguments given so far). Keep the listener open until the
/// child has been spawned; the parent's copy may be closed after that.
pub fn pass_listener(cmd: &mut std::process::Command, listener: &impl std::os::fd::AsRawFd) {
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    // SAFETY: fcntl is async-signal-safe, and the descriptor is open in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    cmd.arg("--listen-fd").arg(fd.to_string());
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, stop: CancellationToken) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let permit = match inner.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Every slot is taken: close idle connections (they free their slots as they
                // go) and wait; only when none is idle is the server saturated.
                let evicted = inner.registry.evict_idle(EVICT_BATCH);
                if evicted == 0 {
                    set_flag(
                        &inner.load.saturated,
                        true,
                        "every connection slot is busy; new clients wait in the backlog",
                    );
                }
                inner.state.metrics.evictions.inc_by(evicted as u64);
                tokio::select! {
                    permit = inner.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = stop.cancelled() => break,
                }
            }
        };
        if inner.slots.available_permits() > 0 {
            set_flag(&inner.load.saturated, false, "connection slots free again");
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                if backoff.recovered() {
                    set_flag(&inner.load.starved, false, "accepting connections again");
                }
                let inner2 = inner.clone();
                inner.connections.spawn(async move {
                    serve_connection(inner2, stream, peer).await;
                    drop(permit);
                });
            }
            // Per-connection failures (the peer reset before we accepted): nothing to do.
            Err(e) if is_connection_error(&e) => debug!(error = %e, "accept"),
            Err(e) => {
                // Out of file descriptors or memory. The pending connection stays in the
                // backlog; close idle connections to free descriptors, and back off instead
                // of spinning. The listener itself is fine: nothing to rebind.
                drop(permit);
                inner.load.accept_errors.fetch_add(1, Ordering::Relaxed);
                inner.state.metrics.accept_errors.inc();
                let evicted = inner.registry.evict_idle(EVICT_BATCH);
                inner.state.metrics.evictions.inc_by(evicted as u64);
                let delay = backoff.failed();
                set_flag(&inner.load.starved, true, "");
                if let Some(failures) = backoff.should_warn() {
                    warn!(error = %e, failures, evicted, "accept failed; closing idle connections and backing off until descriptors free up");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    debug!("accept loop stopped");
}

/// Sets a load flag, logging the change once rather than at every accept.
fn set_flag(flag: &AtomicBool, value: bool, message: &str) {
    if flag.swap(value, Ordering::Relaxed) != value && !message.is_empty() {
        if value {
            warn!("{message}");
        } else {
            info!("{message}");
        }
    }
}

/// Exponential backoff for accept() failures (10 ms doubling to 1 s), and a warning at most
/// every 10 s with the number of failures since the last one.
#[derive(Default)]
struct AcceptBackoff {
    failures: u32,
    unreported: u64,
    warned: Option<std::time::Instant>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const WARN_EVERY: Duration = Duration::from_secs(10);

    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.unreported += 1;
        Self::FIRST
            .saturating_mul(1 << (self.failures - 1).min(7))
            .min(Self::MAX)
    }

    /// The failures to report, when it is time to warn again.
    fn should_warn(&mut self) -> Option<u64> {
        if self
            .warned
            .is_some_and(|at| at.elapsed() < Self::WARN_EVERY)
        {
            return None;
        }
        self.warned = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.unreported))
    }

    /// Clears the failures; true if there were any.
    fn recovered(&mut self) -> bool {
        std::mem::take(&mut self.failures) > 0
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let registration = inner.registry.register();
    let shared = registration.shared.clone();
    // Registered before this check, and `shutdown` drains the registry after cancelling:
    // one of the two sees the other.
    if inner.draining.is_cancelled() {
        shared.ask_to_close(conn::Close::Drain);
    }
    let stream = sendfile::Socket::new(stream, inner.state.site.sealed().cloned());
    let stream = conn::Guarded::new(stream, shared.clone(), inner.limits);
    let expired = stream.expired();
    let state = inner.state.clone();
    let on_request = shared.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        on_request.request_started();
        let response = response::respond(&state, &req, on_request.line_version());
        let response = response.map(|body| Tracked {
            body,
            shared: on_request.clone(),
        });
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = inner.http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        why = std::future::poll_fn(|cx| shared.poll_close(cx)) => match why {
            // Resources ran out and this connection was idle: close it. One that never
            // sent a byte is simply dropped (hyper's graceful shutdown would wait for its
            // first request); a request that arrived meanwhile is answered first.
            conn::Close::Evict if shared.is_idle() => Ok(()),
            // Finish the request in flight, if any, then close.
            conn::Close::Evict | conn::Close::Drain => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    let expired = *expired.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = expired {
        inner.state.metrics.connection_timeout(why.label());
    }
    if let Err(e) = result {
        // Garbage, oversized heads, timeouts and resets end here: the client's problem.
        debug!(%peer, error = %e, "connection closed with an error");
    }
    drop(registration);
}

/// A response body that tells the connection when it has been handed over in full (hyper
/// drops it then), so the keep-alive limit starts counting.
struct Tracked<B> {
    body: B,
    shared: Arc<conn::Shared>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.shared.response_done();
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
