//! Deterministic source archives.
//!
//! `amictl archive` packs a source tree into a zip that depends only on the files' paths,
//! contents and executable bits: every entry carries the zip epoch (1980-01-01 00:00:00) as
//! its time, mode 0644 or 0755 (symlinks 0777), and the entries are sorted by path. The same
//! tree therefore gives the same bytes on any machine, on any day, whatever the umask or the
//! order the files were written in. The site baked into the image publishes this zip, and
//! its sha256 lets anyone check that a running instance serves the source it was built from.
//!
//! Which files go in:
//! - Inside a git work tree, the files git tracks (`git ls-files`), as they are in the
//!   working tree; a tracked file deleted from the working tree is left out.
//! - Elsewhere (the Nix build sandbox gets a copy of the flake without `.git`), every file
//!   under the directory.
//!
//! In both cases `.git` (at any depth), the top-level `target/` directory and `result` /
//! `result-*` symlinks (Nix out-links) are left out. For a clean checkout both listings are
//! the same, so `amictl archive` on a developer's machine and inside `nix build` give the
//! same bytes.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

/// The archive's file name when `--output` is not given.
pub const DEFAULT_OUTPUT: &str = "source.zip";

/// Mode of a regular file that nobody may execute.
const MODE_FILE: u32 = 0o644;
/// Mode of a regular file that someone may execute (on disk, any of the `x` bits).
const MODE_EXECUTABLE: u32 = 0o755;
/// Mode of a symlink; the zip crate adds the symlink type bits.
const MODE_SYMLINK: u32 = 0o777;
/// zlib's default level: fixed here so that a change of the crate's default cannot change
/// the bytes.
const DEFLATE_LEVEL: i64 = 6;

/// How the list of files was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `git ls-files`: the directory is inside a git work tree.
    Git,
    /// A walk of the directory: no git work tree (or no git).
    Walk,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file, executable or not.
    File { executable: bool },
    /// A symlink, stored with its target.
    Symlink { target: String },
}

/// One file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the archived directory, `/`-separated, UTF-8.
    pub path: String,
    pub kind: EntryKind,
}

/// What [`create`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Lower-case hex sha256 of the zip file.
    pub sha256: String,
    /// The entries, in archive order.
    pub entries: Vec<Entry>,
    pub listing: Listing,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{} does not exist", path.display())]
    Missing { path: PathBuf },

    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("git failed in {}: {stderr}", dir.display())]
    Git { dir: PathBuf, stderr: String },

    #[error("{}: zip entry names must be UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },

    #[error("cannot write the zip entry {path}")]
    Zip {
        path: String,
        #[source]
        source: zip::result::ZipError,
    },

    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    fn read(path: &Path, source: io::Error) -> Self {
        Self::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    fn write(path: &Path, source: io::Error) -> Self {
        Self::Write {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks that `dir` exists and is a directory.
fn check_dir(dir: &Path) -> Result<(), ArchiveError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ArchiveError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ArchiveError::Missing {
            path: dir.to_path_buf(),
        }),
        Err(err) => Err(ArchiveError::read(dir, err)),
    }
}

/// Lists the files to archive, sorted by path: the git-tracked files when `dir` is inside a
/// git work tree, every file under `dir` otherwise.
pub fn list(dir: &Path) -> Result<(Listing, Vec<Entry>), ArchiveError> {
    check_dir(dir)?;
    if inside_git_work_tree(dir)? {
        Ok((Listing::Git, list_git(dir)?))
    } else {
        Ok((Listing::Walk, list_walk(dir)?))
    }
}

/// A `git` command that ignores the caller's `GIT_DIR`-style overrides, so that running
/// from a git hook archives `dir`'s own repository.
fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null());
    cmd
}

/// Whether `dir` is inside a git work tree. No git on the PATH counts as no: the Nix build
/// sandbox has neither git nor `.git`. A repository git refuses to read (another user's,
/// without `safe.directory`) is an error rather than a silent walk, which would archive
/// untracked files.
fn inside_git_work_tree(dir: &Path) -> Result<bool, ArchiveError> {
    let out = match git(dir)
        .args(["rev-parse", "--is-inside-work-tree"])
        .output()
    {
        Ok(out) => out,
        Err(err) => {
            tracing::debug!(%err, "cannot run git; walking the directory instead");
            return Ok(false);
        }
    };
    if out.status.success() {
        return Ok(out.stdout.trim_ascii() == b"true");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("safe.directory") {
        return Err(ArchiveError::Git {
            dir: dir.to_path_buf(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(false)
}

/// The tracked files under `dir`, as they are in the working tree.
pub fn list_git(dir: &Path) -> Result<Vec<Entry>, ArchiveError> {
    // Run in `dir`, `ls-files` lists only the files under it, relative to it.
    let out = git(dir)
        .args(["ls-files", "-z", "--cached"])
        .output()
        .map_err(|err| ArchiveError::Git {
            dir: dir.to_path_buf(),
            stderr: err.to_string(),
        })?;
    if !out.status.success() {
        return Err(ArchiveError::Git {
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }

    let mut entries = Vec::new();
    for relative in out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let relative = Path::new(OsStr::from_bytes(relative));
        if excluded(relative) {
            continue;
        }
        // A tracked file deleted from the working tree is not part of the tree we archive.
        let meta = match fs::symlink_metadata(dir.join(relative)) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(ArchiveError::read(&dir.join(relative), err)),
        };
        // Submodules show up as directories: their files are another repository's.
        if let Some(entry) = entry_for(dir, relative, &meta)? {
            entries.push(entry);
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    // An unmerged path is listed once per stage.
    entries.dedup_by(|a, b| a.path == b.path);
    Ok(entries)
}

/// Every file under `dir` but the excluded ones, without following symlinks.
pub fn list_walk(dir: &Path) -> Result<Vec<Entry>, ArchiveError> {
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative_dir) = pending.pop() {
        let absolute = dir.join(&relative_dir);
        let read_dir = fs::read_dir(&absolute).map_err(|err| ArchiveError::read(&absolute, err))?;
        for child in read_dir {
            let child = child.map_err(|err| ArchiveError::read(&absolute, err))?;
            let relative = relative_dir.join(child.file_name());
            if excluded(&relative) {
                continue;
            }
            let meta = fs::symlink_metadata(child.path())
                .map_err(|err| ArchiveError::read(&child.path(), err))?;
            if meta.is_dir() {
                pending.push(relative);
            } else if let Some(entry) = entry_for(dir, &relative, &meta)? {
                entries.push(entry);
            }
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Whether a path (relative to the archived directory) stays out of every archive: anything
/// named `.git` (the repository, or a worktree's pointer to it) and anything under the
/// top-level `target` (Cargo's build directory). A `target` directory deeper down is
/// ordinary source.
fn excluded(relative: &Path) -> bool {
    let mut components = relative.components().map(|c| c.as_os_str().as_bytes());
    if components.clone().next() == Some(b"target".as_slice()) {
        return true;
    }
    components.any(|name| name == b".git")
}

/// Whether a symlink is a Nix out-link (`result`, `result-dev`, ...).
fn is_out_link(name: &[u8]) -> bool {
    name == b"result" || name.starts_with(b"result-")
}

/// The archive entry for one file, or `None` for things a zip does not hold (directories
/// such as submodules, sockets, fifos, devices) and for Nix out-links.
fn entry_for(
    dir: &Path,
    relative: &Path,
    meta: &fs::Metadata,
) -> Result<Option<Entry>, ArchiveError> {
    let file_type = meta.file_type();
    let absolute = dir.join(relative);
    let path = utf8_path(relative)?;
    if file_type.is_symlink() {
        let name = relative
            .file_name()
            .map(OsStrExt::as_bytes)
            .unwrap_or_default();
        if is_out_link(name) {
            return Ok(None);
        }
        let target = fs::read_link(&absolute).map_err(|err| ArchiveError::read(&absolute, err))?;
        let target = target
            .to_str()
            .ok_or_else(|| ArchiveError::NonUtf8Path {
                path: absolute.clone(),
            })?
            .to_string();
        return Ok(Some(Entry {
            path,
            kind: EntryKind::Symlink { target },
        }));
    }
    if file_type.is_file() {
        let executable = meta.permissions().mode() & 0o111 != 0;
        return Ok(Some(Entry {
            path,
            kind: EntryKind::File { executable },
        }));
    }
    tracing::debug!(path = %absolute.display(), "skipping: neither a file nor a symlink");
    Ok(None)
}

/// The `/`-separated UTF-8 form of a relative path.
fn utf8_path(relative: &Path) -> Result<String, ArchiveError> {
    let parts: Option<Vec<&str>> = relative
        .components()
        .map(|component| component.as_os_str().to_str())
        .collect();
    parts
        .map(|parts| parts.join("/"))
        .ok_or_else(|| ArchiveError::NonUtf8Path {
            path: relative.to_path_buf(),
        })
}

/// Writes the zip of `entries` (read from under `dir`) to `out` and returns it.
pub fn write_zip<W: Write + Seek>(
    dir: &Path,
    entries: &[Entry],
    out: W,
) -> Result<W, ArchiveError> {
    let base = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .compression_level(Some(DEFLATE_LEVEL))
        .last_modified_time(DateTime::default());
    let mut zip = ZipWriter::new(out);
    for entry in entries {
        let zip_err = |source| ArchiveError::Zip {
            path: entry.path.clone(),
            source,
        };
        let absolute = dir.join(&entry.path);
        match &entry.kind {
            EntryKind::Symlink { target } => {
                zip.add_symlink(
                    entry.path.as_str(),
                    target,
                    base.unix_permissions(MODE_SYMLINK),
                )
                .map_err(zip_err)?;
            }
            EntryKind::File { executable } => {
                let mut file =
                    File::open(&absolute).map_err(|err| ArchiveError::read(&absolute, err))?;
                let size = file
                    .metadata()
                    .map_err(|err| ArchiveError::read(&absolute, err))?
                    .len();
                let mode = if *executable {
                    MODE_EXECUTABLE
                } else {
                    MODE_FILE
                };
                // Zip64 headers only where they are needed, so that small trees stay
                // readable by every unzip.
                let options = base
                    .unix_permissions(mode)
                    .large_file(size >= u64::from(u32::MAX));
                zip.start_file(entry.path.as_str(), options)
                    .map_err(zip_err)?;
                io::copy(&mut file, &mut zip).map_err(|err| ArchiveError::read(&absolute, err))?;
            }
        }
    }
    zip.finish().map_err(|source| ArchiveError::Zip {
        path: String::new(),
        source,
    })
}

/// The path of `output` relative to `dir`, when the output lands inside the archived tree
/// (`amictl archive` with the defaults writes `./source.zip`): that file must not archive
/// its previous self.
fn output_inside(dir: &Path, output: &Path) -> Option<String> {
    let dir = fs::canonicalize(dir).ok()?;
    let parent = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let absolute = fs::canonicalize(parent).ok()?.join(output.file_name()?);
    let relative = absolute.strip_prefix(&dir).ok()?;
    utf8_path(relative).ok()
}

/// Archives `dir` into `output`, atomically: the zip is written to a temporary file beside
/// `output` and renamed over it only once complete, so a failed run leaves no file behind.
pub fn create(dir: &Path, output: &Path) -> Result<Archive, ArchiveError> {
    let (listing, mut entries) = list(dir)?;
    if let Some(own) = output_inside(dir, output) {
        entries.retain(|entry| entry.path != own);
    }

    let parent = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".amictl-archive-")
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(|err| ArchiveError::write(parent, err))?;

    let file = write_zip(dir, &entries, temp.as_file_mut())?;
    file.sync_all()
        .map_err(|err| ArchiveError::write(output, err))?;
    let sha256 = sha256_of(temp.as_file_mut()).map_err(|err| ArchiveError::write(output, err))?;

    // tempfile creates 0600; an archive is for sharing.
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o644))
        .map_err(|err| ArchiveError::write(output, err))?;
    temp.persist(output)
        .map_err(|err| ArchiveError::write(output, err.error))?;
    Ok(Archive {
        sha256,
        entries,
        listing,
    })
}

/// Lower-case hex sha256 of a file's whole content.
fn sha256_of(file: &mut File) -> io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The line `sha256sum` prints for a file: `<hex>  <name>`.
pub fn sha256sum_line(sha256: &str, name: &Path) -> String {
    format!("{sha256}  {}", name.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_git_target_at_top_only() {
        assert!(excluded(Path::new(".git")));
        assert!(excluded(Path::new(".git/config")));
        assert!(excluded(Path::new("vendor/dep/.git")));
        assert!(excluded(Path::new("target")));
        assert!(excluded(Path::new("target/debug/amictl")));
        assert!(!excluded(Path::new("src/target/mod.rs")));
        assert!(!excluded(Path::new("targets.md")));
        assert!(!excluded(Path::new("builder/src/archive.rs")));
    }

    #[test]
    fn out_links() {
        assert!(is_out_link(b"result"));
        assert!(is_out_link(b"result-dev"));
        assert!(!is_out_link(b"results.md"));
        assert!(!is_out_link(b"resultant"));
    }

    #[test]
    fn sha256sum_format() {
        assert_eq!(
            sha256sum_line("ab", Path::new("out/source.zip")),
            "ab  out/source.zip"
        );
    }
}
