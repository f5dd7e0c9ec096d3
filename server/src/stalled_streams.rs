//! HTTP/2 responses whose client has stopped taking them.
//!
//! Over HTTP/1 a client that reads nothing blocks the socket, and [`SendTimeout`] closes the
//! connection. Over HTTP/2 it only keeps a stream's flow-control window shut: the socket stays
//! free (pings are answered, other streams move), so each such stream would keep its blob's
//! file open and a few chunks in memory for as long as the client likes, up to 200 streams on
//! every connection. Here every response body of an HTTP/2 connection is watched: once one has
//! had a piece waiting for its client for the send timeout, the connection is closed, as an
//! HTTP/1 one would be. Bodies are handed over in pieces of at most [`PIECE`], so that a client
//! that reads slowly but steadily always takes the next piece in time.
//!
//! [`SendTimeout`]: crate::send_timeout::SendTimeout

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The largest piece of a body handed to HTTP/2 at once (four frames of its default size). A
/// client is cut off only when it takes less than this in the send timeout: about 1 KiB a
/// second at the default 60 s. Pieces of one frame cost a quarter of one client's throughput
/// (a wake-up of the connection's task per piece); of four, nothing measurable.
const PIECE: usize = 64 * 1024;

/// The response bodies of one connection, and how long each has waited for its client.
pub struct Watch {
    timeout: Duration,
    started: Instant,
    next_id: AtomicU64,
    bodies: Mutex<HashMap<u64, Arc<Waiting>>>,
    /// Told when a body is watched: the watchdog sleeps until there is one.
    watched: Notify,
}

/// One body's state, shared between the body and the watchdog.
struct Waiting {
    /// Milliseconds after the connection started (plus one) when its last piece was handed
    /// over and not yet taken; 0 while it is not waiting on the client.
    since: AtomicU64,
    /// The request's path, for the log.
    path: String,
}

impl Watch {
    /// A connection's watch: bodies may wait up to `timeout` on their client.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Watch {
            timeout,
            started: Instant::now(),
            next_id: AtomicU64::new(0),
            bodies: Mutex::new(HashMap::new()),
            watched: Notify::new(),
        })
    }

    /// `body`, watched (and handed over in pieces) until it is dropped.
    pub fn watch<B>(self: &Arc<Self>, body: B, path: String) -> Watched<B> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiting = Arc::new(Waiting {
            since: AtomicU64::new(0),
            path,
        });
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, waiting.clone());
        self.watched.notify_one();
        Watched {
            inner: body,
            rest: Bytes::new(),
            entry: Some(Entry {
                watch: self.clone(),
                id,
                waiting,
            }),
        }
    }

    /// Resolves with the path of a response that has waited on its client longer than the
    /// timeout, and how long it has waited. Checks a few times per timeout while there are
    /// bodies, and sleeps while there are none.
    pub async fn stalled(&self) -> (String, Duration) {
        let tick = (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let watched = self.watched.notified();
            if self.bodies.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
                watched.await;
                continue;
            }
            tokio::time::sleep(tick).await;
            if let Some(found) = self.longest_over() {
                return found;
            }
        }
    }

    /// The body that has waited longest, if longer than the timeout.
    fn longest_over(&self) -> Option<(String, Duration)> {
        let now = self.now();
        let bodies = self.bodies.lock().unwrap_or_else(PoisonError::into_inner);
        bodies
            .values()
            .filter_map(|w| match w.since.load(Ordering::Relaxed) {
                0 => None,
                since => Some((w, Duration::from_millis(now.saturating_sub(since)))),
            })
            .max_by_key(|(_, waited)| *waited)
            .filter(|(_, waited)| *waited > self.timeout)
            .map(|(w, waited)| (w.path.clone(), waited))
    }

    /// Milliseconds since the connection started, plus one (0 means "not waiting").
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }
}

/// A watched body's place in its connection's [`Watch`].
struct Entry {
    watch: Arc<Watch>,
    id: u64,
    waiting: Arc<Waiting>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.watch
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A response body, passed through as it is (HTTP/1) or watched and in pieces (HTTP/2).
pub struct Watched<B> {
    inner: B,
    /// What is left of a chunk of which a first piece was handed over.
    rest: Bytes,
    entry: Option<Entry>,
}

impl<B> Watched<B> {
    /// `body` as it is, unwatched.
    pub fn unwatched(body: B) -> Self {
        Watched {
            inner: body,
            rest: Bytes::new(),
            entry: None,
        }
    }

    /// Hands over the first piece of `chunk`, keeping the rest for the next polls.
    fn piece(&mut self, mut chunk: Bytes) -> Bytes {
        if chunk.len() > PIECE {
            self.rest = chunk.split_off(PIECE);
        }
        if let Some(e) = &self.entry {
            e.waiting.since.store(e.watch.now(), Ordering::Relaxed);
        }
        chunk
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Some(entry) = &this.entry else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // Being polled again: the client took the last piece.
        entry.waiting.since.store(0, Ordering::Relaxed);
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(Frame::data(this.piece(rest)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.piece(data))))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(chunks: Vec<Bytes>) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        StreamBody::new(futures::stream::iter(
            chunks.into_iter().map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
        ))
    }

    #[tokio::test]
    async fn a_watched_body_comes_whole_in_pieces() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let watch = Watch::new(Duration::from_secs(60));
        let mut watched = watch.watch(
            body(vec![
                Bytes::from(data[..70_000].to_vec()),
                Bytes::from(data[70_000..].to_vec()),
            ]),
            "/v2/x".to_string(),
        );
        let mut got = Vec::new();
        while let Some(frame) = watched.frame().await {
            let piece = frame.unwrap().into_data().unwrap();
            assert!(piece.len() <= PIECE);
            got.extend_from_slice(&piece);
        }
        assert!(got == data);
        drop(watched);
        assert!(watch.bodies.lock().unwrap().is_empty(), "a dropped body is forgotten");
    }

    #[tokio::test]
    async fn a_piece_not_taken_within_the_timeout_is_found_and_one_taken_is_not() {
        let timeout = Duration::from_millis(400);
        let watch = Watch::new(timeout);
        let mut taken = watch.watch(body(vec![Bytes::from(vec![1u8; 3 * PIECE])]), "/v2/reading".to_string());
        let mut left = watch.watch(body(vec![Bytes::from(vec![2u8; 3 * PIECE])]), "/v2/stalled".to_string());
        // Each hands over its first piece; only `taken` is polled again.
        taken.frame().await.unwrap().unwrap();
        left.frame().await.unwrap().unwrap();
        let reader = async {
            loop {
                tokio::time::sleep(timeout / 4).await;
                if taken.frame().await.is_none() {
                    // Done: the body no longer waits on anyone.
                    std::future::pending::<()>().await;
                }
            }
        };
        let started = Instant::now();
        let found = tokio::select! {
            found = watch.stalled() => found,
            () = reader => unreachable!(),
        };
        assert_eq!(found.0, "/v2/stalled".to_string());
        assert!(found.1 > timeout);
        assert!(started.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn unwatched_bodies_pass_through() {
        let mut b = Watched::unwatched(body(vec![Bytes::from(vec![7u8; 100_000])]));
        let frame = b.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 100_000);
    }
}
