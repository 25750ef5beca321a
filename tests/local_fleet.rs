//! The local fleet end to end: the real `amictl` and `ami-agent` binaries, real processes,
//! the real load balancer, and probers sending requests through the fleet's URL while it
//! is rolled, broken, killed, healed, interrupted and resumed: one opens a new connection
//! for each of 200 requests a second, the others keep their connections alive and send
//! request after request on them, as browsers and wrk do.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::{ami_agent as agent, amictl, is_alive};

struct Fleet {
    name: String,
    state: tempfile::TempDir,
    sites: tempfile::TempDir,
    /// Whether the fleet replaces its dead instances by itself (its balancer's supervisor).
    supervised: bool,
}

impl Fleet {
    fn new(name: &str) -> Self {
        Fleet {
            name: name.into(),
            state: tempfile::tempdir().unwrap(),
            sites: tempfile::tempdir().unwrap(),
            supervised: true,
        }
    }

    /// A fleet whose dead instances stay dead until `health --heal`.
    fn unsupervised(name: &str) -> Self {
        let mut fleet = Fleet::new(name);
        fleet.supervised = false;
        fleet
    }

    /// A site whose version.txt says `version`.
    fn site(&self, version: &str) -> PathBuf {
        let dir = self.sites.path().join(version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("version.txt"), format!("{version}\n")).unwrap();
        std::fs::write(
            dir.join("index.html"),
            format!("<!doctype html><title>{version}</title>"),
        )
        .unwrap();
        dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(amictl());
        cmd.args(args)
            .args(["--provider", "local", "--fleet", &self.name])
            .env("XDG_STATE_HOME", self.state.path())
            .env("AMICTL_LOG", "info")
            .env_remove("AMICTL_PROVIDER")
            .env(
                "AMICTL_LOCAL_SUPERVISOR",
                if self.supervised { "on" } else { "off" },
            )
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        eprintln!(
            "amictl {args:?} -> {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn rollout(&self, content: &Path, extra: &[&str]) -> Output {
        let content = content.to_str().unwrap();
        let mut args = vec!["rollout", "--content", content, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn dir(&self) -> PathBuf {
        self.state.path().join("amictl/local").join(&self.name)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir().join("fleet.json")).unwrap()).unwrap()
    }

    /// The fleet's instances that are not terminated: (id, release, retiring).
    fn instances(&self) -> Vec<(String, String, bool)> {
        let state = self.state();
        state["instances"]
            .as_object()
            .unwrap()
            .values()
            .filter(|r| !r["terminated"].as_bool().unwrap())
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_owned(),
                    r["image"].as_str().unwrap().to_owned(),
                    !r["retiring"].is_null(),
                )
            })
            .collect()
    }

    /// Instance directories whose process is alive (it holds its lock).
    fn live_processes(&self) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(self.dir().join("instances")) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter(|e| is_alive(&e.path().join("lock")))
            .map(|e| e.file_name().into_string().unwrap())
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        let state = self.state();
        let mut pids: Vec<u32> = state["instances"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
            .collect();
        let status: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.dir().join("balancer/status.json")).unwrap(),
        )
        .unwrap();
        pids.push(status["pid"].as_u64().unwrap() as u32);
        pids
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Never leave processes behind, whatever the test did.
        let _ = self.command(&["destroy"]).output();
    }
}

fn url(out: &Output) -> SocketAddr {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let last = stdout.lines().last().expect("the URL on stdout");
    last.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("not a URL: {last}"))
}

fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("no response head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    Ok(body.trim().to_owned())
}

/// Sends 200 requests a second for `/version.txt`, each on a new connection, recording
/// every answer (or failure) in order.
struct Prober {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Result<String, String>>>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                seen.push(get(addr, "/version.txt"));
                next += Duration::from_millis(5);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            seen
        });
        Prober { stop, handle }
    }

    fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Reads one answer on a kept-alive connection: the status line, the head, and a body of
/// the Content-Length it announces.
fn read_answer(s: &mut TcpStream) -> Result<String, String> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed before an answer".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let l = l.to_ascii_lowercase();
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .ok_or("no Content-Length")?;
    while buf.len() < end + len {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed in the middle of a body".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&buf[end..end + len])
        .trim()
        .to_owned())
}

/// `connections` clients, each sending `/version.txt` requests one after the other on one
/// kept-alive connection (a new one only after a failure), recording every answer.
struct KeepAliveProber {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<Result<String, String>>>>,
}

impl KeepAliveProber {
    fn start(addr: SocketAddr, connections: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..connections)
            .map(|_| {
                let flag = stop.clone();
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut conn: Option<TcpStream> = None;
                    while !flag.load(Ordering::Relaxed) {
                        let s = match conn.as_mut() {
                            Some(s) => s,
                            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            {
                                Ok(s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                                    conn.insert(s)
                                }
                                Err(e) => {
                                    seen.push(Err(e.to_string()));
                                    continue;
                                }
                            },
                        };
                        let answer = s
                            .write_all(b"GET /version.txt HTTP/1.1\r\nHost: fleet\r\n\r\n")
                            .map_err(|e| e.to_string())
                            .and_then(|()| read_answer(s));
                        if answer.is_err() {
                            conn = None;
                        }
                        seen.push(answer);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    seen
                })
            })
            .collect();
        KeepAliveProber { stop, handles }
    }

    /// Every answer of every client.
    fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    }
}

/// Whether `pid` runs (a zombie waiting for its parent to reap it does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn failures(seen: &[Result<String, String>]) -> Vec<&String> {
    seen.iter().filter_map(|r| r.as_ref().err()).collect()
}

/// Neither the prober on fresh connections nor the keep-alive one saw a failed request.
fn assert_no_failures(seen: &[Result<String, String>], kept: &[Result<String, String>]) {
    assert!(
        failures(seen).is_empty(),
        "failed requests: {:?}",
        failures(seen)
    );
    assert!(
        failures(kept).is_empty(),
        "failed keep-alive requests: {:?}",
        failures(kept)
    );
}

#[test]
fn rollouts_lose_no_request_and_a_broken_release_rolls_back() {
    agent();
    let fleet = Fleet::new("web");
    let out = fleet.rollout(&fleet.site("v1"), &["--per-az", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let addr = url(&out);
    assert_eq!(get(addr, "/version.txt").unwrap(), "v1");
    assert_eq!(fleet.instances().len(), 4);

    // v1 -> v2 under load.
    let prober = Prober::start(addr);
    let kept = KeepAliveProber::start(addr, 4);
    std::thread::sleep(Duration::from_millis(300));
    let out = fleet.rollout(&fleet.site("v2"), &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(url(&out), addr, "the URL does not move");
    let done = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let (seen, kept) = (prober.finish(), kept.finish());
    assert_no_failures(&seen, &kept);
    assert!(
        kept.len() > 500,
        "the keep-alive prober ran: {} requests",
        kept.len()
    );
    let kept_versions: BTreeSet<&str> = kept.iter().map(|r| r.as_deref().unwrap()).collect();
    assert_eq!(kept_versions, BTreeSet::from(["v1", "v2"]));
    assert!(seen.len() > 500, "the prober ran: {} requests", seen.len());
    let bodies: Vec<&str> = seen.iter().map(|r| r.as_deref().unwrap()).collect();
    let distinct: BTreeSet<&str> = bodies.iter().copied().collect();
    assert_eq!(
        distinct,
        BTreeSet::from(["v1", "v2"]),
        "only v1 and v2 are served"
    );
    assert_eq!(bodies.first(), Some(&"v1"));
    // Once the rollout has returned, only v2 answers.
    let after = (done.elapsed().as_millis() / 5) as usize;
    assert!(bodies[bodies.len() - after.min(bodies.len())..]
        .iter()
        .all(|b| *b == "v2"));
    let instances = fleet.instances();
    assert_eq!(instances.len(), 4);
    assert_eq!(
        fleet.live_processes().len(),
        4,
        "the old processes are gone"
    );
    let v2 = instances[0].1.clone();
    assert!(instances
        .iter()
        .all(|(_, rel, retiring)| *rel == v2 && !retiring));

    // A broken v3: content that does not match its manifest.
    let v3 = fleet.site("v3");
    let manifest = fleet.sites.path().join("v3.manifest.json");
    let m = Command::new(agent())
        .arg("manifest")
        .arg(&v3)
        .output()
        .unwrap();
    assert!(m.status.success());
    std::fs::write(&manifest, &m.stdout).unwrap();
    std::fs::write(
        v3.join("index.html"),
        "tampered after the manifest was made",
    )
    .unwrap();
    let prober = Prober::start(addr);
    let kept = KeepAliveProber::start(addr, 4);
    let out = fleet.rollout(&v3, &["--manifest", manifest.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    let seen = prober.finish();
    let kept = kept.finish();
    assert!(
        kept.iter().all(|r| r.as_deref() == Ok("v2")),
        "keep-alive requests during the rollback: {:?}",
        failures(&kept)
    );
    assert_eq!(out.status.code(), Some(3), "a failed release rolls back");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match its manifest"), "{stderr}");
    assert!(
        failures(&seen).is_empty(),
        "failed requests: {:?}",
        failures(&seen)
    );
    assert!(seen.iter().all(|r| r.as_deref() == Ok("v2")));
    let after: BTreeSet<String> = fleet.instances().into_iter().map(|i| i.0).collect();
    let before: BTreeSet<String> = instances.into_iter().map(|i| i.0).collect();
    assert_eq!(after, before, "the fleet is exactly as it was");
    assert_eq!(fleet.live_processes(), before);
    let out = fleet.run(&["health"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A release that starts but fails its health gate rolls back too, and the failed
    // rollout's health command does not become the fleet's.
    let out = fleet.rollout(
        &fleet.site("v4"),
        &["--health-command", "exit 2", "--timeout", "3"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health gate failed"));
    assert_eq!(get(addr, "/version.txt").unwrap(), "v2");
    assert_eq!(fleet.live_processes(), before);
    assert_eq!(fleet.run(&["health"]).status.code(), Some(0));
}

#[test]
fn a_killed_instance_is_healed_and_an_interrupted_rollout_resumes() {
    agent();
    // `health --heal` is what heals here: the fleet's own supervisor is off.
    let fleet = Fleet::unsupervised("api");
    let out = fleet.rollout(&fleet.site("v1"), &["--per-az", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let addr = url(&out);

    // kill -9 one instance: health sees it, --heal replaces it.
    let victim = fleet.instances()[0].0.clone();
    let pid = fleet.state()["instances"][&victim]["pid"].as_u64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.live_processes().contains(&victim) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = fleet.run(&["health", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = report["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["instance_id"] == victim.as_str())
        .expect("the killed instance has a row");
    assert_eq!(row["status"], "unhealthy");
    assert_eq!(row["outcome"], "down");
    let out = fleet.run(&["health", "--heal"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ids: BTreeSet<String> = fleet.instances().into_iter().map(|i| i.0).collect();
    assert_eq!(ids.len(), 4);
    assert!(!ids.contains(&victim), "the dead instance was replaced");
    assert_eq!(fleet.live_processes(), ids);
    assert_eq!(fleet.run(&["health"]).status.code(), Some(0));

    // The load balancer killed: health says the URL is dead, --heal brings it back.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.dir().join("balancer/status.json")).unwrap())
            .unwrap();
    let lb_pid = status["pid"].as_u64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(lb_pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(addr, "/version.txt").is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = fleet.run(&["health"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("load-balancer"));
    assert_eq!(fleet.run(&["health", "--heal"]).status.code(), Some(0));
    assert_eq!(get(addr, "/version.txt").unwrap(), "v1");

    // SIGINT half-way through a rollout, then the same command again.
    let v2 = fleet.site("v2");
    let mut child = fleet
        .command(&["rollout", "--content", v2.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Half-way: one AZ replaced, the other not yet.
    loop {
        let retiring = fleet.instances().iter().filter(|i| i.2).count();
        if retiring >= 2 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted");
    let mixed = fleet.instances();
    let releases: BTreeSet<&str> = mixed.iter().map(|i| i.1.as_str()).collect();
    assert_eq!(releases.len(), 2, "stopped half-way: {mixed:?}");
    assert_eq!(
        get(addr, "/version.txt").map(|b| b.starts_with('v')),
        Ok(true)
    );

    let prober = Prober::start(addr);
    let out = fleet.run(&["rollout", "--content", v2.to_str().unwrap()]);
    let seen = prober.finish();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    assert!(
        failures(&seen).is_empty(),
        "failed requests: {:?}",
        failures(&seen)
    );
    let end = fleet.instances();
    assert_eq!(end.len(), 4, "whole: {end:?}");
    let release = end[0].1.clone();
    assert!(end
        .iter()
        .all(|(_, rel, retiring)| *rel == release && !retiring));
    let ids: BTreeSet<String> = end.into_iter().map(|i| i.0).collect();
    assert_eq!(fleet.live_processes(), ids, "nothing orphaned");
    let targets: BTreeSet<String> = fleet.state()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(targets, ids, "exactly the new instances take traffic");
    assert_eq!(get(addr, "/version.txt").unwrap(), "v2");

    // destroy leaves nothing running.
    let pids = fleet.pids();
    let out = fleet.run(&["destroy"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!fleet.dir().exists());
    for pid in pids {
        assert!(!running(pid), "process {pid} still runs");
    }
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    assert_eq!(
        fleet.run(&["destroy"]).status.code(),
        Some(0),
        "twice is fine"
    );
    // A fleet that is not there cannot be judged: unknown (3), not degraded (1).
    let out = fleet.run(&["health"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no local fleet api"));
}

#[test]
fn one_change_of_a_fleet_at_a_time() {
    agent();
    let fleet = Fleet::new("lk");
    let v1 = fleet.site("v1");
    // A rollout that takes a while: every health check sleeps first.
    let mut first = fleet
        .command(&[
            "rollout",
            "--content",
            v1.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--per-az",
            "1",
            "--health-command",
            "sleep 1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lease = fleet.dir().join("lease.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lease.exists() {
        assert!(
            Instant::now() < deadline,
            "the first rollout never took the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A second rollout, and a destroy, are refused while it runs, naming it.
    let holder = format!("(pid {})", first.id());
    for args in [
        vec!["rollout", "--content", v1.to_str().unwrap()],
        vec!["destroy"],
    ] {
        let out = fleet.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("fleet lk is locked by rollout of fleet lk to ")
                && stderr.contains(&holder),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("--break-lock"), "{stderr}");
    }

    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert!(!lease.exists(), "released at the end");
    let out = fleet.rollout(&fleet.site("v2"), &["--health-command", "true"]);
    assert_eq!(out.status.code(), Some(0), "the lock is free again");

    // A holder killed with -9 leaves its lease behind; on this machine a dead holder holds
    // nothing, so the next command goes ahead.
    let dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    drop(dead.wait_with_output());
    std::fs::write(
        &lease,
        serde_json::json!({
            "operation": "rollout of fleet lk to gone",
            "user": "me", "host": "here", "pid": pid,
            "since_unix": 1, "renewed_unix": 4102444800u64, "ttl_secs": 300, "nonce": "n"
        })
        .to_string(),
    )
    .unwrap();
    let out = fleet.run(&["destroy"]);
    assert_eq!(out.status.code(), Some(0));
}

/// The fleet's instances that are not terminated, by id.
fn ids(fleet: &Fleet) -> BTreeSet<String> {
    fleet.instances().into_iter().map(|i| i.0).collect()
}

fn kill9(fleet: &Fleet, id: &str) {
    let pid = fleet.state()["instances"][id]["pid"].as_u64().unwrap() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

/// Waits (reading the fleet's files only) until `dead` is replaced: `count` instances, all
/// alive, exactly the balancer's targets, each healthy in the balancer's latest status.
fn wait_replaced(fleet: &Fleet, dead: &str, count: usize, within: Duration) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    loop {
        let state = fleet.state();
        let ids = ids(fleet);
        let targets: BTreeSet<String> = state["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect();
        let file = |name: &str| -> serde_json::Value {
            std::fs::read(fleet.dir().join("balancer").join(name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        };
        let routed: BTreeSet<String> = file("targets.json")["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect();
        let status = file("status.json");
        let healthy: BTreeSet<String> = status["targets"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, t)| t["state"] == "healthy")
            .map(|(id, _)| id.clone())
            .collect();
        let current = status["generation"].as_u64() >= state["generation"].as_u64();
        if ids.len() == count
            && !ids.contains(dead)
            && fleet.live_processes() == ids
            && targets == ids
            && routed == ids
            && current
            && healthy == ids
        {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "{dead} not replaced within {within:?}: instances {ids:?}, live {:?}, targets {targets:?}, routed {routed:?}, healthy {healthy:?}",
            fleet.live_processes()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_fleet_replaces_a_killed_instance_by_itself_unless_it_is_locked() {
    agent();
    let fleet = Fleet::new("self");
    let out = fleet.rollout(&fleet.site("v1"), &["--per-az", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let addr = url(&out);
    let before = ids(&fleet);
    assert_eq!(before.len(), 4);

    // kill -9 one instance under load, and run no amictl command until it is replaced.
    let prober = Prober::start(addr);
    let kept = KeepAliveProber::start(addr, 4);
    std::thread::sleep(Duration::from_millis(300));
    let victim = before.first().unwrap().clone();
    let az = fleet.state()["instances"][&victim]["az"].clone();
    let killed = Instant::now();
    kill9(&fleet, &victim);
    let after = wait_replaced(&fleet, &victim, 4, Duration::from_secs(10));
    eprintln!(
        "kill -9 to a healthy replacement in the targets: {:?}",
        killed.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let (seen, kept) = (prober.finish(), kept.finish());
    assert_no_failures(&seen, &kept);
    assert!(seen.len() > 200, "the prober ran: {} requests", seen.len());
    assert!(seen.iter().chain(&kept).all(|r| r.as_deref() == Ok("v1")));
    let new: Vec<&String> = after.difference(&before).collect();
    assert_eq!(new.len(), 1, "one replacement: {after:?}");
    let state = fleet.state();
    assert_eq!(state["instances"][new[0]]["az"], az, "in the same AZ");
    assert_eq!(
        state["instances"][new[0]]["image"], state["image"],
        "on the fleet's release"
    );
    assert_eq!(state["instances"][&victim]["terminated"], true);
    let out = fleet.run(&["health"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(
        table.contains(new[0].as_str()) && !table.contains(&victim),
        "{table}"
    );

    // While someone else holds the fleet's lease (a live process: this one), a dead
    // instance stays as it is; once the lease is gone, it is replaced.
    let lease = fleet.dir().join("lease.json");
    std::fs::write(
        &lease,
        serde_json::json!({
            "operation": "rollout of fleet self to elsewhere",
            "user": "me", "host": "here", "pid": std::process::id(),
            "since_unix": 1, "renewed_unix": 4102444800u64, "ttl_secs": 300, "nonce": "n"
        })
        .to_string(),
    )
    .unwrap();
    let victim = after.last().unwrap().clone();
    kill9(&fleet, &victim);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ids(&fleet), after, "nothing launched or terminated");
    assert!(!fleet.live_processes().contains(&victim));
    assert!(fleet.state()["targets"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(victim)));
    let log = std::fs::read_to_string(fleet.dir().join("balancer/balancer.log")).unwrap();
    assert!(log.contains("rollout of fleet self to elsewhere"), "{log}");
    std::fs::remove_file(&lease).unwrap();
    let end = wait_replaced(&fleet, &victim, 4, Duration::from_secs(10));
    assert_eq!(end.intersection(&after).count(), 3);
    assert_eq!(fleet.run(&["health"]).status.code(), Some(0));
}
