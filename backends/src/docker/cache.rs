//! The export cache: blobs in one content-addressed store shared by every image (a base layer
//! of ten images is stored once), and one entry per engine image id saying what its export
//! held. Entries are keyed by image id, so a rebuild under the same tag (a new id) is
//! exported again on the next request. Entries are files, so they survive a restart.
//!
//! Exports are single-flight per image (concurrent requests wait for the one export) and
//! bounded in number; the store has an optional size limit, enforced by dropping the least
//! recently used entries and deleting the blobs no remaining entry references — never a
//! blob that is pinned (being served, or stored by an export not recorded yet).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{RwLock, Semaphore};

use ferry_core::flight::Flights;
use ferry_core::{BlobStore, Digest, Error, Result};

use super::export::Exported;
use super::pins::{Pin, Pins};
use crate::fsutil::{list_names, read_optional, remove_optional, write_atomic};

/// What one engine image's export held.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub image_id: String,
    #[serde(flatten)]
    pub export: Exported,
    /// Milliseconds since the epoch of the last request served from this entry.
    pub last_used_ms: u64,
}

impl Entry {
    fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.export.manifests.iter().chain(&self.export.blobs)
    }
}

/// How long a failed export answers the requests for the same image instead of a new one.
const FAILED_EXPORT_MEMORY: std::time::Duration = std::time::Duration::from_secs(10);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn id_key(image_id: &str) -> String {
    image_id.trim_start_matches("sha256:").to_string()
}

pub struct Cache {
    /// The backend's name, for metrics.
    backend: String,
    pub store: BlobStore,
    entries_dir: PathBuf,
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    /// Exports under way (each its own task, finished and recorded even when every request
    /// that waited for it has gone) and exports that failed lately, by image id.
    flights: Flights<Arc<Entry>>,
    exports: Semaphore,
    max_bytes: Option<u64>,
    /// Blobs that must stay: being streamed, or stored by an export not yet recorded.
    pub pins: Pins,
    /// Exports run since start (for logs and tests).
    pub export_count: AtomicU64,
}

impl Cache {
    pub async fn open(
        backend: &str,
        dir: PathBuf,
        max_parallel_exports: usize,
        max_bytes: Option<u64>,
    ) -> Result<Self> {
        let store = BlobStore::open(&dir).await?;
        let entries_dir = dir.join("entries");
        tokio::fs::create_dir_all(&entries_dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", entries_dir.display()), e))?;
        let mut entries = HashMap::new();
        for name in list_names(&entries_dir).await? {
            let Some(bytes) = read_optional(&entries_dir.join(&name)).await? else {
                continue;
            };
            match serde_json::from_slice::<Entry>(&bytes) {
                Ok(e) => {
                    entries.insert(id_key(&e.image_id), Arc::new(e));
                }
                Err(e) => {
                    tracing::warn!(entry = %name, error = %e, "dropping unreadable cache entry");
                    remove_optional(&entries_dir.join(&name)).await?;
                }
            }
        }
        Ok(Cache {
            backend: backend.to_string(),
            store,
            entries_dir,
            entries: RwLock::new(entries),
            flights: Flights::remembering_failures(FAILED_EXPORT_MEMORY),
            exports: Semaphore::new(max_parallel_exports.max(1)),
            max_bytes,
            pins: Pins::default(),
            export_count: AtomicU64::new(0),
        })
    }

    /// The entry of an image id when its manifests are still in the store.
    pub async fn get(&self, image_id: &str) -> Option<Arc<Entry>> {
        let entry = self.entries.read().await.get(&id_key(image_id)).cloned()?;
        for d in &entry.export.manifests {
            if !self.store.path(d).exists() {
                return None;
            }
        }
        Some(entry)
    }

    /// The entry that holds a manifest with this digest.
    pub async fn by_manifest(&self, digest: &Digest) -> Option<Arc<Entry>> {
        self.entries
            .read()
            .await
            .values()
            .find(|e| e.export.manifests.contains(digest))
            .cloned()
    }

    /// Image ids whose exports held (or lacked) this blob.
    pub async fn images_with_blob(&self, digest: &Digest) -> (Vec<String>, Vec<String>) {
        let entries = self.entries.read().await;
        let holding = entries
            .values()
            .filter(|e| e.digests().any(|d| d == digest))
            .map(|e| e.image_id.clone())
            .collect();
        let lacking = entries
            .values()
            .filter(|e| e.export.missing.contains(digest))
            .map(|e| e.image_id.clone())
            .collect();
        (holding, lacking)
    }

    /// Notes that an entry was used, for LRU eviction (persisted lazily with the entry).
    pub async fn touch(&self, image_id: &str) {
        let mut entries = self.entries.write().await;
        if let Some(e) = entries.get_mut(&id_key(image_id)) {
            if now_ms() > e.last_used_ms + 1000 {
                let mut updated = (**e).clone();
                updated.last_used_ms = now_ms();
                *e = Arc::new(updated);
            }
        }
    }

    /// Returns the entry for `image_id`, running `export` (once, however many callers ask at
    /// the same time) when there is none. The export runs as a task of its own within the
    /// limit of parallel exports: once started it is finished and recorded even if every
    /// caller went away, and its failure answers the callers of the next few seconds too.
    /// The export hands back pins on what it stored, released once the entry is recorded.
    pub async fn get_or_export<F, Fut>(self: &Arc<Self>, image_id: &str, export: F) -> Result<Arc<Entry>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(Exported, Vec<Pin>)>> + Send + 'static,
    {
        let cached = self.get(image_id).await;
        ferry_core::metrics::cache_lookup(&self.backend, cached.is_some());
        if let Some(e) = cached {
            return Ok(e);
        }
        let (cache, id) = (self.clone(), image_id.to_string());
        self.flights
            .run(&id_key(image_id), async move {
                if let Some(e) = cache.get(&id).await {
                    return Ok(e);
                }
                let _permit = cache
                    .exports
                    .acquire()
                    .await
                    .map_err(|_| Error::Internal("export limiter closed".into()))?;
                cache.export_count.fetch_add(1, Ordering::Relaxed);
                let (exported, pins) = export().await?;
                let entry = cache.record(&id, exported).await;
                drop(pins);
                let entry = entry?;
                cache.evict(&id).await?;
                Ok(entry)
            })
            .await
    }

    /// Deletes blobs an export stored but does not use (or all it stored, when it failed),
    /// except those a recorded entry references or somebody else pins.
    pub async fn discard(&self, pins: impl IntoIterator<Item = Pin>) {
        let entries = self.entries.read().await;
        let referenced: HashSet<&Digest> = entries.values().flat_map(|e| e.digests()).collect();
        for pin in pins {
            if !referenced.contains(&pin.digest) {
                self.pins.remove_if_sole(&self.store, pin);
            }
        }
    }

    /// Records what an export (or a direct read) found for an image.
    pub async fn record(&self, image_id: &str, exported: Exported) -> Result<Arc<Entry>> {
        let entry = Arc::new(Entry {
            image_id: image_id.to_string(),
            export: exported,
            last_used_ms: now_ms(),
        });
        let json = serde_json::to_vec_pretty(&*entry).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(&self.entries_dir.join(id_key(image_id)), &json).await?;
        self.entries.write().await.insert(id_key(image_id), entry.clone());
        Ok(entry)
    }

    /// Enforces the size limit: drops least recently used entries (never `fresh`, the one
    /// just exported) until the blobs the rest reference fit, then deletes every blob no
    /// remaining entry references (except those being served).
    async fn evict(&self, fresh: &str) -> Result<()> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        let (all, sizes) = self.blob_sizes().await?;
        if sizes.values().sum::<u64>() <= max {
            return Ok(());
        }
        let mut entries = self.entries.write().await;
        let mut order: Vec<Arc<Entry>> = entries.values().cloned().collect();
        // Least recently used first; the fresh entry last, whatever its clock says.
        order.sort_by_key(|e| (id_key(&e.image_id) == id_key(fresh), e.last_used_ms));
        let referenced_size = |kept: &[Arc<Entry>]| {
            let set: HashSet<&Digest> = kept.iter().flat_map(|e| e.digests()).collect();
            set.iter().map(|d| sizes.get(*d).copied().unwrap_or(0)).sum::<u64>()
        };
        let mut dropped = Vec::new();
        // The fresh entry stays even when it alone is over the limit.
        while order.len() > 1 && referenced_size(&order) > max {
            dropped.push(order.remove(0));
        }
        let freed = self.drop_entries(&mut entries, &dropped, &all, &sizes).await?;
        tracing::info!(
            dropped_images = dropped.len(),
            freed_bytes = freed,
            limit_bytes = max,
            "cache over its size limit: evicted least recently used images"
        );
        Ok(())
    }

    /// Every blob in the store, with its size.
    async fn blob_sizes(&self) -> Result<(Vec<Digest>, HashMap<Digest, u64>)> {
        let all = self.store.list().await?;
        let mut sizes = HashMap::new();
        for d in &all {
            sizes.insert(d.clone(), self.store.size(d).await?.unwrap_or(0));
        }
        Ok((all, sizes))
    }

    /// Removes `dropped` from `entries` (and their files), then deletes every blob of `all`
    /// that no remaining entry references and nobody pins. The bytes freed.
    async fn drop_entries(
        &self,
        entries: &mut HashMap<String, Arc<Entry>>,
        dropped: &[Arc<Entry>],
        all: &[Digest],
        sizes: &HashMap<Digest, u64>,
    ) -> Result<u64> {
        for e in dropped {
            entries.remove(&id_key(&e.image_id));
            remove_optional(&self.entries_dir.join(id_key(&e.image_id))).await?;
        }
        let keep: HashSet<&Digest> = entries.values().flat_map(|e| e.digests()).collect();
        let mut freed = 0u64;
        for d in all {
            if !keep.contains(d) && self.pins.remove_unpinned(&self.store, d) {
                freed += sizes.get(d).copied().unwrap_or(0);
            }
        }
        Ok(freed)
    }

    /// Every entry, with the bytes of the blobs and manifests it references.
    pub async fn list(&self) -> Vec<(Arc<Entry>, u64)> {
        let entries: Vec<Arc<Entry>> = self.entries.read().await.values().cloned().collect();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let mut size = 0;
            for d in e.digests() {
                size += self.store.size(d).await.ok().flatten().unwrap_or(0);
            }
            out.push((e, size));
        }
        out
    }

    /// Drops the entries `select` picks (an admin's eviction) and the blobs only they
    /// referenced; blobs being served or stored by a running export stay.
    pub async fn evict_where(&self, select: impl Fn(&Entry) -> bool) -> Result<(usize, u64)> {
        let (all, sizes) = self.blob_sizes().await?;
        let mut entries = self.entries.write().await;
        let dropped: Vec<Arc<Entry>> = entries.values().filter(|e| select(e)).cloned().collect();
        if dropped.is_empty() {
            return Ok((0, 0));
        }
        let freed = self.drop_entries(&mut entries, &dropped, &all, &sizes).await?;
        Ok((dropped.len(), freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::export::Format;

    async fn blob(cache: &Cache, data: &'static [u8]) -> Digest {
        cache.store.write_bytes(bytes::Bytes::from_static(data)).await.unwrap()
    }

    fn exported(manifest: &Digest, blobs: &[&Digest]) -> Exported {
        Exported {
            format: Format::Oci,
            top: manifest.clone(),
            media_type: ferry_core::media::OCI_MANIFEST.to_string(),
            manifests: vec![manifest.clone()],
            blobs: blobs.iter().map(|d| (*d).clone()).collect(),
            missing: Vec::new(),
        }
    }

    #[tokio::test]
    async fn discarding_spares_blobs_another_export_holds_or_an_entry_references() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open("test", dir.path().to_path_buf(), 2, None).await.unwrap());
        let (m, shared, own) = (
            blob(&cache, b"m").await,
            blob(&cache, b"shared").await,
            blob(&cache, b"own").await,
        );

        // Export A is still running and has stored `shared`; export B stored it too and failed.
        let held_by_a = cache.pins.pin(&shared);
        cache.discard([cache.pins.pin(&shared), cache.pins.pin(&own)]).await;
        assert!(cache.store.path(&shared).exists(), "A still needs it");
        assert!(!cache.store.path(&own).exists(), "only B had it");

        // A is recorded: its blobs stay referenced after its pins are gone.
        let pins = vec![held_by_a, cache.pins.pin(&m)];
        cache
            .get_or_export("sha256:a", {
                let e = exported(&m, &[&shared]);
                move || async move { Ok((e, pins)) }
            })
            .await
            .unwrap();
        cache.discard([cache.pins.pin(&shared)]).await;
        assert!(cache.store.path(&shared).exists(), "entry A references it");
    }

    #[tokio::test]
    async fn eviction_spares_blobs_of_an_export_not_yet_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open("test", dir.path().to_path_buf(), 2, Some(1)).await.unwrap());
        let in_flight = blob(&cache, b"stored by an export still running").await;
        let pin = cache.pins.pin(&in_flight);
        let (m, layer) = (blob(&cache, b"m").await, blob(&cache, b"layer").await);
        let pins = vec![cache.pins.pin(&m), cache.pins.pin(&layer)];
        // Over the 1-byte limit: eviction runs after this entry is recorded.
        cache
            .get_or_export("sha256:b", {
                let e = exported(&m, &[&layer]);
                move || async move { Ok((e, pins)) }
            })
            .await
            .unwrap();
        assert!(cache.store.path(&in_flight).exists(), "pinned by the running export");
        drop(pin);
        let (m2, layer2) = (blob(&cache, b"m2").await, blob(&cache, b"layer2").await);
        cache
            .get_or_export("sha256:c", {
                let e = exported(&m2, &[&layer2]);
                move || async move { Ok((e, Vec::new())) }
            })
            .await
            .unwrap();
        assert!(
            !cache.store.path(&in_flight).exists(),
            "unpinned and unreferenced: evicted"
        );
    }
}
