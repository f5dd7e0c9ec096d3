//! Blobs of engine images: read from the engine's storage, or from the export cache, exporting
//! the image that holds one when the cache lacks it.

use std::sync::Arc;

use ferry_core::{BlobBody, ByteRange, Digest, Repository, Result};

use super::{direct, export, DockerBackend, EngineImage, MAX_EXPORTS_PER_BLOB_LOOKUP};

impl DockerBackend {
    /// Exports the engine images tagged under `repo` that the cache holds no export of, until
    /// one holds `digest`. For a blob asked for before any manifest (a client resuming a pull
    /// after a restart with an empty cache, or after an eviction) on an engine whose image
    /// ids and layer ids are not blob digests — the containerd image store: ids are manifest
    /// digests, layers are stored compressed — only an export tells which image holds it.
    /// The repository narrows it to a few images, each exported once.
    pub(super) async fn find_by_export(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let mut ids: Vec<String> = self
            .engine_tags()
            .await?
            .into_iter()
            .filter(|(r, _, _)| r == repo)
            .map(|(_, _, id)| id)
            .collect();
        ids.dedup();
        for id in ids.into_iter().take(MAX_EXPORTS_PER_BLOB_LOOKUP) {
            if self.cache.get(&id).await.is_some() {
                continue;
            }
            tracing::info!(backend = %self.config.name, repository = %repo, %digest, image = %id,
                "blob asked for before its manifest and not in the engine's index: exporting an image of this repository to find it");
            let found = EngineImage { name: id.clone(), id };
            self.entry(&found, repo).await?;
            if let Some(size) = self.cache.store.size(digest).await? {
                return Ok(Some(size));
            }
        }
        Ok(None)
    }

    /// The layer `digest` when it is served from the engine's storage: known from a manifest
    /// read directly, or (after a restart) from a cached entry read that way. A layer found
    /// not to match makes its image exported from then on.
    pub(super) async fn direct_layer(&self, repo: &Repository, digest: &Digest) -> Result<Option<Arc<direct::Layer>>> {
        if let Some(l) = self.direct.layer(digest).await {
            if !l.is_bad() {
                return Ok(Some(l));
            }
            let image = l.image_id.clone();
            self.fall_back_to_export(&image).await?;
            return Ok(None);
        }
        let (holding, _) = self.cache.images_with_blob(digest).await;
        for id in holding {
            if self
                .cache
                .get(&id)
                .await
                .is_some_and(|e| e.export.format == export::Format::Direct)
            {
                let found = EngineImage { name: id.clone(), id };
                self.entry(&found, repo).await?;
                return Ok(self.direct.layer(digest).await.filter(|l| !l.is_bad()));
            }
        }
        Ok(None)
    }

    /// The layer `digest` from the engine's storage, when it is served from there.
    pub(super) async fn direct_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>> {
        let Some(layer) = self.direct_layer(repo, digest).await? else {
            return Ok(None);
        };
        let image = layer.image_id.clone();
        if let Some(body) = self.direct.body(layer, range).await? {
            return Ok(Some(body));
        }
        self.fall_back_to_export(&image).await?;
        Ok(None)
    }

    /// Stops reading `image` directly and drops its entry: its next request exports it.
    pub(super) async fn fall_back_to_export(&self, image: &str) -> Result<()> {
        self.direct.refuse(image).await;
        let id = image.to_string();
        self.cache
            .evict_where(|e| e.image_id == id && e.export.format == export::Format::Direct)
            .await?;
        Ok(())
    }

    /// Makes sure the cache holds `digest`, re-exporting the image it came from when it was
    /// evicted or exporting the engine image that holds it. Its size, or `None` when no image
    /// has it.
    pub(super) async fn ensure_blob(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        if let Some(size) = self.cache.store.size(digest).await? {
            return Ok(Some(size));
        }
        let (holding, lacking) = self.cache.images_with_blob(digest).await;
        let id = match holding.into_iter().next() {
            Some(id) => Some(id),
            None if !lacking.is_empty() => {
                tracing::debug!(backend = %self.config.name, %digest, images = ?lacking,
                    "the engine's export lacks this blob");
                return Ok(None);
            }
            None => self.index.lookup(&self.engine, digest).await?,
        };
        let Some(id) = id else {
            return self.find_by_export(repo, digest).await;
        };
        let found = EngineImage { name: id.clone(), id };
        self.entry(&found, repo).await?;
        self.cache.store.size(digest).await
    }
}
