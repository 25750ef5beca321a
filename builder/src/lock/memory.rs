//! A lease store in memory with S3's conditional-write semantics, for tests and the
//! simulated cloud: 412 when a precondition fails, 404 when `If-Match` names nothing, and,
//! what moto does not model, 409 ConditionalRequestConflict for writes that race (injected
//! with [`MemoryStore::conflict_next`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{LeaseStore, StoreError};

#[derive(Default)]
pub struct MemoryStore {
    object: Mutex<Option<(Vec<u8>, String)>>,
    conflicts: AtomicU32,
    /// Every write that happened, for tests: `create`, `replace`, `delete`.
    pub writes: Mutex<Vec<&'static str>>,
}

impl MemoryStore {
    /// The next `n` conditional writes fail with 409, as S3's do under a concurrent write.
    pub fn conflict_next(&self, n: u32) {
        self.conflicts.store(n, Ordering::SeqCst);
    }

    /// The object as it is, bypassing preconditions (another client's unconditional write).
    pub fn put(&self, body: &[u8]) {
        *self.object.lock().unwrap() = Some((body.to_vec(), etag(body)));
    }

    pub fn get(&self) -> Option<Vec<u8>> {
        self.object.lock().unwrap().as_ref().map(|(b, _)| b.clone())
    }

    /// Every call is a round trip: other tasks run meanwhile, so two clients' calls
    /// interleave as they do against S3.
    async fn round_trip(&self) {
        tokio::task::yield_now().await;
    }

    fn conflict(&self) -> bool {
        self.conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// `If-Match` as S3 judges it: 404 without an object, 412 for another ETag.
fn matches(object: Option<&(Vec<u8>, String)>, if_match: &str) -> Result<(), StoreError> {
    match object {
        None => Err(StoreError::Gone),
        Some((_, current)) if current != if_match => Err(StoreError::Changed),
        Some(_) => Ok(()),
    }
}

fn etag(body: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(body))[..32])
}

impl LeaseStore for MemoryStore {
    async fn create(&self, body: Vec<u8>) -> Result<String, StoreError> {
        self.round_trip().await;
        if self.conflict() {
            return Err(StoreError::Conflict);
        }
        let mut object = self.object.lock().unwrap();
        if object.is_some() {
            return Err(StoreError::Changed);
        }
        let tag = etag(&body);
        *object = Some((body, tag.clone()));
        self.writes.lock().unwrap().push("create");
        Ok(tag)
    }

    async fn read(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        self.round_trip().await;
        Ok(self.object.lock().unwrap().clone())
    }

    async fn replace(&self, body: Vec<u8>, if_match: &str) -> Result<String, StoreError> {
        self.round_trip().await;
        if self.conflict() {
            return Err(StoreError::Conflict);
        }
        let mut object = self.object.lock().unwrap();
        matches(object.as_ref(), if_match)?;
        let tag = etag(&body);
        *object = Some((body, tag.clone()));
        self.writes.lock().unwrap().push("replace");
        Ok(tag)
    }

    async fn delete(&self, if_match: &str) -> Result<(), StoreError> {
        self.round_trip().await;
        if self.conflict() {
            return Err(StoreError::Conflict);
        }
        let mut object = self.object.lock().unwrap();
        matches(object.as_ref(), if_match)?;
        *object = None;
        self.writes.lock().unwrap().push("delete");
        Ok(())
    }

    fn location(&self) -> String {
        "memory".into()
    }
}
