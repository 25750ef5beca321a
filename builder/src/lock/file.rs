//! The local fleet's lease: a file in the fleet's directory, its preconditions checked
//! under an exclusive flock of a file beside it, its replacements atomic (rename). The
//! ETag is the content's SHA-256. Every holder runs on this machine, so a holder whose
//! process is gone holds nothing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use rustix::fs::{flock, FlockOperation};
use sha2::{Digest, Sha256};

use super::{LeaseStore, StoreError};

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// The lease at `path` (its directory must exist).
    pub fn new(path: PathBuf) -> FileStore {
        FileStore { path }
    }

    /// Holds the exclusive flock while `f` runs: the preconditions and the write are one
    /// step for every amictl on this machine.
    fn locked<T>(
        &self,
        f: impl FnOnce(Option<(Vec<u8>, String)>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.path.with_extension("flock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&guard)
            .with_context(|| format!("opening {}", guard.display()))?;
        flock(&file, FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", guard.display()))?;
        let current = match std::fs::read(&self.path) {
            Ok(bytes) => {
                let tag = etag(&bytes);
                Some((bytes, tag))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("reading {}", self.path.display()))
                    .into())
            }
        };
        f(current)
    }

    fn write(&self, body: &[u8]) -> Result<String, StoreError> {
        let tmp = self.path.with_extension("tmp");
        let mut f: File =
            File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(body)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        Ok(etag(body))
    }
}

fn etag(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

impl LeaseStore for FileStore {
    async fn create(&self, body: Vec<u8>) -> Result<String, StoreError> {
        self.locked(|current| match current {
            Some(_) => Err(StoreError::Changed),
            None => self.write(&body),
        })
    }

    async fn read(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        self.locked(Ok)
    }

    async fn replace(&self, body: Vec<u8>, if_match: &str) -> Result<String, StoreError> {
        self.locked(|current| match current {
            None => Err(StoreError::Gone),
            Some((_, tag)) if tag != if_match => Err(StoreError::Changed),
            Some(_) => self.write(&body),
        })
    }

    async fn delete(&self, if_match: &str) -> Result<(), StoreError> {
        self.locked(|current| match current {
            None => Err(StoreError::Gone),
            Some((_, tag)) if tag != if_match => Err(StoreError::Changed),
            Some(_) => std::fs::remove_file(&self.path)
                .with_context(|| format!("removing {}", self.path.display()))
                .map_err(StoreError::from),
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn on_this_machine(&self) -> bool {
        true
    }
}
