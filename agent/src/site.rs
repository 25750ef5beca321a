//! The release in memory: every manifest file read and verified once at start, with its
//! response headers precomputed, so serving never touches the disk and a damaged disk
//! copy can always be healed from here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use crate::manifest::{FileEntry, Manifest, Mismatch};

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
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
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
        let mut assets = HashMap::with_capacity(manifest.files.len());
        let mut mismatches = Vec::new();
        for entry in &manifest.files {
            match std::fs::read(root.join(&entry.path)) {
                Ok(bytes) => match entry.mismatch(&bytes) {
                    None => {
                        assets.insert(
                            entry.path.clone(),
                            Arc::new(Asset::new(entry.clone(), bytes.into())),
                        );
                    }
                    Some(m) => mismatches.push((entry.path.clone(), m)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    mismatches.push((entry.path.clone(), Mismatch::Missing))
                }
                Err(e) => mismatches.push((
                    entry.path.clone(),
                    Mismatch::Unreadable {
                        error: e.to_string(),
                    },
                )),
            }
        }
        if !mismatches.is_empty() {
            return Err(SiteError::Mismatch {
                root: root.to_owned(),
                version: manifest.version,
                mismatches,
            });
        }
        Ok(Site {
            manifest_json: Bytes::from(manifest.to_json()),
            manifest,
            assets,
        })
    }

    pub fn get(&self, path: &str) -> Option<&Arc<Asset>> {
        self.assets.get(path)
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
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
