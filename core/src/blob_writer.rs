//! A blob being written into a [`BlobStore`]: bytes go to a temp file under the store's root
//! and through sha256; sealed when the digest is the expected one, persisted (fsynced and
//! renamed into place) after. Dropped unfinished, the temp file goes.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::blobstore::{joined, BlobStore};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Takes the exclusive flock of `file` without waiting; whether it was taken. A temp file is
/// locked by its writer while it is written (and sealed), so that [`BlobStore::open`] in
/// another process (`ferry doctor`, a second ferry on the same directory) sweeps only the
/// temp files of writers that are gone.
pub(crate) fn try_lock(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock takes a lock on a descriptor borrowed from `file` for the call; it reads
    // and writes no memory of this process.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A blob being written starts going to the disk every this many bytes.
const WRITEBACK_EVERY: u64 = 1024 * 1024;

/// A blob writer an async stream feeds: free, or on a blocking thread with a batch.
pub(crate) enum Writing {
    Idle(Box<BlobWriter>),
    Busy(tokio::task::JoinHandle<Result<BlobWriter>>),
}

impl Writing {
    /// The writer once its batch is written.
    pub(crate) async fn ready(self) -> Result<BlobWriter> {
        match self {
            Writing::Idle(w) => Ok(*w),
            Writing::Busy(h) => joined(h).await,
        }
    }
}

/// A blob being written (blocking I/O): bytes go to a temp file and through sha256.
/// Dropping it without [`commit`](BlobWriter::commit) removes the temp file.
pub struct BlobWriter {
    store: BlobStore,
    file: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    size: u64,
    /// Where the writeback last started: bytes before it are on their way to the disk.
    written_back: u64,
    tmp: Option<PathBuf>,
    expected: Option<Digest>,
}

impl std::io::Write for BlobWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.file.write(data)?;
        self.hasher.update(&data[..n]);
        self.size += n as u64;
        self.write_back();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter {
    /// A writer into a new temp file `tmp` of `store`.
    pub(crate) fn create(store: BlobStore, tmp: PathBuf, expected: Option<Digest>) -> Result<BlobWriter> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        // Held until the file is closed: another process opening the store leaves it alone.
        try_lock(&file);
        Ok(BlobWriter {
            store,
            file: std::io::BufWriter::with_capacity(crate::chunks::READ_CHUNK, file),
            hasher: Sha256::new(),
            size: 0,
            written_back: 0,
            tmp: Some(tmp),
            expected,
        })
    }

    /// The temp file the bytes go to until the commit: a reader may follow the write there
    /// (a flushed byte is readable), and keeps reading after the commit through its open file.
    pub fn temp_path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }

    /// Writes `chunks` whole, straight to the file (after what is buffered): no copy, as few
    /// gathered writes as the kernel takes. For a caller that holds the bytes in chunks already.
    pub fn write_chunks(&mut self, chunks: &[Bytes]) -> io::Result<()> {
        use std::io::Write;
        self.file.flush()?;
        let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
        let mut left = &mut slices[..];
        io::IoSlice::advance_slices(&mut left, 0);
        while !left.is_empty() {
            match self.file.get_mut().write_vectored(left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.hash_written(left, n);
                    io::IoSlice::advance_slices(&mut left, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.write_back();
        Ok(())
    }

    /// Starts the disk write of what reached the file since the last start, every
    /// [`WRITEBACK_EVERY`] bytes, without waiting for it: the disk works while the bytes
    /// arrive, and the fsync at the commit finds only the tail still to write (rather than the
    /// whole blob at once, in the way of every other writer's fsync on the same disk).
    fn write_back(&mut self) {
        use std::os::fd::AsRawFd;
        let in_file = self.size - self.file.buffer().len() as u64;
        if in_file - self.written_back < WRITEBACK_EVERY {
            return;
        }
        let (offset, len) = (self.written_back, in_file - self.written_back);
        // SAFETY: a plain system call on the open file's descriptor, passing no memory; it
        // only starts writeback of pages already written (a failure shows at the fsync).
        let _ = unsafe {
            libc::sync_file_range(
                self.file.get_ref().as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.written_back = in_file;
    }

    /// Counts and hashes the first `n` bytes of `bufs`, just written.
    fn hash_written(&mut self, bufs: &[io::IoSlice<'_>], n: usize) {
        let mut hashed = 0;
        for buf in bufs {
            if hashed == n {
                break;
            }
            let take = buf.len().min(n - hashed);
            self.hasher.update(&buf[..take]);
            hashed += take;
        }
        self.size += n as u64;
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of what was written so far.
    pub fn digest_so_far(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }

    /// Flushes, fsyncs and checks the digest; on a match renames the blob into place.
    /// On a mismatch nothing is stored and [`Error::DigestInvalid`] is returned.
    pub fn commit(self) -> Result<(Digest, u64)> {
        let sealed = self.seal()?;
        let out = (sealed.digest.clone(), sealed.size);
        sealed.persist()?;
        Ok(out)
    }

    /// The first half of [`commit`](BlobWriter::commit): flushes and checks the digest, and
    /// hands back the blob to [`persist`](SealedBlob::persist), possibly on another thread
    /// while the caller goes on writing the next one.
    pub fn seal(mut self) -> Result<SealedBlob> {
        let digest = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if let Some(expected) = &self.expected {
            if *expected != digest {
                return Err(Error::DigestInvalid(format!(
                    "content hashing to {digest} instead of {expected}"
                )));
            }
        }
        std::io::Write::flush(&mut self.file).map_err(|e| Error::io("flushing blob temp file", e))?;
        let file = self
            .file
            .get_ref()
            .try_clone()
            .map_err(|e| Error::io("reopening blob temp file", e))?;
        Ok(SealedBlob {
            store: self.store.clone(),
            file,
            tmp: self.tmp.take(),
            digest,
            size: self.size,
        })
    }
}

/// A fully written blob with a verified digest, not yet durable nor in place. Dropping it
/// without [`persist`](SealedBlob::persist) removes it.
pub struct SealedBlob {
    store: BlobStore,
    file: std::fs::File,
    tmp: Option<PathBuf>,
    /// What the content hashed to.
    pub digest: Digest,
    /// Its length.
    pub size: u64,
}

impl SealedBlob {
    /// fsyncs the content, then renames it into its content address.
    pub fn persist(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("syncing blob temp file", e))?;
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = self.store.place(&tmp, &self.digest) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for SealedBlob {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
