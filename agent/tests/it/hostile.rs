//! Hostile clients on loopback, bounded in count and time: idle floods, clients that never
//! read, slow readers, idle keep-alive connections, a full server seen by the health loop,
//! and the real binary under a low open-file limit.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ami_agent::health::{HealthConfig, HealthLoop, Listener, ServerListener};
use ami_agent::http::{bind, Server, ServerConfig};
use ami_agent::notify::Notice;
use ami_agent::site::Site;
use ami_agent::state::AgentState;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Larger than loopback's socket buffers on both ends, so a client that does not read
/// leaves the server with bytes it cannot send.
const HUGE: usize = 16 << 20;

fn huge_site() -> TestSite {
    let site = test_site();
    std::fs::write(site.root.join("huge.bin"), big_bytes(HUGE)).unwrap();
    let manifest = ami_agent::manifest::Manifest::from_dir(&site.root, "v1-test").unwrap();
    std::fs::write(&site.manifest_path, manifest.to_json()).unwrap();
    TestSite { manifest, ..site }
}

/// A client that asks for the huge file and never reads a byte of the answer.
async fn non_reader(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    s
}

/// Waits until the server has closed `s` (EOF or reset), reading and discarding what it
/// sent; returns how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_flood_is_closed_to_make_room_for_new_clients() {
    let site = test_site();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            max_connections: 16,
            ..ServerConfig::default()
        },
    );
    // Connections that never send anything, then kept-alive ones that went quiet after a
    // request: 24 in all for 16 slots.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(s.addr).await.unwrap());
    }
    for _ in 0..12 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /version.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        idle.push(c);
    }
    // Every new client is served at once, although every slot was taken.
    for _ in 0..20 {
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            get(s.addr, "GET", "/version.txt", &[]),
        )
        .await
        .expect("a new client waited behind idle connections");
        assert_eq!(r.status, 200);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    assert!(s.state.metrics.evictions.get() >= 8);
    assert!(
        !s.server.load().saturated,
        "idle connections are not saturation"
    );
    // The evicted ones were closed, not left hanging.
    let mut closed = 0;
    for c in &mut idle {
        if closed_within(c, Duration::from_millis(200)).await.is_some() {
            closed += 1;
        }
    }
    assert!(closed >= 8, "only {closed} idle connections were closed");
}

#[tokio::test]
async fn clients_that_never_read_are_dropped_after_the_send_timeout() {
    let site = huge_site();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            max_connections: 8,
            send_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        },
    );
    let mut stuck = Vec::new();
    for _ in 0..8 {
        stuck.push(non_reader(s.addr).await);
    }
    // Every slot holds a response that cannot move: the server is saturated, not idle,
    // and a new client waits...
    wait_for("saturation", Duration::from_secs(5), || {
        s.server.load().saturated
    })
    .await;
    let started = Instant::now();
    let probe = tokio::spawn(get(s.addr, "GET", "/version.txt", &[]));
    // ...until the send timeout frees the slots, and not much longer.
    let r = tokio::time::timeout(Duration::from_secs(10), probe)
        .await
        .expect("the probe was never served")
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_for("all eight send timeouts", Duration::from_secs(5), || {
        s.state.metrics.connection_timeouts("send") == 8
    })
    .await;
    assert!(!s.server.load().saturated);
    for c in &mut stuck {
        assert!(closed_within(c, Duration::from_secs(5)).await.is_some());
    }
    wait_for("the registry to empty", Duration::from_secs(5), || {
        s.server.load().open_connections == 0
    })
    .await;
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_and_a_steady_one_is_not() {
    let site = huge_site();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            send_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        },
    );
    // Reads a byte every 200 ms: the socket buffers never drain far enough for the server
    // to write again, so the send timeout ends it (nginx's send_timeout does the same).
    let mut slow = non_reader(s.addr).await;
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while s.state.metrics.connection_timeouts("send") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a slow reader held its connection for 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = tokio::time::timeout(Duration::from_millis(50), slow.read(&mut byte)).await;
    }
    drop(slow);

    // A client that reads steadily gets the whole file, however long that takes overall.
    let mut steady = non_reader(s.addr).await;
    let mut got = Vec::with_capacity(HUGE + 1024);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = steady.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() >= HUGE {
            let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            if got.len() - end == HUGE {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = parse_response(&got).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), HUGE);
    assert_eq!(s.state.metrics.connection_timeouts("send"), 1);
}

#[tokio::test]
async fn idle_keep_alive_and_silent_connections_have_their_own_limits() {
    let site = test_site();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            header_read_timeout: Duration::from_millis(600),
            keep_alive_timeout: Duration::from_millis(1500),
            ..ServerConfig::default()
        },
    );
    // A kept-alive connection may sit idle for the keep-alive limit, longer than the
    // header limit, and is closed once it passes.
    let mut kept = TcpStream::connect(s.addr).await.unwrap();
    kept.write_all(b"GET /version.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(parse_response(&buf[..n]).is_some_and(|r| r.status == 200));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    kept.write_all(b"GET /version.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(
        parse_response(&buf[..n]).is_some_and(|r| r.status == 200),
        "a connection idle for less than the keep-alive limit was closed"
    );
    let idle = closed_within(&mut kept, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection stayed open");
    assert!(
        idle >= Duration::from_millis(1400) && idle < Duration::from_millis(3000),
        "{idle:?}"
    );
    assert_eq!(s.state.metrics.connection_timeouts("keep_alive"), 1);

    // A new connection that sends nothing gets the header limit.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let waited = closed_within(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection stayed open");
    assert!(waited < Duration::from_millis(1400), "{waited:?}");
    assert_eq!(s.state.metrics.connection_timeouts("header"), 1);
}

/// What `/metrics` says of an agent that was busy but never broken.
fn assert_never_rebound_nor_failed(metrics: &str) {
    for line in [
        "ami_agent_listener_rebinds_total 0",
        "ami_agent_self_check_failures_total 0",
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }
}

#[tokio::test]
async fn a_full_server_is_overloaded_not_dead() {
    let site = huge_site();
    let state = Arc::new(AgentState::new(
        Site::load(&site.root, Some(site.manifest.clone())).unwrap(),
    ));
    let server = Server::new(
        state.clone(),
        &ServerConfig {
            max_connections: 4,
            send_timeout: Duration::from_secs(60),
            ..ServerConfig::default()
        },
    );
    let listener = ServerListener::new(
        server.clone(),
        bind("127.0.0.1:0".parse().unwrap(), false).unwrap(),
        false,
    )
    .unwrap();
    let addr = listener.local_addr();
    let recorder = Recorder::default();
    let mut health = HealthLoop::new(
        state.clone(),
        site.root.clone(),
        recorder.clone(),
        listener,
        HealthConfig {
            request_timeout: Duration::from_millis(500),
            ..HealthConfig::default()
        },
    )
    .unwrap();
    assert!(health.tick().await.ok);
    recorder.take();

    let mut stuck = Vec::new();
    for _ in 0..4 {
        stuck.push(non_reader(addr).await);
    }
    wait_for("saturation", Duration::from_secs(5), || {
        server.load().saturated
    })
    .await;
    // A client waiting in the backlog when the check runs.
    let waiting = tokio::spawn(get(addr, "GET", "/version.txt", &[]));

    let check = health.tick().await;
    assert!(
        check.ok,
        "an overloaded server failed its self-check: {check:?}"
    );
    let overloaded = check.overloaded.as_deref().expect("overload reported");
    assert!(overloaded.contains("every slot busy"), "{overloaded}");
    assert_eq!(check.load.unwrap().open_connections, 4);
    assert!(recorder.take().contains(&Notice::Watchdog));
    let metrics = state.metrics.encode();
    assert_never_rebound_nor_failed(&metrics);
    assert!(
        metrics.contains("ami_agent_self_checks_overloaded_total 1"),
        "{metrics}"
    );
    assert!(state.status().content_drift.files.is_empty());
    assert!(health.listener().is_alive());

    // The waiting client was not reset by a rebind: it is served once a slot frees.
    drop(stuck.pop());
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert_eq!(r.status, 200);
    drop(stuck);
    wait_for("slots to free", Duration::from_secs(10), || {
        !server.load().saturated
    })
    .await;
    let check = health.tick().await;
    assert!(check.ok && check.overloaded.is_none(), "{check:?}");
}

/// The real binary with an open-file limit it cannot raise, flooded with idle connections:
/// accept() runs out of descriptors, closes idle connections and backs off; the listener is
/// never rebound, nothing is reported as drift, and clients keep being served.
#[test]
fn a_low_open_file_limit_is_survived_without_rebinding() {
    use std::os::unix::process::CommandExt;
    let site = test_site();
    let log = site.dir.path().join("agent.log");
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.arg("serve");
    let (listener, addr) = listener_for(&mut cmd);
    cmd.args(["--health-interval", "1"])
        .arg("--root")
        .arg(&site.root)
        .arg("--manifest")
        .arg(&site.manifest_path)
        .arg("--drift-source")
        .arg(format!("http://{addr}/"))
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("AMI_AGENT_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use rustix::process::{setrlimit, Resource, Rlimit};
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(96),
                    maximum: Some(96),
                },
            )
            .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    let mut agent = Agent {
        child,
        addr,
        stderr_path: log,
    };
    agent.wait_ready();

    // Twice the descriptors the agent has, all idle, while probes keep coming.
    let mut flood = Vec::new();
    let mut served = 0;
    let mut probes = 0;
    for round in 0..30 {
        for _ in 0..8 {
            if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                flood.push(c);
            }
        }
        if round % 3 == 0 {
            probes += 1;
            if blocking_get(addr, "/version.txt").is_ok_and(|b| b == VERSION) {
                served += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        flood.len() >= 150,
        "only {} connections opened",
        flood.len()
    );
    // Let the health loop run a few checks while the flood is still open.
    std::thread::sleep(Duration::from_secs(3));
    let health = blocking_get(addr, "/healthz").expect("healthz under an fd flood");
    let metrics = blocking_get(addr, "/metrics").expect("metrics under an fd flood");
    drop(flood);
    let stderr = agent.stderr();
    assert!(
        served * 10 >= probes * 9,
        "{served}/{probes} probes served: {stderr}"
    );
    assert!(
        stderr.contains("open-file limit is below what max_connections needs"),
        "{stderr}"
    );
    assert!(!stderr.contains("binding the listener again"), "{stderr}");
    assert!(!stderr.contains("binding it again"), "{stderr}");
    assert!(!stderr.contains("NOT healed"), "{stderr}");
    assert!(!stderr.contains("content drift"), "{stderr}");
    assert_never_rebound_nor_failed(&metrics);
    assert!(
        !metrics.contains("ami_agent_accept_errors_total 0\n"),
        "{metrics}"
    );
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    // Accept errors were logged once per episode, not ten times a second.
    let warnings = stderr.matches("accept failed").count();
    assert!(warnings <= 10, "{warnings} accept warnings: {stderr}");
}
