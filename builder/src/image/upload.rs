//! The upload engine: a reader thread walks the image block by block, hashes each block
//! right after reading it and hands it to upload workers that put it (see `plan` for why
//! zero blocks go too). The hash is taken while the block is still in the CPU's cache: a
//! worker would take it up to a queue's depth later, from memory, and SHA-256 over cold
//! 512 KiB blocks measured 0.90 s/GiB against 0.54 s/GiB hot. With SHA extensions (SHA-NI,
//! ARMv8 SHA2) one thread hashes at about 2 GB/s, well above what the EBS direct APIs take
//! (about 500 MB/s at 100 connections); without them `sha2` manages about 0.4 GB/s, near
//! that rate. So the blocks are striped over a few reader threads (block i goes to reader
//! i mod n), each hashing what it has just read: the hash stays in cache and still runs on
//! several cores. Holes are never read nor hashed: they go as one shared zero buffer with
//! its precomputed checksum. The store is a trait, so the engine is tested against an
//! in-memory fake and runs against EBS direct APIs.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use indicatif::ProgressBar;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::aws::AwsError;

use super::buffers::BlockPool;
use super::digest::{block_digest, image_digest, linear_checksum, zero_block_digest, BlockDigest};
pub use super::error::UploadError;
use super::info::ImageSource;
use super::plan::{is_zero, must_upload, plan, Planned, BLOCK_SIZE};

/// What StartSnapshot needs.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub volume_size_gib: i32,
    pub description: String,
    pub tags: Vec<(String, String)>,
    /// Makes a retried StartSnapshot return the same snapshot instead of a second one.
    pub client_token: String,
    pub encrypted: bool,
    pub kms_key_arn: Option<String>,
    /// Minutes AWS keeps a pending snapshot before it gives up on it.
    pub timeout_minutes: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotState {
    Pending,
    Completed,
    Error(String),
    Missing,
}

/// The EBS direct APIs (and EC2's snapshot calls) the upload needs.
pub trait SnapshotStore: Send + Sync + 'static {
    fn start(&self, spec: &StartSpec) -> impl Future<Output = Result<String, AwsError>> + Send;
    fn put_block(
        &self,
        snapshot_id: &str,
        index: i32,
        data: Bytes,
        checksum_b64: String,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    fn complete(
        &self,
        snapshot_id: &str,
        changed_blocks: i32,
        linear_b64: String,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    fn state(
        &self,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<SnapshotState, AwsError>> + Send;
    fn delete(&self, snapshot_id: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
}

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub concurrency: usize,
    /// Threads that read and hash blocks (see the module's comment); at least one.
    pub readers: usize,
    pub encrypted: bool,
    /// Leave all-zero blocks out of the snapshot (a sparse snapshot). Only for snapshots
    /// whose volumes are never encrypted: see `plan`. The caller refuses it otherwise.
    pub omit_zero_blocks: bool,
    pub kms_key_arn: Option<String>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    pub client_token: String,
    pub snapshot_timeout_minutes: i32,
    /// How long a block put may keep failing with "snapshot not found" right after
    /// StartSnapshot (awslabs/coldsnap #43 saw up to about two minutes).
    pub not_found_grace: Duration,
    /// How long to wait for the snapshot to become `completed` after CompleteSnapshot.
    pub completion_deadline: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            // AWS's guidance: ~100 connections at 100 ms latency reach ~500 MB/s; 64 keeps a
            // laptop's uplink full without exhausting file descriptors.
            concurrency: 64,
            readers: default_readers(),
            encrypted: false,
            omit_zero_blocks: false,
            kms_key_arn: None,
            description: String::new(),
            tags: Vec::new(),
            client_token: String::new(),
            snapshot_timeout_minutes: 60,
            not_found_grace: Duration::from_secs(120),
            completion_deadline: Duration::from_secs(30 * 60),
        }
    }
}

/// Readers beyond four add nothing: four hash faster than the EBS direct APIs take bytes,
/// even without SHA extensions.
const MAX_READERS: usize = 4;

/// One reader per CPU this process may run on, up to [`MAX_READERS`].
pub fn default_readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_READERS))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub snapshot_id: String,
    /// The image's content address (see `digest`).
    pub digest: String,
    pub blocks_total: u64,
    pub blocks_uploaded: u64,
    pub bytes_read: u64,
}

/// How the image's bytes become a completed snapshot: EBS direct APIs, or S3 and
/// ImportSnapshot. Either way the image's digest is computed in the same pass.
pub trait Uploader: Send + Sync {
    /// Uploads; writes the snapshot's id to `started` as soon as it exists, so the caller
    /// can delete it whatever happens next.
    fn upload(
        &self,
        image: &ImageSource,
        progress: &ProgressBar,
        cancel: &CancellationToken,
        started: &mut Option<String>,
    ) -> impl Future<Output = Result<Uploaded, UploadError>> + Send;
}

struct Job {
    index: u64,
    /// Always BLOCK_SIZE bytes: the last block is padded with zeros.
    data: Bytes,
    /// Logical bytes of the image in this block (for progress).
    len: u64,
    digest: BlockDigest,
}

/// Uploads `image` into a new snapshot. The snapshot's id is written to `started` as soon
/// as it exists, so the caller can delete it whatever happens next.
pub async fn upload<S: SnapshotStore>(
    store: Arc<S>,
    image: &ImageSource,
    opts: &UploadOptions,
    progress: &ProgressBar,
    cancel: &CancellationToken,
    started: &mut Option<String>,
) -> Result<Uploaded, UploadError> {
    let file = std::fs::File::open(&image.path).map_err(|source| UploadError::Read {
        path: image.path.clone(),
        source,
    })?;
    let spec = StartSpec {
        volume_size_gib: image.volume_size_gib(),
        description: opts.description.clone(),
        tags: opts.tags.clone(),
        client_token: opts.client_token.clone(),
        encrypted: opts.encrypted,
        kms_key_arn: opts.kms_key_arn.clone(),
        timeout_minutes: opts.snapshot_timeout_minutes,
    };
    let snapshot_id = tokio::select! {
        r = store.start(&spec) => r.map_err(UploadError::Start)?,
        _ = cancel.cancelled() => return Err(UploadError::Interrupted),
    };
    *started = Some(snapshot_id.clone());
    info!(%snapshot_id, size = image.size, "snapshot started");

    let (tx, rx) = mpsc::channel::<Job>(opts.concurrency.max(1));
    let size = image.size;
    // An encrypted snapshot never omits a block, whatever the caller asked.
    let omit = opts.omit_zero_blocks && !opts.encrypted;
    let reader_progress = progress.clone();
    let checked = file.try_clone().map_err(|source| UploadError::Read {
        path: image.path.clone(),
        source,
    })?;
    // Enough buffers for every job queued and in flight, so steady state allocates nothing.
    let pool = BlockPool::new(BLOCK_SIZE as usize, 2 * opts.concurrency.max(1) + 2);
    let readers = opts.readers.max(1);
    let reader = std::thread::spawn(move || {
        read_blocks(&file, size, omit, readers, &pool, tx, &reader_progress)
    });

    let stop = cancel.child_token();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        workers.spawn(worker(
            store.clone(),
            snapshot_id.clone(),
            rx.clone(),
            stop.clone(),
            progress.clone(),
            opts.not_found_grace,
        ));
    }
    let mut digests = BTreeMap::new();
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(done)) => digests.extend(done),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                stop.cancel();
            }
            Err(e) => {
                failure.get_or_insert(UploadError::Put {
                    snapshot_id: snapshot_id.clone(),
                    index: 0,
                    source: AwsError::Other {
                        action: "upload",
                        message: format!("upload worker failed: {e}"),
                    },
                });
                stop.cancel();
            }
        }
    }
    // The workers are gone, so the readers' sends fail and they stop.
    drop(rx);
    let read = reader.join().expect("the reader threads do not panic");
    if cancel.is_cancelled() {
        return Err(UploadError::Interrupted);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let read = read.map_err(|e| match e {
        ReadError::Io(source) => UploadError::Read {
            path: image.path.clone(),
            source,
        },
        ReadError::Changed(what) => UploadError::Changed {
            path: image.path.clone(),
            what,
        },
    })?;
    let blocks_total = read.blocks;
    let bytes_read = read.bytes_read;
    // Holes were taken on trust from the hole map and blocks were read at different
    // times: the file must still be what it was when the reading began (size, hole map,
    // mtime), or the snapshot may hold a mix of two images.
    let now = fingerprint(&checked, size).map_err(|source| UploadError::Read {
        path: image.path.clone(),
        source,
    })?;
    if let Some(what) = read.before.changed(&now) {
        return Err(UploadError::Changed {
            path: image.path.clone(),
            what,
        });
    }

    // Every block the plan sent must be in the snapshot, and by default that is every
    // block of the image: CompleteSnapshot would otherwise seal a snapshot that is not it.
    let uploaded = digests.len() as u64;
    let planned = if omit { read.sent } else { blocks_total };
    if uploaded != planned || read.sent != planned {
        return Err(UploadError::BlockCount {
            snapshot_id,
            planned,
            uploaded,
        });
    }
    let linear = linear_checksum(digests.values().copied());
    let digest = image_digest(
        size,
        (0..blocks_total).map(|i| digests.get(&i).copied().unwrap_or_else(zero_block_digest)),
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    tokio::select! {
        r = store.complete(&snapshot_id, uploaded as i32, b64.encode(linear)) => r.map_err(|source| UploadError::Complete {
            snapshot_id: snapshot_id.clone(),
            source,
        })?,
        _ = cancel.cancelled() => return Err(UploadError::Interrupted),
    }
    info!(%snapshot_id, blocks = uploaded, "all blocks sent, waiting for the snapshot to complete");
    tokio::select! {
        r = wait_completed(&*store, &snapshot_id, opts.completion_deadline) => r?,
        _ = cancel.cancelled() => return Err(UploadError::Interrupted),
    }
    Ok(Uploaded {
        snapshot_id,
        digest,
        blocks_total,
        blocks_uploaded: uploaded,
        bytes_read,
    })
}

async fn worker<S: SnapshotStore>(
    store: Arc<S>,
    snapshot_id: String,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    stop: CancellationToken,
    progress: ProgressBar,
    not_found_grace: Duration,
) -> Result<Vec<(u64, BlockDigest)>, UploadError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut done = Vec::new();
    loop {
        let job = tokio::select! {
            job = async { rx.lock().await.recv().await } => job,
            _ = stop.cancelled() => return Ok(done),
        };
        let Some(job) = job else { return Ok(done) };
        let digest = job.digest;
        let index = i32::try_from(job.index).expect("EBS volumes have fewer than 2^31 blocks");
        let put = put_with_grace(
            &*store,
            &snapshot_id,
            index,
            job.data,
            b64.encode(digest),
            not_found_grace,
        );
        tokio::select! {
            r = put => r.map_err(|source| UploadError::Put {
                snapshot_id: snapshot_id.clone(),
                index: job.index,
                source,
            })?,
            _ = stop.cancelled() => return Ok(done),
        }
        progress.inc(job.len);
        done.push((job.index, digest));
    }
}

/// Puts one block, riding out the window in which a fresh snapshot is not yet visible.
/// Throttling and transient faults are retried below this, with the SDK's standard policy
/// (`blocks`).
async fn put_with_grace<S: SnapshotStore>(
    store: &S,
    snapshot_id: &str,
    index: i32,
    data: Bytes,
    checksum: String,
    grace: Duration,
) -> Result<(), AwsError> {
    let deadline = Instant::now() + grace;
    let mut delay = Duration::from_millis(250);
    loop {
        match store
            .put_block(snapshot_id, index, data.clone(), checksum.clone())
            .await
        {
            Err(AwsError::NotFound(msg)) if Instant::now() + delay < deadline => {
                debug!(index, %msg, "snapshot not visible yet, retrying");
                tokio::time::sleep(jitter(delay)).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            other => return other,
        }
    }
}

/// Polls until `completed`, backing off from 1 s to 15 s (DescribeSnapshots is rate
/// limited per account, and large snapshots take minutes).
pub async fn wait_completed<S: SnapshotStore>(
    store: &S,
    snapshot_id: &str,
    deadline: Duration,
) -> Result<(), UploadError> {
    let started = Instant::now();
    let mut delay = Duration::from_secs(1);
    loop {
        match store.state(snapshot_id).await {
            Ok(SnapshotState::Completed) => return Ok(()),
            Ok(SnapshotState::Error(message)) => {
                return Err(UploadError::Failed {
                    snapshot_id: snapshot_id.to_owned(),
                    message,
                })
            }
            // Pending, or not listed yet (EC2 is eventually consistent): keep waiting.
            Ok(state) => debug!(%snapshot_id, ?state, "waiting for the snapshot"),
            Err(e) => warn!(%snapshot_id, error = %e, "cannot read the snapshot's state, retrying"),
        }
        if started.elapsed() + delay > deadline {
            return Err(UploadError::CompletionTimeout {
                snapshot_id: snapshot_id.to_owned(),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(jitter(delay)).await;
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

/// Full jitter between half and all of `d`, so many clients do not retry in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// What the reader saw.
struct ReadSummary {
    /// The file when the reading began.
    before: Fingerprint,
    /// Blocks in the image.
    blocks: u64,
    /// Bytes actually read (holes are not).
    bytes_read: u64,
    /// Blocks handed to the workers.
    sent: u64,
}

enum ReadError {
    Io(io::Error),
    /// The file is not what it was when the upload started.
    Changed(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// What tells cheaply whether a file changed: size, modification time and hole map.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
    extents: Vec<Range<u64>>,
}

impl Fingerprint {
    /// How `now` differs from `self`, in words.
    fn changed(&self, now: &Fingerprint) -> Option<String> {
        if now.len != self.len {
            Some(format!(
                "{} bytes when the upload began, {} now",
                self.len, now.len
            ))
        } else if now.extents != self.extents {
            Some("its hole map moved".into())
        } else if now.modified != self.modified {
            Some("it was written to".into())
        } else {
            None
        }
    }
}

fn fingerprint(file: &std::fs::File, size: u64) -> io::Result<Fingerprint> {
    let meta = file.metadata()?;
    Ok(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        extents: data_extents(file, size.max(meta.len()))?,
    })
}

/// Reads the image and sends the blocks that must be uploaded: all of them, unless
/// `omit_zero_blocks`. Holes are sent as the shared zero buffer without reading. The blocks
/// are striped over `readers` threads. Fails if the file is not `size` bytes, or ends
/// early; the caller checks afterwards that nothing else changed.
fn read_blocks(
    file: &std::fs::File,
    size: u64,
    omit_zero_blocks: bool,
    readers: usize,
    pool: &Arc<BlockPool>,
    tx: mpsc::Sender<Job>,
    progress: &ProgressBar,
) -> Result<ReadSummary, ReadError> {
    let before = fingerprint(file, size)?;
    if before.len != size {
        return Err(ReadError::Changed(format!(
            "{size} bytes when planned, {} when the upload began",
            before.len
        )));
    }
    let blocks = plan(size, &before.extents);
    let stripe = Stripe {
        file,
        size,
        omit_zero_blocks,
        blocks: &blocks,
        every: readers.max(1),
        zeros: Bytes::from(vec![0u8; BLOCK_SIZE as usize]),
        pool,
        progress,
        stop: AtomicBool::new(false),
    };
    let results: Vec<Result<Read, ReadError>> = std::thread::scope(|scope| {
        let mut running = Vec::new();
        let mut here = vec![0];
        for first in 1..stripe.every {
            let (stripe, tx) = (&stripe, tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("reader-{first}"))
                .spawn_scoped(scope, move || stripe.read(first, &tx));
            match spawned {
                Ok(handle) => running.push(handle),
                // Out of threads: this one reads that share too, after its own.
                Err(_) => here.push(first),
            }
        }
        let mut results: Vec<_> = here.into_iter().map(|k| stripe.read(k, &tx)).collect();
        drop(tx);
        results.extend(
            running
                .into_iter()
                .map(|h| h.join().expect("a reader thread does not panic")),
        );
        results
    });
    let mut total = Read::default();
    for read in results {
        let read = read?;
        total.bytes_read += read.bytes_read;
        total.sent += read.sent;
    }
    Ok(ReadSummary {
        before,
        blocks: blocks.len() as u64,
        bytes_read: total.bytes_read,
        sent: total.sent,
    })
}

/// What the reader threads share: reader k takes blocks k, k + every, k + 2 every, ...
struct Stripe<'a> {
    file: &'a std::fs::File,
    size: u64,
    omit_zero_blocks: bool,
    blocks: &'a [Planned],
    every: usize,
    zeros: Bytes,
    pool: &'a Arc<BlockPool>,
    progress: &'a ProgressBar,
    /// Set by the first reader that fails, so the others stop too.
    stop: AtomicBool,
}

/// What one reader did.
#[derive(Default)]
struct Read {
    bytes_read: u64,
    sent: u64,
}

impl Stripe<'_> {
    fn read(&self, first: usize, tx: &mpsc::Sender<Job>) -> Result<Read, ReadError> {
        let result = self.read_inner(first, tx);
        if result.is_err() {
            self.stop.store(true, Ordering::Relaxed);
        }
        result
    }

    fn read_inner(&self, first: usize, tx: &mpsc::Sender<Job>) -> Result<Read, ReadError> {
        let mut done = Read::default();
        for planned in self.blocks.iter().skip(first).step_by(self.every) {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let index = planned.index();
            let len = (self.size - index * BLOCK_SIZE).min(BLOCK_SIZE);
            let job = match *planned {
                Planned::Hole { .. } => must_upload(true, self.omit_zero_blocks).then(|| Job {
                    index,
                    data: self.zeros.clone(),
                    len,
                    digest: zero_block_digest(),
                }),
                Planned::Read { len, .. } => {
                    let mut block = self.pool.take();
                    let buf = block.as_mut_slice();
                    // A reused buffer holds an earlier block: the short last block's
                    // padding must be zeros again.
                    buf[len as usize..].fill(0);
                    self.file
                        .read_exact_at(&mut buf[..len as usize], index * BLOCK_SIZE)
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::UnexpectedEof => ReadError::Changed(format!(
                                "it ended before block {index}, {} bytes were planned",
                                self.size
                            )),
                            _ => ReadError::Io(e),
                        })?;
                    done.bytes_read += len;
                    let zero = is_zero(&buf[..len as usize]);
                    let upload = must_upload(zero, self.omit_zero_blocks);
                    // Now, while the block is in the cache (see the module's comment).
                    let digest = match (upload, zero) {
                        (false, _) => None,
                        (true, true) => Some(zero_block_digest()),
                        (true, false) => Some(block_digest(buf)),
                    };
                    digest.map(|digest| Job {
                        index,
                        digest,
                        data: block.freeze(),
                        len,
                    })
                }
            };
            match job {
                Some(job) => {
                    if tx.blocking_send(job).is_err() {
                        // The upload stopped (an error or Ctrl-C): nothing more to read.
                        break;
                    }
                    done.sent += 1;
                }
                None => self.progress.inc(len),
            }
        }
        Ok(done)
    }
}

/// The file's data extents from SEEK_DATA/SEEK_HOLE; the whole file where the filesystem
/// cannot tell.
pub fn data_extents(file: &std::fs::File, size: u64) -> io::Result<Vec<Range<u64>>> {
    use rustix::fs::{seek, SeekFrom};
    use rustix::io::Errno;
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(whole_file(size)),
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start)).unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        extents.push(start..end);
        pos = end;
    }
    Ok(extents)
}

/// One extent covering the whole file (a list of ranges, not a range of numbers).
#[allow(clippy::single_range_in_vec_init)]
fn whole_file(size: u64) -> Vec<Range<u64>> {
    vec![0..size]
}
