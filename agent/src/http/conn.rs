//! Per-connection time limits and the registry of open connections.
//!
//! hyper has one timer, `header_read_timeout`, and it starts when it begins to read a head:
//! on a kept-alive connection that is when the previous response ended, so it doubles as
//! the idle timeout and nothing limits a client that stops reading a response. The stream
//! wrapper here gives each phase its own limit, the way nginx does:
//!
//! - **header**: from the first byte of a request to its complete head
//!   (`client_header_timeout`); a new connection gets the same time for its first byte;
//! - **keep-alive**: from the end of a response to the first byte of the next request
//!   (`keepalive_timeout`). Behind a load balancer this must outlast the balancer's own
//!   idle timeout (60 s on an ALB), or the balancer sends requests on connections the
//!   agent is closing and answers them 502;
//! - **send**: the longest a write may wait for the client to take bytes (`send_timeout`):
//!   a client that stops reading is dropped, however large the response.
//!
//! The stream also holds back a connection's first request line until its end, so its
//! version can be read before hyper parses it (see `first_line`).
//!
//! The registry lets the accept loop close idle connections when every slot is taken or
//! file descriptors run out (nginx's reusable connections): a flood of idle sockets then
//! cannot keep a new client waiting.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::first_line::{FirstLine, LineVersion};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header: Duration,
    pub keep_alive: Duration,
    pub send: Duration,
}

/// Why a connection was closed by a limit (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Header,
    KeepAlive,
    Send,
}

impl Expired {
    /// The metrics label (`crate::metrics::LIMITS`).
    pub fn label(self) -> &'static str {
        match self {
            Expired::Header => "header",
            Expired::KeepAlive => "keep_alive",
            Expired::Send => "send",
        }
    }
}

const IDLE_NEW: u8 = 0;
const IDLE: u8 = 1;
const HEAD: u8 = 2;
const BUSY: u8 = 3;

/// `Shared::since_ms` before the phase's start has been taken.
const UNSTAMPED: u64 = u64::MAX;

/// What the server and the stream both know about one connection.
#[derive(Debug)]
pub struct Shared {
    epoch: Instant,
    phase: AtomicU8,
    /// Milliseconds since `epoch` when the phase began, or `UNSTAMPED` until a limit or
    /// the registry first asks. Taking the time lazily saves clock reads per request: a
    /// request whose head arrives whole never needs one. A write in the idle phase clears
    /// it again, so the keep-alive limit counts from the last byte written.
    since_ms: AtomicU64,
    /// A write is waiting for the client to take bytes: the response is not delivered,
    /// whatever the phase says (hyper lets go of a body before it is all sent).
    write_blocked: AtomicBool,
    /// What the connection's first request line asked for (a `LineVersion`).
    line_version: AtomicU8,
    /// Set to ask the connection to close (a `Close`, 0 for none); the connection's task
    /// is woken through `close_waker`. A flag and a waker, not a `Notify`: the connection
    /// polls this on every wake-up, and a `Notify` takes a lock each time it is polled.
    close: AtomicU8,
    close_waker: AtomicWaker,
}

/// Why a connection is asked to close, in rising order of force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Resources ran out: close if idle, else after the request in progress.
    Evict = 1,
    /// The server is shutting down: finish the request in progress, then close.
    Drain = 2,
}

impl Shared {
    fn new(epoch: Instant) -> Self {
        let now = ms_since(epoch);
        Shared {
            epoch,
            phase: AtomicU8::new(IDLE_NEW),
            since_ms: AtomicU64::new(now),
            write_blocked: AtomicBool::new(false),
            line_version: AtomicU8::new(LineVersion::Http1 as u8),
            close: AtomicU8::new(0),
            close_waker: AtomicWaker::new(),
        }
    }

    fn set(&self, phase: u8) {
        self.since_ms.store(UNSTAMPED, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    /// When the current phase began: the first time anyone asks after it began.
    fn stamp(&self) -> u64 {
        let since = self.since_ms.load(Ordering::Relaxed);
        if since != UNSTAMPED {
            return since;
        }
        let now = ms_since(self.epoch);
        match self
            .since_ms
            .compare_exchange(UNSTAMPED, now, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => now,
            Err(earlier) => earlier,
        }
    }

    /// Bytes went out: an idle phase (the response's body was handed over, its bytes
    /// still going) counts again from now.
    fn wrote(&self) {
        if self.phase.load(Ordering::Relaxed) == IDLE {
            self.since_ms.store(UNSTAMPED, Ordering::Relaxed);
        }
    }

    /// Asks the connection to close; a drain is never downgraded to an eviction.
    pub fn ask_to_close(&self, why: Close) {
        self.close.fetch_max(why as u8, Ordering::AcqRel);
        self.close_waker.wake();
    }

    /// Whether the connection has been asked to close, and why.
    pub fn asked_to_close(&self) -> Option<Close> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Close::Evict),
            _ => Some(Close::Drain),
        }
    }

    /// Ready once the connection is asked to close.
    pub fn poll_close(&self, cx: &mut Context<'_>) -> Poll<Close> {
        if let Some(why) = self.asked_to_close() {
            return Poll::Ready(why);
        }
        self.close_waker.register(cx.waker());
        match self.asked_to_close() {
            Some(why) => Poll::Ready(why),
            None => Poll::Pending,
        }
    }

    /// A request head was parsed: no read limit until its response is done.
    pub fn request_started(&self) {
        // No time: nothing is measured from the start of a request (a clock read saved
        // per request).
        self.phase.store(BUSY, Ordering::Release);
    }

    /// The response's body was handed to hyper in full: waiting for the next request.
    pub fn response_done(&self) {
        self.set(IDLE);
    }

    /// What the connection's first request line asked for, once it has been read.
    pub fn line_version(&self) -> LineVersion {
        LineVersion::from_u8(self.line_version.load(Ordering::Relaxed))
    }

    /// Waiting for a request, with nothing left to send.
    pub fn is_idle(&self) -> bool {
        self.idle_for().is_some()
    }

    /// Waiting for a request, and for how long (counting from the last byte written, so
    /// a response still draining to a slow client is not cut by the keep-alive limit).
    fn idle_for(&self) -> Option<Duration> {
        if self.write_blocked.load(Ordering::Acquire) {
            return None;
        }
        match self.phase.load(Ordering::Acquire) {
            IDLE_NEW | IDLE => {
                let since = self.stamp();
                Some(Duration::from_millis(
                    ms_since(self.epoch).saturating_sub(since),
                ))
            }
            _ => None,
        }
    }

    /// When a read that has not completed must give up, and which limit that is.
    fn read_deadline(&self, limits: &Limits) -> Option<(Instant, Expired)> {
        if self.write_blocked.load(Ordering::Acquire) {
            // The send limit governs until the response is delivered.
            return None;
        }
        let since = |ms: u64| self.epoch + Duration::from_millis(ms);
        match self.phase.load(Ordering::Acquire) {
            IDLE_NEW | HEAD => Some((since(self.stamp()) + limits.header, Expired::Header)),
            IDLE => Some((since(self.stamp()) + limits.keep_alive, Expired::KeepAlive)),
            _ => None,
        }
    }
}

fn ms_since(epoch: Instant) -> u64 {
    Instant::now().saturating_duration_since(epoch).as_millis() as u64
}

/// Every open connection, so idle ones can be closed when resources run out.
#[derive(Debug)]
pub struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Shared>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    pub shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Shared>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared::new(self.epoch));
        self.lock().insert(id, shared.clone());
        Registration {
            registry: self.clone(),
            id,
            shared,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks up to `max` idle connections to close, the longest idle first, and returns
    /// how many were asked. A connection with a request in progress is never chosen.
    pub fn evict_idle(&self, max: usize) -> usize {
        let mut idle: Vec<(Duration, Arc<Shared>)> = self
            .lock()
            .values()
            .filter_map(|s| s.idle_for().map(|d| (d, s.clone())))
            .collect();
        let n = idle.len().min(max);
        if n == 0 {
            return 0;
        }
        if n < idle.len() {
            idle.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
        }
        for (_, shared) in &idle[..n] {
            shared.ask_to_close(Close::Evict);
        }
        n
    }

    /// Asks every open connection to finish its request in progress and close.
    pub fn drain_all(&self) {
        for shared in self.lock().values() {
            shared.ask_to_close(Close::Drain);
        }
    }
}

/// A stream with the connection's read and write limits applied.
pub struct Guarded<S> {
    inner: S,
    shared: Arc<Shared>,
    limits: Limits,
    read_timer: Option<(Pin<Box<Sleep>>, Instant)>,
    write_timer: Option<Pin<Box<Sleep>>>,
    first_line: FirstLine,
    /// Which limit closed the connection, if one did.
    expired: Arc<Mutex<Option<Expired>>>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, shared: Arc<Shared>, limits: Limits) -> Self {
        Guarded {
            inner,
            shared,
            limits,
            read_timer: None,
            write_timer: None,
            first_line: FirstLine::default(),
            expired: Arc::new(Mutex::new(None)),
        }
    }

    /// Where the stream records the limit that closed it.
    pub fn expired(&self) -> Arc<Mutex<Option<Expired>>> {
        self.expired.clone()
    }

    fn expire(&self, why: Expired) -> io::Error {
        *self.expired.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        let what = match why {
            Expired::Header => "no complete request head in time",
            Expired::KeepAlive => "idle keep-alive connection",
            Expired::Send => "the client stopped reading the response",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

/// Polls the read timer for `deadline`. Each request on a kept-alive connection pushes the
/// deadline later; moving a timer in tokio's wheel on every request costs more than letting
/// it fire once and moving it then. So a timer is only ever moved earlier at once; one armed
/// for an earlier time fires, finds the deadline still ahead, and is moved to it.
fn timer_fired(
    timer: &mut Option<(Pin<Box<Sleep>>, Instant)>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> bool {
    let mut armed = timer.is_none();
    let (sleep, at) =
        timer.get_or_insert_with(|| (Box::pin(tokio::time::sleep_until(deadline)), deadline));
    if deadline < *at {
        sleep.as_mut().reset(deadline);
        *at = deadline;
        armed = true;
    }
    // A timer polled once since it was armed wakes the task when it fires: until then
    // there is nothing to poll (the task's waker does not change).
    if !armed && !sleep.is_elapsed() {
        return false;
    }
    if poll_timer(sleep, cx).is_pending() {
        return false;
    }
    if *at >= deadline || Instant::now() >= deadline {
        return true;
    }
    sleep.as_mut().reset(deadline);
    *at = deadline;
    poll_timer(sleep, cx).is_ready()
}

/// Polls a timer outside tokio's cooperative budget: a budget-exhausted poll would return
/// Pending without registering the waker, and `timer_fired` polls a timer only once.
fn poll_timer(sleep: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
    let mut unconstrained = tokio::task::unconstrained(sleep.as_mut());
    Pin::new(&mut unconstrained).poll(cx)
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let shared = &this.shared;
        let polled = this
            .first_line
            .poll_read(&mut this.inner, cx, buf, |asked| {
                shared.line_version.store(asked as u8, Ordering::Relaxed)
            });
        // A first line held back until its end has arrived all the same.
        if (buf.filled().len() > before || this.first_line.is_holding())
            && matches!(this.shared.phase.load(Ordering::Acquire), IDLE_NEW | IDLE)
        {
            this.shared.set(HEAD);
        }
        match polled {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => match this.poll_read_timer(cx) {
                Some(why) => Poll::Ready(Err(this.expire(why))),
                None => Poll::Pending,
            },
        }
    }
}

impl<S> Guarded<S> {
    /// Keeps the read timer armed and registered with the task, and says which limit
    /// passed, if one did. hyper polls the read side while it is still answering, gets
    /// Pending, and then waits for the socket to become readable: it does not read again
    /// when the response ends. So while no read limit applies (a response in progress),
    /// the timer stays armed no later than the keep-alive limit could end, and the write
    /// side arms it again once the response is out (`poll_flush`); when it fires, the
    /// task is woken, hyper reads, and the real deadline is looked at.
    fn poll_read_timer(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        match self.shared.read_deadline(&self.limits) {
            Some((deadline, why)) => timer_fired(&mut self.read_timer, deadline, cx).then_some(why),
            None => {
                match &mut self.read_timer {
                    // Armed and registered for a limit that began before the response
                    // did (one that ends later is moved by `poll_flush`).
                    Some((sleep, _)) if !sleep.is_elapsed() => {}
                    timer => {
                        // In the future, so it cannot pass now: this only arms the timer.
                        let look_again = Instant::now() + self.limits.keep_alive;
                        timer_fired(timer, look_again, cx);
                    }
                }
                None
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Runs one write attempt under the send limit: the clock starts when a write first
    /// has to wait and stops at the next byte the client takes (nginx's `send_timeout`).
    fn guard_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
        progressed: impl Fn(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match attempt(Pin::new(&mut self.inner), cx) {
            Poll::Ready(Ok(v)) => {
                if progressed(&v) {
                    self.write_timer = None;
                    self.shared.wrote();
                    self.shared.write_blocked.store(false, Ordering::Release);
                }
                Poll::Ready(Ok(v))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.shared.write_blocked.store(true, Ordering::Release);
                let send = self.limits.send;
                let timer = self
                    .write_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(send)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(self.expire(Expired::Send)))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard_write(cx, |s, cx| s.poll_write(cx, buf), |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard_write(cx, |s, cx| s.poll_write_vectored(cx, bufs), |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = self.guard_write(cx, |s, cx| s.poll_flush(cx), |_| false);
        if flushed.is_ready() && self.poll_read_timer(cx).is_some() {
            // A limit passed: the read side reports it.
            cx.waker().wake_by_ref();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard_write(cx, |s, cx| s.poll_shutdown(cx), |_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        header: Duration::from_secs(10),
        keep_alive: Duration::from_secs(75),
        send: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_gets_the_header_limit_for_its_first_byte() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        let started = Instant::now();
        let err = g.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.header);
        assert_eq!(*g.expired().lock().unwrap(), Some(Expired::Header));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_line_held_back_counts_as_a_request_begun() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Half a request line: nothing reaches the reader yet, but the connection is no
        // longer idle, and the header limit counts from this first byte.
        client.write_all(b"GET / HTTP/1.").await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::spawn(async move { (g.read(&mut buf).await, g) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!reg.shared.is_idle());
        assert_eq!(registry.evict_idle(10), 0);
        let (read, g) = read.await.unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.header);
        assert_eq!(*g.expired().lock().unwrap(), Some(Expired::Header));
        assert_eq!(reg.shared.line_version(), LineVersion::Http1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_line_s_version_reaches_the_service() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (mut client, server) = tokio::io::duplex(64);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        client.write_all(b"GET / HTTP/2.0\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(reg.shared.line_version(), LineVersion::OtherMajor);
    }

    /// A connection whose request has been read and is being answered.
    async fn request_read() -> (
        Registration,
        tokio::io::DuplexStream,
        Guarded<tokio::io::DuplexStream>,
    ) {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (mut client, server) = tokio::io::duplex(1024);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(g.read(&mut [0u8; 64]).await.unwrap() > 0);
        reg.shared.request_started();
        (reg, client, g)
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_limit_counts_from_the_end_of_the_response() {
        let (reg, _client, mut g) = request_read().await;
        let mut buf = [0u8; 64];
        // A request in progress has no read limit: the service may take its time.
        let busy = tokio::time::timeout(Duration::from_secs(300), g.read(&mut buf)).await;
        assert!(busy.is_err(), "no read limit while busy");
        reg.shared.response_done();
        let started = Instant::now();
        let err = g.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.keep_alive);
        assert_eq!(*g.expired().lock().unwrap(), Some(Expired::KeepAlive));
    }

    /// hyper's order of calls: it polls the read side while the response is being made
    /// (Pending), writes and flushes the response, and polls the read side again only
    /// when the task is woken. The keep-alive limit must still close the connection.
    #[tokio::test(start_paused = true)]
    async fn keep_alive_limit_holds_when_the_last_read_was_polled_mid_response() {
        let (reg, _client, mut g) = request_read().await;
        let mut buf = [0u8; 64];
        let mut answered = false;
        let mut started = None;
        let outcome = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            if let Poll::Ready(r) = Pin::new(&mut g).poll_read(cx, &mut rb) {
                return Poll::Ready(r);
            }
            if !answered {
                answered = true;
                reg.shared.response_done();
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                assert!(Pin::new(&mut g).poll_write(cx, head).is_ready());
                assert!(Pin::new(&mut g).poll_flush(cx).is_ready());
                started = Some(Instant::now());
            }
            Poll::Pending
        });
        let err = tokio::time::timeout(Duration::from_secs(300), outcome)
            .await
            .expect("the idle connection was never closed")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.unwrap().elapsed(), LIMITS.keep_alive);
        assert_eq!(*g.expired().lock().unwrap(), Some(Expired::KeepAlive));
    }

    /// A body hyper has let go of may still be going out: the keep-alive limit counts
    /// from the last byte written, not from when the phase turned idle.
    #[tokio::test(start_paused = true)]
    async fn keep_alive_counts_from_the_last_byte_written() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (_client, server) = tokio::io::duplex(1 << 20);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        reg.shared.request_started();
        reg.shared.response_done();
        let (first, _) = reg.shared.read_deadline(&LIMITS).unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        g.write_all(b"the rest of the body").await.unwrap();
        let (later, why) = reg.shared.read_deadline(&LIMITS).unwrap();
        assert_eq!(why, Expired::KeepAlive);
        assert_eq!(later - first, Duration::from_secs(50));
        assert_eq!(later, Instant::now() + LIMITS.keep_alive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_send_limit() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (mut client, server) = tokio::io::duplex(16);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        // The client reads 16 bytes every 30 s: slow, but every write makes progress
        // within the limit, so the response goes through.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            while got.len() < 64 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let n = client.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            client
        });
        g.write_all(&[7u8; 64]).await.unwrap();
        let _client = reader.await.unwrap();
        // Now nobody reads: the write fails once the limit passes, not before.
        let started = Instant::now();
        let err = g.write_all(&[7u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.send);
        assert_eq!(*g.expired().lock().unwrap(), Some(Expired::Send));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_picks_idle_connections_longest_idle_first() {
        let registry = Arc::new(Registry::default());
        let old = registry.register();
        tokio::time::advance(Duration::from_secs(5)).await;
        let newer = registry.register();
        let busy = registry.register();
        busy.shared.request_started();
        assert_eq!(registry.len(), 3);

        assert_eq!(registry.evict_idle(1), 1);
        // The longest-idle one was asked, and a poll sees it at once.
        let poll =
            |shared: &Shared| shared.poll_close(&mut Context::from_waker(std::task::Waker::noop()));
        assert_eq!(poll(&old.shared), Poll::Ready(Close::Evict));
        assert_eq!(newer.shared.asked_to_close(), None);
        assert_eq!(poll(&newer.shared), Poll::Pending);
        // A busy connection is never chosen, however many are asked for.
        assert_eq!(registry.evict_idle(10), 2);
        assert_eq!(newer.shared.asked_to_close(), Some(Close::Evict));
        assert_eq!(busy.shared.asked_to_close(), None);
        // Draining reaches every connection and outranks an eviction.
        registry.drain_all();
        for r in [&old, &newer, &busy] {
            assert_eq!(poll(&r.shared), Poll::Ready(Close::Drain));
        }
        registry.evict_idle(10);
        assert_eq!(old.shared.asked_to_close(), Some(Close::Drain));
        drop(old);
        assert_eq!(registry.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_still_being_sent_is_not_idle() {
        let registry = Arc::new(Registry::default());
        let reg = registry.register();
        let (_client, server) = tokio::io::duplex(16);
        let mut g = Guarded::new(server, reg.shared.clone(), LIMITS);
        // hyper lets go of the body before the client has it: the phase says idle...
        reg.shared.request_started();
        reg.shared.response_done();
        // ...but the write is stuck behind a client that does not read.
        let stuck = tokio::time::timeout(Duration::from_secs(1), g.write_all(&[1u8; 64])).await;
        assert!(stuck.is_err());
        assert_eq!(registry.evict_idle(10), 0);
        // No keep-alive limit either while the send limit runs.
        assert!(reg.shared.read_deadline(&LIMITS).is_none());
    }
}
