//! One module per subcommand: each owns its clap `Args` and its `run()`.

use clap::{Parser, Subcommand};

pub mod archive;
pub mod destroy;
pub mod drift;
pub mod health;
pub mod iam_policy;
pub mod image;
pub mod local_balancer;
pub mod lock;
pub mod rollout;
pub mod stack;
pub mod up;

#[derive(Debug, Parser)]
#[command(
    name = "amictl",
    version,
    about = "Publish NixOS images as AMIs and roll fleets onto them"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `amictl=trace`.
    #[arg(long, env = "AMICTL_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size difference between subcommands' arguments costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a deterministic zip of a source tree and print its sha256.
    Archive(archive::Args),
    /// Publish NixOS images as AMIs.
    Image(image::Args),
    /// Replace (or create) a fleet across AZs, gated by health checks.
    Rollout(rollout::Args),
    /// Check a fleet's instances (through SSM, or locally) or an endpoint: exit 0 healthy,
    /// 1 degraded, 2 unhealthy, 3 unknown.
    Health(health::Args),
    /// Clock, content and AMI drift of a fleet's instances: exit 1 when anything drifts.
    Drift(drift::Args),
    /// Stop and remove a whole fleet (terminate its instances).
    Destroy(destroy::Args),
    /// The CloudFormation stack a fleet runs in: template, check, deploy, delete.
    Stack(stack::Args),
    /// Print the least-privilege IAM policy amictl needs.
    IamPolicy(iam_policy::Args),
    /// From nothing to a URL: deploy the stack, publish the image, roll the fleet out.
    Up(up::Args),
    /// The local fleet's load balancer (started by `rollout --provider local`).
    #[command(hide = true)]
    LocalBalancer(local_balancer::Args),
}

/// Where a fleet lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// EC2 instances, SSM Run Command, an ALB target group, CloudWatch alarms.
    #[default]
    Aws,
    /// `ami-agent serve` processes on this machine behind a local load balancer.
    Local,
}

impl Command {
    /// The exit code for an error that stopped the command: 1, but 3 ("unknown") for the
    /// checks, whose 1 means "degraded" or "drifted" and must not be claimed by, say, an
    /// unreachable endpoint.
    pub fn error_exit_code(&self) -> i32 {
        match self {
            Command::Health(_) | Command::Drift(_) => 3,
            _ => 1,
        }
    }
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<i32> {
        match self.command {
            Command::Archive(args) => archive::run(args).await,
            Command::Image(args) => image::run(args).await,
            Command::Rollout(args) => rollout::run(args).await,
            Command::Health(args) => health::run(args).await,
            Command::Drift(args) => drift::run(args).await,
            Command::Destroy(args) => destroy::run(args).await,
            Command::Stack(args) => stack::run(args).await,
            Command::IamPolicy(args) => iam_policy::run(args).await,
            Command::Up(args) => up::run(args).await,
            Command::LocalBalancer(args) => local_balancer::run(args).await,
        }
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM, so long operations can clean up after themselves.
pub fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("interrupted: stopping and cleaning up");
        token.cancel();
    });
}
