//! A local "image": a content directory (and optionally its manifest), copied once into the
//! fleet's `releases/` under a content address, so a release is immutable once imported
//! and importing the same tree twice is a no-op (like `image publish`).

use std::path::{Path, PathBuf};

use ami_agent::manifest::Manifest;
use ami_agent::site::version_from_root;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("--content {0}: not a directory (point it at the site to serve, e.g. examples/site)")]
    NotADirectory(PathBuf),
    #[error("--content {path}: {message}")]
    Content { path: PathBuf, message: String },
    #[error("--manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("release {0} is not in this fleet: roll out with --content DIR to import it")]
    Missing(String),
}

/// An imported release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub id: String,
    pub dir: PathBuf,
    /// The version its content declares (`version.txt`).
    pub version: String,
}

impl Release {
    pub fn content(&self) -> PathBuf {
        self.dir.join("content")
    }
    /// The manifest it was imported with, if any (else the agent makes one at start).
    pub fn manifest(&self) -> Option<PathBuf> {
        let m = self.dir.join("manifest.json");
        m.exists().then_some(m)
    }
}

/// The release id of a tree and manifest: the same bytes always give the same id (pure
/// given the listing).
pub fn release_id(listing: &Manifest, manifest: Option<&[u8]>) -> String {
    let mut h = Sha256::new();
    h.update(listing.to_json().as_bytes());
    if let Some(m) = manifest {
        h.update(b"\0manifest\0");
        h.update(m);
    }
    format!("rel-{}", &hex::encode(h.finalize())[..12])
}

/// Imports `content` (and `manifest`) into `releases`, returning the release. A manifest
/// that does not match the content is imported as it is: serving it is what fails (the
/// agent refuses), which is what a rollout's gate is for.
pub fn import(
    releases: &Path,
    content: &Path,
    manifest: Option<&Path>,
) -> Result<Release, ReleaseError> {
    if !content.is_dir() {
        return Err(ReleaseError::NotADirectory(content.to_owned()));
    }
    let version = version_from_root(content);
    let listing = Manifest::from_dir(content, &version).map_err(|e| ReleaseError::Content {
        path: content.to_owned(),
        message: e.to_string(),
    })?;
    if listing.files.is_empty() {
        return Err(ReleaseError::Content {
            path: content.to_owned(),
            message: "no files to serve".into(),
        });
    }
    let manifest_bytes = match manifest {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| ReleaseError::Manifest {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            // Refuse what the agent could never read: a typo, not a broken release.
            Manifest::load(path).map_err(|e| ReleaseError::Manifest {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            Some(bytes)
        }
        None => None,
    };
    let id = release_id(&listing, manifest_bytes.as_deref());
    let dir = releases.join(&id);
    let release = Release {
        id,
        dir: dir.clone(),
        version,
    };
    if dir.is_dir() {
        return Ok(release);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReleaseError::Io { path, source }
    };
    std::fs::create_dir_all(releases).map_err(io(releases))?;
    // Build it aside and rename it in, so a release directory is always complete.
    let tmp = tempfile::Builder::new()
        .prefix(".import-")
        .tempdir_in(releases)
        .map_err(io(releases))?;
    copy_tree(content, &tmp.path().join("content"), &listing)?;
    if let Some(bytes) = &manifest_bytes {
        let m = tmp.path().join("manifest.json");
        std::fs::write(&m, bytes).map_err(io(&m))?;
    }
    let staged = tmp.keep();
    if let Err(e) = std::fs::rename(&staged, &dir) {
        let _ = std::fs::remove_dir_all(&staged);
        // Someone imported the same release meanwhile: theirs is as good as ours.
        if !dir.is_dir() {
            return Err(io(&dir)(e));
        }
    }
    Ok(release)
}

/// The release `id` of the fleet whose releases live in `releases`.
pub fn find(releases: &Path, id: &str) -> Result<Release, ReleaseError> {
    let dir = releases.join(id);
    if !dir.join("content").is_dir() {
        return Err(ReleaseError::Missing(id.to_owned()));
    }
    let version = version_from_root(&dir.join("content"));
    Ok(Release {
        id: id.to_owned(),
        dir,
        version,
    })
}

/// Copies the files `listing` names from `from` into `to`.
pub fn copy_tree(from: &Path, to: &Path, listing: &Manifest) -> Result<(), ReleaseError> {
    for f in &listing.files {
        let dst = to.join(&f.path);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ReleaseError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::copy(from.join(&f.path), &dst).map_err(|source| ReleaseError::Io {
            path: dst.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Copies a release's content into an instance's own directory.
pub fn copy_content(release: &Release, to: &Path) -> Result<(), ReleaseError> {
    let content = release.content();
    let listing =
        Manifest::from_dir(&content, &release.version).map_err(|e| ReleaseError::Content {
            path: content.clone(),
            message: e.to_string(),
        })?;
    copy_tree(&content, to, &listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_content_addressed_and_idempotent() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("version.txt"), "v1\n").unwrap();
        std::fs::create_dir(src.path().join("css")).unwrap();
        std::fs::write(src.path().join("css/a.css"), "body{}").unwrap();
        let store = tempfile::tempdir().unwrap();
        let a = import(store.path(), src.path(), None).unwrap();
        assert_eq!(a.version, "v1");
        assert_eq!(import(store.path(), src.path(), None).unwrap(), a);
        assert_eq!(
            std::fs::read_to_string(a.content().join("css/a.css")).unwrap(),
            "body{}"
        );
        assert_eq!(a.manifest(), None);
        // A changed byte is a new release; the old one stays as it was.
        std::fs::write(src.path().join("version.txt"), "v2\n").unwrap();
        let b = import(store.path(), src.path(), None).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(find(store.path(), &a.id).unwrap().version, "v1");
        assert!(matches!(
            find(store.path(), "rel-nope"),
            Err(ReleaseError::Missing(_))
        ));
        // Only complete releases are left behind.
        let names: Vec<String> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("rel-")), "{names:?}");
    }

    #[test]
    fn bad_input_names_the_flag() {
        let store = tempfile::tempdir().unwrap();
        let e = import(store.path(), Path::new("/nonexistent/site"), None).unwrap_err();
        assert!(
            e.to_string().starts_with("--content /nonexistent/site"),
            "{e}"
        );
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("index.html"), "hi").unwrap();
        let bad = src.path().join("m.json");
        std::fs::write(&bad, "not json").unwrap();
        let e = import(store.path(), src.path(), Some(&bad)).unwrap_err();
        assert!(e.to_string().starts_with("--manifest"), "{e}");
    }
}
