//! The real `ami-agent` binary as a child process: start-up refusal, healing, systemd
//! notifications and watchdog, SIGTERM, `check` exit codes, `manifest`, the config file.

use crate::common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn refuses_a_root_that_does_not_match_its_manifest() {
    let site = test_site();
    std::fs::write(site.root.join("version.txt"), "tampered\n").unwrap();
    std::fs::remove_file(site.root.join("css/site.css")).unwrap();
    let mut agent = Agent::spawn(&site, &[], &[]);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let err = agent.stderr();
    assert!(err.contains("version.txt: size"), "{err}");
    assert!(err.contains("css/site.css: missing"), "{err}");
}

#[test]
fn heals_deleted_and_modified_files_and_reports_it() {
    let site = test_site();
    let mut agent = Agent::spawn(&site, &["--health-interval", "1"], &[]);
    agent.wait_ready();
    assert_eq!(check(&["--url", &agent.url()]).0, 0);

    std::fs::remove_file(site.root.join("index.html")).unwrap();
    std::fs::write(site.root.join("version.txt"), "defaced\n").unwrap();
    // Same size, different bytes, mtime put back: only hashing can see it.
    let css = site.root.join("css/site.css");
    let mtime = std::fs::metadata(&css).unwrap().modified().unwrap();
    std::fs::write(&css, "body { color: white }\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&css)
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let healed = std::fs::read(site.root.join("index.html"))
            .is_ok_and(|b| b == INDEX.as_bytes())
            && std::fs::read(site.root.join("version.txt")).is_ok_and(|b| b == VERSION.as_bytes())
            && std::fs::read(&css).is_ok_and(|b| b == b"body { color: black }\n");
        if healed {
            break;
        }
        assert!(Instant::now() < deadline, "not healed: {}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = blocking_get(agent.addr, "/metrics").unwrap();
    assert!(metrics.contains("ami_agent_heals_total 3"), "{metrics}");
    let health: serde_json::Value =
        serde_json::from_str(&blocking_get(agent.addr, "/healthz").unwrap()).unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["content_drift"]["heals_total"], 3);
    // Healed but tampered with recently: degraded, exit 1.
    let (code, out) = check(&["--url", &agent.url()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("degraded:"), "{out}");
    assert!(agent.stderr().contains("content drift healed"));
}

#[test]
fn check_exit_codes_for_healthy_tampered_dead_and_unknown() {
    let site = test_site();
    let mut agent = Agent::spawn(&site, &[], &[]);
    agent.wait_ready();

    let (code, out) = check(&["--url", &agent.url()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("healthy:") && out.contains("4/4 files match"),
        "{out}"
    );
    let (code, out) = check(&["--url", &agent.url(), "--json"]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["files_ok"], 4);

    // Checked against the release it should serve, which differs: wrong content.
    let other = tempfile::tempdir().unwrap();
    write_site(other.path());
    std::fs::write(other.path().join("version.txt"), "v2\n").unwrap();
    let m = ami_agent::manifest::Manifest::from_dir(other.path(), "v2").unwrap();
    let other_manifest = other.path().join("m.json");
    std::fs::write(&other_manifest, m.to_json()).unwrap();
    let (code, out) = check(&[
        "--url",
        &agent.url(),
        "--manifest",
        other_manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("/version.txt: size"), "{out}");
    let (code, _) = check(&["--url", &agent.url(), "--expect-version", "v2"]);
    assert_eq!(code, 2);

    // Nobody listening.
    let dead = format!("http://127.0.0.1:{}/", free_port());
    let (code, out) = check(&["--url", &dead, "--timeout", "2"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does not answer"), "{out}");

    // Something answers that publishes no manifest: unknown.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), "not json").unwrap();
    let plain = TestSite {
        manifest: ami_agent::manifest::Manifest::from_dir(dir.path(), "x").unwrap(),
        manifest_path: dir.path().join("../none.json"),
        root: dir.path().to_owned(),
        dir,
    };
    let mut odd = Agent::spawn_plain(&plain);
    odd.wait_ready();
    let (code, out) = check(&["--url", &odd.url()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("--manifest"), "{out}");
}

#[test]
fn systemd_ready_and_watchdog_only_while_healthy() {
    let site = test_site();
    let sock_path = site.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // A 2 s watchdog: the agent must check (and ping) at under half of it.
    let mut agent = Agent::spawn(
        &site,
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let read_for = |d: Duration| {
        let mut msgs = Vec::new();
        let end = Instant::now() + d;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = sock.recv(&mut buf) {
                msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        msgs
    };
    let msgs = read_for(Duration::from_secs(3));
    assert!(
        msgs.first().is_some_and(|m| m.contains("READY=1")),
        "{msgs:?}"
    );
    let pings = msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "{pings} watchdog pings in 3 s: {msgs:?}");
    assert_eq!(msgs.iter().filter(|m| m.contains("READY=1")).count(), 1);

    // A directory where a file belongs: the agent cannot heal, so it stops pinging.
    std::fs::remove_file(site.root.join("version.txt")).unwrap();
    std::fs::create_dir(site.root.join("version.txt")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let msgs = read_for(Duration::from_secs(3));
    assert!(!msgs.iter().any(|m| m.contains("WATCHDOG=1")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("STATUS=") && m.contains("failing")),
        "{msgs:?}"
    );
    let (code, out) = check(&["--url", &agent.url()]);
    assert_eq!(code, 2, "{out}");

    // Once the obstacle is gone it heals and pings again.
    std::fs::remove_dir(site.root.join("version.txt")).unwrap();
    let msgs = read_for(Duration::from_secs(3));
    assert!(msgs.iter().any(|m| m.contains("WATCHDOG=1")), "{msgs:?}");

    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    let msgs = read_for(Duration::from_millis(300));
    assert!(msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir(&root).unwrap();
    let big = big_bytes(32 << 20);
    std::fs::write(root.join("huge.bin"), &big).unwrap();
    let manifest = ami_agent::manifest::Manifest::from_dir(&root, "v").unwrap();
    std::fs::write(dir.path().join("manifest.json"), manifest.to_json()).unwrap();
    let site = TestSite {
        manifest_path: dir.path().join("manifest.json"),
        manifest,
        root,
        dir,
    };
    let mut agent = Agent::spawn(&site, &[], &[]);
    agent.wait_ready();

    let mut client = std::net::TcpStream::connect(agent.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        client,
        "GET /huge.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = vec![0u8; 4096];
    client.read_exact(&mut first).unwrap();
    agent.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(agent.addr).is_err(),
        "still accepting"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    let r = parse_response(&first).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == big, "the response in flight was cut short");
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn manifest_command_is_deterministic_and_serve_reads_a_config_file() {
    let site = test_site();
    let run = || {
        Command::new(agent_bin())
            .args([
                "manifest",
                site.root.to_str().unwrap(),
                "--version",
                "v1-test",
            ])
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(
        String::from_utf8(a.stdout).unwrap(),
        site.manifest.to_json()
    );

    // Port 0: the agent binds what the file says, and its log says what it got.
    let config = site.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nmanifest = {:?}\nlisten = \"127.0.0.1:0\"\nhealth_interval = 1\n\
             drift_sources = [\"ntp://127.0.0.1:9\"]\n",
            site.root, site.manifest_path
        ),
    )
    .unwrap();
    let log = site.dir.path().join("config-agent.log");
    let mut child = Command::new(agent_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("AMI_AGENT_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr: SocketAddr = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(rest) = text.split("listening addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "never listened: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let body = blocking_get(addr, "/version.txt").unwrap();
    assert_eq!(body, VERSION);
    let _ = child.kill();
    let _ = child.wait();

    // With an inherited socket the file's `listen` is not used, and the log says so.
    let mut cmd = Command::new(agent_bin());
    cmd.args(["serve", "--config", config.to_str().unwrap()])
        .env("AMI_AGENT_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let (listener, inherited) = listener_for(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("listening addr=") {
            break text;
        }
        assert!(Instant::now() < deadline, "never listened: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("the config file's `listen` is ignored")
            && text.contains("configured=127.0.0.1:0")
            && text.contains(&format!("serving={inherited}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening addr={inherited}")),
        "{text}"
    );
    assert_eq!(blocking_get(inherited, "/version.txt").unwrap(), VERSION);
    let _ = child.kill();
    let _ = child.wait();

    // A misspelt key is an error that names it.
    std::fs::write(&config, "root = \"/x\"\nhealth_intervall = 3\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("health_intervall"));
}

#[test]
fn a_mistyped_check_is_unknown_not_unhealthy() {
    let out = Command::new(agent_bin())
        .args(["check", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let out = Command::new(agent_bin())
        .args(["serve", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(agent_bin())
        .args(["check", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn check_watch_prints_one_line_per_check() {
    let site = test_site();
    let mut agent = Agent::spawn(&site, &[], &[]);
    agent.wait_ready();
    let mut watch = Command::new(agent_bin())
        .args(["check", "--url", &agent.url(), "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("healthy: ") && l.contains("GMT")),
        "{text}"
    );
}

/// `--listen-fd` takes only a listening TCP socket, and says what it got instead.
#[test]
fn an_inherited_descriptor_must_be_a_listening_socket() {
    use std::os::fd::AsRawFd;
    let site = test_site();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd
            .arg("--root")
            .arg(&site.root)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    // Nothing open at that number in the child: a number this process does not pass on.
    let closed = (9..)
        // Closed (-1, every bit set) or close-on-exec. SAFETY: F_GETFD only reads flags.
        .find(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC != 0)
        .unwrap()
        .to_string();
    let msg = run(std::process::Command::new(agent_bin()).args(["serve", "--listen-fd", &closed]));
    assert!(
        msg.contains(&format!("descriptor {closed} is not open")),
        "{msg}"
    );

    // A file, and a bound socket that does not listen, handed over open.
    let file = std::fs::File::open(&site.manifest_path).unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    for (fd, expected) in [
        (file.as_raw_fd(), "is not a socket"),
        (socket.as_raw_fd(), "is not a listening TCP socket"),
    ] {
        let mut cmd = std::process::Command::new(agent_bin());
        cmd.arg("serve");
        ami_agent::http::pass_listener(&mut cmd, &fd);
        let msg = run(&mut cmd);
        assert!(msg.contains(&format!("--listen-fd {fd}")), "{msg}");
        assert!(msg.contains(expected), "{msg}");
    }
}
