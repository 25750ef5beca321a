//! The release in memory: every manifest file read and verified once at start, with its
//! response headers precomputed, so serving never touches the disk and a damaged disk
//! copy can always be healed from here.

pub mod sealed;

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tracing::warn;

use self::sealed::Sealed;
use crate::manifest::{ContentHasher, FileEntry, Manifest, Mismatch};

#[derive(Debug)]
pub struct Asset {
    pub entry: FileEntry,
    pub body: Bytes,
    /// Strong validator: the content's sha256.
    pub etag: HeaderValue,
    pub content_type: HeaderValue,
    /// The whole head of a 200 answer, built once: a response clones it rather than
    /// inserting (and hashing) eight headers per request.
    pub headers: HeaderMap,
}

#[derive(Debug)]
pub struct Site {
    pub manifest: Manifest,
    /// The manifest as published at `/manifest.json`.
    pub manifest_json: Bytes,
    assets: HashMap<String, Arc<Asset>>,
    sealed: Option<Arc<Sealed>>,
}

/// Where a verified file's bytes went while loading.
enum Stored {
    Heap(Bytes),
    At(Range<usize>),
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("cannot keep the content in memory: {0}")]
    Store(#[source] std::io::Error),
    #[error("{} does not match its manifest (release {version}), refusing to serve a broken release:\n{}", root.display(), list(.mismatches))]
    Mismatch {
        root: PathBuf,
        version: String,
        mismatches: Vec<(String, Mismatch)>,
    },
}

fn list(mismatches: &[(String, Mismatch)]) -> String {
    mismatches
        .iter()
        .map(|(path, m)| format!("  {path}: {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Site {
    /// Reads every file the manifest lists from `root` and verifies it. Without a manifest,
    /// one is made from `root` (version from its `version.txt`, if any).
    pub fn load(root: &Path, manifest: Option<Manifest>) -> Result<Self, SiteError> {
        let manifest = match manifest {
            Some(m) => m,
            None => Manifest::from_dir(root, &version_from_root(root))?,
        };
        // Content goes into one sealed memfd as it is verified (see `sealed`), or stays on
        // the heap where memfds are not allowed: served the same, only copied per write.
        let mut store = match sealed::Writer::new() {
            Ok(writer) => Some(writer),
            Err(e) => {
                warn!(error = %e, "cannot create a memfd: content stays on the heap and large files are copied into each response");
                None
            }
        };
        let mut verified = Vec::with_capacity(manifest.files.len());
        let mut mismatches = Vec::new();
        for entry in &manifest.files {
            let path = root.join(&entry.path);
            let loaded = match &mut store {
                Some(writer) => stream_into(writer, &path, entry)?.map(Stored::At),
                None => match std::fs::read(&path) {
                    Ok(bytes) => match entry.mismatch(&bytes) {
                        None => Ok(Stored::Heap(bytes.into())),
                        Some(m) => Err(m),
                    },
                    Err(e) => Err(unreadable(e)),
                },
            };
            match loaded {
                Ok(body) => verified.push((entry, body)),
                Err(m) => mismatches.push((entry.path.clone(), m)),
            }
        }
        if !mismatches.is_empty() {
            return Err(SiteError::Mismatch {
                root: root.to_owned(),
                version: manifest.version,
                mismatches,
            });
        }
        let sealed = match store {
            Some(writer) => writer.seal().map_err(SiteError::Store)?,
            None => None,
        };
        let assets = verified
            .into_iter()
            .map(|(entry, body)| {
                let body = match body {
                    Stored::Heap(bytes) => bytes,
                    Stored::At(range) => {
                        sealed.as_ref().map_or_else(Bytes::new, |s| s.bytes(range))
                    }
                };
                (
                    entry.path.clone(),
                    Arc::new(Asset::new(entry.clone(), body)),
                )
            })
            .collect();
        Ok(Site {
            manifest_json: Bytes::from(manifest.to_json()),
            manifest,
            assets,
            sealed,
        })
    }

    /// The memfd holding the content, when there is one: what `sendfile` sends from.
    pub fn sealed(&self) -> Option<&Arc<Sealed>> {
        self.sealed.as_ref()
    }

    pub fn get(&self, path: &str) -> Option<&Arc<Asset>> {
        self.assets.get(path)
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }
}

/// Copies a file into the store while hashing it, a chunk at a time: loading never holds
/// a whole file on the heap. The outer error is the store's, the inner one the file's.
fn stream_into(
    writer: &mut sealed::Writer,
    path: &Path,
    entry: &FileEntry,
) -> Result<Result<Range<usize>, Mismatch>, SiteError> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => return Ok(Err(unreadable(e))),
    };
    let start = writer.position();
    let mut hasher = ContentHasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(unreadable(e))),
        };
        hasher.update(&buf[..n]);
        writer.append(&buf[..n]).map_err(SiteError::Store)?;
    }
    Ok(match hasher.mismatch(entry) {
        None => Ok(start..writer.position()),
        Some(m) => Err(m),
    })
}

fn unreadable(e: std::io::Error) -> Mismatch {
    if e.kind() == std::io::ErrorKind::NotFound {
        Mismatch::Missing
    } else {
        Mismatch::Unreadable {
            error: e.to_string(),
        }
    }
}

impl Asset {
    pub fn new(entry: FileEntry, body: Bytes) -> Self {
        let etag = HeaderValue::try_from(format!("\"{}\"", entry.sha256))
            .expect("hex digests are valid header values");
        let content_type = content_type_for(&entry.path);
        let content_length = HeaderValue::from(body.len());
        let headers = crate::http::headers::asset_headers(&etag, &content_type, &content_length);
        Asset {
            content_type,
            entry,
            body,
            etag,
            headers,
        }
    }
}

/// The first line of `version.txt`, or `unversioned`.
pub fn version_from_root(root: &Path) -> String {
    std::fs::read_to_string(root.join("version.txt"))
        .ok()
        .and_then(|text| text.lines().next().map(|l| l.trim().to_owned()))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unversioned".to_owned())
}

fn content_type_for(path: &str) -> HeaderValue {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    // Browsers guess the charset of text without one; say it, nosniff forbids guessing.
    let value = if mime.type_() == mime_guess::mime::TEXT
        || mime.essence_str() == "application/javascript"
        || mime.essence_str() == "application/json"
    {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_owned()
    };
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type_for("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type_for("version.txt"), "text/plain; charset=utf-8");
        assert_eq!(content_type_for("source.zip"), "application/zip");
        assert_eq!(content_type_for("a/b.css"), "text/css; charset=utf-8");
        assert_eq!(content_type_for("x.png"), "image/png");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
    }

    #[test]
    fn load_refuses_a_root_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        std::fs::write(dir.path().join("b.txt"), "two").unwrap();
        let manifest = Manifest::from_dir(dir.path(), "v1").unwrap();
        std::fs::write(dir.path().join("a.txt"), "uno").unwrap();
        std::fs::remove_file(dir.path().join("b.txt")).unwrap();
        let err = Site::load(dir.path(), Some(manifest))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.txt: sha256"), "{err}");
        assert!(err.contains("b.txt: missing"), "{err}");
    }

    #[test]
    fn load_without_manifest_uses_version_txt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("version.txt"), "abc123 26.05\n").unwrap();
        let site = Site::load(dir.path(), None).unwrap();
        assert_eq!(site.version(), "abc123 26.05");
        assert_eq!(site.get("version.txt").unwrap().body, "abc123 26.05\n");
    }
}
