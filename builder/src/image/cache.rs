//! Remembers the digest of image files already uploaded, keyed by what identifies the
//! file's bytes on this machine (device, inode, size, mtime). A second publish of the same
//! file can then find its AMI without reading a byte. Best effort: a miss only costs an
//! upload, after which the digest lookup still finds the existing AMI.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::debug;

/// Entries kept; older ones are dropped (a cache of a few hundred images is plenty).
const MAX_ENTRIES: usize = 256;

#[derive(Debug, Clone)]
pub struct DigestCache {
    path: PathBuf,
}

impl DigestCache {
    pub fn at(path: PathBuf) -> Self {
        DigestCache { path }
    }

    /// `$XDG_CACHE_HOME/amictl/digests.json`, else `~/.cache/amictl/digests.json`.
    pub fn default_location() -> Option<Self> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(Self::at(base.join("amictl/digests.json")))
    }

    pub fn get(&self, file: &Path) -> Option<String> {
        let key = key(file)?;
        self.load().remove(&key)
    }

    pub fn put(&self, file: &Path, digest: &str) {
        let Some(key) = key(file) else { return };
        let mut entries = self.load();
        entries.insert(key, digest.to_owned());
        while entries.len() > MAX_ENTRIES {
            let first = entries.keys().next().cloned().expect("non-empty");
            entries.remove(&first);
        }
        if let Err(e) = self.store(&entries) {
            debug!(error = %e, path = %self.path.display(), "cannot write the digest cache");
        }
    }

    fn load(&self) -> BTreeMap<String, String> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn store(&self, entries: &BTreeMap<String, String>) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&tmp, entries)?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn key(file: &Path) -> Option<String> {
    let m = std::fs::metadata(file).ok()?;
    Some(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::at(dir.path().join("c/digests.json"));
        let img = dir.path().join("img");
        std::fs::write(&img, b"one").unwrap();
        assert_eq!(cache.get(&img), None);
        cache.put(&img, "d1");
        assert_eq!(cache.get(&img).as_deref(), Some("d1"));
        std::fs::write(&img, b"two!").unwrap();
        assert_eq!(cache.get(&img), None);
    }
}
