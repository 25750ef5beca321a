//! Helpers shared by the agent's integration tests: a site on disk, an in-process server
//! on 127.0.0.1:0, the real binary as a child process, and a raw HTTP/1.1 client that can
//! send anything (hostile requests included).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ami_agent::http::{bind, Acceptor, Server, ServerConfig};
use ami_agent::manifest::Manifest;
use ami_agent::notify::{Notice, Notifier};
use ami_agent::site::Site;
use ami_agent::state::AgentState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const INDEX: &str = "<!doctype html><title>t</title><h1>Hello, world!</h1>\n";
pub const VERSION: &str = "v1-test 26.05\n";

/// A systemd stand-in that records what the agent tells it.
#[derive(Clone, Default)]
pub struct Recorder(Arc<std::sync::Mutex<Vec<Notice>>>);

impl Notifier for Recorder {
    fn notify(&self, notices: &[Notice]) {
        self.0.lock().unwrap().extend_from_slice(notices);
    }
    fn watchdog(&self) -> Option<Duration> {
        None
    }
}

impl Recorder {
    /// What was recorded since the last call.
    pub fn take(&self) -> Vec<Notice> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// Writes a small site: index.html, version.txt, css/site.css, a 200 KiB binary file.
pub fn write_site(dir: &Path) {
    std::fs::create_dir_all(dir.join("css")).unwrap();
    std::fs::write(dir.join("index.html"), INDEX).unwrap();
    std::fs::write(dir.join("version.txt"), VERSION).unwrap();
    std::fs::write(dir.join("css/site.css"), "body { color: black }\n").unwrap();
    std::fs::write(dir.join("big.bin"), big_bytes(200 * 1024)).unwrap();
}

pub fn big_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

pub struct TestSite {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

/// A site in `tmp/www` with its manifest in `tmp/manifest.json` (outside the root).
pub fn test_site() -> TestSite {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    write_site(&root);
    let manifest = Manifest::from_dir(&root, "v1-test").unwrap();
    let manifest_path = dir.path().join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_json()).unwrap();
    TestSite {
        dir,
        root,
        manifest_path,
        manifest,
    }
}

pub struct InProcess {
    pub addr: SocketAddr,
    pub state: Arc<AgentState>,
    pub server: Server,
    pub acceptor: Acceptor,
}

pub fn start_in_process(root: &Path, config: ServerConfig) -> InProcess {
    let site = Site::load(root, None).unwrap();
    let state = Arc::new(AgentState::new(site));
    let server = Server::new(state.clone(), &config);
    let listener = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
    let acceptor = server.spawn_acceptor(listener).unwrap();
    InProcess {
        addr: acceptor.local_addr(),
        state,
        server,
        acceptor,
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw bytes, reads until the server closes, parses one response (None if the server
/// closed without answering).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    parse_response(&buf)
}

/// A GET with `Connection: close` and extra header lines.
pub async fn get(addr: SocketAddr, method: &str, path: &str, extra: &[&str]) -> RawResponse {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes()).await.expect("a response")
}

pub fn parse_response(buf: &[u8]) -> Option<RawResponse> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(RawResponse {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    })
}

/// A port nobody listened on a moment ago: for a client that must find nothing there.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Binds a loopback port here and hands the listening socket to `cmd` (`--listen-fd`), as
/// the local fleet does: the port is the child's from the start. Drop the listener once
/// the child is spawned.
pub fn listener_for(cmd: &mut Command) -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    ami_agent::http::pass_listener(cmd, &listener);
    (listener, addr)
}

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ami-agent")
}

/// The real agent as a child process; killed on drop.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr_path: PathBuf,
}

impl Agent {
    pub fn spawn(site: &TestSite, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve");
        let (listener, addr) = listener_for(&mut cmd);
        let stderr_path = site.dir.path().join(format!("agent-{}.log", addr.port()));
        cmd.arg("--root")
            .arg(&site.root)
            .arg("--manifest")
            .arg(&site.manifest_path)
            // Its own listener as the clock reference: the tests never leave the machine.
            .arg("--drift-source")
            .arg(format!("http://{addr}/"))
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("AMI_AGENT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        drop(listener);
        Agent {
            child,
            addr,
            stderr_path,
        }
    }

    /// The agent serving a directory with no manifest file (it makes one at start).
    pub fn spawn_plain(site: &TestSite) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("serve");
        let (listener, addr) = listener_for(&mut cmd);
        let stderr_path = site.dir.path().join(format!("agent-{}.log", addr.port()));
        let child = cmd
            .arg("--root")
            .arg(&site.root)
            .arg("--drift-source")
            .arg(format!("http://{addr}/"))
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        drop(listener);
        Agent {
            child,
            addr,
            stderr_path,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until `/healthz` says the first self-check ran.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited with {status}: {}", self.stderr());
            }
            if let Ok(body) = blocking_get(self.addr, "/healthz") {
                if !body.contains("\"starting\"") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready in time: {}", self.stderr());
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit in time: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking GET returning the body, for polling from sync code.
pub fn blocking_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let r = parse_response(&buf).ok_or_else(|| std::io::Error::other("bad response"))?;
    if r.status != 200 {
        return Err(std::io::Error::other(format!("status {}", r.status)));
    }
    Ok(String::from_utf8_lossy(&r.body).into_owned())
}

/// Runs `ami-agent check` with args; returns (exit code, stdout).
pub fn check(args: &[&str]) -> (i32, String) {
    let out = Command::new(agent_bin())
        .arg("check")
        .args(args)
        .env("AMI_AGENT_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
