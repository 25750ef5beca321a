//! `amictl local-balancer --dir DIR --listen ADDR`: the local fleet's load balancer, started
//! detached by `rollout --provider local` (see [`crate::local::balancer`] for the files it
//! reads and writes in DIR). Runs until SIGTERM or Ctrl-C. Beside the proxy runs the
//! fleet's supervisor ([`crate::local::supervisor`]): the fleet is DIR's parent directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::local::balancer::{self, BalancerSettings};
use crate::local::{supervisor, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The balancer's directory: targets.json in, status.json out, and its lock.
    #[arg(long)]
    pub dir: PathBuf,
    /// The stable address clients connect to, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Replace the fleet's instances whose process is gone (the fleet in DIR's parent).
    /// `AMICTL_LOCAL_SUPERVISOR=off` in the environment of the amictl that starts the
    /// balancer turns it off: dead instances then wait for `health --heal`.
    #[arg(
        long,
        env = "AMICTL_LOCAL_SUPERVISOR",
        value_name = "on|off",
        default_value = "on",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub supervise: bool,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    // Checked before binding so a second balancer says why, not just that the port is
    // taken; `serve` takes the lock for real.
    if balancer::is_running(&args.dir) {
        anyhow::bail!("a balancer is already running for {}", args.dir.display());
    }
    let listener = bind(args.listen)?;
    let shutdown = CancellationToken::new();
    crate::cmd::cancel_on_signal(shutdown.clone());
    let supervisor = match (args.supervise, fleet_of(&args.dir)) {
        (true, Some(store)) => Some(tokio::spawn(supervisor::run(
            store,
            supervisor::Settings::default(),
            shutdown.clone(),
        ))),
        (true, None) => {
            tracing::warn!(dir = %args.dir.display(), "not a local fleet's balancer directory: no supervisor");
            None
        }
        (false, _) => None,
    };
    let served = balancer::serve(
        &args.dir,
        listener,
        BalancerSettings::default(),
        shutdown.clone(),
    )
    .await;
    // The supervisor goes with the balancer (it lets a replacement in progress clean up).
    shutdown.cancel();
    if let Some(supervisor) = supervisor {
        let _ = supervisor.await;
    }
    served?;
    Ok(0)
}

/// The fleet whose balancer directory is `dir` (`<fleet dir>/balancer`).
fn fleet_of(dir: &std::path::Path) -> Option<Store> {
    let dir = std::path::absolute(dir).ok()?;
    let fleet_dir = dir.parent()?;
    let name = fleet_dir.file_name()?.to_str()?;
    let store = Store::new(fleet_dir.parent()?, name).ok()?;
    (store.balancer_dir() == dir).then_some(store)
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot create a socket")?;
    // SO_REUSEADDR so a restarted balancer need not wait out TIME_WAIT; no SO_REUSEPORT,
    // so two balancers can never share the address.
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("{addr} is already in use (another balancer or program listens there)")
        } else {
            anyhow::Error::new(e).context(format!("cannot bind {addr}"))
        }
    })?;
    socket
        .listen(1024)
        .with_context(|| format!("cannot listen on {addr}"))
}
