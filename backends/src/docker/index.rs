//! Which engine image holds a blob, for blob requests that come before any manifest request
//! (after a restart, say): the engine's image ids (a legacy export's config digest is the
//! image id) and layer diff-ids (a legacy export's layer digest is the diff-id). Built at
//! start and rebuilt when the engine's image events say something changed. An image id
//! names immutable content, so a rebuild inspects only the images it has not seen before.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::{Mutex, RwLock};

use ferry_core::{Digest, Result};

use super::engine::Engine;

/// Images inspected at once during a rebuild.
const PARALLEL_INSPECTS: usize = 8;

#[derive(Default)]
pub struct ImageIndex {
    map: RwLock<HashMap<Digest, String>>,
    /// Layer diff-ids by image id, from earlier inspections (only used while rebuilding).
    layers: Mutex<HashMap<String, Vec<Digest>>>,
    /// Set by engine events and at start; the next lookup miss rebuilds.
    stale: AtomicBool,
    /// Held while rebuilding, so a lookup waits for a rebuild under way instead of missing.
    rebuilding: Mutex<()>,
}

impl ImageIndex {
    pub fn new() -> Self {
        ImageIndex {
            map: RwLock::new(HashMap::new()),
            layers: Mutex::new(HashMap::new()),
            stale: AtomicBool::new(true),
            rebuilding: Mutex::new(()),
        }
    }

    /// The image id holding `digest` (as config or diff-id), rebuilding first when stale.
    pub async fn lookup(&self, engine: &Engine, digest: &Digest) -> Result<Option<String>> {
        if let Some(id) = self.map.read().await.get(digest) {
            return Ok(Some(id.clone()));
        }
        self.refresh(engine).await?;
        Ok(self.map.read().await.get(digest).cloned())
    }

    /// Rebuilds the index if it is stale; waits for a rebuild already under way.
    pub async fn refresh(&self, engine: &Engine) -> Result<()> {
        let _guard = self.rebuilding.lock().await;
        if self.stale.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.rebuild(engine).await {
                self.stale.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    async fn rebuild(&self, engine: &Engine) -> Result<()> {
        let started = Instant::now();
        let ids: Vec<String> = engine.list().await?.into_iter().map(|s| s.id).collect();
        let mut known = self.layers.lock().await;
        let new: Vec<String> = ids.iter().filter(|id| !known.contains_key(*id)).cloned().collect();
        let inspected: Vec<(String, Option<Vec<Digest>>)> =
            futures::stream::iter(new.into_iter().map(|id| async move {
                let layers = engine.inspect(&id).await?.map(|i| {
                    let diff_ids = i.root_fs.and_then(|r| r.layers).unwrap_or_default();
                    diff_ids.iter().filter_map(|l| l.parse::<Digest>().ok()).collect()
                });
                Ok::<_, ferry_core::Error>((id, layers))
            }))
            .buffer_unordered(PARALLEL_INSPECTS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let inspected_count = inspected.len();
        for (id, layers) in inspected {
            // An image removed between list and inspect is simply not indexed.
            if let Some(layers) = layers {
                known.insert(id, layers);
            }
        }
        let listed: HashSet<&String> = ids.iter().collect();
        known.retain(|id, _| listed.contains(id));
        let mut map = HashMap::new();
        for id in &ids {
            if let Ok(d) = id.parse::<Digest>() {
                map.insert(d, id.clone());
            }
            for d in known.get(id).into_iter().flatten() {
                map.entry(d.clone()).or_insert_with(|| id.clone());
            }
        }
        tracing::debug!(
            images = ids.len(),
            inspected = inspected_count,
            digests = map.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine image index rebuilt"
        );
        *self.map.write().await = map;
        Ok(())
    }

    /// Follows the engine's image events and marks the index stale on each; reconnects
    /// after the engine goes away. Ends when the index is dropped.
    pub fn follow(self: &Arc<Self>, engine: Arc<Engine>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(index) = weak.upgrade() else { return };
                match engine.image_events().await {
                    Ok(events) => {
                        drop(index);
                        let mut events = Box::pin(events);
                        while let Some(ev) = events.next().await {
                            let Some(index) = weak.upgrade() else { return };
                            if ev.is_err() {
                                break;
                            }
                            index.mark_stale();
                        }
                    }
                    Err(_) => drop(index),
                }
                if let Some(index) = weak.upgrade() {
                    index.mark_stale();
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
    }
}
