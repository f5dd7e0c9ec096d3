//! A manifest pushed through the chain: the writable backend must end up holding the whole
//! image on its own.
//!
//! A client pushing an image first HEADs each blob and skips the upload of every blob that
//! answers 200, and in a chain that answer may come from an engine backend: a locally built
//! image's config and layers are in the engine, so `docker push` of it uploads little or
//! nothing. The push store cannot rely on the engine to keep them (the export cache is
//! evictable, the engine image removable), so when the manifest arrives, every blob and
//! child manifest it references that the push store lacks but another backend holds is taken
//! in first — hard-linked from another ferry store on the same file system, else streamed
//! and verified against its digest — and only then is the manifest stored.
//!
//! The other way out, answering HEAD from the push store alone while a push is under way,
//! would need to tell a pusher's HEAD from a puller's, which nothing in a request does, and
//! would make every push of a local image upload what the machine already holds.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::backend::{Registry, RequestCtx};
use crate::chain::{Chain, Found};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ManifestInfo};
use crate::reference::{ImageRef, Reference, Repository};

/// An index's children are image manifests; nothing deeper is followed.
const MAX_DEPTH: usize = 2;

impl Chain {
    /// Stores a pushed manifest in the writable backend, after taking in what it references
    /// from the other backends. Returns the backend's name, the stored manifest and its subject.
    pub async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
        ctx: &RequestCtx,
    ) -> Result<Found<(Manifest, Option<Digest>)>> {
        let (name, registry) = self
            .registry()
            .ok_or_else(|| Error::Unsupported("no push backend is configured".into()))?;
        let info = ManifestInfo::parse(&bytes, content_type)?;
        self.take_in(&registry, &name, repo, &info, ctx, 0).await?;
        let stored = registry.put_manifest(repo, reference, content_type, bytes).await?;
        Ok(Found {
            backend: name,
            value: stored,
        })
    }

    /// Takes into `registry` every blob and child manifest `info` references that it lacks
    /// and another backend holds. What no backend holds is left for the registry's own check
    /// to refuse.
    fn take_in<'a>(
        &'a self,
        registry: &'a Arc<dyn Registry>,
        name: &'a str,
        repo: &'a Repository,
        info: &'a ManifestInfo,
        ctx: &'a RequestCtx,
        depth: usize,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for d in &info.blobs {
                if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                    continue; // a foreign layer: clients fetch it from its URL
                }
                if registry.blob_size(repo, &d.digest, ctx).await?.is_none() {
                    self.take_blob(registry, name, repo, &d.digest, ctx).await?;
                }
            }
            if depth >= MAX_DEPTH {
                return Ok(());
            }
            for d in &info.manifests {
                let child = ImageRef::new(repo.clone(), Reference::Digest(d.digest.clone()));
                if registry.manifest(&child, ctx).await?.is_some() {
                    continue;
                }
                let Some(found) = self
                    .first_of_others(name, ctx, |h| {
                        let child = child.clone();
                        Box::pin(async move { h.backend.manifest(&child, ctx).await })
                    })
                    .await?
                else {
                    continue;
                };
                let m = found.value;
                let child_info = ManifestInfo::parse(&m.bytes, Some(&m.media_type))?;
                self.take_in(registry, name, repo, &child_info, ctx, depth + 1).await?;
                registry
                    .put_manifest(repo, &child.reference, Some(&m.media_type), m.bytes)
                    .await?;
                tracing::info!(request = %ctx.request_id, repository = %repo, manifest = %d.digest,
                    from = %found.backend, "took a child manifest of the pushed index into the push store");
            }
            Ok(())
        })
    }

    /// Copies (or links) one blob from the first other backend that holds it.
    async fn take_blob(
        &self,
        registry: &Arc<dyn Registry>,
        name: &str,
        repo: &Repository,
        digest: &Digest,
        ctx: &RequestCtx,
    ) -> Result<()> {
        let started = Instant::now();
        let found = self
            .first_of_others(name, ctx, |h| {
                Box::pin(async move {
                    let Some(size) = h.backend.blob_size(repo, digest, ctx).await? else {
                        return Ok(None);
                    };
                    if let Some(file) = h.backend.blob_file(digest).await? {
                        if registry.link_blob(repo, digest, &file).await? {
                            return Ok(Some(("linked", size)));
                        }
                    }
                    let Some(body) = h.backend.blob(repo, digest, None, ctx).await? else {
                        return Ok(None);
                    };
                    let size = registry.put_blob(repo, digest, body.stream).await?;
                    Ok(Some(("copied", size)))
                })
            })
            .await?;
        if let Some(f) = found {
            let (how, size) = f.value;
            tracing::info!(request = %ctx.request_id, repository = %repo, %digest, from = %f.backend, how, size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "took a blob the pushed manifest references into the push store (the client skipped its upload)");
        }
        Ok(())
    }
}
