//! `amictl archive`: a deterministic zip of a source tree (see [`crate::archive`]).

use std::path::PathBuf;

use anyhow::Context;

use crate::archive;

/// Pack the git-tracked files of DIR into a reproducible zip and print its sha256.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the zip. It is written to a temporary file beside it and renamed into
    /// place, so a failed run leaves nothing half-written.
    #[arg(long, short, value_name = "FILE", default_value = archive::DEFAULT_OUTPUT)]
    pub output: PathBuf,

    /// The directory to archive: its git-tracked files inside a git work tree, every file
    /// (but `.git`, `target/` and `result*` out-links) elsewhere.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

/// Writes the archive and prints `<sha256>  <output>` on stdout, as `sha256sum` would.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let Args { output, dir } = args;
    let (output, archive) = tokio::task::spawn_blocking(move || {
        let archive = archive::create(&dir, &output).with_context(|| {
            format!("cannot archive {} into {}", dir.display(), output.display())
        })?;
        anyhow::Ok((output, archive))
    })
    .await
    .context("the archive task panicked")??;

    tracing::info!(
        entries = archive.entries.len(),
        listing = ?archive.listing,
        output = %output.display(),
        "archive written"
    );
    println!("{}", archive::sha256sum_line(&archive.sha256, &output));
    Ok(0)
}
