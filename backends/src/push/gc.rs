//! Garbage collection of the push store: blob files no manifest references any more (after
//! deletes, or pushes abandoned before their manifest), removed with their repository links.
//!
//! What is never removed:
//! - a blob a stored manifest references, or a manifest itself;
//! - a blob younger than `min_age`, or linked, mounted or asked for (`HEAD`, as a pusher
//!   does before skipping an upload) in some repository within `min_age`: the manifest of a
//!   push under way may be about to name it;
//! - a blob being streamed: its open file keeps its bytes until the stream ends.
//!
//! A collection holds the store's lock exclusively and a manifest push holds it shared, from
//! checking what the manifest references to recording it: the two never interleave, whether
//! the collector runs in the server or as `ferry gc` beside it (the lock is a file lock).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use ferry_core::{Digest, Error, ManifestInfo, Result};

use super::PushBackend;
use crate::fsutil::list_names;

/// What a collection found (and, unless it was a dry run, removed).
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// Blobs in the store.
    pub blobs: usize,
    /// Blobs kept because a manifest references them, or they are recent.
    pub kept: usize,
    /// Blobs removed (or that would be, in a dry run).
    pub removed: Vec<(Digest, u64)>,
}

impl GcReport {
    /// Bytes of the removed blobs.
    pub fn bytes(&self) -> u64 {
        self.removed.iter().map(|(_, s)| s).sum()
    }
}

/// The store's lock file, held shared by a manifest push and exclusively by a collection.
pub(super) struct StoreLock(PathBuf);

impl StoreLock {
    pub(super) fn new(root: &Path) -> Self {
        StoreLock(root.join("gc.lock"))
    }

    async fn take(&self, how: FlockArg) -> Result<Flock<std::fs::File>> {
        let path = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            Flock::lock(file, how).map_err(|(_, e)| Error::io(format!("locking {}", path.display()), e.into()))
        })
        .await
        .map_err(|e| Error::Internal(format!("lock task: {e}")))?
    }

    /// Held while a manifest is checked and recorded.
    pub(super) async fn shared(&self) -> Result<Flock<std::fs::File>> {
        self.take(FlockArg::LockShared).await
    }

    async fn exclusive(&self) -> Result<Flock<std::fs::File>> {
        self.take(FlockArg::LockExclusive).await
    }
}

fn younger_than(path: &Path, age: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_none_or(|elapsed| elapsed < age)
}

impl PushBackend {
    /// Collects unreferenced blobs older than `min_age`; with `dry_run` only says which.
    pub async fn collect_garbage(&self, min_age: Duration, dry_run: bool) -> Result<GcReport> {
        let _lock = self.lock.exclusive().await?;
        let started = std::time::Instant::now();
        let mut live: HashSet<Digest> = HashSet::new();
        let mut links: Vec<PathBuf> = Vec::new();
        for dir in self.repository_dirs().await? {
            for hex in list_names(&dir.join("_manifests")).await? {
                let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
                    continue;
                };
                if let Some(bytes) = self.blobs.read(&digest).await? {
                    // A manifest that does not parse any more keeps only itself.
                    if let Ok(info) = ManifestInfo::parse(&bytes, None) {
                        live.extend(info.blobs.iter().chain(&info.manifests).map(|d| d.digest.clone()));
                    }
                }
                live.insert(digest);
            }
            for hex in list_names(&dir.join("_blobs")).await? {
                let link = dir.join("_blobs").join(&hex);
                if younger_than(&link, min_age) {
                    if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                        live.insert(d);
                    }
                }
                links.push(link);
            }
        }
        let mut report = GcReport::default();
        for digest in self.blobs.list().await? {
            report.blobs += 1;
            if live.contains(&digest) || younger_than(&self.blobs.path(&digest), min_age) {
                report.kept += 1;
                continue;
            }
            let size = self.blobs.size(&digest).await?.unwrap_or(0);
            report.removed.push((digest, size));
        }
        if !dry_run {
            let gone: HashSet<&str> = report.removed.iter().map(|(d, _)| d.hex()).collect();
            // Links first: a link without its file would promise what cannot be served.
            for link in links {
                if link
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| gone.contains(n))
                {
                    crate::fsutil::remove_optional(&link).await?;
                }
            }
            for (digest, _) in &report.removed {
                self.blobs.delete(digest).await?;
            }
            self.uploads.shrank(report.bytes());
        }
        tracing::info!(backend = %self.config.name, dry_run, blobs = report.blobs, kept = report.kept,
            removed = report.removed.len(), freed_bytes = report.bytes(), min_age_s = min_age.as_secs(),
            elapsed_ms = started.elapsed().as_millis() as u64, "garbage collection");
        Ok(report)
    }

    /// Every repository directory: those with manifests, and those with only blob links (a
    /// push whose manifest has not come, which the catalog does not list).
    async fn repository_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.join("repos")];
        while let Some(dir) = stack.pop() {
            let names = list_names(&dir).await?;
            if names.iter().any(|n| n == "_manifests" || n == "_blobs") {
                out.push(dir.clone());
            }
            stack.extend(names.iter().filter(|n| !n.starts_with('_')).map(|n| dir.join(n)));
        }
        Ok(out)
    }

    /// Marks a blob as wanted in `repo` now (a pusher asked whether it exists): a collection
    /// spares it for `min_age` even if no manifest names it yet.
    pub(super) fn touch_link(&self, repo: &ferry_core::Repository, digest: &Digest) {
        let link = self.link_path(repo, digest);
        if let Ok(f) = std::fs::File::options().write(true).open(&link) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}
