//! `amictl local-balancer --dir DIR --listen ADDR`: the local fleet's load balancer, started
//! detached by `rollout --provider local` (see [`crate::local::balancer`] for the files it
//! reads and writes in DIR). Runs until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::local::balancer::{self, BalancerSettings};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The balancer's directory: targets.json in, status.json out, and its lock.
    #[arg(long)]
    pub dir: PathBuf,
    /// The stable address clients connect to, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: SocketAddr,
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
    balancer::serve(&args.dir, listener, BalancerSettings::default(), shutdown).await?;
    Ok(0)
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
