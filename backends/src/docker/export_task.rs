//! One export of an engine image (`docker save`) streamed into the cache and interpreted, as
//! a task of its own.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use ferry_core::{Error, Repository, Result};

use super::cache::Cache;
use super::engine::Engine;
use super::export::{self, Exported};
use super::{archive, pins, EXPORT_PREFETCH_CHUNKS};

/// One export of an engine image, owning what it needs: it runs as a task of its own.
pub(super) struct Export {
    pub(super) backend: String,
    pub(super) engine: Arc<Engine>,
    pub(super) cache: Arc<Cache>,
    pub(super) name: String,
    pub(super) id: String,
    pub(super) repo: Repository,
}

impl Export {
    /// Streams the archive into the cache and interprets it. Blobs it stored but nothing
    /// references (all of them, when the archive is unusable) are discarded; the rest come
    /// back pinned until the cache records the entry.
    pub(super) async fn run(self) -> Result<(Exported, Vec<pins::Pin>)> {
        let Export {
            backend,
            engine,
            cache,
            name,
            id,
            repo,
        } = self;
        let started = Instant::now();
        let metric = ferry_core::metrics::export_started(&backend);
        let result = Self::read(&backend, &engine, &cache, &name, &id, &repo, started).await;
        metric.done(result.is_ok());
        result
    }

    pub(super) async fn read(
        backend: &str,
        engine: &Engine,
        cache: &Arc<Cache>,
        name: &str,
        id: &str,
        repo: &Repository,
        started: Instant,
    ) -> Result<(Exported, Vec<pins::Pin>)> {
        // The image's size estimates the archive's (exact for layer tars, high for the OCI
        // layout's compressed blobs).
        let estimate = match engine.inspect(id).await {
            Ok(Some(i)) => i.size.unwrap_or(0).max(0) as u64,
            _ => 0,
        };
        tracing::info!(backend = %backend, image = %name, id = %id, estimated_bytes = estimate, "exporting image from the engine");
        let progress = ferry_core::progress::Progress::new("export", backend, name, estimate);
        let counted = progress.clone();
        let stream = engine.export(name).await?.map(move |chunk| {
            if let Ok(b) = &chunk {
                counted.add(b.len() as u64);
            }
            chunk
        });
        let reader = ferry_core::prefetch::Prefetched::spawn(stream, EXPORT_PREFETCH_CHUNKS);
        let store = cache.store.clone();
        let mut archive = archive::Archive::new(&cache.pins);
        let (mut archive, read) = tokio::task::spawn_blocking(move || {
            let read = archive::read(reader, &store, &mut archive);
            (archive, read)
        })
        .await
        .map_err(|e| Error::Internal(format!("export task failed: {e}")))?;
        if let Err(e) = read {
            cache.discard(std::mem::take(&mut archive.pins).into_values()).await;
            tracing::error!(backend = %backend, image = %name, error = %e,
                elapsed_ms = started.elapsed().as_millis() as u64, "export failed");
            return Err(e);
        }
        let result = export::interpret(&mut archive, &cache.store, repo, name).await;
        let mut pinned = std::mem::take(&mut archive.pins);
        let exported = match result {
            Ok(exported) => exported,
            Err(e) => {
                cache.discard(pinned.into_values()).await;
                tracing::error!(backend = %backend, image = %name, error = %e, "export unusable");
                return Err(e);
            }
        };
        let used: Vec<pins::Pin> = exported
            .blobs
            .iter()
            .chain(&exported.manifests)
            .filter_map(|d| pinned.remove(d))
            .collect();
        cache.discard(pinned.into_values()).await;
        let summary = export::describe(&exported);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (bytes, _, rate_mib_s) = progress.summary();
        if exported.missing.is_empty() {
            tracing::info!(backend = %backend, image = %name, %summary, bytes, rate_mib_s, elapsed_ms, "export finished");
        } else {
            tracing::warn!(backend = %backend, image = %name, %summary, elapsed_ms,
                missing = ?exported.missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "export lacks blobs its manifest references (Docker's containerd image store drops layers shared between images from `docker save`, moby#49473); later backends are asked for them: let ferry reach the engine's containerd (mount its socket) to serve and heal them, or add a containerd backend (namespace \"moby\") after this one");
        }
        Ok((exported, used))
    }
}
