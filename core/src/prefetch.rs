//! Bridges an async byte stream to blocking code (tar reading, hashing, file writes) without
//! stalling either side.

use std::io::{self, Read};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

/// A blocking reader over a byte stream that a task drains ahead of it. Reading the stream
/// on demand (as `SyncIoBridge` does) leaves the socket idle while a chunk is hashed and
/// written, and costs two thread wake-ups per chunk; here the socket (an engine's export) is
/// read while earlier chunks are processed, up to `depth` chunks ahead. The reader holds its
/// thread while it waits for the stream: it is for streams a local engine paces, never for
/// one a client does (a request body is written by [`crate::BlobStore::write_stream`]).
pub struct Prefetched {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Prefetched {
    /// Starts draining `stream` on the current runtime.
    pub fn spawn<S>(stream: S, depth: usize) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(depth);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let last = item.is_err();
                // A closed channel means the reader gave up: stop reading the engine.
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Prefetched {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for Prefetched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: Vec<io::Result<&'static [u8]>>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        futures::stream::iter(parts.into_iter().map(|p| p.map(Bytes::from_static)))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_every_byte_across_chunks_then_eof() {
        let mut r = Prefetched::spawn(chunks(vec![Ok(b"abc"), Ok(b""), Ok(b"defgh")]), 1);
        let out = tokio::task::spawn_blocking(move || {
            let mut small = [0u8; 2];
            let mut out = Vec::new();
            loop {
                let n = r.read(&mut small).unwrap();
                if n == 0 {
                    return out;
                }
                out.extend_from_slice(&small[..n]);
            }
        })
        .await
        .unwrap();
        assert_eq!(out, b"abcdefgh");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_error_reaches_the_reader() {
        let failing = chunks(vec![Ok(b"ab"), Err(io::Error::other("engine went away")), Ok(b"never")]);
        let mut r = Prefetched::spawn(failing, 4);
        let result = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        })
        .await
        .unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.to_string(), "engine went away");
    }
}
