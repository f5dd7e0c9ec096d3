//! The cache's size limit: blobs touched when served, the least recently used evicted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use ferry_core::{BlobStore, Digest};

use super::UpstreamBackend;

/// Deletes least recently used blobs until the cache is a tenth under `max`. A blob being
/// served stays readable to its reader until the stream ends.
pub(super) async fn evict(backend: &str, store: &BlobStore, used: &AtomicU64, max: u64) {
    let target = max - max / 10;
    let mut blobs = Vec::new();
    let Ok(all) = store.list().await else { return };
    for d in all {
        if let Ok(m) = tokio::fs::metadata(store.path(&d)).await {
            blobs.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), d));
        }
    }
    blobs.sort_by_key(|(t, ..)| *t);
    let mut total: u64 = blobs.iter().map(|(_, len, _)| len).sum();
    let (mut freed, mut count) = (0u64, 0usize);
    for (_, len, d) in blobs {
        if total <= target {
            break;
        }
        if matches!(store.delete(&d).await, Ok(true)) {
            total -= len;
            freed += len;
            count += 1;
        }
    }
    used.store(total, Ordering::SeqCst);
    tracing::info!(
        backend,
        freed_bytes = freed,
        blobs = count,
        limit_bytes = max,
        "upstream cache over its size limit: evicted least recently used blobs"
    );
}

impl UpstreamBackend {
    /// Marks a blob used now, for the LRU order of eviction.
    pub(super) fn touch(&self, digest: &Digest) {
        let path = self.store.path(digest);
        tokio::task::spawn_blocking(move || {
            // Times change through the descriptor of a read-only open: the owner may.
            if let Ok(f) = std::fs::File::open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        });
    }
}
