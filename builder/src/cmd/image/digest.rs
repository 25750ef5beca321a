//! `amictl image digest FILE`: the content digest, computed by reading the whole file.

use std::path::PathBuf;

use crate::image::digest::{digest_file, SCHEME};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A raw disk image.
    pub file: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let file = args.file.clone();
    let digest = tokio::task::spawn_blocking(move || digest_file(&file))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    println!("{SCHEME}:{digest}  {}", args.file.display());
    Ok(0)
}
