//! The fill with no origin but a body in memory: what reaches clients, what is stored, and
//! what is handed over.

use super::*;

/// An origin's answer whose body is `body`.
fn origin(body: reqwest::Body) -> reqwest::Response {
    reqwest::Response::from(http::Response::new(body))
}

/// Starts a fill of `wanted`, its outcome (stored or not) on the returned channel.
fn spawn(
    store: &BlobStore,
    wanted: Wanted,
    body: reqwest::Body,
    keep_percent: u8,
) -> (Arc<Fill>, tokio::sync::oneshot::Receiver<bool>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fill = Fill::spawn(
        "test",
        store,
        wanted,
        origin(body),
        keep_percent,
        Commit::Store,
        move |outcome: &Result<()>| {
            let _ = tx.send(outcome.is_ok());
        },
    )
    .unwrap();
    (fill, rx)
}

/// Whether the fill stored its blob; a fill that never ends fails the test.
async fn outcome(stored: tokio::sync::oneshot::Receiver<bool>) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(10), stored)
        .await
        .expect("the fill ended")
        .expect("the fill reported how it ended")
}

fn wanted(data: &[u8]) -> Wanted {
    Wanted {
        repo: Repository::new("reg.example", "team/app").unwrap(),
        digest: Digest::of(data),
        size: data.len() as u64,
    }
}

// The runtime is single-threaded: the fill's tasks run only once the test awaits, so
// the client leaves before the writer has written anything, whatever has arrived.

#[tokio::test]
async fn a_blob_that_arrived_whole_is_stored_although_its_client_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = vec![7u8; 64 * 1024];
    let (fill, stored) = spawn(&store, wanted(&data), data.clone().into(), 50);
    let Joined::Body(body) = fill.join(None).await.unwrap() else {
        panic!("the fill ended before its first reader")
    };
    drop(body);
    assert!(outcome(stored).await, "every byte had arrived");
    assert_eq!(std::fs::read(store.path(&Digest::of(&data))).unwrap(), data);
}

/// A fill handed to a store of its own (a heal's containerd), its outcome on the channel:
/// the hand-off copies the verified file into `into` after `delay`.
fn spawn_handed(
    store: &BlobStore,
    wanted: Wanted,
    body: reqwest::Body,
    into: PathBuf,
    delay: std::time::Duration,
) -> (Arc<Fill>, tokio::sync::oneshot::Receiver<bool>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let hand: HandOff = Box::new(move |file: PathBuf| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            std::fs::copy(&file, &into).map_err(|e| Error::io("handing over", e))?;
            Ok(())
        })
    });
    let fill = Fill::spawn(
        "heal",
        store,
        wanted,
        origin(body),
        0,
        Commit::Hand(hand),
        move |o: &Result<()>| {
            let _ = tx.send(o.is_ok());
        },
    )
    .unwrap();
    (fill, rx)
}

async fn read_all(fill: &Arc<Fill>) -> (Vec<u8>, Option<io::Error>) {
    let Joined::Body(body) = fill.join(None).await.unwrap() else {
        panic!("the fill ended before its first reader")
    };
    let mut out = Vec::new();
    let mut stream = body.stream;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[tokio::test]
async fn a_handed_blob_reaches_its_store_before_its_last_byte_reaches_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("scratch")).await.unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let into = dir.path().join("committed");
    let (fill, stored) = spawn_handed(
        &store,
        wanted(&data),
        data.clone().into(),
        into.clone(),
        std::time::Duration::from_millis(300),
    );
    let (got, err) = read_all(&fill).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, data);
    assert_eq!(
        std::fs::read(&into).unwrap(),
        data,
        "the whole blob was in its store when the client had it"
    );
    assert!(outcome(stored).await);
    assert_eq!(store.size(&Digest::of(&data)).await.unwrap(), None, "not kept twice");
    assert!(!fill.temp.exists(), "the temp file went");
}

#[tokio::test]
async fn a_handed_blob_that_does_not_verify_reaches_no_store_and_no_client_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("scratch")).await.unwrap();
    let good = vec![5u8; 100_000];
    let mut evil = good.clone();
    evil[70_000] ^= 1;
    let into = dir.path().join("committed");
    let (fill, stored) = spawn_handed(
        &store,
        wanted(&good),
        evil.into(),
        into.clone(),
        std::time::Duration::ZERO,
    );
    let (got, err) = read_all(&fill).await;
    assert!(err.is_some(), "a complete wrong blob reached the client");
    assert!(got.len() < good.len());
    assert!(!outcome(stored).await);
    assert!(!into.exists(), "nothing was handed over");
    assert!(!fill.temp.exists(), "nothing partial is left");
    // A short body fails the same way, as unavailable.
    let short = good[..50_000].to_vec();
    let (fill, stored) = spawn_handed(
        &store,
        wanted(&good),
        short.into(),
        into.clone(),
        std::time::Duration::ZERO,
    );
    let (_, err) = read_all(&fill).await;
    assert!(err.is_some());
    assert!(!outcome(stored).await);
    assert!(!into.exists());
}

#[tokio::test]
async fn a_fill_not_far_enough_along_stops_when_its_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = vec![9u8; 1024 * 1024];
    // The origin sends a first part, then nothing more.
    let first = Bytes::copy_from_slice(&data[..4096]);
    let stalled = futures::stream::once(async move { Ok::<_, io::Error>(first) }).chain(futures::stream::pending());
    let (fill, stored) = spawn(&store, wanted(&data), reqwest::Body::wrap_stream(stalled), 50);
    let Joined::Body(body) = fill.join(None).await.unwrap() else {
        panic!("the fill ended before its first reader")
    };
    drop(body);
    assert!(!outcome(stored).await, "4 KiB of 1 MiB is not far enough along");
    assert_eq!(store.size(&Digest::of(&data)).await.unwrap(), None);
    assert!(!fill.temp.exists(), "nothing partial is left");
}

#[test]
fn fills_from_origins_that_stall_hold_no_thread() {
    // One blocking thread for the whole runtime: were a fill's writer waiting on its
    // origin there, no other file work could run.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut fills = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 1024 * 1024];
            let first = Bytes::copy_from_slice(&data[..64 * 1024]);
            let stalled =
                futures::stream::once(async move { Ok::<_, io::Error>(first) }).chain(futures::stream::pending());
            let (fill, stored) = spawn(&store, wanted(&data), reqwest::Body::wrap_stream(stalled), 50);
            let Joined::Body(body) = fill.join(None).await.unwrap() else {
                panic!("the fill ended before its first reader")
            };
            fills.push((fill, stored, body));
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::task::spawn_blocking(|| 42)).await;
        assert_eq!(other.expect("the blocking thread is held").unwrap(), 42);
    });
}

/// An origin's body that notes when it is first asked for bytes, sends `first`, then `rest`,
/// or nothing more (and never ends) when `rest` is `None`.
fn watched(first: Bytes, rest: Option<Bytes>, asked: Arc<AtomicBool>) -> reqwest::Body {
    let first = futures::stream::once(async move {
        asked.store(true, Ordering::SeqCst);
        Ok::<_, io::Error>(first)
    });
    match rest {
        Some(rest) => reqwest::Body::wrap_stream(first.chain(futures::stream::once(async move { Ok(rest) }))),
        None => reqwest::Body::wrap_stream(first.chain(futures::stream::pending())),
    }
}

/// Waits until `cond` holds, for at most 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fetches_beyond_the_ceiling_wait_for_one_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    // As many fetches as may copy at once, each from an origin that stalls after 4 KiB, and
    // each read by a client.
    let mut stalled = Vec::new();
    for i in 0..DEFAULT_MAX_FETCHES {
        let data = vec![i as u8; 1024 * 1024];
        let asked = Arc::new(AtomicBool::new(false));
        let body = watched(Bytes::copy_from_slice(&data[..4096]), None, asked.clone());
        let (fill, stored) = spawn(&store, wanted(&data), body, 50);
        let Joined::Body(reader) = fill.join(None).await.unwrap() else {
            panic!("the fill ended before its first reader")
        };
        stalled.push((asked, stored, reader));
    }
    until("every fetch under the ceiling started", || {
        stalled.iter().all(|(asked, _, _)| asked.load(Ordering::SeqCst))
    })
    .await;

    // One more waits: its origin is not asked for a byte.
    let data = b"the blob fetched once a slot is free".repeat(1000);
    let asked = Arc::new(AtomicBool::new(false));
    let body = watched(
        Bytes::copy_from_slice(&data[..100]),
        Some(Bytes::copy_from_slice(&data[100..])),
        asked.clone(),
    );
    let (fill, stored) = spawn(&store, wanted(&data), body, 50);
    let reading = tokio::spawn({
        let fill = fill.clone();
        async move { read_all(&fill).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!asked.load(Ordering::SeqCst), "a fetch beyond the ceiling started");

    // The client of one stalled fetch leaves; that fetch stops, and the waiting one runs.
    let (_, first_stored, reader) = stalled.remove(0);
    drop(reader);
    assert!(!outcome(first_stored).await);
    let (got, err) = reading.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, data);
    assert!(outcome(stored).await);
    assert!(asked.load(Ordering::SeqCst));
}
