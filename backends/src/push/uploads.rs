//! Blob upload sessions on disk: `uploads/<id>/data` holds the bytes received so far and
//! `uploads/<id>/repo` the repository it was opened for. Sessions survive a restart (the
//! offset is the data file's length); sessions idle longer than the TTL are removed whole.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::fs::{self, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use ferry_core::{ByteStream, Digest, Error, Repository, Result, UploadState};

/// Running hash of a session, valid while it covers exactly `offset` bytes of the data file.
struct Hashing {
    offset: u64,
    hasher: Sha256,
}

/// What uploads may take.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    pub max_blob_size: u64,
    /// Bytes the store (blobs and uploads in progress) may hold in all.
    pub quota: Option<u64>,
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
}

/// The upload sessions of one store.
pub struct Uploads {
    dir: PathBuf,
    ttl: Duration,
    limits: UploadLimits,
    /// One lock per live session: chunks of one upload are applied one at a time. The hash
    /// is kept so finishing an upload does not re-read it; after a restart it is recomputed.
    sessions: Mutex<HashMap<String, Arc<Mutex<Option<Hashing>>>>>,
    /// The client each session opened since start was opened by (for the per-client limit).
    owners: std::sync::Mutex<HashMap<String, Option<IpAddr>>>,
    /// Bytes the store holds, blobs and uploads (counted at open, then as writes go).
    used: Arc<AtomicU64>,
}

impl Uploads {
    /// The sessions under `dir`, touching nothing (for a process beside the server).
    pub fn attach(dir: PathBuf, ttl: Duration, limits: UploadLimits) -> Self {
        Uploads {
            dir,
            ttl,
            limits,
            sessions: Mutex::new(HashMap::new()),
            owners: std::sync::Mutex::new(HashMap::new()),
            used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens the sessions under `dir`; `store_root` is what counts against the quota.
    pub async fn open(dir: PathBuf, ttl: Duration, limits: UploadLimits, store_root: &Path) -> Result<Self> {
        fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let uploads = Self::attach(dir, ttl, limits);
        uploads.expire().await?;
        let root = store_root.to_path_buf();
        let used = tokio::task::spawn_blocking(move || disk_usage(&root))
            .await
            .map_err(|e| Error::Internal(format!("counting the push store: {e}")))?;
        uploads.used.store(used, Ordering::Relaxed);
        Ok(uploads)
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<IpAddr>>> {
        self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts bytes a monolithic upload stored.
    pub fn grew(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Stops counting bytes a garbage collection freed.
    pub fn shrank(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(bytes)));
    }

    /// Checks `more` bytes on top of `already` fit the blob size limit and the quota.
    fn check_room(&self, already: u64, more: u64) -> Result<()> {
        if already + more > self.limits.max_blob_size {
            return Err(Error::TooLarge(format!(
                "a blob may be at most {} bytes (max_blob_size)",
                self.limits.max_blob_size
            )));
        }
        if let Some(quota) = self.limits.quota {
            if self.used.load(Ordering::Relaxed) + more > quota {
                return Err(Error::TooLarge(format!(
                    "the push store is full (quota of {quota} bytes)"
                )));
            }
        }
        Ok(())
    }

    /// A monolithic upload's body, failing once it passes the blob size limit or the quota.
    pub fn limited(&self, body: ByteStream, already: u64) -> Result<ByteStream> {
        self.check_room(already, 0)?;
        let (limits, used) = (self.limits, self.used.clone());
        let mut seen = already;
        Ok(body
            .map(move |chunk| {
                let chunk = chunk?;
                seen += chunk.len() as u64;
                let full = limits
                    .quota
                    .is_some_and(|q| used.load(Ordering::Relaxed) + seen - already > q);
                if seen > limits.max_blob_size || full {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        "the blob passes max_blob_size or the push store's quota",
                    ));
                }
                Ok(chunk)
            })
            .boxed())
    }

    fn session_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn data_path(&self, id: &str) -> PathBuf {
        self.session_dir(id).join("data")
    }

    /// Removes sessions idle for longer than the TTL, and half-created ones.
    pub async fn expire(&self) -> Result<usize> {
        let mut removed = 0;
        let mut rd = fs::read_dir(&self.dir)
            .await
            .map_err(|e| Error::io(format!("listing {}", self.dir.display()), e))?;
        while let Some(entry) = rd.next_entry().await.map_err(|e| Error::io("listing uploads", e))? {
            let path = entry.path();
            let stale = match fs::metadata(path.join("data")).await.and_then(|m| m.modified()) {
                Ok(modified) => SystemTime::now()
                    .duration_since(modified)
                    .is_ok_and(|idle| idle > self.ttl),
                Err(_) => true,
            };
            let complete = fs::try_exists(path.join("repo")).await.unwrap_or(false);
            if stale || !complete {
                let id = entry.file_name().to_string_lossy().into_owned();
                self.release(&id).await;
                if self.sessions.lock().await.remove(&id).is_some() {
                    ferry_core::metrics::upload_sessions(-1);
                }
                self.owners().remove(&id);
                fs::remove_dir_all(&path)
                    .await
                    .map_err(|e| Error::io(format!("removing expired upload {}", path.display()), e))?;
                tracing::info!(upload = %id, "removed expired upload session");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Creates a session. The `repo` file is written last: a session dir without it is a
    /// half-created one and is swept by [`Uploads::expire`].
    pub async fn start(&self, repo: &Repository, client: Option<IpAddr>) -> Result<UploadState> {
        let open = self.sessions.lock().await.len();
        if open >= self.limits.max_sessions {
            return Err(Error::TooManyRequests(format!(
                "{open} upload sessions are open (max_upload_sessions); finish or cancel some"
            )));
        }
        if let Some(ip) = client {
            let mine = self.owners().values().filter(|o| **o == Some(ip)).count();
            if mine >= self.limits.max_sessions_per_client {
                return Err(Error::TooManyRequests(format!(
                    "{ip} has {mine} upload sessions open (max_upload_sessions_per_client); finish or cancel some"
                )));
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let dir = self.session_dir(&id);
        let io = |e| Error::io(format!("creating upload {}", dir.display()), e);
        fs::create_dir(&dir).await.map_err(io)?;
        fs::File::create(dir.join("data")).await.map_err(io)?;
        fs::write(dir.join("repo"), repo.canonical()).await.map_err(io)?;
        self.sessions.lock().await.insert(
            id.clone(),
            Arc::new(Mutex::new(Some(Hashing {
                offset: 0,
                hasher: Sha256::new(),
            }))),
        );
        self.owners().insert(id.clone(), client);
        ferry_core::metrics::upload_sessions(1);
        Ok(UploadState { id, offset: 0 })
    }

    /// The lock of a session that exists on disk for `repo`, or [`Error::UploadUnknown`].
    async fn session(&self, repo: &Repository, id: &str) -> Result<Arc<Mutex<Option<Hashing>>>> {
        let unknown = || Error::UploadUnknown(id.to_string());
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(unknown());
        }
        let owner = fs::read_to_string(self.session_dir(id).join("repo"))
            .await
            .map_err(|_| unknown())?;
        if owner != repo.canonical() {
            return Err(unknown());
        }
        let mut sessions = self.sessions.lock().await;
        if !sessions.contains_key(id) {
            // A session from before a restart, open again.
            ferry_core::metrics::upload_sessions(1);
        }
        Ok(sessions.entry(id.to_string()).or_default().clone())
    }

    async fn data_len(&self, id: &str) -> Result<u64> {
        fs::metadata(self.data_path(id))
            .await
            .map(|m| m.len())
            .map_err(|_| Error::UploadUnknown(id.to_string()))
    }

    pub async fn state(&self, repo: &Repository, id: &str) -> Result<UploadState> {
        let lock = self.session(repo, id).await?;
        let _guard = lock.lock().await;
        Ok(UploadState {
            id: id.to_string(),
            offset: self.data_len(id).await?,
        })
    }

    /// Appends a chunk; on a failed read of the body the data file is cut back to where it
    /// stood, so a session never holds half a chunk.
    pub async fn append(
        &self,
        repo: &Repository,
        id: &str,
        range: Option<(u64, u64)>,
        body: ByteStream,
    ) -> Result<UploadState> {
        let lock = self.session(repo, id).await?;
        let mut hashing = lock.lock().await;
        let offset = self.append_locked(id, range, body, &mut hashing).await?;
        Ok(UploadState {
            id: id.to_string(),
            offset,
        })
    }

    async fn append_locked(
        &self,
        id: &str,
        range: Option<(u64, u64)>,
        mut body: ByteStream,
        hashing: &mut Option<Hashing>,
    ) -> Result<u64> {
        let offset = self.data_len(id).await?;
        if let Some((start, _)) = range {
            if start != offset {
                return Err(Error::UploadOutOfOrder(format!(
                    "chunk starts at byte {start}, the upload holds {offset} bytes"
                )));
            }
        }
        if hashing.as_ref().is_some_and(|h| h.offset != offset) {
            *hashing = None;
        }
        let path = self.data_path(id);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .await
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut written = 0u64;
        let result: Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Error::io("reading upload body", e))?;
                self.check_room(offset + written, chunk.len() as u64)?;
                self.used.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                written += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
                if let Some(h) = hashing.as_mut() {
                    h.hasher.update(&chunk);
                }
            }
            if let Some((start, end)) = range {
                if written != end - start + 1 {
                    return Err(Error::UploadInvalid(format!(
                        "Content-Range {start}-{end} announces {} bytes, the body had {written}",
                        end - start + 1
                    )));
                }
            }
            file.flush().await.map_err(|e| Error::io("flushing upload", e))
        }
        .await;
        if let Err(e) = result {
            self.used
                .fetch_sub(written.min(self.used.load(Ordering::Relaxed)), Ordering::Relaxed);
            *hashing = None;
            let _ = file.set_len(offset).await;
            return Err(e);
        }
        if let Some(h) = hashing.as_mut() {
            h.offset = offset + written;
        }
        Ok(offset + written)
    }

    /// Appends the last chunk and, when the data hashes to `expected`, moves it into `store`.
    /// The session stays locked from the last chunk until it is gone, so a chunk sent while
    /// the upload finishes waits, then finds no session; it can never land in the blob. On a
    /// mismatch nothing is stored and the session is discarded.
    pub async fn finish(
        &self,
        repo: &Repository,
        id: &str,
        body: ByteStream,
        expected: &Digest,
        store: &ferry_core::BlobStore,
    ) -> Result<u64> {
        let lock = self.session(repo, id).await?;
        let mut hashing = lock.lock().await;
        // A body that breaks off leaves the session as it stood, for the client to retry.
        let size = self.append_locked(id, None, body, &mut hashing).await?;
        let stored = async {
            let actual = match hashing.take() {
                Some(h) if h.offset == size => Digest::from_hasher(h.hasher),
                _ => hash_file(&self.data_path(id)).await?,
            };
            store.adopt(&self.data_path(id), expected, &actual).await
        }
        .await;
        if stored.is_err() {
            self.release(id).await;
        }
        let removed = self.remove(id).await;
        stored?;
        removed.map(|()| size)
    }

    /// Removes a session and everything it holds.
    pub async fn remove(&self, id: &str) -> Result<()> {
        if self.sessions.lock().await.remove(id).is_some() {
            ferry_core::metrics::upload_sessions(-1);
        }
        self.owners().remove(id);
        let dir = self.session_dir(id);
        match fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
        }
    }

    /// Checks a session exists for `repo` and removes it.
    pub async fn cancel(&self, repo: &Repository, id: &str) -> Result<()> {
        self.session(repo, id).await?;
        self.release(id).await;
        self.remove(id).await
    }

    /// Stops counting a session's data against the quota (it is about to be removed).
    async fn release(&self, id: &str) {
        if let Ok(len) = self.data_len(id).await {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(len)));
        }
    }
}

/// Bytes of the files under `root` (blocking).
fn disk_usage(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

async fn hash_file(path: &Path) -> Result<Digest> {
    let io = |e| Error::io(format!("hashing {}", path.display()), e);
    let mut f = fs::File::open(path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(hasher))
}
