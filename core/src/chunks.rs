//! Byte streams made by blocking code (a blob's file, a layer assembled from its files), a
//! chunk at a time on tokio's blocking threads.
//!
//! No thread waits on the stream's consumer. A thread per stream, blocked until its client
//! took the next chunk, let a few hundred clients that ask for a blob and never read the
//! answer take every blocking thread, and with them every file read and write of the server.
//! Here a blocking run makes chunks while the stream's queue has room, then gives its thread
//! back; the consumer starts the next run once it has taken all but one of them. A client that
//! stops reading holds a few chunks and no thread, and one that reads costs a thread hop per
//! two or three chunks.
//!
//! The read-ahead budget lives here too, a ceiling on the bytes of chunks made and not yet
//! sent, whatever the number of streams ([`Account`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::backend::ByteStream;

/// Chunks made ahead of the consumer: with the one it is sending, the four that
/// [`chunk_size`] sizes each stream's share of the budget by.
const QUEUED: usize = 3;
/// The next run starts when no more than this many chunks are left queued.
const LOW: usize = 1;

/// Something read a chunk at a time by blocking calls.
pub trait ChunkSource: Send + 'static {
    /// The next chunk, of at most `max` bytes, or `None` at the end. An error ends the
    /// stream.
    fn next_chunk(&mut self, max: usize) -> Option<io::Result<Bytes>>;
}

/// Streams `source`'s chunks, made on blocking threads a few ahead of the consumer.
pub fn stream<S: ChunkSource>(source: S) -> ByteStream {
    let (tx, rx) = mpsc::channel(QUEUED);
    Chunks {
        rx,
        tx,
        maker: Maker::Idle(source),
        account: Account::new(),
    }
    .boxed()
}

/// Where the source is.
enum Maker<S> {
    /// Waiting for room in the queue.
    Idle(S),
    /// Waiting for a run's place ([`RUNS_AT_ONCE`]), with leave for its first chunk.
    Queued(S, Grant, Place),
    /// Making chunks on a blocking thread; it hands the source back, and whether more follow.
    Running(JoinHandle<(S, bool)>),
    /// Made its last chunk (or failed).
    Done,
}

struct Chunks<S> {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    /// Handed to each run.
    tx: mpsc::Sender<io::Result<Bytes>>,
    maker: Maker<S>,
    account: Account,
}

/// Makes chunks until the queue is full, the source ends, the consumer has gone, or the
/// budget has no room for more: the first with `first`, the rest read ahead.
fn run<S: ChunkSource>(mut source: S, tx: mpsc::Sender<io::Result<Bytes>>, first: Grant, ahead: Ahead) -> (S, bool) {
    let mut grant = Some(first);
    while tx.capacity() > 0 {
        let Some(g) = grant.take().or_else(|| ahead.try_grant()) else {
            return (source, true);
        };
        let Some(chunk) = source.next_chunk(g.size()) else {
            return (source, false);
        };
        let chunk = chunk.map(|bytes| g.hold(bytes));
        let failed = chunk.is_err();
        if tx.try_send(chunk).is_err() || failed {
            return (source, false);
        }
    }
    (source, true)
}

// The source is only ever moved, never pinned.
impl<S> Unpin for Chunks<S> {}

impl<S: ChunkSource> Chunks<S> {
    /// Starts a run with `grant` when the source is idle, or queues it for a place.
    fn start(&mut self, grant: Grant) {
        if let Maker::Idle(source) = std::mem::replace(&mut self.maker, Maker::Done) {
            self.maker = match runs().clone().try_acquire_owned() {
                Ok(place) => self.spawn(source, grant, place),
                Err(_) => Maker::Queued(source, grant, Box::pin(run_place())),
            };
        }
    }

    /// A run on a blocking thread, which gives its place back when it ends.
    fn spawn(&self, source: S, grant: Grant, place: OwnedSemaphorePermit) -> Maker<S> {
        let (tx, ahead) = (self.tx.clone(), self.account.ahead());
        Maker::Running(tokio::task::spawn_blocking(move || {
            let _place = place;
            run(source, tx, grant, ahead)
        }))
    }

    /// Reads ahead when the source is idle, the queue is down to its low mark, and the
    /// budget has room.
    fn read_ahead(&mut self) {
        if self.rx.len() > LOW || !matches!(self.maker, Maker::Idle(_)) {
            return;
        }
        if let Some(grant) = self.account.ahead().try_grant() {
            self.start(grant);
        }
    }
}

impl<S: ChunkSource> Stream for Chunks<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(Some(chunk)) = this.rx.poll_recv(cx) {
                // The next chunks are made while this one is sent.
                this.read_ahead();
                return Poll::Ready(Some(chunk));
            }
            // The queue is empty (this stream holds a sender, so it never closes).
            let making = match &mut this.maker {
                Maker::Done => return Poll::Ready(None),
                Maker::Idle(_) => {
                    let grant = std::task::ready!(this.account.poll_grant(cx));
                    this.start(grant);
                    continue;
                }
                Maker::Queued(_, _, place) => {
                    let place = std::task::ready!(place.as_mut().poll(cx));
                    // The semaphore is never closed, so the place is there.
                    if let (Maker::Queued(source, grant, _), Some(place)) =
                        (std::mem::replace(&mut this.maker, Maker::Done), place)
                    {
                        this.maker = this.spawn(source, grant, place);
                    }
                    continue;
                }
                Maker::Running(making) => making,
            };
            let made = match Pin::new(making).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(made) => made,
            };
            match made {
                // What the run queued is taken on the next turn of the loop.
                Ok((source, true)) => this.maker = Maker::Idle(source),
                Ok((_, false)) => this.maker = Maker::Done,
                Err(e) => {
                    this.maker = Maker::Done;
                    return Poll::Ready(Some(Err(io::Error::other(format!("reading a blob stopped: {e}")))));
                }
            }
        }
    }
}

/// Blocking runs under way at once, across every stream. Each is a blocking thread, and a
/// thread costs what it touched of its stack for as long as it lives (68 KiB once a layer's
/// tar-split has been decompressed on it) plus what its run holds (a decompressor, 60 KiB):
/// 1000 streams let loose took 130 threads, some 15 MiB. Runs are short (four chunks at
/// most), so 32 keep both cores and a disk's queue busy; more wait their turn, in order.
pub const RUNS_AT_ONCE: usize = 32;

/// A turn among [`RUNS_AT_ONCE`], being waited for.
type Place = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

fn runs() -> &'static Arc<Semaphore> {
    static RUNS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    RUNS.get_or_init(|| Arc::new(Semaphore::new(RUNS_AT_ONCE)))
}

/// A place among the blocking runs allowed at once, for a stream that reads on a blocking
/// thread of its own making (held until the read ends; `None` never comes, the semaphore is
/// never closed).
pub async fn run_place() -> Option<OwnedSemaphorePermit> {
    runs().clone().acquire_owned().await.ok()
}

/// Read buffer for serving blobs: large enough to keep syscalls off the profile.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// The read-ahead budget unless the config sets one: 12 MiB, so up to 12 streams read
/// 256 KiB chunks four deep.
pub const DEFAULT_READ_AHEAD: usize = 12 * 1024 * 1024;
/// The smallest chunk, however many streams there are.
const MIN_READ_CHUNK: usize = 8 * 1024;

/// The bytes of chunks made and not yet sent, for the whole process.
struct Budget {
    permits: Arc<Semaphore>,
    bytes: usize,
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// Sets the read-ahead budget (bytes, at least one smallest chunk) before the first stream;
/// `false` when it was already set to another figure (it is the process's, set once).
pub fn set_read_ahead(bytes: usize) -> bool {
    let bytes = bytes.clamp(MIN_READ_CHUNK, u32::MAX as usize);
    BUDGET.get_or_init(|| Budget::new(bytes)).bytes == bytes
}

impl Budget {
    fn new(bytes: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(bytes)),
            bytes,
        }
    }
}

fn budget() -> &'static Budget {
    BUDGET.get_or_init(|| Budget::new(DEFAULT_READ_AHEAD))
}

/// Blob streams being served now, and the bytes they hold against the budget.
pub fn in_use() -> (usize, usize) {
    let b = budget();
    (
        SERVING.load(Ordering::Relaxed),
        b.bytes - b.permits.available_permits().min(b.bytes),
    )
}

/// Blob streams being served right now.
static SERVING: AtomicUsize = AtomicUsize::new(0);

/// The chunk size for the next read: 256 KiB while few blobs are served, less (down to
/// 8 KiB) when many are, so that four chunks a stream fit the budget while they can.
pub fn chunk_size() -> usize {
    let serving = SERVING.load(Ordering::Relaxed).max(1);
    (budget().bytes / (4 * serving)).clamp(MIN_READ_CHUNK, READ_CHUNK)
}

/// Counts a stream in [`chunk_size`] while it lives.
struct Serving;

impl Serving {
    fn start() -> Self {
        SERVING.fetch_add(1, Ordering::Relaxed);
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream's dealings with the read-ahead budget. Every chunk a stream makes is held
/// against it until the chunk's last byte is dropped (sent, or thrown away), wherever it
/// waits meanwhile: in the stream's queue, in the HTTP connection's buffers, in an HTTP/2
/// stream's send buffer. Every chunk needs room in the budget, except one: when the budget
/// has none, the chunk a consumer waits for is free (and of the smallest size) once none of
/// the stream's chunks is held anywhere, so that every stream moves, one chunk at a time,
/// however the budget is spent (by clients that stopped reading, say). Chunk bytes held at
/// once are thus at most the budget plus 8 KiB a stream. (A free chunk the size of the
/// others let the last streams of a load, whose chunks grow as others end, hold a budget's
/// worth more.)
pub struct Account {
    share: Arc<Share>,
    /// A turn at the budget, queued behind the streams that asked before.
    waiting: Option<Turn>,
    _serving: Serving,
}

/// A place in the budget's queue.
type Turn = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// What a stream's chunks tell it when they are dropped.
#[derive(Default)]
struct Share {
    /// Its chunks not yet dropped.
    held: AtomicUsize,
    /// Woken when the last of them is.
    waker: AtomicWaker,
}

impl Default for Account {
    fn default() -> Self {
        Self::new()
    }
}

impl Account {
    /// A stream's account; it counts in [`chunk_size`] while it lives.
    pub fn new() -> Self {
        Account {
            share: Arc::default(),
            waiting: None,
            _serving: Serving::start(),
        }
    }

    /// Leave to make the chunk a consumer waits for: free when the stream holds no chunk,
    /// else from the budget, waiting for room or for the stream's chunks to be dropped.
    pub fn poll_grant(&mut self, cx: &mut Context<'_>) -> Poll<Grant> {
        loop {
            if let Some(waiting) = &mut self.waiting {
                if let Poll::Ready(turn) = waiting.as_mut().poll(cx) {
                    self.waiting = None;
                    if let Ok(permit) = turn {
                        return Poll::Ready(self.grant(permit.num_permits(), Some(permit)));
                    }
                }
            }
            if let Some(grant) = self.ahead().try_grant() {
                self.waiting = None;
                return Poll::Ready(grant);
            }
            if self.share.held.load(Ordering::Acquire) == 0 {
                self.waiting = None;
                return Poll::Ready(self.grant(MIN_READ_CHUNK, None));
            }
            self.share.waker.register(cx.waker());
            if self.share.held.load(Ordering::Acquire) == 0 {
                continue;
            }
            if self.waiting.is_none() {
                let turn = budget().permits.clone().acquire_many_owned(MIN_READ_CHUNK as u32);
                self.waiting = Some(Box::pin(turn));
                continue;
            }
            return Poll::Pending;
        }
    }

    /// [`Account::poll_grant`] as a future.
    pub async fn grant_next(&mut self) -> Grant {
        std::future::poll_fn(|cx| self.poll_grant(cx)).await
    }

    /// What reading ahead needs, for a blocking thread.
    pub fn ahead(&self) -> Ahead {
        Ahead(self.share.clone())
    }

    fn grant(&self, size: usize, permit: Option<OwnedSemaphorePermit>) -> Grant {
        Grant {
            size,
            permit,
            share: self.share.clone(),
        }
    }
}

/// Reads ahead for one stream, from the budget only.
pub struct Ahead(Arc<Share>);

impl Ahead {
    /// Leave to read one more chunk ahead, if the budget has room for it now.
    pub fn try_grant(&self) -> Option<Grant> {
        let size = chunk_size();
        let permit = budget().permits.clone().try_acquire_many_owned(size as u32).ok()?;
        Some(Grant {
            size,
            permit: Some(permit),
            share: self.0.clone(),
        })
    }
}

/// Leave to make one chunk of at most [`Grant::size`] bytes.
pub struct Grant {
    size: usize,
    permit: Option<OwnedSemaphorePermit>,
    share: Arc<Share>,
}

impl Grant {
    /// The most bytes the chunk may have.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The chunk, held against the stream's account until its last byte is dropped.
    pub fn hold(self, bytes: Bytes) -> Bytes {
        self.share.held.fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(Held {
            bytes,
            _permit: self.permit,
            share: self.share,
        })
    }
}

/// A chunk and what it holds of the budget.
struct Held {
    bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
    share: Arc<Share>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.share.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.share.waker.wake();
        }
    }
}

/// Streams `len` bytes of `file` from `offset`, each chunk read on a blocking thread
/// straight into the buffer it is sent in (a tokio `File` would copy every chunk once more),
/// one chunk ahead of the client.
pub fn file_stream(file: std::fs::File, offset: u64, len: u64) -> crate::backend::ByteStream {
    crate::chunks::stream(FileChunks {
        file,
        seek_to: (offset > 0).then_some(offset),
        left: len,
    })
}

/// A range of a file, read a chunk at a time.
struct FileChunks {
    file: std::fs::File,
    /// Where the first read starts, when not at the beginning.
    seek_to: Option<u64>,
    left: u64,
}

impl ChunkSource for FileChunks {
    fn next_chunk(&mut self, max: usize) -> Option<io::Result<Bytes>> {
        use std::io::{Read, Seek};
        if self.left == 0 {
            return None;
        }
        if let Some(offset) = self.seek_to.take() {
            if let Err(e) = self.file.seek(io::SeekFrom::Start(offset)) {
                self.left = 0;
                return Some(Err(e));
            }
        }
        let want = self.left.min(max as u64);
        // read_to_end fills spare capacity without zeroing it first.
        let mut buf = Vec::with_capacity(want as usize);
        let read = match (&mut self.file).take(want).read_to_end(&mut buf) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file is shorter than its size",
            )),
            Ok(n) => {
                self.left -= n as u64;
                Ok(Bytes::from(buf))
            }
            Err(e) => Err(e),
        };
        if read.is_err() {
            self.left = 0;
        }
        Some(read)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Runs `work` on a runtime with one blocking thread for everything: work that kept it
    /// waiting would leave nothing else able to use it.
    pub(crate) fn on_one_blocking_thread(work: impl Future<Output = ()>) {
        tokio::runtime::Builder::new_multi_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    }

    /// Fails unless other blocking work runs within 5 s.
    pub(crate) async fn the_blocking_thread_is_free() {
        let other = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(|| 42)).await;
        assert_eq!(other.expect("the blocking thread is held").unwrap(), 42);
    }

    struct Counting {
        left: usize,
        made: Arc<AtomicUsize>,
    }

    impl ChunkSource for Counting {
        fn next_chunk(&mut self, _max: usize) -> Option<io::Result<Bytes>> {
            if self.left == 0 {
                return None;
            }
            self.left -= 1;
            self.made.fetch_add(1, Ordering::SeqCst);
            Some(Ok(Bytes::from(vec![self.left as u8; 4])))
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn chunks_come_in_order_then_the_end() {
        let made = Arc::new(AtomicUsize::new(0));
        let s = stream(Counting { left: 3, made });
        let all: Vec<Bytes> = s.map(|c| c.unwrap()).collect().await;
        assert_eq!(
            all,
            vec![
                Bytes::from(vec![2u8; 4]),
                Bytes::from(vec![1u8; 4]),
                Bytes::from(vec![0u8; 4])
            ]
        );
    }

    #[test]
    fn consumers_that_stop_reading_hold_a_few_chunks_each_and_no_thread() {
        on_one_blocking_thread(async {
            let made = Arc::new(AtomicUsize::new(0));
            let mut stalled = Vec::new();
            for _ in 0..3 {
                let mut s = stream(Counting {
                    left: 100,
                    made: made.clone(),
                });
                assert!(s.next().await.is_some());
                stalled.push(s);
            }
            the_blocking_thread_is_free().await;
            // Each stream's first chunk and at most a queue's worth made ahead; the rest waits.
            let made = made.load(Ordering::SeqCst);
            assert!((3..=3 * (1 + QUEUED)).contains(&made), "{made} chunks made");
        });
    }

    /// Chunks of whatever size is asked, counting the bytes made.
    struct Sized {
        left: usize,
        made: Arc<AtomicUsize>,
    }

    impl ChunkSource for Sized {
        fn next_chunk(&mut self, max: usize) -> Option<io::Result<Bytes>> {
            let n = max.min(self.left);
            if n == 0 {
                return None;
            }
            self.left -= n;
            self.made.fetch_add(n, Ordering::SeqCst);
            Some(Ok(Bytes::from(vec![7u8; n])))
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn chunks_read_ahead_stay_within_the_budget_and_every_stream_moves() {
        // 600 clients that took one chunk and stopped reading (their chunk kept, as a
        // socket that takes nothing keeps it).
        let made = Arc::new(AtomicUsize::new(0));
        let mut stalled = Vec::new();
        let mut kept = 0;
        for _ in 0..600 {
            let mut s = stream(Sized {
                left: 64 << 20,
                made: made.clone(),
            });
            let first = s.next().await.unwrap().unwrap();
            kept += first.len();
            stalled.push((s, first));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Beyond the one chunk each was given, what they read ahead fits the budget.
        let ahead = made.load(Ordering::SeqCst) - kept;
        assert!(ahead <= DEFAULT_READ_AHEAD, "{ahead} bytes read ahead");
        assert!(in_use().1 <= DEFAULT_READ_AHEAD);
        // A client that reads gets its blob whole meanwhile, however the budget is spent.
        let reader = stream(Sized {
            left: 8 << 20,
            made: Arc::new(AtomicUsize::new(0)),
        });
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            reader.fold(0, |n, c| async move { n + c.unwrap().len() }),
        )
        .await
        .expect("the reader was kept waiting");
        assert_eq!(read, 8 << 20);
        drop(stalled);
    }

    /// Chunks that take a while to make, counting the makers at work at once.
    struct Slow {
        left: usize,
        busy: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    }

    impl ChunkSource for Slow {
        fn next_chunk(&mut self, _max: usize) -> Option<io::Result<Bytes>> {
            if self.left == 0 {
                return None;
            }
            self.left -= 1;
            let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            self.busy.fetch_sub(1, Ordering::SeqCst);
            Some(Ok(Bytes::from_static(b"slow")))
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn blocking_runs_at_once_are_capped_and_every_stream_ends() {
        let (busy, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let streams = (0..300).map(|_| {
            let s = stream(Slow {
                left: 8,
                busy: busy.clone(),
                most: most.clone(),
            });
            tokio::spawn(s.fold(0, |n, c| async move { n + c.unwrap().len() }))
        });
        let read = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(streams))
            .await
            .expect("streams waiting for a run were left waiting");
        assert!(read.into_iter().all(|r| r.unwrap() == 8 * 4));
        let most = most.load(Ordering::SeqCst);
        assert!((2..=RUNS_AT_ONCE).contains(&most), "{most} runs at once");
    }

    struct Failing;

    impl ChunkSource for Failing {
        fn next_chunk(&mut self, _max: usize) -> Option<io::Result<Bytes>> {
            Some(Err(io::Error::other("disk went away")))
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_error_ends_the_stream() {
        let mut s = stream(Failing);
        assert_eq!(s.next().await.unwrap().unwrap_err().to_string(), "disk went away");
        assert!(s.next().await.is_none());
    }
}
