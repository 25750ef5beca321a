use std::sync::Arc;
use std::time::Duration;

use super::memory::MemoryStore;
use super::*;

fn holder(op: &str) -> Holder {
    Holder::here(op, Duration::from_secs(60))
}

/// A lease someone else wrote `age` seconds after its last renewal.
fn foreign(op: &str, renewed_ago: u64, ttl: u64) -> Vec<u8> {
    let now = crate::rollout::now_unix();
    let h = Holder {
        operation: op.into(),
        user: "bob".into(),
        host: "ci-runner-7".into(),
        pid: 4242,
        ci: Some("https://github.com/o/r/actions/runs/9".into()),
        since_unix: now - renewed_ago - 30,
        renewed_unix: now - renewed_ago,
        ttl_secs: ttl,
        nonce: "n".into(),
    };
    h.to_bytes()
}

#[tokio::test]
async fn one_holder_at_a_time_and_the_refusal_names_it() {
    let store = Arc::new(MemoryStore::default());
    let first = acquire(store.clone(), "web", holder("rollout r-1"), Takeover::Never)
        .await
        .unwrap();
    let err = acquire(store.clone(), "web", holder("rollout r-2"), Takeover::Never)
        .await
        .err()
        .expect("the second must be refused");
    let msg = err.to_string();
    assert!(matches!(err, LockError::Held { .. }), "{msg}");
    assert!(
        msg.contains("fleet web is locked by rollout r-1 by "),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("(pid {})", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("expires in"), "{msg}");
    assert!(msg.contains("--break-lock"), "{msg}");
    first.release().await.unwrap();
    assert_eq!(store.get(), None, "released means deleted");
    let again = acquire(store.clone(), "web", holder("rollout r-2"), Takeover::Never)
        .await
        .unwrap();
    again.release().await.unwrap();
}

#[tokio::test]
async fn a_concurrent_write_409_is_retried() {
    let store = Arc::new(MemoryStore::default());
    store.conflict_next(2);
    let lease = acquire(store.clone(), "web", holder("destroy"), Takeover::Never)
        .await
        .unwrap();
    assert_eq!(*store.writes.lock().unwrap(), ["create"]);
    lease.release().await.unwrap();
}

#[tokio::test]
async fn break_lock_waits_for_expiry_unless_told_now() {
    let store = Arc::new(MemoryStore::default());
    store.put(&foreign("rollout r-9", 10, 300));
    let live = acquire(store.clone(), "web", holder("up"), Takeover::IfExpired)
        .await
        .err()
        .expect("a live lease is not broken by --break-lock alone");
    let msg = live.to_string();
    assert!(msg.contains("rollout r-9 by bob@ci-runner-7 (pid 4242), CI run https://github.com/o/r/actions/runs/9"), "{msg}");
    assert!(msg.contains("--break-lock --yes"), "{msg}");

    let lease = acquire(store.clone(), "web", holder("up"), Takeover::Now)
        .await
        .unwrap();
    let now: Holder = serde_json::from_slice(&store.get().unwrap()).unwrap();
    assert_eq!(now.operation, "up");
    lease.release().await.unwrap();

    store.put(&foreign("rollout r-9", 400, 300));
    let expired = acquire(
        store.clone(),
        "web",
        holder("rollout r-10"),
        Takeover::Never,
    )
    .await
    .err()
    .expect("an expired lease still needs --break-lock");
    assert!(expired.to_string().contains("expired"), "{expired}");
    let lease = acquire(
        store.clone(),
        "web",
        holder("rollout r-10"),
        Takeover::IfExpired,
    )
    .await
    .unwrap();
    lease.release().await.unwrap();
}

#[tokio::test]
async fn of_two_breakers_one_wins() {
    let store = Arc::new(MemoryStore::default());
    store.put(&foreign("rollout r-9", 400, 300));
    let (a, b) = tokio::join!(
        acquire(
            store.clone(),
            "web",
            holder("rollout a"),
            Takeover::IfExpired
        ),
        acquire(
            store.clone(),
            "web",
            holder("rollout b"),
            Takeover::IfExpired
        ),
    );
    assert!(a.is_ok() != b.is_ok(), "exactly one takes it over");
    let loser = a.as_ref().err().or(b.as_ref().err()).unwrap().to_string();
    assert!(loser.contains("is locked by rollout "), "{loser}");
}

#[tokio::test]
async fn a_lease_that_is_not_amictls_is_named_not_overwritten() {
    let store = Arc::new(MemoryStore::default());
    store.put(b"terraform was here");
    let err = acquire(store.clone(), "web", holder("destroy"), Takeover::Now)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LockError::Foreign { .. }), "{err}");
    assert_eq!(store.get().unwrap(), b"terraform was here");
}

/// A fresh store and a 10 s lease on it (renewed every 2 s).
async fn ten_second_lease() -> (Arc<MemoryStore>, Lease<MemoryStore>) {
    let store = Arc::new(MemoryStore::default());
    let me = Holder::here("rollout r-1", Duration::from_secs(10));
    let lease = acquire(store.clone(), "web", me, Takeover::Never)
        .await
        .unwrap();
    (store, lease)
}

#[tokio::test(start_paused = true)]
async fn renewal_rewrites_the_lease_and_notices_a_takeover() {
    let (store, lease) = ten_second_lease().await;
    let first = store.get().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(store.writes.lock().unwrap().contains(&"replace"));
    assert_ne!(store.get().unwrap(), first, "renewed");
    assert!(!lease.is_lost());

    // Someone breaks it.
    store.put(&foreign("rollout r-2", 0, 300));
    tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the holder notices within a renewal interval");
    // Releasing a lost lease leaves the new holder's alone.
    lease.release().await.unwrap();
    let now: Holder = serde_json::from_slice(&store.get().unwrap()).unwrap();
    assert_eq!(now.operation, "rollout r-2");
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_in_its_lifetime_is_lost() {
    let (store, lease) = ten_second_lease().await;
    // Every renewal from now on meets a conflict, as if S3 were unreachable.
    store.conflict_next(u32::MAX);
    tokio::time::timeout(Duration::from_secs(15), lease.lost())
        .await
        .expect("lost once the lifetime passed without a renewal");
}

#[tokio::test]
async fn the_local_store_takes_over_from_a_dead_process_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(file::FileStore::new(dir.path().join("lease.json")));
    let lease = acquire(store.clone(), "web", holder("rollout r-1"), Takeover::Never)
        .await
        .unwrap();
    let err = acquire(store.clone(), "web", holder("rollout r-2"), Takeover::Never)
        .await
        .err()
        .expect("a live local holder is respected");
    assert!(err.to_string().contains("rollout r-1"), "{err}");
    lease.release().await.unwrap();
    assert!(!dir.path().join("lease.json").exists());

    // A holder killed with its lease in place: its pid is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let mut h = holder("rollout r-3");
    h.pid = dead;
    std::fs::write(dir.path().join("lease.json"), h.to_bytes()).unwrap();
    let lease = acquire(store.clone(), "web", holder("rollout r-4"), Takeover::Never)
        .await
        .expect("a dead local holder holds nothing");
    lease.release().await.unwrap();
}

#[test]
fn keys_keep_fleet_names_readable_and_safe() {
    assert_eq!(s3::key("web"), "amictl/locks/web.json");
    assert_eq!(s3::key("amictl-pr-7"), "amictl/locks/amictl-pr-7.json");
    assert_eq!(s3::key("a/../b c"), "amictl/locks/a%2F..%2Fb%20c.json");
}

/// A lease that exists when created and is gone when read, every time.
struct Flickering;

impl LeaseStore for Flickering {
    async fn create(&self, _: Vec<u8>) -> Result<String, StoreError> {
        Err(StoreError::Changed)
    }
    async fn read(&self) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        Ok(None)
    }
    async fn replace(&self, _: Vec<u8>, _: &str) -> Result<String, StoreError> {
        Err(StoreError::Gone)
    }
    async fn delete(&self, _: &str) -> Result<(), StoreError> {
        Err(StoreError::Gone)
    }
    fn location(&self) -> String {
        "flickering".into()
    }
}

#[tokio::test]
async fn a_lease_that_never_settles_is_an_error_not_a_hang() {
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        acquire(
            Arc::new(Flickering),
            "web",
            holder("rollout r-1"),
            Takeover::Never,
        ),
    )
    .await
    .expect("gives up")
    .err()
    .unwrap();
    assert!(err.to_string().contains("kept changing"), "{err}");
}
