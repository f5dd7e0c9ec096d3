//! The content-addressed blob store on disk.
//!
//! Layout under the root: `blobs/sha256/<2 hex>/<64 hex>` for blobs, `tmp/` for writes in
//! progress. A write goes through a hashing writer into a temp file under the same root (same
//! file system), is fsynced, and is renamed into place only when its digest is the expected
//! one; so a blob path either holds the full, verified content or does not exist, and a crash
//! leaves at most a temp file, which [`BlobStore::open`] sweeps away — only those no writer
//! holds (each locks its temp file), so a second process opening the store (`ferry doctor`)
//! leaves the first's writes alone. Two writers of one digest at once each write their own
//! temp file and the second rename replaces identical bytes.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::fs;

use crate::backend::{BlobBody, ByteStream};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::range::ByteRange;

use crate::blob_writer::Writing;
pub use crate::blob_writer::{BlobWriter, SealedBlob};
use crate::chunks::file_stream;

/// Bytes of a stream being stored gathered into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Removes the temp files under `tmp` whose writers are gone (a crash's leftovers): those
/// whose lock can be taken. A writer of a store another process holds keeps its file.
fn sweep(tmp: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(tmp)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else { continue };
        if crate::blob_writer::try_lock(&file) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// A directory of blobs keyed by digest.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) a store under `root` and removes temp files that a crash
    /// left behind.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let store = BlobStore { root };
        let tmp = store.tmp_dir();
        for dir in [tmp.clone(), store.root.join("blobs/sha256")] {
            fs::create_dir_all(&dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        blocking(move || sweep(&tmp).map_err(|e| Error::io(format!("clearing {}", tmp.display()), e))).await?;
        Ok(store)
    }

    /// The store at `root` as it is, clearing nothing: for a second process (`ferry gc`)
    /// beside the one that writes it.
    pub fn attach(root: impl Into<PathBuf>) -> Self {
        BlobStore { root: root.into() }
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the blob with this digest lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("blobs/sha256").join(&hex[..2]).join(hex)
    }

    /// The blob's size, or `None` when the store does not hold it.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        match fs::metadata(self.path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("stat of blob {digest}"), e)),
        }
    }

    /// Reads a whole blob into memory; meant for small blobs (manifests, configs).
    pub async fn read(&self, digest: &Digest) -> Result<Option<Bytes>> {
        match fs::read(self.path(digest)).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading blob {digest}"), e)),
        }
    }

    /// Opens a blob (or one range of it) as a stream, or `None` when absent. The file stays
    /// readable while it is streamed even if it is deleted meanwhile.
    pub async fn open_blob(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobBody>> {
        let path = self.path(digest);
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<(std::fs::File, u64)>> {
            match std::fs::File::open(&path) {
                Ok(f) => {
                    let size = f.metadata()?.len();
                    Ok(Some((f, size)))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("blob open task failed: {e}")))?
        .map_err(|e| Error::io(format!("opening blob {digest}"), e))?;
        let Some((file, size)) = opened else {
            return Ok(None);
        };
        let (offset, len) = match range {
            Some(r) => r.resolve(size)?,
            None => (0, size),
        };
        Ok(Some(BlobBody {
            size,
            range: range.map(|_| (offset, len)),
            stream: file_stream(file, offset, len),
        }))
    }

    /// Starts writing a blob whose digest is computed on the way; for blocking contexts
    /// (the async helpers below run it on a blocking thread). `expected`, when given, is
    /// checked at [`BlobWriter::commit`].
    pub fn writer(&self, expected: Option<Digest>) -> Result<BlobWriter> {
        BlobWriter::create(self.clone(), self.tmp_path(), expected)
    }

    /// Writes a whole stream as one blob. Its chunks are gathered into writes of
    /// 256 KiB on a blocking thread while the next ones arrive; no thread waits on the
    /// stream (a request body that trickles in would hold one for as long as it lasts, and a
    /// few hundred of them every thread the server has for files).
    pub async fn write_stream(&self, expected: Option<Digest>, mut body: ByteStream) -> Result<(Digest, u64)> {
        use futures::StreamExt;
        let store = self.clone();
        let mut writer = Writing::Idle(Box::new(blocking(move || store.writer(expected)).await?));
        let mut batch = Vec::new();
        let mut batched = 0;
        loop {
            let end = match body.next().await {
                Some(Ok(chunk)) => {
                    batched += chunk.len();
                    batch.push(chunk);
                    false
                }
                // Reads and writes fail for different reasons (a client gone, a disk full):
                // the error says which.
                Some(Err(e)) => return Err(Error::io("reading request body", e)),
                None => true,
            };
            if batched >= WRITE_BATCH || (end && !batch.is_empty()) {
                let mut w = writer.ready().await?;
                let chunks = std::mem::take(&mut batch);
                batched = 0;
                writer = Writing::Busy(tokio::task::spawn_blocking(move || {
                    w.write_chunks(&chunks).map_err(|e| Error::io("writing a blob", e))?;
                    Ok(w)
                }));
            }
            if end {
                break;
            }
        }
        let w = writer.ready().await?;
        blocking(move || w.commit()).await
    }

    /// Writes a small blob held in memory.
    pub async fn write_bytes(&self, data: Bytes) -> Result<Digest> {
        let store = self.clone();
        blocking(move || {
            let mut w = store.writer(Some(Digest::of(&data)))?;
            std::io::Write::write_all(&mut w, &data).map_err(|e| Error::io("writing blob", e))?;
            Ok(w.commit()?.0)
        })
        .await
    }

    /// Moves a file that already holds content (a finished upload) into the store, after
    /// checking it hashes to `expected`. The file must live on the store's file system. It is
    /// first renamed into the store's temp dir, so nothing holding its old path (a late chunk
    /// of the upload) can write to what becomes the blob.
    pub async fn adopt(&self, file: &Path, expected: &Digest, actual: &Digest) -> Result<()> {
        if expected != actual {
            return Err(Error::DigestInvalid(format!(
                "content hashing to {actual} instead of {expected}"
            )));
        }
        let (store, file, digest) = (self.clone(), file.to_path_buf(), expected.clone());
        blocking(move || {
            let tmp = store.tmp_path();
            std::fs::rename(&file, &tmp)
                .map_err(|e| Error::io(format!("moving {} into the store", file.display()), e))?;
            let placed = std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))
                .and_then(|()| store.place(&tmp, &digest));
            if placed.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            placed
        })
        .await
    }

    /// Takes a blob from another content-addressed store on the same file system in as a
    /// hard link of its file `src` (that store verified it when it wrote it; neither ever
    /// changes a blob in place). `false`, with nothing changed, when the file is gone or the
    /// link cannot be made (another file system): the caller copies it instead.
    pub async fn link_file(&self, src: &Path, digest: &Digest) -> Result<bool> {
        let (store, src, digest) = (self.clone(), src.to_path_buf(), digest.clone());
        blocking(move || {
            let tmp = store.tmp_path();
            if let Err(e) = std::fs::hard_link(&src, &tmp) {
                tracing::debug!(%digest, from = %src.display(), error = %e, "cannot link blob; it will be copied");
                return Ok(false);
            }
            let placed = store.place(&tmp, &digest);
            if placed.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            placed.map(|()| true)
        })
        .await
    }

    fn tmp_path(&self) -> PathBuf {
        self.tmp_dir().join(uuid::Uuid::new_v4().to_string())
    }

    /// Puts a verified temp file at its content address and syncs the directory. A blob
    /// already there is never replaced (it holds the same bytes, verified when it was
    /// written): the temp file is dropped instead. A hard link makes "create unless it
    /// exists" one atomic step; a rename is the fallback for file systems without links.
    pub(crate) fn place(&self, file: &Path, digest: &Digest) -> Result<()> {
        let dest = self.path(digest);
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        match std::fs::hard_link(file, &dest) {
            Ok(()) => {
                let _ = std::fs::remove_file(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = std::fs::remove_file(file);
                return Ok(());
            }
            Err(_) if dest.exists() => {
                let _ = std::fs::remove_file(file);
                return Ok(());
            }
            Err(_) => {
                std::fs::rename(file, &dest).map_err(|e| Error::io(format!("moving blob {digest} into place"), e))?
            }
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            // Best effort: makes the new name itself durable.
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes a blob; `false` when it was not there.
    pub async fn delete(&self, digest: &Digest) -> Result<bool> {
        match fs::remove_file(self.path(digest)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("deleting blob {digest}"), e)),
        }
    }

    /// Every digest in the store (for eviction and inventories).
    pub async fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let base = self.root.join("blobs/sha256");
        let mut dirs = fs::read_dir(&base)
            .await
            .map_err(|e| Error::io(format!("listing {}", base.display()), e))?;
        while let Some(d) = dirs.next_entry().await.map_err(|e| Error::io("listing blobs", e))? {
            let mut files = fs::read_dir(d.path())
                .await
                .map_err(|e| Error::io("listing blobs", e))?;
            while let Some(f) = files.next_entry().await.map_err(|e| Error::io("listing blobs", e))? {
                if let Ok(digest) = format!("sha256:{}", f.file_name().to_string_lossy()).parse() {
                    out.push(digest);
                }
            }
        }
        Ok(out)
    }
}

/// Runs blocking file work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    joined(tokio::task::spawn_blocking(f)).await
}

/// The outcome of blocking work already started.
pub(crate) async fn joined<T>(work: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    work.await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn collect(body: BlobBody) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = body.stream;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn opening_a_store_sweeps_only_temp_files_no_writer_holds() {
        let dir = tempfile::tempdir().unwrap();
        let first = BlobStore::open(dir.path()).await.unwrap();
        let data = b"written while another process opens the store".to_vec();
        let digest = Digest::of(&data);
        let mut writer = first.writer(Some(digest.clone())).unwrap();
        std::io::Write::write_all(&mut writer, &data[..10]).unwrap();
        let temp = writer.temp_path().unwrap().to_path_buf();
        // A crash's leftover: a temp file nobody holds.
        let crashed = dir.path().join("tmp/crashed");
        std::fs::write(&crashed, b"partial").unwrap();

        let second = BlobStore::open(dir.path()).await.unwrap();
        assert!(temp.exists(), "a living writer's temp file was swept");
        assert!(!crashed.exists(), "the leftover stayed");
        std::io::Write::write_all(&mut writer, &data[10..]).unwrap();
        writer.seal().unwrap().persist().unwrap();
        assert_eq!(second.read(&digest).await.unwrap().unwrap().as_ref(), data.as_slice());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn write_verify_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let d = store.write_bytes(Bytes::from_static(b"hello world")).await.unwrap();
        assert_eq!(d, Digest::of(b"hello world"));
        assert_eq!(store.size(&d).await.unwrap(), Some(11));
        let body = store
            .open_blob(&d, Some(ByteRange::FromTo(6, 10)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body.range, Some((6, 5)));
        assert_eq!(collect(body).await, b"world");
        assert!(matches!(
            store.open_blob(&d, Some(ByteRange::From(11))).await,
            Err(Error::RangeNotSatisfiable { .. })
        ));
    }

    #[tokio::test]
    async fn chunks_written_gathered_hash_and_store_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        // Buffered writes before and after chunks written straight to the file.
        let chunks: Vec<Bytes> = [7usize, crate::chunks::READ_CHUNK, 3, 100_000, 200_000, 1]
            .iter()
            .enumerate()
            .map(|(i, n)| Bytes::from(vec![i as u8 + 1; *n]))
            .collect();
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut w = store.writer(Some(Digest::of(&whole))).unwrap();
        std::io::Write::write_all(&mut w, &chunks[0]).unwrap();
        w.write_chunks(&chunks[1..5]).unwrap();
        std::io::Write::write_all(&mut w, &chunks[5]).unwrap();
        assert_eq!(w.size(), whole.len() as u64);
        let (d, size) = w.commit().unwrap();
        assert_eq!((d.clone(), size), (Digest::of(&whole), whole.len() as u64));
        let body = store.open_blob(&d, None).await.unwrap().unwrap();
        assert_eq!(collect(body).await, whole);
    }

    #[tokio::test]
    async fn wrong_digest_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let mut w = store.writer(Some(Digest::of(b"other"))).unwrap();
        std::io::Write::write_all(&mut w, b"hello").unwrap();
        assert!(matches!(w.commit(), Err(Error::DigestInvalid(_))));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn streams_that_trickle_in_hold_no_thread() {
        // Were a write waiting on its stream on the one blocking thread, no other file work
        // could run.
        crate::chunks::tests::on_one_blocking_thread(async {
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::open(dir.path()).await.unwrap();
            let mut writes = Vec::new();
            for _ in 0..3 {
                let first = futures::stream::once(async { Ok::<_, io::Error>(Bytes::from_static(b"0123456789")) });
                let body = first.chain(futures::stream::pending()).boxed();
                let store = store.clone();
                writes.push(tokio::spawn(async move { store.write_stream(None, body).await }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            crate::chunks::tests::the_blocking_thread_is_free().await;
            for w in writes {
                w.abort();
            }
        });
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let data = vec![7u8; 1 << 20];
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (s, d) = (store.clone(), data.clone());
                tokio::spawn(async move { s.write_bytes(Bytes::from(d)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let d = Digest::of(&data);
        assert_eq!(store.list().await.unwrap(), vec![d.clone()]);
        assert_eq!(std::fs::read(store.path(&d)).unwrap(), data);
    }

    #[tokio::test]
    async fn crash_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/partial"), b"half").unwrap();
        BlobStore::open(dir.path()).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
