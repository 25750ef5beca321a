//! `amictl image`: publish a NixOS image as an AMI, and the tools around it.

pub mod build;
pub mod digest;
pub mod gc;
pub mod lifecycle;
pub mod list;
pub mod publish;

use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload a raw image (the result of `nix build .#ami`) and register it as an AMI;
    /// prints the AMI id. Content-addressed: the same image twice gives the same AMI.
    Publish(publish::Args),
    /// Print an image file's content digest (what `publish` tags AMIs with).
    Digest(digest::Args),
    /// Build the image with `nix build` and publish it (as `publish RESULT_DIR` does).
    Build(build::Args),
    /// This account's amictl AMIs in the region, newest first.
    List(list::Args),
    /// Deregister AMIs beyond the newest N that no instance uses, and delete their snapshots.
    Gc(gc::Args),
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    match args.command {
        ImageCommand::Publish(a) => publish::run(a).await,
        ImageCommand::Digest(a) => digest::run(a).await,
        ImageCommand::Build(a) => build::run(a).await,
        ImageCommand::List(a) => list::run(a).await,
        ImageCommand::Gc(a) => gc::run(a).await,
    }
}
