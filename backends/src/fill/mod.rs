//! The one verified fetch of a blob from its origin while clients read it (a tee), for the
//! upstream cache and for heals: the origin's bytes go to a temp file of a blob store and
//! every client reads that file as it grows, from wherever its `Range` starts. One fill per
//! digest, however many clients ask at once. The last byte is handed out only after the
//! whole blob hashed to its digest and was committed where it belongs ([`Commit`]), so no
//! client ever gets a complete blob that is not the one it asked for, and a blob that does
//! not verify is committed nowhere. The fetch runs at most half a MiB ahead of its furthest
//! reader, so readers get the newest bytes from memory. A fill whose clients all went away
//! goes on (at the origin's pace) when it is well along (configurable), and stops otherwise.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use ferry_core::blobstore::blocking;
use ferry_core::{BlobBody, BlobStore, ByteRange, Digest, Error, Repository, Result};

mod reader;
use reader::Reader;

/// The newest bytes of a fill kept in memory (as the origin's chunks, shared, not copied), so
/// that readers keeping pace with the fetch get them without reading the file back: four
/// read chunks (1 MiB while few blobs are served, less under load, from the shared read-ahead
/// budget). The newest batch is always kept whole.
fn recent_bytes() -> usize {
    4 * ferry_core::chunks::chunk_size()
}

/// How far the fetch runs ahead of its furthest reader: a client slower than the origin then
/// reads the newest bytes from memory rather than back from the file (an origin on the same
/// machine outruns any client; reading the file back cost a fifth of ferry's CPU time on such
/// a pull). Half of [`recent_bytes`].
fn ahead_bytes() -> u64 {
    (recent_bytes() / 2) as u64
}

/// How long the fetch waits for its furthest reader to move on before it stops waiting.
const PACE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The origin's chunks are gathered into batches of this many bytes: one write, one wake-up of
/// the writer and one of the readers per batch, rather than per chunk (a paced link or TLS
/// hands its bytes over in small pieces; the page cache takes large writes at a fraction of
/// the cost per byte).
const BATCH_BYTES: usize = 256 * 1024;
/// How long a batch waits to fill up before it goes anyway: how far readers may lag behind
/// a slow origin (nothing, for a download of seconds).
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(50);
/// Batches queued for the writer thread (a longer queue is memory, not speed: the writer only
/// hashes and copies into the page cache).
const QUEUED_BATCHES: usize = 1;

/// Fetches at once unless the config sets another figure ([`set_max_fetches`]).
pub const DEFAULT_MAX_FETCHES: usize = 16;

/// The fetches that may copy from their origins at once, for the whole process: each holds
/// its recent chunks and up to three batches (some 1.75 MiB), and without a ceiling their
/// number was the number of distinct blobs clients asked for.
static FETCHES: OnceLock<Arc<Semaphore>> = OnceLock::new();

/// Sets how many fetches copy at once (at least one), before the first fill; `false` when it
/// was already set to another figure (it is the process's, set once).
pub fn set_max_fetches(n: usize) -> bool {
    let n = n.clamp(1, Semaphore::MAX_PERMITS);
    FETCHES.get_or_init(|| Arc::new(Semaphore::new(n))).available_permits() == n
}

fn fetches() -> Arc<Semaphore> {
    FETCHES
        .get_or_init(|| Arc::new(Semaphore::new(DEFAULT_MAX_FETCHES)))
        .clone()
}

/// Where a fill stands.
#[derive(Clone, Debug)]
enum Stage {
    /// Bytes written (and flushed) so far.
    Writing(u64),
    /// Whole and hashed to its digest: readers may have the last byte while it is made
    /// durable (fsync) and put in place.
    Verified,
    /// Verified and in the store.
    Done,
    /// Stopped; nothing was stored.
    Failed(String),
}

/// A fill under way.
pub struct Fill {
    /// The repository it was fetched for (another repository's client must show the origin
    /// lets it read the blob before joining).
    pub repo: Repository,
    /// The blob.
    pub digest: Digest,
    /// Its size, as the origin announced it.
    pub size: u64,
    temp: PathBuf,
    progress: watch::Receiver<Stage>,
    /// The newest chunks written, with their offsets.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
    readers: AtomicUsize,
    /// The furthest position a reader is at or waits for.
    head: AtomicU64,
    /// A reader moved on or left: the fetch may go on.
    advanced: Notify,
    /// The fetch no longer waits for readers.
    unpaced: AtomicBool,
    /// A fill with no reader left stops unless this many bytes have arrived.
    keep_from: u64,
    cancelled: AtomicBool,
    cancel: Notify,
}

/// Where a verified blob goes before its last byte reaches a client.
pub enum Commit {
    /// Into the blob store the fill writes to (the upstream cache).
    Store,
    /// Handed over as the verified temp file (its path) to a store of its own — containerd's
    /// content store, for a heal; the temp file goes once that is done.
    Hand(HandOff),
}

/// What takes a verified temp file (its path) into a store of its own.
pub type HandOff = Box<dyn FnOnce(PathBuf) -> Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> + Send>;

/// The blob a fill fetches: `size` bytes of `digest`, for `repo`.
pub struct Wanted {
    /// The repository asked for.
    pub repo: Repository,
    /// The blob.
    pub digest: Digest,
    /// Its size, as the origin announced it.
    pub size: u64,
}

/// What a reader found when it tried to join.
pub enum Joined {
    /// The stream.
    Body(BlobBody),
    /// The fill ended meanwhile: the blob is in the store now, or the fill failed.
    Gone,
}

impl Fill {
    /// Starts filling `blob` from `origin`'s body into `store`'s temp file, committed as
    /// `commit` says. `keep_percent` is how far along a fill goes on without readers. `done`
    /// runs once the fill ended, with its outcome.
    pub fn spawn(
        backend: &str,
        store: &BlobStore,
        blob: Wanted,
        origin: reqwest::Response,
        keep_percent: u8,
        commit: Commit,
        done: impl FnOnce(&Result<()>) + Send + 'static,
    ) -> Result<Arc<Fill>> {
        let Wanted { repo, digest, size } = blob;
        let writer = store.writer(Some(digest.clone()))?;
        let temp = writer
            .temp_path()
            .map(PathBuf::from)
            .ok_or_else(|| Error::Internal("blob writer without a temp file".into()))?;
        let (progress_tx, progress) = watch::channel(Stage::Writing(0));
        let fill = Arc::new(Fill {
            repo,
            digest,
            size,
            temp,
            progress,
            recent: Mutex::new(VecDeque::new()),
            readers: AtomicUsize::new(0),
            head: AtomicU64::new(0),
            advanced: Notify::new(),
            unpaced: AtomicBool::new(false),
            keep_from: size.saturating_mul(u64::from(keep_percent)) / 100,
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
        });
        let (batches_tx, mut batches_rx) = mpsc::channel::<Option<Vec<Bytes>>>(QUEUED_BATCHES);
        // The writer: appends each batch (on a blocking thread, which it gives back between
        // batches: a slow origin must not hold one for the whole fetch), publishes how far the
        // file is, and commits (verifying the digest) when the origin's body ended whole.
        let logged = matches!(commit, Commit::Store);
        let written = {
            let progress_tx = progress_tx.clone();
            let fill = fill.clone();
            let temp = fill.temp.clone();
            tokio::spawn(async move {
                let mut writer = writer;
                let mut commit = Some(commit);
                while let Some(piece) = batches_rx.recv().await {
                    let Some(batch) = piece else {
                        let sealed = blocking(move || writer.seal()).await?;
                        return match commit.take() {
                            Some(Commit::Hand(hand)) => {
                                hand(temp).await?;
                                progress_tx.send_replace(Stage::Verified);
                                drop(sealed);
                                Ok(())
                            }
                            _ => {
                                progress_tx.send_replace(Stage::Verified);
                                blocking(move || sealed.persist()).await
                            }
                        };
                    };
                    let offset = writer.size();
                    // Straight to the file: readers may read it as soon as it is published.
                    let (w, batch) = blocking(move || {
                        writer
                            .write_chunks(&batch)
                            .map_err(|e| Error::io("writing a fetched blob", e))?;
                        Ok((writer, batch))
                    })
                    .await?;
                    writer = w;
                    fill.remember(offset, batch);
                    progress_tx.send_replace(Stage::Writing(writer.size()));
                }
                Err(Error::Internal("the fetch stopped".into()))
            })
        };
        let task_fill = fill.clone();
        let backend = backend.to_string();
        tokio::spawn(async move {
            let started = Instant::now();
            let fill = task_fill;
            // The slot is held until the fill ended; its readers meanwhile wait as for a slow
            // origin.
            let (fetched, _slot) = match fill.slot(&backend).await {
                Ok(slot) => (fill.copy(&backend, origin, &batches_tx).await, Some(slot)),
                Err(e) => (Err(e), None),
            };
            if fetched.is_ok() {
                let _ = batches_tx.send(None).await;
            }
            drop(batches_tx);
            let stored = match written.await {
                Ok(r) => r,
                Err(e) => Err(Error::Internal(format!("blob writer task: {e}"))),
            };
            let outcome = fetched.and(stored);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            match &outcome {
                Ok(()) => {
                    if logged {
                        tracing::info!(backend = %backend, origin = %fill.repo, digest = %fill.digest, size = fill.size,
                            elapsed_ms, "fetched blob from its origin into the cache");
                    }
                    progress_tx.send_replace(Stage::Done);
                }
                Err(e) => {
                    if logged {
                        tracing::warn!(backend = %backend, origin = %fill.repo, digest = %fill.digest, error = %e,
                            elapsed_ms, "fetch of a blob from its origin failed; nothing stored");
                    }
                    progress_tx.send_replace(Stage::Failed(e.to_string()));
                }
            }
            done(&outcome);
        });
        Ok(fill)
    }

    /// One of the fetches that may copy at once, waiting for one to end when all are taken;
    /// an error when every client left meanwhile (a fill that goes on without clients, as a
    /// heal, waits on).
    async fn slot(&self, backend: &str) -> Result<OwnedSemaphorePermit> {
        let fetches = fetches();
        if let Ok(slot) = fetches.clone().try_acquire_owned() {
            return Ok(slot);
        }
        let waited = Instant::now();
        tracing::info!(backend = %backend, origin = %self.repo, digest = %self.digest,
            "fetch waits for one of the fetches under way to end (server.max_fetches)");
        let acquire = fetches.acquire_owned();
        tokio::pin!(acquire);
        loop {
            let cancelled = self.cancel.notified();
            if let Some(e) = self.abandoned(0) {
                return Err(e);
            }
            tokio::select! {
                slot = &mut acquire => {
                    let slot = slot.map_err(|_| Error::Internal("fetch slots closed".into()))?;
                    tracing::debug!(backend = %backend, digest = %self.digest,
                        waited_ms = waited.elapsed().as_millis() as u64, "fetch may start");
                    return Ok(slot);
                }
                () = cancelled => {}
            }
        }
    }

    /// Copies the origin's body to the writer thread in batches, checking its length; stops
    /// when the fill is abandoned.
    async fn copy(
        &self,
        backend: &str,
        origin: reqwest::Response,
        to: &mpsc::Sender<Option<Vec<Bytes>>>,
    ) -> Result<()> {
        enum Step {
            Chunk(Option<reqwest::Result<Bytes>>),
            Cancelled,
            Due,
        }
        let mut body = origin.bytes_stream();
        let mut received = 0u64;
        let mut sent = 0u64;
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        let due = tokio::time::sleep(BATCH_WAIT);
        tokio::pin!(due);
        loop {
            // The origin's bytes first: a chunk already there is counted before a client's
            // leaving is looked at, so a blob that has arrived is kept (the flag is checked
            // after every step, so a fast origin does not hide a cancel).
            let step = tokio::select! {
                biased;
                next = body.next() => Step::Chunk(next),
                () = self.cancel.notified() => Step::Cancelled,
                () = &mut due, if !batch.is_empty() => Step::Due,
            };
            // Whether the body ended, and whether the batch goes now.
            let (end, send) = match step {
                Step::Chunk(Some(Ok(chunk))) => {
                    received += chunk.len() as u64;
                    if received > self.size {
                        return Err(Error::Internal(format!(
                            "origin {} sent more than the {} bytes it announced",
                            self.repo, self.size
                        )));
                    }
                    ferry_core::metrics::upstream_fetched(backend, chunk.len() as u64);
                    if batch.is_empty() {
                        due.as_mut().reset(tokio::time::Instant::now() + BATCH_WAIT);
                    }
                    batched += chunk.len();
                    batch.push(chunk);
                    (false, batched >= BATCH_BYTES)
                }
                Step::Chunk(Some(Err(e))) => {
                    return Err(Error::Unavailable {
                        backend: backend.to_string(),
                        reason: format!("origin {}: {}", self.repo, ferry_core::error::with_causes(&e)),
                    })
                }
                Step::Chunk(None) => (true, true),
                Step::Cancelled => (false, false),
                Step::Due => (false, true),
            };
            // After counting what just arrived: a chunk that completes the blob keeps it.
            if let Some(e) = self.abandoned(received) {
                return Err(e);
            }
            if send && !batch.is_empty() {
                self.pace(sent).await;
                if let Some(e) = self.abandoned(received) {
                    return Err(e);
                }
                sent += batched as u64;
                batched = 0;
                if to.send(Some(std::mem::take(&mut batch))).await.is_err() {
                    return Err(Error::Internal("the blob writer stopped".into()));
                }
            }
            if end {
                return if received == self.size {
                    Ok(())
                } else {
                    Err(Error::Unavailable {
                        backend: backend.to_string(),
                        reason: format!("origin {} sent {received} of {} bytes", self.repo, self.size),
                    })
                };
            }
        }
    }

    /// Why the fetch stops, once every client left a fill not far enough along. The bytes
    /// received count, not only those written when the last client left: a small blob
    /// arrives whole before the writer has written any, and dropping it then saves nothing.
    fn abandoned(&self, received: u64) -> Option<Error> {
        (self.cancelled.load(Ordering::SeqCst) && received < self.keep_from)
            .then(|| Error::Internal(format!("every client left after {received} of {} bytes", self.size)))
    }

    /// Waits while the bytes handed to the writer (`sent`) are more than [`ahead_bytes`]
    /// past the furthest reader, as long as there is one.
    ///
    /// A reader that does not move on for [`PACE_WAIT`] ends the pacing for the rest of the
    /// fill: a stalled client must not hold the fetch (nor its origin connection) back.
    async fn pace(&self, sent: u64) {
        loop {
            let notified = self.advanced.notified();
            let ahead = sent.saturating_sub(self.head.load(Ordering::SeqCst));
            if ahead <= ahead_bytes()
                || self.readers.load(Ordering::SeqCst) == 0
                || self.cancelled.load(Ordering::SeqCst)
                || self.unpaced.load(Ordering::SeqCst)
            {
                return;
            }
            if tokio::time::timeout(PACE_WAIT, notified).await.is_err() {
                self.unpaced.store(true, Ordering::SeqCst);
                return;
            }
        }
    }

    /// A reader is at (or waits for) `pos`.
    fn reached(&self, pos: u64) {
        if self.head.fetch_max(pos, Ordering::SeqCst) < pos {
            self.advanced.notify_waiters();
        }
    }

    /// Keeps a batch just written at `offset` among the recent chunks, dropping the oldest
    /// beyond [`recent_bytes`] (never the batch's own).
    fn remember(&self, offset: u64, batch: Vec<Bytes>) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = batch.len();
        let mut at = offset;
        for chunk in batch {
            let len = chunk.len() as u64;
            recent.push_back((at, chunk));
            at += len;
        }
        let mut held: usize = recent.iter().map(|(_, b)| b.len()).sum();
        let limit = recent_bytes();
        while held > limit && recent.len() > kept {
            if let Some((_, b)) = recent.pop_front() {
                held -= b.len();
            }
        }
    }

    /// Up to `want` bytes at `pos` from the recent chunks, if they hold `pos`.
    fn recent_at(&self, pos: u64, want: u64) -> Option<Bytes> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let (offset, chunk) = recent.iter().find(|(o, b)| *o <= pos && pos < *o + b.len() as u64)?;
        let start = (pos - offset) as usize;
        let end = (start as u64 + want).min(chunk.len() as u64) as usize;
        Some(chunk.slice(start..end))
    }

    /// Bytes still to be written.
    fn remaining(&self) -> u64 {
        match *self.progress.borrow() {
            Stage::Writing(n) => self.size.saturating_sub(n),
            _ => 0,
        }
    }

    /// Whether the fill ended (stored or failed).
    pub fn ended(&self) -> bool {
        matches!(*self.progress.borrow(), Stage::Done | Stage::Failed(_))
    }

    /// Whether the fill failed: the blob must be fetched again.
    pub fn failed(&self) -> bool {
        matches!(*self.progress.borrow(), Stage::Failed(_))
    }

    /// A stream of the blob (or `range` of it) that follows the fill.
    pub async fn join(self: &Arc<Self>, range: Option<ByteRange>) -> Result<Joined> {
        let (offset, len) = match range {
            Some(r) => r.resolve(self.size)?,
            None => (0, self.size),
        };
        let file = match std::fs::File::open(&self.temp) {
            Ok(f) => Arc::new(f),
            // Committed (the temp name is gone) or failed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Joined::Gone),
            Err(e) => return Err(Error::io(format!("opening {}", self.temp.display()), e)),
        };
        if let Stage::Failed(_) = *self.progress.borrow() {
            return Ok(Joined::Gone);
        }
        self.readers.fetch_add(1, Ordering::SeqCst);
        self.reached(offset);
        let reader = Reader {
            fill: self.clone(),
            file,
            pos: offset,
            end: offset + len,
            progress: self.progress.clone(),
            failed: false,
            account: ferry_core::chunks::Account::new(),
        };
        Ok(Joined::Body(BlobBody {
            size: self.size,
            range: range.map(|_| (offset, len)),
            stream: futures::stream::unfold(reader, |mut r| async move {
                let item = r.next().await?;
                Some((item, r))
            })
            .boxed(),
        }))
    }

    /// A reader went away: when it was the last and the fill is not far enough along, stop.
    fn reader_left(&self) {
        if self.readers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        self.advanced.notify_waiters();
        let far_enough = match *self.progress.borrow() {
            Stage::Writing(n) => n >= self.keep_from,
            _ => true,
        };
        if !far_enough {
            self.cancelled.store(true, Ordering::SeqCst);
            self.cancel.notify_one();
            self.advanced.notify_waiters();
        }
    }
}

/// The fills under way, by digest.
#[derive(Default)]
pub struct Fills {
    active: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl Fills {
    /// The fill of `digest`, if one is under way.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
            .cloned()
    }

    /// The bytes the fills under way will still write to disk.
    pub fn promised(&self) -> u64 {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|f| f.remaining())
            .sum()
    }

    /// The fill of `digest` under way, or the one `start` starts when there is none (or
    /// only one that failed); with whether it was started here. `start` is not called when
    /// a fill is under way, so what it would fetch from is dropped unread.
    pub fn start(&self, digest: &Digest, start: impl FnOnce() -> Result<Arc<Fill>>) -> Result<(Arc<Fill>, bool)> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = active.get(digest).filter(|f| !f.failed()) {
            return Ok((f.clone(), false));
        }
        let fill = start()?;
        active.insert(digest.clone(), fill.clone());
        Ok((fill, true))
    }

    /// Forgets the fill of `digest` once it ended (not one that started since).
    pub fn remove(&self, digest: &Digest) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active.get(digest).is_some_and(|f| f.ended()) {
            active.remove(digest);
        }
    }
}

#[cfg(test)]
mod tests;
