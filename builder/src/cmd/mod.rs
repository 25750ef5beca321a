//! One module per subcommand: each owns its clap `Args` and its `run()`.

use clap::{Parser, Subcommand};

pub mod archive;

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a deterministic zip of a source tree and print its sha256.
    Archive(archive::Args),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<i32> {
        match self.command {
            Command::Archive(args) => archive::run(args).await,
        }
    }
}
