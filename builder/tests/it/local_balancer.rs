//! The local fleet's load balancer, in process: tiny HTTP backends written here, the
//! balancer's `serve` on a task, and its directory's files as the only interface.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amictl::local::balancer::{
    is_running, read_status, serve, write_targets, BackendState, BalancerSettings, ServeError,
    Status, Target, Targets, STATUS_FILE, TARGETS_FILE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every wait in these tests gives up after this long.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long `/slow` takes to answer: long enough to change targets meanwhile.
const SLOW: Duration = Duration::from_millis(700);

fn settings() -> BalancerSettings {
    BalancerSettings {
        health_interval: Duration::from_millis(50),
        health_timeout: Duration::from_millis(500),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
        connect_timeout: Duration::from_millis(500),
        deregistration_delay: Duration::from_secs(10),
        poll: Duration::from_millis(20),
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("AMICTL_LOG").unwrap_or_else(|_| "amictl=debug".to_owned()))
        .with_test_writer()
        .try_init();
}

/// An HTTP backend: `/healthz` answers 200 (500 once switched), `/` its name, `/slow` its
/// name after [`SLOW`] (reporting the request on `slow`), `/hang` nothing for a minute,
/// `/flaky` its name, except on "a", which closes the connection unanswered.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(name: &'static str, slow: Option<mpsc::UnboundedSender<&'static str>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(answer(
                    name,
                    stream,
                    flag.load(Ordering::SeqCst),
                    slow.clone(),
                ));
            }
        });
        Self {
            name,
            addr,
            healthy,
            task,
        }
    }

    fn target(&self) -> Target {
        Target {
            id: self.name.to_owned(),
            addr: self.addr,
        }
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Closes the listening socket: connecting is refused from now on.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn answer(
    name: &'static str,
    mut stream: TcpStream,
    healthy: bool,
    slow: Option<mpsc::UnboundedSender<&'static str>>,
) {
    let mut request = Vec::new();
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0; 1024];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split(' ').nth(1).unwrap_or("");
    let (code, body) = match path {
        "/healthz" if healthy => (200, "ok".to_owned()),
        "/healthz" => (500, "sick".to_owned()),
        "/" => (200, name.to_owned()),
        "/slow" => {
            if let Some(slow) = &slow {
                let _ = slow.send(name);
            }
            tokio::time::sleep(SLOW).await;
            (200, name.to_owned())
        }
        // Target "a" closes on it without answering, as an agent that is stopping may.
        "/flaky" if name == "a" => return,
        "/flaky" => (200, name.to_owned()),
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        _ => (404, "not found".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The status and body of the answer to `GET path` through `addr`, or None when the
/// connection was closed without one.
async fn request(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("the answer came in time")
        .ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The body of a 200 answer to `GET path` through `addr`, or None when the connection was
/// closed without one.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let (status, body) = request(addr, path).await?;
    assert_eq!(status, 200, "{body}");
    Some(body)
}

/// `n` requests to `/` one after the other: the backends' names.
async fn names(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(get(addr, "/").await.expect("every request is served"));
    }
    names
}

struct Balancer {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Balancer {
    async fn start(settings: BalancerSettings) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), settings).await
    }

    async fn start_in(dir: tempfile::TempDir, settings: BalancerSettings) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let path = dir.path().to_owned();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { serve(&path, listener, settings, token).await });
        let lb = Self {
            dir,
            addr,
            shutdown,
            task,
        };
        lb.wait("the first status", |_| true).await;
        lb
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn set_targets(&self, generation: u64, targets: &[&Backend]) {
        let targets = Targets {
            generation,
            targets: targets.iter().map(|b| b.target()).collect(),
        };
        write_targets(self.dir(), &targets).unwrap();
    }

    /// Polls status.json until `done` holds for it.
    async fn wait(&self, what: &str, done: impl Fn(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            let status = read_status(self.dir()).unwrap();
            if let Some(status) = &status {
                if done(status) {
                    return status.clone();
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "waited in vain for {what}: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_states(&self, generation: u64, states: &[(&str, BackendState)]) -> Status {
        self.wait(&format!("generation {generation} with {states:?}"), |s| {
            s.generation == generation
                && s.targets.len() == states.len()
                && states
                    .iter()
                    .all(|(id, state)| s.targets.get(*id).is_some_and(|t| t.state == *state))
        })
        .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the balancer stopped in time")
            .unwrap()
            .unwrap();
    }
}

use BackendState::{Draining, Healthy, Unhealthy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_goes_round_robin_over_healthy_targets() {
    let lb = Balancer::start(settings()).await;
    let status = read_status(lb.dir()).unwrap().unwrap();
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.listen, lb.addr);
    assert_eq!(status.generation, 0, "no targets.json yet");

    let (a, b) = (
        Backend::start("a", None).await,
        Backend::start("b", None).await,
    );
    lb.set_targets(1, &[&a, &b]);
    lb.wait_states(1, &[("a", Healthy), ("b", Healthy)]).await;

    let names = names(lb.addr, 10).await;
    assert!(names.windows(2).all(|w| w[0] != w[1]), "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 5, "{names:?}");

    // A request stops counting as active when its answer has been handed over, which
    // can be just after the client has read it.
    let status = lb
        .wait("10 connections counted, none active", |s| {
            s.connections_total == 10 && s.targets.values().all(|t| t.active == 0)
        })
        .await;
    assert_eq!(status.failed_total, 0);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_moves_on_to_the_next_target() {
    // The dead target stays "healthy" for the whole test, so only retrying can save
    // the requests it is given.
    let lb = Balancer::start(BalancerSettings {
        unhealthy_threshold: 1000,
        ..settings()
    })
    .await;
    let (a, b) = (
        Backend::start("a", None).await,
        Backend::start("b", None).await,
    );
    lb.set_targets(1, &[&a, &b]);
    lb.wait_states(1, &[("a", Healthy), ("b", Healthy)]).await;
    a.kill().await;

    assert_eq!(names(lb.addr, 6).await, ["b"; 6]);
    let status = lb
        .wait("6 connections counted", |s| s.connections_total == 6)
        .await;
    assert_eq!(status.failed_total, 0);
    assert_eq!(status.targets["a"].state, Healthy);

    // With nothing that accepts, the balancer answers 502 itself, and counts it.
    let dead = Backend::start("dead", None).await;
    lb.set_targets(2, &[&dead]);
    dead.kill().await;
    lb.wait("generation 2", |s| s.generation == 2).await;
    assert_eq!(request(lb.addr, "/").await.map(|r| r.0), Some(502));
    lb.wait("a failed request", |s| s.failed_total == 1).await;
    // With no target at all, 503.
    lb.set_targets(3, &[]);
    lb.wait("generation 3", |s| s.generation == 3).await;
    assert_eq!(request(lb.addr, "/").await.map(|r| r.0), Some(503));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_targets_get_no_traffic_unless_all_are() {
    let (lb, a, b) = two_healthy_targets().await;

    b.set_healthy(false);
    lb.wait_states(1, &[("a", Healthy), ("b", Unhealthy)]).await;
    assert_eq!(names(lb.addr, 6).await, ["a"; 6]);

    // None healthy: fail open to all of them, like an ALB.
    a.set_healthy(false);
    lb.wait_states(1, &[("a", Unhealthy), ("b", Unhealthy)])
        .await;
    let mut names = names(lb.addr, 4).await;
    names.sort();
    assert_eq!(names, ["a", "a", "b", "b"]);

    b.set_healthy(true);
    lb.wait_states(1, &[("a", Unhealthy), ("b", Healthy)]).await;
    assert_eq!(self::names(lb.addr, 4).await, ["b"; 4]);
    assert_eq!(read_status(lb.dir()).unwrap().unwrap().failed_total, 0);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_drains_its_connections_then_goes() {
    let lb = Balancer::start(settings()).await;
    let (tx, mut slow) = mpsc::unbounded_channel();
    let a = Backend::start("a", Some(tx.clone())).await;
    let b = Backend::start("b", Some(tx)).await;
    lb.set_targets(1, &[&a, &b]);
    lb.wait_states(1, &[("a", Healthy), ("b", Healthy)]).await;

    let addr = lb.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    let busy = tokio::time::timeout(DEADLINE, slow.recv())
        .await
        .unwrap()
        .unwrap();
    let (gone, stays) = if busy == "a" { (&a, &b) } else { (&b, &a) };
    lb.set_targets(2, &[stays]);
    let status = lb
        .wait_states(2, &[(gone.name, Draining), (stays.name, Healthy)])
        .await;
    assert_eq!(status.targets[gone.name].active, 1);
    assert!(
        !in_flight.is_finished(),
        "the change was made while in flight"
    );

    // New connections only go to the remaining target.
    assert_eq!(names(lb.addr, 4).await, [stays.name; 4]);
    assert_eq!(in_flight.await.unwrap().as_deref(), Some(gone.name));
    lb.wait_states(2, &[(stays.name, Healthy)]).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deregistration_delay_closes_what_is_left() {
    let lb = Balancer::start(BalancerSettings {
        deregistration_delay: Duration::from_millis(200),
        ..settings()
    })
    .await;
    let a = Backend::start("a", None).await;
    lb.set_targets(1, &[&a]);
    lb.wait_states(1, &[("a", Healthy)]).await;

    let addr = lb.addr;
    let hanging = tokio::spawn(async move { request(addr, "/hang").await });
    lb.wait("a connection to a", |s| s.targets["a"].active == 1)
        .await;
    let removed = Instant::now();
    lb.set_targets(2, &[]);
    let cut = hanging.await.unwrap();
    assert_eq!(cut.map(|r| r.0), Some(502), "cut with a 502");
    assert!(removed.elapsed() < Duration::from_secs(2));
    lb.wait_states(2, &[]).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_targets_json() {
    let a = Backend::start("a", None).await;
    let dir = tempfile::tempdir().unwrap();
    write_targets(
        dir.path(),
        &Targets {
            generation: 1,
            targets: vec![a.target()],
        },
    )
    .unwrap();
    // The very first status.json already has the targets that were there at start.
    let lb = Balancer::start_in(dir, settings()).await;
    let first = read_status(lb.dir()).unwrap().unwrap();
    assert_eq!(first.generation, 1);
    assert!(first.targets.contains_key("a"));

    let b = Backend::start("b", None).await;
    lb.set_targets(2, &[&a, &b]);
    lb.wait_states(2, &[("a", Healthy), ("b", Healthy)]).await;

    // A bad file is ignored: the last good targets stay, and so does their generation.
    std::fs::write(lb.dir().join(TARGETS_FILE), "{\"generation\": 3, ").unwrap();
    tokio::time::sleep(settings().poll * 5).await;
    let kept = read_status(lb.dir()).unwrap().unwrap();
    assert_eq!(kept.generation, 2);
    assert_eq!(kept.targets.len(), 2);
    let mut served = names(lb.addr, 2).await;
    served.sort();
    assert_eq!(served, ["a", "b"]);

    // Nothing changes, yet status.json is rewritten: its heartbeat.
    let before = read_status(lb.dir()).unwrap().unwrap();
    lb.wait("a heartbeat", |s| {
        s.updated_unix_ms > before.updated_unix_ms
    })
    .await;

    lb.set_targets(4, &[&b]);
    lb.wait_states(4, &[("b", Healthy)]).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_balancer_per_directory_and_is_running_tells() {
    let lb = Balancer::start(settings()).await;
    assert!(is_running(lb.dir()));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = serve(lb.dir(), listener, settings(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(second, ServeError::AlreadyRunning { .. }));
    assert_eq!(
        second.to_string(),
        format!("a balancer is already running for {}", lb.dir().display())
    );
    assert!(is_running(lb.dir()), "probing did not take the lock away");

    let Balancer {
        dir,
        addr,
        shutdown,
        task,
    } = lb;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(!is_running(dir.path()));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
    assert!(dir.path().join(STATUS_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_connections_finish() {
    let lb = Balancer::start(settings()).await;
    let (tx, mut slow) = mpsc::unbounded_channel();
    let a = Backend::start("a", Some(tx)).await;
    lb.set_targets(1, &[&a]);
    lb.wait_states(1, &[("a", Healthy)]).await;

    let addr = lb.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    tokio::time::timeout(DEADLINE, slow.recv())
        .await
        .unwrap()
        .unwrap();
    let stopping = Instant::now();
    lb.shutdown.cancel();
    // Refused at once, while the open one goes on.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
    assert_eq!(in_flight.await.unwrap().as_deref(), Some("a"));
    lb.task.await.unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2));
}

/// A balancer over targets "a" and "b", both healthy (generation 1).
async fn two_healthy_targets() -> (Balancer, Backend, Backend) {
    let lb = Balancer::start(settings()).await;
    let (a, b) = (
        Backend::start("a", None).await,
        Backend::start("b", None).await,
    );
    lb.set_targets(1, &[&a, &b]);
    lb.wait_states(1, &[("a", Healthy), ("b", Healthy)]).await;
    (lb, a, b)
}

/// One kept-alive client connection, reading each answer by its Content-Length.
struct KeepAlive(TcpStream);

impl KeepAlive {
    async fn open(addr: SocketAddr) -> Self {
        KeepAlive(TcpStream::connect(addr).await.unwrap())
    }

    async fn send(&mut self, method: &str, path: &str) -> (u16, String) {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n");
        self.0.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(DEADLINE, self.0.read(&mut chunk))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0, "the balancer closed a kept-alive connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        while buf.len() < end + len {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the body was cut");
            buf.extend_from_slice(&chunk[..n]);
        }
        (
            status,
            String::from_utf8_lossy(&buf[end..end + len]).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_client_moves_off_a_removed_target_at_its_next_request() {
    let (lb, _a, b) = two_healthy_targets().await;

    // One connection, requests spread over both targets: it is not pinned to one.
    let mut client = KeepAlive::open(lb.addr).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, name) = client.send("GET", "/").await;
        assert_eq!(status, 200);
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);

    // Once "a" is removed, the same connection's next requests all go to "b".
    lb.set_targets(2, &[&b]);
    lb.wait("generation 2", |s| s.generation == 2).await;
    for _ in 0..4 {
        assert_eq!(client.send("GET", "/").await, (200, "b".to_owned()));
    }
    let status = lb
        .wait("8 requests counted", |s| s.requests_total == 8)
        .await;
    assert_eq!(status.connections_total, 1);
    assert_eq!(status.failed_total, 0);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_closed_on_unanswered_is_retried_only_when_idempotent() {
    let (lb, _a, _b) = two_healthy_targets().await;

    // Whichever target comes first, every GET is answered, by "b".
    let mut client = KeepAlive::open(lb.addr).await;
    for _ in 0..4 {
        assert_eq!(client.send("GET", "/flaky").await, (200, "b".to_owned()));
    }
    let status = lb.wait("retries counted", |s| s.retried_total >= 2).await;
    assert_eq!(status.failed_total, 0);

    // A POST may have had an effect before the connection closed: never sent twice.
    let mut posted = Vec::new();
    for _ in 0..2 {
        posted.push(client.send("POST", "/flaky").await.0);
    }
    posted.sort_unstable();
    assert_eq!(posted, [200, 502], "one POST went to a and got 502");
    lb.wait("the 502 counted", |s| s.failed_total == 1).await;
    lb.stop().await;
}
