//! The publish engine against an in-memory cloud with injected faults: what is uploaded,
//! and that every failure or interruption leaves nothing behind.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amictl::aws::AwsError;
use amictl::image::digest::digest_file;
use amictl::image::info::{Arch, BootMode, ImageSource};
use amictl::image::publish::{
    publish, AmiRecord, DirectUpload, ImageRegistry, Outcome, PublishError, PublishOptions,
    RegisterError, Services,
};
use amictl::image::register::RegisterSpec;
use amictl::image::upload::{SnapshotState, SnapshotStore, StartSpec, UploadOptions};
use bytes::Bytes;
use common::moto::sparse_image;
use indicatif::ProgressBar;
use tokio_util::sync::CancellationToken;

const BLOCK: u64 = 524_288;

#[derive(Default)]
struct Cloud {
    snapshots: BTreeMap<String, Snap>,
    amis: BTreeMap<String, AmiRecord>,
    next: u32,
    puts: u32,
}

struct Snap {
    blocks: BTreeMap<i32, Bytes>,
    completed: bool,
    encrypted: bool,
    tags: Vec<(String, String)>,
}

impl Snap {
    /// The first `size` bytes of a volume made from this snapshot, as EBS serves them. A
    /// block the snapshot holds reads as itself. One it does not hold reads as zeros on an
    /// unencrypted volume, and on an encrypted one as the decryption of zeros under the
    /// volume's key: bytes that look random (here a keyed hash of the block's index, `key`
    /// standing for the volume's data key).
    fn read_volume(&self, size: u64, encrypted: bool, key: u64) -> Vec<u8> {
        use sha2::Digest;
        let mut out = Vec::with_capacity(size as usize);
        for index in 0..size.div_ceil(BLOCK) {
            match self.blocks.get(&(index as i32)) {
                Some(data) => out.extend_from_slice(data),
                None if encrypted => {
                    for chunk in 0..BLOCK / 32 {
                        let mut h = sha2::Sha256::new();
                        h.update(key.to_le_bytes());
                        h.update(index.to_le_bytes());
                        h.update(chunk.to_le_bytes());
                        out.extend_from_slice(&h.finalize());
                    }
                }
                None => out.resize(out.len() + BLOCK as usize, 0),
            }
        }
        out.truncate(size as usize);
        out
    }
}

#[derive(Default, Clone)]
struct Faults {
    /// The first N puts answer "snapshot not found" (StartSnapshot's eventual consistency).
    not_found_puts: u32,
    /// Puts after this many fail for good.
    fail_puts_after: Option<u32>,
    /// Cancel this token at the Nth put.
    cancel_at_put: Option<(u32, CancellationToken)>,
    register_fails: bool,
    never_available: bool,
    /// Runs at the Nth put: a writer touching the image while it is uploaded.
    meddle_at_put: Option<(u32, Arc<dyn Fn() + Send + Sync>)>,
}

#[derive(Clone, Default)]
struct Fake {
    cloud: Arc<Mutex<Cloud>>,
    faults: Arc<Mutex<Faults>>,
}

impl Fake {
    fn with(faults: Faults) -> Self {
        Fake {
            faults: Arc::new(Mutex::new(faults)),
            ..Default::default()
        }
    }
}

impl SnapshotStore for Fake {
    async fn start(&self, spec: &StartSpec) -> Result<String, AwsError> {
        let mut c = self.cloud.lock().unwrap();
        c.next += 1;
        let id = format!("snap-{}", c.next);
        c.snapshots.insert(
            id.clone(),
            Snap {
                blocks: BTreeMap::new(),
                completed: false,
                encrypted: spec.encrypted,
                tags: spec.tags.clone(),
            },
        );
        Ok(id)
    }

    async fn put_block(
        &self,
        id: &str,
        index: i32,
        data: Bytes,
        checksum: String,
    ) -> Result<(), AwsError> {
        tokio::task::yield_now().await;
        let n = {
            let mut c = self.cloud.lock().unwrap();
            c.puts += 1;
            c.puts
        };
        let faults = self.faults.lock().unwrap().clone();
        if let Some((at, token)) = &faults.cancel_at_put {
            if n == *at {
                token.cancel();
            }
        }
        if let Some((at, meddle)) = &faults.meddle_at_put {
            if n == *at {
                meddle();
            }
        }
        if n <= faults.not_found_puts {
            return Err(AwsError::NotFound(format!("snapshot {id} not found")));
        }
        if faults.fail_puts_after.is_some_and(|after| n > after) {
            return Err(AwsError::Other {
                action: "ebs:PutSnapshotBlock",
                message: "connection refused".into(),
            });
        }
        use base64::Engine;
        use sha2::Digest;
        assert_eq!(data.len() as u64, BLOCK, "blocks are always 512 KiB");
        let sum = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&data));
        assert_eq!(sum, checksum, "checksum of block {index}");
        let mut c = self.cloud.lock().unwrap();
        let snap = c
            .snapshots
            .get_mut(id)
            .ok_or_else(|| AwsError::NotFound(id.into()))?;
        assert!(!snap.completed, "put after completion");
        snap.blocks.insert(index, data);
        Ok(())
    }

    async fn complete(&self, id: &str, changed: i32, _linear: String) -> Result<(), AwsError> {
        let mut c = self.cloud.lock().unwrap();
        let snap = c.snapshots.get_mut(id).unwrap();
        assert_eq!(snap.blocks.len() as i32, changed, "ChangedBlocksCount");
        snap.completed = true;
        Ok(())
    }

    async fn state(&self, id: &str) -> Result<SnapshotState, AwsError> {
        let c = self.cloud.lock().unwrap();
        Ok(match c.snapshots.get(id) {
            Some(s) if s.completed => SnapshotState::Completed,
            Some(_) => SnapshotState::Pending,
            None => SnapshotState::Missing,
        })
    }

    async fn delete(&self, id: &str) -> Result<(), AwsError> {
        self.cloud.lock().unwrap().snapshots.remove(id);
        Ok(())
    }
}

impl ImageRegistry for Fake {
    async fn find(&self, tags: &[(&str, &str)]) -> Result<Vec<AmiRecord>, AwsError> {
        let c = self.cloud.lock().unwrap();
        Ok(c.amis
            .values()
            .filter(|a| tags.iter().all(|(k, v)| a.tag(k) == Some(*v)))
            .cloned()
            .collect())
    }
    async fn find_by_name(&self, name: &str) -> Result<Option<AmiRecord>, AwsError> {
        Ok(self
            .cloud
            .lock()
            .unwrap()
            .amis
            .values()
            .find(|a| a.name == name)
            .cloned())
    }
    async fn get(&self, id: &str) -> Result<Option<AmiRecord>, AwsError> {
        Ok(self.cloud.lock().unwrap().amis.get(id).cloned())
    }
    async fn register(&self, spec: &RegisterSpec) -> Result<String, RegisterError> {
        if self.faults.lock().unwrap().register_fails {
            return Err(RegisterError::Aws(AwsError::Denied {
                action: "ec2:RegisterImage",
                message: "not allowed".into(),
            }));
        }
        let never = self.faults.lock().unwrap().never_available;
        let mut c = self.cloud.lock().unwrap();
        if c.amis.values().any(|a| a.name == spec.name) {
            return Err(RegisterError::DuplicateName(spec.name.clone()));
        }
        c.next += 1;
        let id = format!("ami-{}", c.next);
        let created = format!("{:05}", c.next);
        c.amis.insert(
            id.clone(),
            AmiRecord {
                id: id.clone(),
                name: spec.name.clone(),
                state: if never {
                    "pending".into()
                } else {
                    "available".into()
                },
                tags: Vec::new(),
                snapshot_ids: vec![spec.snapshot_id.clone()],
                created,
                public: false,
            },
        );
        Ok(id)
    }
    async fn tag(&self, ids: &[String], tags: &[(String, String)]) -> Result<(), AwsError> {
        let mut c = self.cloud.lock().unwrap();
        for id in ids {
            if let Some(a) = c.amis.get_mut(id) {
                a.tags.extend(tags.iter().cloned());
            }
            if let Some(snap) = c.snapshots.get_mut(id) {
                snap.tags.extend(tags.iter().cloned());
            }
        }
        Ok(())
    }
    async fn deregister(&self, id: &str) -> Result<(), AwsError> {
        self.cloud.lock().unwrap().amis.remove(id);
        Ok(())
    }
}

fn options() -> PublishOptions {
    PublishOptions {
        prefix: "t-".into(),
        tpm_v2: false,
        keep_on_failure: false,
        omit_zero_blocks: false,
        available_deadline: Duration::from_secs(3),
    }
}

fn upload_options(encrypted: bool) -> UploadOptions {
    UploadOptions {
        concurrency: 8,
        encrypted,
        omit_zero_blocks: false,
        not_found_grace: Duration::from_secs(20),
        completion_deadline: Duration::from_secs(5),
        ..UploadOptions::default()
    }
}

async fn run(
    fake: &Fake,
    image: &ImageSource,
    upload: UploadOptions,
    opts: PublishOptions,
    cancel: &CancellationToken,
) -> Result<Outcome, PublishError> {
    let uploader = DirectUpload {
        store: Arc::new(fake.clone()),
        options: upload,
    };
    let services = Services {
        store: Arc::new(fake.clone()),
        registry: fake,
        uploader: &uploader,
        cache: None,
    };
    publish(&services, image, &opts, &ProgressBar::hidden(), cancel).await
}

/// `run` with the default options and nothing cancelling it.
async fn run_plain(fake: &Fake, image: &ImageSource) -> Result<Outcome, PublishError> {
    run(
        fake,
        image,
        upload_options(false),
        options(),
        &CancellationToken::new(),
    )
    .await
}

/// `run` with `--omit-zero-blocks`, which succeeds.
async fn run_sparse(fake: &Fake, image: &ImageSource) -> Outcome {
    let upload = UploadOptions {
        omit_zero_blocks: true,
        ..upload_options(false)
    };
    let opts = PublishOptions {
        omit_zero_blocks: true,
        ..options()
    };
    run(fake, image, upload, opts, &CancellationToken::new())
        .await
        .unwrap()
}

/// 12 blocks + 7 bytes: data in blocks 0, 3-4 and the short last block; 8 is written zeros.
fn image(dir: &std::path::Path) -> ImageSource {
    let path = dir.join("disk.raw");
    sparse_image(
        &path,
        12 * BLOCK + 7,
        &[(10, 100), (4 * BLOCK - 5, 10), (12 * BLOCK, 7)],
    );
    use std::os::unix::fs::FileExt;
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&vec![0u8; BLOCK as usize], 8 * BLOCK)
        .unwrap();
    ImageSource::from_file(&path, BootMode::Uefi, Arch::X86_64, "l".into(), None).unwrap()
}

#[tokio::test]
async fn uploads_every_block_by_default_and_rides_out_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::with(Faults {
        not_found_puts: 3,
        ..Default::default()
    });
    let outcome = run_plain(&fake, &img).await.unwrap();
    let Outcome::Created { ami_id, uploaded } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(uploaded.digest, digest_file(&img.path).unwrap());
    assert_eq!((uploaded.blocks_total, uploaded.blocks_uploaded), (13, 13));
    // Holes are sent without being read: only the blocks with data were.
    assert_eq!(uploaded.bytes_read, 4 * BLOCK + 7);
    let c = fake.cloud.lock().unwrap();
    let snap = &c.snapshots[&uploaded.snapshot_id];
    assert_eq!(
        snap.blocks.keys().copied().collect::<Vec<_>>(),
        (0..13).collect::<Vec<_>>()
    );
    // The short last block is padded with zeros.
    assert_eq!(&snap.blocks[&12][7..], &vec![0u8; BLOCK as usize - 7][..]);
    assert!(!snap.encrypted);
    assert!(!c.amis[&ami_id].sparse());
    assert!(c.amis[&ami_id]
        .tag("amictl:image-digest")
        .unwrap()
        .ends_with(&uploaded.digest));
}

/// The property that matters: a volume made from the snapshot reads back the image,
/// byte for byte, whether it is encrypted (as amictl launches them) or not.
#[tokio::test]
async fn a_volume_from_the_snapshot_reads_back_the_image_encrypted_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let bytes = std::fs::read(&img.path).unwrap();
    // One reader thread, and blocks striped over three (13 blocks: uneven shares).
    for readers in [1, 3] {
        let fake = Fake::default();
        let upload = UploadOptions {
            readers,
            ..upload_options(false)
        };
        let outcome = run(&fake, &img, upload, options(), &CancellationToken::new()).await;
        let Outcome::Created { uploaded, .. } = outcome.unwrap() else {
            panic!()
        };
        assert_eq!(uploaded.digest, digest_file(&img.path).unwrap());
        assert_eq!(uploaded.bytes_read, 4 * BLOCK + 7, "{readers} readers");
        let c = fake.cloud.lock().unwrap();
        let snap = &c.snapshots[&uploaded.snapshot_id];
        for (encrypted, key) in [(true, 7), (true, 8), (false, 0)] {
            let volume = snap.read_volume(img.size, encrypted, key);
            let first_bad = volume.iter().zip(&bytes).position(|(a, b)| a != b);
            assert_eq!(
                first_bad,
                None,
                "{readers} readers: an {} volume differs from the image at byte {first_bad:?}",
                if encrypted {
                    "encrypted"
                } else {
                    "unencrypted"
                }
            );
        }
    }
}

/// `--omit-zero-blocks`: a sparse snapshot, tagged and named so, which reads back right
/// only unencrypted; the fake shows the corruption an encrypted launch would boot into.
#[tokio::test]
async fn omitting_zero_blocks_is_a_tagged_sparse_snapshot_wrong_on_encrypted_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::default();
    let outcome = run_sparse(&fake, &img).await;
    let Outcome::Created { ami_id, uploaded } = outcome else {
        panic!("{outcome:?}")
    };
    // The content address does not depend on what was left out.
    assert_eq!(uploaded.digest, digest_file(&img.path).unwrap());
    assert_eq!((uploaded.blocks_total, uploaded.blocks_uploaded), (13, 4));
    let bytes = std::fs::read(&img.path).unwrap();
    let c = fake.cloud.lock().unwrap();
    let snap = &c.snapshots[&uploaded.snapshot_id];
    assert_eq!(
        snap.blocks.keys().copied().collect::<Vec<_>>(),
        [0, 3, 4, 12]
    );
    let ami = &c.amis[&ami_id];
    assert!(ami.sparse() && ami.name.ends_with("-sparse"), "{ami:?}");
    assert!(snap
        .tags
        .contains(&("amictl:sparse".to_owned(), "true".to_owned())));
    assert!(snap.read_volume(img.size, false, 0) == bytes);
    assert!(snap.read_volume(img.size, true, 7) != bytes);
    let why = amictl::image::register::sparse_refusal(&ami_id, &ami.tags).unwrap();
    assert!(why.contains(&ami_id), "{why}");
}

/// A whole publish never takes a sparse AMI for its own, even of the same content; a
/// sparse one may take a whole one (it is safe everywhere).
#[tokio::test]
async fn a_whole_publish_never_reuses_a_sparse_ami() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::default();
    let first = run_sparse(&fake, &img).await;
    let whole = run_plain(&fake, &img).await.unwrap();
    assert!(matches!(whole, Outcome::Created { .. }), "{whole:?}");
    assert_ne!(first.ami_id(), whole.ami_id());
    assert!(!fake.cloud.lock().unwrap().amis[whole.ami_id()].sparse());
    // Now a sparse publish finds the whole AMI first, and a whole one finds itself.
    let again = run_sparse(&fake, &img).await;
    assert_eq!(again.ami_id(), whole.ami_id());
    assert_eq!(
        run_plain(&fake, &img).await.unwrap().ami_id(),
        whole.ami_id()
    );
}

#[tokio::test]
async fn encrypted_snapshots_get_every_block_zeros_included() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::default();
    let outcome = run(
        &fake,
        &img,
        upload_options(true),
        options(),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let Outcome::Created { uploaded, .. } = outcome else {
        panic!()
    };
    assert_eq!(uploaded.blocks_uploaded, 13);
    // Encryption changes what is uploaded, never the content address.
    assert_eq!(uploaded.digest, digest_file(&img.path).unwrap());
    let c = fake.cloud.lock().unwrap();
    assert!(c.snapshots[&uploaded.snapshot_id].encrypted);
    assert_eq!(c.snapshots[&uploaded.snapshot_id].blocks.len(), 13);
}

#[tokio::test]
async fn same_content_twice_gives_the_same_ami_and_leaves_no_extra_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::default();
    let first = run_plain(&fake, &img).await.unwrap();
    let second = run_plain(&fake, &img).await.unwrap();
    assert_eq!(first.ami_id(), second.ami_id());
    assert!(matches!(second, Outcome::Existing { uploaded: true, .. }));
    let c = fake.cloud.lock().unwrap();
    assert_eq!((c.snapshots.len(), c.amis.len()), (1, 1));
}

async fn assert_nothing_left(fake: &Fake) {
    let c = fake.cloud.lock().unwrap();
    assert!(
        c.snapshots.is_empty(),
        "snapshots left: {:?}",
        c.snapshots.keys().collect::<Vec<_>>()
    );
    assert!(
        c.amis.is_empty(),
        "AMIs left: {:?}",
        c.amis.keys().collect::<Vec<_>>()
    );
}

/// A writer touching the image mid-upload: the publish fails, says so, and leaves nothing.
#[tokio::test]
async fn an_image_that_changes_while_it_is_uploaded_fails_and_leaves_nothing() {
    use std::os::unix::fs::FileExt;
    type Meddle = fn(&std::path::Path);
    let cases: [(&str, Meddle); 3] = [
        ("shrunk", |p| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_len(2 * BLOCK).unwrap();
        }),
        ("data written into a hole", |p| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.write_all_at(b"late", 6 * BLOCK).unwrap();
        }),
        ("a data block rewritten", |p| {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.write_all_at(b"late", 10).unwrap();
        }),
    ];
    for ((what, meddle), readers) in cases.into_iter().flat_map(|c| [(c, 1), (c, 3)]) {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let path = img.path.clone();
        let fake = Fake::with(Faults {
            meddle_at_put: Some((1, Arc::new(move || meddle(&path)))),
            ..Default::default()
        });
        let upload = UploadOptions {
            readers,
            ..upload_options(false)
        };
        let err = run(&fake, &img, upload, options(), &CancellationToken::new())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("changed while it was uploaded") && text.contains("deleted snapshot"),
            "{what}, {readers} readers: {text}"
        );
        assert_nothing_left(&fake).await;
    }
}

#[tokio::test]
async fn a_failing_upload_deletes_the_partial_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::with(Faults {
        fail_puts_after: Some(2),
        ..Default::default()
    });
    let err = run_plain(&fake, &img).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("connection refused") && text.contains("deleted snapshot snap-1"),
        "{text}"
    );
    assert_nothing_left(&fake).await;
}

#[tokio::test]
async fn keep_on_failure_keeps_it_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::with(Faults {
        fail_puts_after: Some(1),
        ..Default::default()
    });
    let opts = PublishOptions {
        keep_on_failure: true,
        ..options()
    };
    let err = run(
        &fake,
        &img,
        upload_options(false),
        opts,
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("kept snapshot snap-1"), "{err}");
    assert_eq!(fake.cloud.lock().unwrap().snapshots.len(), 1);
}

#[tokio::test]
async fn ctrl_c_mid_upload_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let cancel = CancellationToken::new();
    let fake = Fake::with(Faults {
        cancel_at_put: Some((2, cancel.clone())),
        ..Default::default()
    });
    let err = run(&fake, &img, upload_options(false), options(), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Interrupted { .. }), "{err}");
    assert_nothing_left(&fake).await;
}

#[tokio::test]
async fn a_failed_registration_deletes_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::with(Faults {
        register_fails: true,
        ..Default::default()
    });
    let err = run_plain(&fake, &img).await.unwrap_err();
    assert!(err.to_string().contains("ec2:RegisterImage"), "{err}");
    assert_nothing_left(&fake).await;
}

#[tokio::test]
async fn an_ami_that_never_becomes_available_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::with(Faults {
        never_available: true,
        ..Default::default()
    });
    let err = run_plain(&fake, &img).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("did not become available") && text.contains("deregistered AMI"),
        "{text}"
    );
    assert_nothing_left(&fake).await;
}

#[tokio::test]
async fn a_name_taken_by_other_content_is_refused_without_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let fake = Fake::default();
    run_plain(&fake, &img).await.unwrap();
    // Someone else's AMI with our name but another digest.
    {
        let mut c = fake.cloud.lock().unwrap();
        let ami = c.amis.values_mut().next().unwrap();
        ami.tags.retain(|(k, _)| k != "amictl:image-digest");
        ami.tags.push((
            "amictl:image-digest".into(),
            "sha256-blocks-512k:other".into(),
        ));
    }
    let err = run_plain(&fake, &img).await.unwrap_err();
    assert!(matches!(err, PublishError::NameTaken { .. }), "{err}");
    assert_eq!(
        fake.cloud.lock().unwrap().snapshots.len(),
        1,
        "the new snapshot was not deleted"
    );
}
