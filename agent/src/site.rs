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
        // Content goes into one sealed memfd as it is verified (see `sealed`), or stays on
        // the heap where memfds are not allowed: served the same, only copied per write.
        let store = match sealed::Writer::new() {
            Ok(writer) => Some(writer),
            Err(e) => {
                warn!(error = %e, "cannot create a memfd: content stays on the heap and large files are copied into each response");
                None
            }
        };
        Self::load_into(root, manifest, store)
    }

    /// [`Site::load`] into `store`, or onto the heap without one.
    fn load_into(
        root: &Path,
        manifest: Option<Manifest>,
        mut store: Option<sealed::Writer>,
    ) -> Result<Self, SiteError> {
        let manifest = match manifest {
            Some(m) => m,
            None => Manifest::from_dir(root, &version_from_root(root))?,
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

    /// A site with a file large enough for `sendfile`, a small one and an empty one.
    fn write_files(dir: &Path) {
        let big: Vec<u8> = (0..3 * crate::http::sendfile::SENDFILE_MIN)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("big.bin"), big).unwrap();
        std::fs::write(dir.join("sub/small.txt"), "small\n").unwrap();
        std::fs::write(dir.join("empty.txt"), "").unwrap();
    }

    /// Where memfds are refused the content stays on the heap: the same site, the same
    /// bytes and headers, only no store for `sendfile` to send from.
    #[test]
    fn without_a_memfd_the_content_stays_on_the_heap() {
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let manifest = Manifest::from_dir(dir.path(), "v1").unwrap();
        let sealed = Site::load(dir.path(), Some(manifest.clone())).unwrap();
        let heap = Site::load_into(dir.path(), Some(manifest.clone()), None).unwrap();
        let store = sealed.sealed().expect("memfds are allowed here");
        assert!(heap.sealed().is_none());
        assert_eq!(heap.manifest_json, sealed.manifest_json);
        for entry in &manifest.files {
            let (a, b) = (
                heap.get(&entry.path).unwrap(),
                sealed.get(&entry.path).unwrap(),
            );
            let on_disk = std::fs::read(dir.path().join(&entry.path)).unwrap();
            assert_eq!(a.body, on_disk, "{}", entry.path);
            assert_eq!(b.body, on_disk, "{}", entry.path);
            assert_eq!(a.headers, b.headers, "{}", entry.path);
            // Only the memfd's bytes can go out with `sendfile`.
            if !on_disk.is_empty() {
                assert!(store.offset_of(&b.body).is_some(), "{}", entry.path);
                assert!(store.offset_of(&a.body).is_none(), "{}", entry.path);
            }
        }
        // The heap path verifies what it reads just the same.
        std::fs::write(dir.path().join("sub/small.txt"), "SMALL\n").unwrap();
        let err = Site::load_into(dir.path(), Some(manifest), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sub/small.txt: sha256"), "{err}");
    }

    /// Both ways of keeping the content, served over a socket by the real server.
    #[tokio::test]
    async fn a_heap_site_is_served_like_a_sealed_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path());
        let manifest = Manifest::from_dir(dir.path(), "v1").unwrap();
        let mut answers = Vec::new();
        for store in [Some(sealed::Writer::new().unwrap()), None] {
            let site = Site::load_into(dir.path(), Some(manifest.clone()), store).unwrap();
            let state = Arc::new(crate::state::AgentState::new(site));
            let server = crate::http::Server::new(state, &Default::default());
            let listener = crate::http::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let acceptor = server.spawn_acceptor(listener).unwrap();
            let mut got = Vec::new();
            for (path, range) in [
                ("/big.bin", ""),
                ("/big.bin", "Range: bytes=100-40000\r\n"),
                ("/sub/small.txt", ""),
                ("/empty.txt", ""),
            ] {
                let mut stream = tokio::net::TcpStream::connect(acceptor.local_addr())
                    .await
                    .unwrap();
                let request =
                    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{range}\r\n");
                stream.write_all(request.as_bytes()).await.unwrap();
                let mut response = Vec::new();
                stream.read_to_end(&mut response).await.unwrap();
                let end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let status = String::from_utf8_lossy(&response[..12]).into_owned();
                got.push((status, response[end + 4..].to_vec()));
            }
            answers.push(got);
        }
        let big = std::fs::read(dir.path().join("big.bin")).unwrap();
        let expected = [
            ("HTTP/1.1 200", big.clone()),
            ("HTTP/1.1 206", big[100..=40000].to_vec()),
            ("HTTP/1.1 200", b"small\n".to_vec()),
            ("HTTP/1.1 200", Vec::new()),
        ];
        for got in answers {
            for ((status, body), (want_status, want_body)) in got.iter().zip(&expected) {
                assert_eq!(status, want_status);
                assert!(body == want_body, "{status}: {} bytes", body.len());
            }
        }
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
