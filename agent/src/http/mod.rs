//! The HTTP/1.1 server: hyper with per-connection limits, a listener that can be replaced
//! while connections keep running, and a bounded graceful drain.

pub mod response;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::state::AgentState;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections beyond this wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and to start the next request on a
    /// kept-alive connection: what defeats slowloris.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431 and the connection closes.
    pub max_header_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
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
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    draining: CancellationToken,
}

/// One accept loop on one listener.
pub struct Acceptor {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    pub fn new(state: Arc<AgentState>, config: &ServerConfig) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_header_size(config.max_header_bytes)
            // The read buffer holds a head plus pipelined requests; hyper's minimum is 8 KiB.
            .max_buf_size((config.max_header_bytes * 2).max(8192))
            .keep_alive(true);
        Server {
            inner: Arc::new(Inner {
                state,
                http,
                slots: Arc::new(Semaphore::new(config.max_connections.max(1))),
                connections: TaskTracker::new(),
                draining: CancellationToken::new(),
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

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let permit = tokio::select! {
            permit = inner.slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let inner2 = inner.clone();
                inner.connections.spawn(async move {
                    serve_connection(inner2, stream, peer).await;
                    drop(permit);
                });
            }
            // Per-connection failures (the peer reset before we accepted): nothing to do.
            Err(e) if is_connection_error(&e) => debug!(error = %e, "accept"),
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning; the
                // limit frees up as connections close.
                warn!(error = %e, "accept failed, backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    debug!("accept loop stopped");
}

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let state = inner.state.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let response = response::respond(&state, req.method(), req.uri().path(), req.headers());
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = inner.http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = inner.draining.cancelled() => {
            // Finish the request in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Garbage, oversized heads, timeouts and resets end here: the client's problem.
        debug!(%peer, error = %e, "connection closed with an error");
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
