//! `ami-agent serve`: load and verify the release, serve it, keep it healthy, and drain
//! gracefully on SIGTERM (rollouts depend on old instances finishing their requests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{self, FileConfig, Overrides};
use crate::health::{HealthConfig, HealthLoop, ServerListener};
use crate::http::{bind, Server, ServerConfig};
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
    /// Seconds in-flight requests get to finish after SIGTERM [default: 10].
    #[arg(long, env = "AMI_AGENT_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<u64>,
    /// TOML config file (what the NixOS module writes); flags override it.
    #[arg(long, env = "AMI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
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
    let state = Arc::new(AgentState::new(site));
    let server = Server::new(
        state.clone(),
        &ServerConfig {
            max_connections: settings.max_connections,
            header_read_timeout: settings.header_read_timeout,
            ..ServerConfig::default()
        },
    );
    let listener = bind(settings.listen, settings.reuse_port).with_context(|| {
        format!(
            "cannot listen on {}: ports below 1024 need root or CAP_NET_BIND_SERVICE; \
             pick another with --listen (e.g. 127.0.0.1:8080)",
            settings.listen
        )
    })?;
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

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
