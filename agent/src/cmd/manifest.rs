//! `ami-agent manifest DIR`: the manifest JSON of a directory, deterministic.

use std::path::PathBuf;

use crate::manifest::Manifest;
use crate::site::version_from_root;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The content directory.
    pub dir: PathBuf,
    /// Release version [default: the first line of DIR/version.txt, else `unversioned`].
    #[arg(long)]
    pub version: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let version = args.version.unwrap_or_else(|| version_from_root(&args.dir));
    let manifest = Manifest::from_dir(&args.dir, &version)?;
    print!("{}", manifest.to_json());
    Ok(0)
}
