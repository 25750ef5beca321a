//! `ami-agent serve`: load and verify the release, serve it, keep it healthy, and drain
//! gracefully on SIGTERM (rollouts depend on old instances finishing their requests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, FileConfig, Overrides};
use crate::health::{HealthConfig, HealthLoop, ServerListener};
use crate::http::{bind, inherit, Server, ServerConfig};
use crate::manifest::Manifest;
use crate::notify::{check_interval, Notice, Notifier, Systemd};
use crate::site::Site;
use crate::state::AgentState;

/// Each clock source gets this long to answer before the next one is tried.
const DRIFT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory holding the release's content.
    #[arg(long, env = "AMI_AGENT_ROOT")]
    pub root: Option<PathBuf>,
    /// The release manifest (JSON); without it one is made from the root at start.
    #[arg(long, env = "AMI_AGENT_MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:80].
    #[arg(long, env = "AMI_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Serve on a listening TCP socket inherited at this descriptor, already bound by the
    /// parent process, instead of binding --listen.
    #[arg(long, env = "AMI_AGENT_LISTEN_FD", conflicts_with = "listen")]
    pub listen_fd: Option<std::os::fd::RawFd>,
    /// Share the listening address with other agents (SO_REUSEPORT).
    #[arg(long, env = "AMI_AGENT_REUSE_PORT")]
    pub reuse_port: bool,
    /// Seconds between self-checks [default: 10].
    #[arg(long, env = "AMI_AGENT_HEALTH_INTERVAL")]
    pub health_interval: Option<u64>,
    /// Clock drift reference, tried in order (ntp://HOST[:PORT] or http(s)://HOST/).
    #[arg(
        long = "drift-source",
        env = "AMI_AGENT_DRIFT_SOURCES",
        value_delimiter = ','
    )]
    pub drift_sources: Vec<String>,
    /// Seconds between clock drift measurements [default: 60].
    #[arg(long, env = "AMI_AGENT_DRIFT_INTERVAL")]
    pub drift_interval: Option<u64>,
    /// Connections served at once [default: 4096].
    #[arg(long, env = "AMI_AGENT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client has to send request headers [default: 10].
    #[arg(long, env = "AMI_AGENT_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<u64>,
    /// Seconds a kept-alive connection may wait for its next request [default: 75].
    #[arg(long, env = "AMI_AGENT_KEEP_ALIVE_TIMEOUT")]
    pub keep_alive_timeout: Option<u64>,
    /// Seconds a response may wait for the client to read before the connection is
    /// dropped [default: 60].
    #[arg(long, env = "AMI_AGENT_SEND_TIMEOUT")]
    pub send_timeout: Option<u64>,
    /// Seconds in-flight requests get to finish after SIGTERM [default: 10].
    #[arg(long, env = "AMI_AGENT_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// TOML config file (what the NixOS module writes); flags override it.
    #[arg(long, env = "AMI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    // Taken before any file is opened, so that the number cannot be anything else.
    let inherited = args
        .listen_fd
        .map(|fd| inherit(fd).with_context(|| format!("cannot serve on --listen-fd {fd}")))
        .transpose()?;
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    // --listen on the command line is refused with --listen-fd; the file's is only ignored,
    // so say so rather than serve somewhere the file does not name.
    if let (Some(listener), Some(configured)) = (&inherited, file.listen) {
        warn!(
            configured = %configured,
            serving = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            "the config file's `listen` is ignored: serving on the socket inherited at --listen-fd"
        );
    }
    let settings = config::resolve(
        Overrides {
            root: args.root,
            manifest: args.manifest,
            listen: args.listen,
            reuse_port: args.reuse_port,
            health_interval: args.health_interval,
            drift_interval: args.drift_interval,
            drift_sources: args.drift_sources,
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout,
            keep_alive_timeout: args.keep_alive_timeout,
            send_timeout: args.send_timeout,
            shutdown_timeout: args.shutdown_timeout,
        },
        file,
    )?;

    let manifest = settings
        .manifest
        .as_deref()
        .map(Manifest::load)
        .transpose()?;
    let site = Site::load(&settings.root, manifest)?;
    info!(
        version = site.version(),
        files = site.manifest.files.len(),
        bytes = site.manifest.total_bytes(),
        root = %settings.root.display(),
        "release loaded and verified"
    );
    raise_fd_limit(settings.max_connections);
    let state = Arc::new(AgentState::new(site));
    let server = Server::new(
        state.clone(),
        &ServerConfig {
            max_connections: settings.max_connections,
            header_read_timeout: settings.header_read_timeout,
            keep_alive_timeout: settings.keep_alive_timeout,
            send_timeout: settings.send_timeout,
            ..ServerConfig::default()
        },
    );
    let listener = match inherited {
        Some(listener) => listener,
        None => bind(settings.listen, settings.reuse_port)
            .map_err(|e| bind_failed(settings.listen, e))?,
    };
    let listener = ServerListener::new(server.clone(), listener, settings.reuse_port)?;

    let notifier = Systemd;
    let interval = check_interval(settings.health_interval, notifier.watchdog());
    let shutdown = CancellationToken::new();
    let health = HealthLoop::new(
        state.clone(),
        settings.root.clone(),
        notifier,
        listener,
        HealthConfig {
            interval,
            ..HealthConfig::default()
        },
    )?;
    let health_task = tokio::spawn(health.run(shutdown.clone()));
    let clock_task = tokio::spawn(crate::clockwatch::run(
        state,
        settings.drift_sources,
        settings.drift_interval,
        DRIFT_TIMEOUT,
        shutdown.clone(),
    ));

    let signal = wait_for_signal().await?;
    info!(
        signal,
        "stopping: no new connections, finishing requests in flight"
    );
    notifier.notify(&[Notice::Stopping]);
    shutdown.cancel();
    let _ = tokio::join!(health_task, clock_task);
    let drained = server.shutdown(settings.shutdown_timeout).await;
    info!(drained, "stopped");
    Ok(0)
}

/// Why a bind failed, in terms of what to do about it.
fn bind_failed(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    let fix = match e.kind() {
        ErrorKind::PermissionDenied => {
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; pick another with --listen \
             (e.g. 127.0.0.1:8080)"
        }
        ErrorKind::AddrInUse => {
            "another process listens there (`ss -ltnp` names it); stop it, or pick another \
             address with --listen"
        }
        ErrorKind::AddrNotAvailable => {
            "no interface of this machine has that address; pick one it has with --listen, \
             or 0.0.0.0 for all"
        }
        _ => "pick another address with --listen",
    };
    anyhow::anyhow!("cannot listen on {addr}: {e}: {fix}")
}

/// Descriptors the agent needs beyond its connections: the listener, the health loop's
/// self-fetch and disk check, the clock probes, the log.
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one: systemd and most shells start services
/// with a soft limit of 1024, which a few hundred idle clients beyond it would exhaust,
/// failing accepts and the health loop's own file reads. Warns when even the hard limit
/// cannot hold `max_connections`.
fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let before = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => info!(from = ?before, to = ?limit.maximum, "raised the open-file limit"),
            Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let soft = getrlimit(Resource::Nofile).current;
    let needed = max_connections as u64 + RESERVED_FDS;
    if soft.is_some_and(|soft| soft < needed) {
        warn!(
            limit = soft,
            needed,
            max_connections,
            "the open-file limit is below what max_connections needs: when it runs out, new \
             clients wait and idle connections are closed; raise LimitNOFILE (the NixOS \
             module sets it from max_connections) or lower max_connections"
        );
    }
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bind_failure_names_its_cause_and_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr, false).map(drop).unwrap_err();
        let msg = bind_failed(addr, e).to_string();
        assert!(msg.contains("another process listens there"), "{msg}");
        assert!(!msg.contains("below 1024"), "{msg}");

        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let msg = bind_failed("0.0.0.0:80".parse().unwrap(), denied).to_string();
        assert!(msg.contains("CAP_NET_BIND_SERVICE"), "{msg}");
    }
}
