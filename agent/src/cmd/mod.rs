//! One module per subcommand: each owns its clap `Args` and its `run()`.

use clap::{Parser, Subcommand};

pub mod check;
pub mod drift;
pub mod manifest;
pub mod serve;

#[derive(Debug, Parser)]
#[command(
    name = "ami-agent",
    version,
    about = "Serve a release's static content and keep it healthy"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `ami_agent=trace`.
    #[arg(long, env = "AMI_AGENT_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a release's static content, heal it, and report drift.
    Serve(serve::Args),
    /// Check an agent from outside (or through SSM): exit 0 healthy, 1 degraded,
    /// 2 unhealthy, 3 unknown.
    Check(check::Args),
    /// Print the manifest (path, size, sha256 of every file) of a directory.
    Manifest(manifest::Args),
    /// Print the clock drift (local minus reference) in whole seconds.
    Drift(drift::Args),
}

/// Exit code for a command line clap rejected. `check` reserves 2 for "unhealthy", so a
/// mistyped health command must say "unknown" (3) rather than condemn the instance.
pub fn usage_exit_code(err: &clap::Error, mut args: impl Iterator<Item = String>) -> i32 {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return 0;
    }
    if args.nth(1).as_deref() == Some("check") {
        3
    } else {
        2
    }
}

impl Cli {
    /// The runtime each subcommand needs: the one-shot probes stay on one thread so they
    /// start fast and small; the server uses every core.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        match self.command {
            Command::Serve(_) => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
            Command::Drift(_) | Command::Check(_) | Command::Manifest(_) => {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            }
        }
    }

    /// Runs the subcommand and returns the process exit code.
    pub async fn run(self) -> anyhow::Result<i32> {
        match self.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Check(args) => check::run(args).await,
            Command::Manifest(args) => manifest::run(args).await,
            Command::Drift(args) => drift::run(args).await,
        }
    }
}
