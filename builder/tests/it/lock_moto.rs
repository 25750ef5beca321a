//! The fleet lock in S3, against moto: the conditional writes amictl's lease makes
//! (`If-None-Match: *`, `If-Match` on PutObject and DeleteObject) as S3 answers them, and
//! `amictl destroy` refusing a fleet another run holds, naming the holder, until told to
//! break the lock. (S3's 409 for racing writes, which moto does not model, is covered by
//! the in-memory store's tests.)

use crate::common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use amictl::lock::s3::{key, S3Store};
use amictl::lock::{acquire, Holder, LeaseStore, LockError, StoreError, Takeover};
use common::moto::{output, Moto};

const BUCKET: &str = "amictl-import-123456789012-us-east-1";

fn someone_else(renewed_ago: u64) -> Vec<u8> {
    let now = amictl::rollout::now_unix();
    serde_json::to_vec(&Holder {
        operation: "rollout of fleet web to ami-0123".into(),
        user: "bob".into(),
        host: "ci-runner-7".into(),
        pid: 4242,
        ci: None,
        since_unix: now - renewed_ago - 60,
        renewed_unix: now - renewed_ago,
        ttl_secs: 300,
        nonce: "x".into(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lease_is_made_renewed_and_released_with_s3_preconditions() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let s3 = aws_sdk_s3::Client::new(&config);
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();

    // The store's own calls, as S3 answers them.
    let store = S3Store::new(&config, BUCKET, "web");
    assert_eq!(
        store.location(),
        format!("s3://{BUCKET}/amictl/locks/web.json")
    );
    let etag = store.create(b"{\"a\":1}".to_vec()).await.unwrap();
    assert!(matches!(
        store.create(b"{}".to_vec()).await,
        Err(StoreError::Changed)
    ));
    assert!(matches!(
        store.replace(b"{}".to_vec(), "\"nope\"").await,
        Err(StoreError::Changed)
    ));
    let etag2 = store.replace(b"{\"a\":2}".to_vec(), &etag).await.unwrap();
    assert_ne!(etag, etag2);
    assert!(
        matches!(store.delete(&etag).await, Err(StoreError::Changed)),
        "a stale ETag deletes nothing"
    );
    let (body, now) = store.read().await.unwrap().unwrap();
    assert_eq!(
        (body.as_slice(), now.as_str()),
        (&b"{\"a\":2}"[..], etag2.as_str())
    );
    store.delete(&etag2).await.unwrap();
    assert!(store.read().await.unwrap().is_none());
    assert!(matches!(
        store.replace(b"{}".to_vec(), &etag2).await,
        Err(StoreError::Gone)
    ));

    // The lease through them.
    let store = Arc::new(S3Store::new(&config, BUCKET, "web"));
    let lease = acquire(
        store.clone(),
        "web",
        Holder::here("rollout of fleet web to ami-1", Duration::from_secs(60)),
        Takeover::Never,
    )
    .await
    .unwrap();
    let err = acquire(
        store.clone(),
        "web",
        Holder::here("destroy of fleet web", Duration::from_secs(60)),
        Takeover::IfExpired,
    )
    .await
    .err()
    .expect("held");
    assert!(matches!(err, LockError::Held { .. }), "{err}");
    assert!(
        err.to_string().contains("rollout of fleet web to ami-1"),
        "{err}"
    );
    lease.release().await.unwrap();
    let gone = s3.get_object().bucket(BUCKET).key(key("web")).send().await;
    assert!(gone.is_err(), "released means deleted");
}

fn destroy(moto: &Moto, state: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let (code, _, stderr) = output(
        moto.amictl()
            .env("XDG_STATE_HOME", state)
            .args([
                "destroy",
                "--fleet",
                "web",
                "--yes",
                "--lock-bucket",
                BUCKET,
            ])
            .args(extra)
            .stdin(Stdio::null()),
    );
    (code, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_waits_for_the_holder_and_breaks_only_when_told() {
    let Some(moto) = Moto::start() else { return };
    let s3 = aws_sdk_s3::Client::new(&moto.sdk_config().await);
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    let put = |body: Vec<u8>| {
        s3.put_object()
            .bucket(BUCKET)
            .key(key("web"))
            .body(body.into())
            .send()
    };
    put(someone_else(10)).await.unwrap();
    let state = tempfile::tempdir().unwrap();

    let (code, stderr) = destroy(&moto, state.path(), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "fleet web is locked by rollout of fleet web to ami-0123 by bob@ci-runner-7 (pid 4242)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("--break-lock"), "{stderr}");
    assert!(
        !stderr.contains("no instances"),
        "nothing was looked at: {stderr}"
    );

    // Expired: --break-lock takes it over without asking, and lets it go at the end.
    put(someone_else(900)).await.unwrap();
    let (code, stderr) = destroy(&moto, state.path(), &["--break-lock"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("taking the lock over"), "{stderr}");
    assert!(stderr.contains("no instances"), "{stderr}");
    assert!(
        s3.get_object()
            .bucket(BUCKET)
            .key(key("web"))
            .send()
            .await
            .is_err(),
        "released"
    );

    // Live: --break-lock with --yes (no terminal to confirm on) takes it at once.
    put(someone_else(10)).await.unwrap();
    let (code, stderr) = destroy(&moto, state.path(), &["--break-lock"]);
    assert_eq!(code, 0, "--yes confirms: {stderr}");
}
