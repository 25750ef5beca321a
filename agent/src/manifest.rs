//! The release manifest: every file's path, size and sha256, plus the release version.
//! It is the truth the agent serves, heals towards and checks against.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Nested directories deeper than this are refused: a symlink loop, not a website.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative, `/`-separated, no `.`/`..`/empty components.
    pub path: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid manifest: {source} (make one with `ami-agent manifest DIR`)", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("manifest entry {path:?} is invalid: {reason}")]
    BadEntry { path: String, reason: &'static str },
    #[error("{} nests directories deeper than {MAX_DEPTH} levels (a symlink loop?)", path.display())]
    TooDeep { path: PathBuf },
    #[error("{} holds a file name that is not UTF-8: {name:?}", dir.display())]
    NotUtf8 {
        dir: PathBuf,
        name: std::ffi::OsString,
    },
}

/// How one file on disk differs from its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mismatch {
    Missing,
    Size { expected: u64, actual: u64 },
    Digest { expected: String, actual: String },
    Unreadable { error: String },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Missing => write!(f, "missing"),
            Mismatch::Size { expected, actual } => {
                write!(f, "size {actual} bytes, manifest says {expected}")
            }
            Mismatch::Digest { expected, actual } => {
                write!(f, "sha256 {actual}, manifest says {expected}")
            }
            Mismatch::Unreadable { error } => write!(f, "unreadable: {error}"),
        }
    }
}

impl Manifest {
    /// Builds the manifest of every regular file below `dir` (symlinks followed), sorted by
    /// path, so the same tree always gives the same bytes.
    pub fn from_dir(dir: &Path, version: &str) -> Result<Self, ManifestError> {
        let mut files = Vec::new();
        walk(dir, "", 0, &mut |rel, path| {
            let bytes = std::fs::read(path).map_err(|source| ManifestError::Io {
                path: path.to_owned(),
                source,
            })?;
            files.push(FileEntry::of(rel, &bytes));
            Ok(())
        })?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest {
            version: version.to_owned(),
            files,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read(path).map_err(|source| ManifestError::Io {
            path: path.to_owned(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| ManifestError::Parse {
                path: path.to_owned(),
                source,
            })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Deterministic pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        text.push('\n');
        text
    }

    /// Rejects entries that could name something outside the root or collide.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut seen = HashSet::new();
        for entry in &self.files {
            let bad = |reason| ManifestError::BadEntry {
                path: entry.path.clone(),
                reason,
            };
            if !is_safe_relative_path(&entry.path) {
                return Err(bad(
                    "paths must be relative, `/`-separated, without `.`, `..` or empty parts",
                ));
            }
            if entry.sha256.len() != 64
                || !entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(bad("sha256 must be 64 lower-case hex digits"));
            }
            if !seen.insert(entry.path.as_str()) {
                return Err(bad("listed twice"));
            }
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

impl FileEntry {
    pub fn of(path: &str, bytes: &[u8]) -> Self {
        FileEntry {
            path: path.to_owned(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }

    /// Compares bytes with this entry.
    pub fn mismatch(&self, bytes: &[u8]) -> Option<Mismatch> {
        let mut hasher = ContentHasher::default();
        hasher.update(bytes);
        hasher.mismatch(self)
    }

    /// Compares the file at `root/path` with this entry, streaming it through the hash.
    pub fn check_on_disk(&self, root: &Path) -> Option<Mismatch> {
        self.verify_on_disk(root).unwrap_or_else(|e| {
            Some(Mismatch::Unreadable {
                error: e.to_string(),
            })
        })
    }

    /// Like [`FileEntry::check_on_disk`], but a file that could not be opened for want of
    /// descriptors or memory is an error, not a mismatch: the agent is overloaded, and the
    /// file says nothing about drift.
    pub fn verify_on_disk(&self, root: &Path) -> Result<Option<Mismatch>, std::io::Error> {
        let path = root.join(&self.path);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(Mismatch::Missing))
            }
            Err(e) if is_resource_exhaustion(&e) => return Err(e),
            Err(e) => {
                return Ok(Some(Mismatch::Unreadable {
                    error: e.to_string(),
                }))
            }
        };
        let mut hasher = ContentHasher::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_resource_exhaustion(&e) => return Err(e),
                Err(e) => {
                    return Ok(Some(Mismatch::Unreadable {
                        error: e.to_string(),
                    }))
                }
            }
        }
        Ok(hasher.mismatch(self))
    }
}

/// Size and sha256 of content seen in pieces, to compare a file or a response body with
/// its entry without holding all of it.
#[derive(Default)]
pub struct ContentHasher {
    hasher: Sha256,
    size: u64,
}

impl ContentHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.hasher.update(bytes);
    }

    /// Compares everything seen so far with `entry`.
    pub fn mismatch(self, entry: &FileEntry) -> Option<Mismatch> {
        if self.size != entry.size {
            return Some(Mismatch::Size {
                expected: entry.size,
                actual: self.size,
            });
        }
        let actual = hex::encode(self.hasher.finalize());
        (actual != entry.sha256).then(|| Mismatch::Digest {
            expected: entry.sha256.clone(),
            actual,
        })
    }
}

/// Out of file descriptors (per process or system-wide) or memory: the agent is
/// overloaded; nothing is wrong with the file or the listener.
pub fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOMEM)
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// True for `a/b.txt`; false for `/a`, `a//b`, `./a`, `a/..`, `a\b`, ``.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    visit: &mut dyn FnMut(&str, &Path) -> Result<(), ManifestError>,
) -> Result<(), ManifestError> {
    if depth > MAX_DEPTH {
        return Err(ManifestError::TooDeep {
            path: dir.to_owned(),
        });
    }
    let io = |source| ManifestError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            return Err(ManifestError::NotUtf8 {
                dir: dir.to_owned(),
                name,
            });
        };
        let rel = if prefix.is_empty() {
            name_str.to_owned()
        } else {
            format!("{prefix}/{name_str}")
        };
        let path = entry.path();
        // Follow symlinks: a Nix-built site may link into other store paths.
        let meta = std::fs::metadata(&path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(&path, &rel, depth + 1, visit)?;
        } else if meta.is_file() {
            visit(&rel, &path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_paths() {
        for ok in ["a", "a/b.txt", "dir/sub/x.html", ".well-known/x"] {
            assert!(is_safe_relative_path(ok), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "./a", "a/./b", "..", "a/../b", "a\\b", "a\0",
        ] {
            assert!(!is_safe_relative_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn from_dir_is_sorted_and_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("z.txt"), "z").unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("index.html"), "hi").unwrap();
        let m = Manifest::from_dir(dir.path(), "v1").unwrap();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["index.html", "sub/a.txt", "z.txt"]);
        assert_eq!(m.files[0].size, 2);
        assert_eq!(m.files[0].sha256, sha256_hex(b"hi"));
        assert_eq!(
            m.to_json(),
            Manifest::from_dir(dir.path(), "v1").unwrap().to_json()
        );
        let reparsed: Manifest = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(reparsed, m);
    }

    #[test]
    fn validate_rejects_escapes_duplicates_and_bad_digests() {
        let entry = |path: &str, sha: &str| FileEntry {
            path: path.into(),
            size: 0,
            sha256: sha.into(),
        };
        let good = sha256_hex(b"");
        let manifest = |files| Manifest {
            version: "v".into(),
            files,
        };
        assert!(manifest(vec![entry("a", &good)]).validate().is_ok());
        assert!(manifest(vec![entry("../etc/passwd", &good)])
            .validate()
            .is_err());
        assert!(manifest(vec![entry("a", &good), entry("a", &good)])
            .validate()
            .is_err());
        assert!(manifest(vec![entry("a", "ABC")]).validate().is_err());
        assert!(manifest(vec![entry("a", &good.to_uppercase())])
            .validate()
            .is_err());
    }

    #[test]
    fn disk_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "hello").unwrap();
        let entry = FileEntry::of("a", b"hello");
        assert_eq!(entry.check_on_disk(dir.path()), None);
        std::fs::write(dir.path().join("a"), "jello").unwrap();
        assert!(matches!(
            entry.check_on_disk(dir.path()),
            Some(Mismatch::Digest { .. })
        ));
        std::fs::write(dir.path().join("a"), "hi").unwrap();
        assert_eq!(
            entry.check_on_disk(dir.path()),
            Some(Mismatch::Size {
                expected: 5,
                actual: 2
            })
        );
        std::fs::remove_file(dir.path().join("a")).unwrap();
        assert_eq!(entry.check_on_disk(dir.path()), Some(Mismatch::Missing));
    }
}
