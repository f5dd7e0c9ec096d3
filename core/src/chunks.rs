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
//! The read-ahead budget lives here too: every stream that reads ahead takes its chunk size
//! from it while it holds a [`Serving`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backend::ByteStream;

/// Chunks made ahead of the consumer: with the one it is sending, the four that the serving
/// read-ahead budget counts per stream ([`chunk_size`]).
const QUEUED: usize = 3;
/// The next run starts when no more than this many chunks are left queued.
const LOW: usize = 1;

/// Something read a chunk at a time by blocking calls.
pub trait ChunkSource: Send + 'static {
    /// The next chunk, or `None` at the end. An error ends the stream.
    fn next_chunk(&mut self) -> Option<io::Result<Bytes>>;
}

/// Streams `source`'s chunks, made on blocking threads a few ahead of the consumer.
pub fn stream<S: ChunkSource>(source: S) -> ByteStream {
    let (tx, rx) = mpsc::channel(QUEUED);
    Chunks {
        rx,
        tx,
        maker: Maker::Idle(source),
    }
    .boxed()
}

/// Where the source is.
enum Maker<S> {
    /// Waiting for room in the queue.
    Idle(S),
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
}

/// Makes chunks until the queue is full, the source ends, or the consumer has gone.
fn run<S: ChunkSource>(mut source: S, tx: mpsc::Sender<io::Result<Bytes>>) -> (S, bool) {
    while tx.capacity() > 0 {
        let Some(chunk) = source.next_chunk() else {
            return (source, false);
        };
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
    /// Starts a run when the source is idle and the queue is down to its low mark.
    fn refill(&mut self) {
        if self.rx.len() > LOW || !matches!(self.maker, Maker::Idle(_)) {
            return;
        }
        if let Maker::Idle(source) = std::mem::replace(&mut self.maker, Maker::Done) {
            let tx = self.tx.clone();
            self.maker = Maker::Running(tokio::task::spawn_blocking(move || run(source, tx)));
        }
    }
}

impl<S: ChunkSource> Stream for Chunks<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            this.refill();
            if let Poll::Ready(Some(chunk)) = this.rx.poll_recv(cx) {
                // The next chunks are made while this one is sent.
                this.refill();
                return Poll::Ready(Some(chunk));
            }
            // The queue is empty (this stream holds a sender, so it never closes).
            let Maker::Running(making) = &mut this.maker else {
                if matches!(this.maker, Maker::Done) {
                    return Poll::Ready(None);
                }
                continue;
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

/// Read buffer for serving blobs: large enough to keep syscalls off the profile.
pub(crate) const READ_CHUNK: usize = 256 * 1024;
/// Bytes read ahead for all the blobs being served at once, as a target: each stream holds
/// up to four chunks (three queued, one being sent; see [`QUEUED`]), so chunks shrink
/// as streams multiply (up to 12 streams still read 256 KiB chunks).
const SERVE_BUDGET: usize = 12 * 1024 * 1024;
/// The smallest chunk, however many streams there are.
const MIN_READ_CHUNK: usize = 16 * 1024;

/// Blob streams being served right now.
static SERVING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The chunk size for the next read: 256 KiB while few blobs are served, less (down to
/// 16 KiB) when many are, so that memory stays near a 12 MiB budget — 200 clients pulling at once must
/// not hold 200 × 768 KiB. Every stream that reads ahead (files here, layers read straight
/// from an engine's storage, blobs being fetched) takes its chunks from this budget while it
/// holds a [`Serving`].
pub fn chunk_size() -> usize {
    let serving = SERVING.load(std::sync::atomic::Ordering::Relaxed).max(1);
    (SERVE_BUDGET / (4 * serving)).clamp(MIN_READ_CHUNK, READ_CHUNK)
}

/// Counts a stream in the shared read-ahead budget while it lives.
pub struct Serving;

impl Serving {
    /// Counts one more stream until the guard drops.
    pub fn start() -> Self {
        SERVING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
        _serving: Serving::start(),
    })
}

/// A range of a file, read a chunk at a time.
struct FileChunks {
    file: std::fs::File,
    /// Where the first read starts, when not at the beginning.
    seek_to: Option<u64>,
    left: u64,
    _serving: Serving,
}

impl ChunkSource for FileChunks {
    fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
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
        let want = self.left.min(chunk_size() as u64);
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
        fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
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

    struct Failing;

    impl ChunkSource for Failing {
        fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
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
