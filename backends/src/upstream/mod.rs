//! The upstream backend: a pull-through cache for every registry at once. A request's origin
//! (`?ns=`, a host as the first path component, else Docker Hub) is asked for what no
//! earlier backend had; what it answers is kept in a blob store on disk, content-addressed,
//! so later pulls — and pulls while the origin is down — come from the disk. Manifests and
//! blobs keep the origin's exact bytes and digests. A tag is re-checked at the origin once its
//! TTL ran out; a digest never is.

mod access;
mod config;
mod eviction;

mod fills;
mod inventory;
mod manifests;
mod meta;
mod policy;
mod tag_list;

pub use config::UpstreamConfig;

use eviction::evict;
use manifests::read_limited;
use policy::{credentials_key, mark_if_private};

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use ferry_core::flight::Flights;
use ferry_core::status::{BackendStatus, CachedImage, Evicted};
use ferry_core::{
    Backend, BlobBody, BlobStore, ByteRange, Digest, Error, ImageRef, Manifest, Reference, Repository, RequestCtx,
    Result,
};

use crate::fill::{Fill, Fills, Joined};
use crate::registry::{RegistryClient, Target};
use access::PrivateRepos;
use meta::Meta;
use tag_list::TagLists;

/// The pull-through cache.
pub struct UpstreamBackend {
    config: UpstreamConfig,
    client: Arc<RegistryClient>,
    store: BlobStore,
    meta: Arc<Meta>,
    /// Which repositories are private, and who may read them.
    access: Arc<PrivateRepos>,
    fills: Arc<Fills>,
    /// Single flight for starting a fill: one origin request per digest.
    starting: Arc<Flights<Option<Arc<Fill>>>>,
    /// Single flight for manifest fetches, by repository, reference and credentials.
    manifests: Flights<Option<Manifest>>,
    /// The origins' tag lists read lately.
    tag_lists: TagLists,
    ttl: Duration,
    max_bytes: Option<u64>,
    /// `max_blob_size`, in bytes.
    max_blob: u64,
    used: Arc<AtomicU64>,
}

impl UpstreamBackend {}

#[async_trait]
impl Backend for UpstreamBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn manifest(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let repo = &image.repository;
        if !self.allowed(repo) {
            return Ok(None);
        }
        match &image.reference {
            Reference::Digest(d) => {
                if self.meta.linked(repo, d).await {
                    if let Some(m) = self.cached_manifest(d).await? {
                        if !self
                            .may_serve(repo, Target::Manifest(&m.digest.to_string()), ctx)
                            .await?
                        {
                            return Ok(None);
                        }
                        ferry_core::metrics::upstream_cache(self.name(), "hit");
                        return Ok(Some(m));
                    }
                }
                ferry_core::metrics::upstream_cache(self.name(), "miss");
                self.fetch_manifest(repo, &d.to_string(), Some(d), ctx).await
            }
            Reference::Tag(t) => self.tagged(repo, t, ctx).await,
        }
    }

    async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>> {
        if !self.allowed(repo) {
            return Ok(None);
        }
        let held = match self.meta.linked(repo, digest).await {
            true => self.store.size(digest).await?,
            false => None,
        };
        let filling = self.fills.get(digest).filter(|f| f.repo == *repo).map(|f| f.size);
        if let Some(size) = held.or(filling) {
            return match self.may_serve(repo, Target::Blob(digest), ctx).await? {
                true => Ok(Some(size)),
                false => Ok(None),
            };
        }
        self.origin_blob_size(repo, digest, ctx).await
    }

    async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        if !self.allowed(repo) {
            return Ok(None);
        }
        let mut checked_access = self.meta.linked(repo, digest).await;
        for _ in 0..3 {
            if self.store.size(digest).await?.is_some() {
                if !checked_access {
                    // Cached for another repository: the origin must serve it for this one.
                    if self.origin_blob_size(repo, digest, ctx).await?.is_none() {
                        return Ok(None);
                    }
                    checked_access = true;
                }
                if !self.may_serve(repo, Target::Blob(digest), ctx).await? {
                    return Ok(None);
                }
                if let Some(body) = self.store.open_blob(digest, range).await? {
                    ferry_core::metrics::upstream_cache(self.name(), "hit");
                    self.touch(digest);
                    return Ok(Some(body));
                }
                continue;
            }
            let Some(fill) = self.fill(repo, digest, ctx).await? else {
                if self.store.size(digest).await?.is_some() {
                    continue;
                }
                return Ok(None);
            };
            if fill.repo != *repo && !checked_access {
                if self.origin_blob_size(repo, digest, ctx).await?.is_none() {
                    return Ok(None);
                }
                checked_access = true;
            }
            // Started for another client, perhaps with other credentials.
            if !self.may_serve(repo, Target::Blob(digest), ctx).await? {
                return Ok(None);
            }
            match fill.join(range).await? {
                Joined::Body(body) => return Ok(Some(body)),
                Joined::Gone => continue,
            }
        }
        Err(Error::Unavailable {
            backend: self.name().to_string(),
            reason: format!("fetching {digest} from {repo} kept failing"),
        })
    }

    /// The origin's tag list (kept a short while: `tag_list.rs`).
    async fn tags(&self, repo: &Repository, ctx: &RequestCtx) -> Result<Option<Vec<String>>> {
        if !self.allowed(repo) {
            return Ok(None);
        }
        let list = self
            .tag_lists
            .get(
                self.name(),
                &self.client,
                repo,
                ctx.authorization.as_deref(),
                &credentials_key(ctx),
            )
            .await?;
        Ok(list.map(|l| l.as_ref().clone()))
    }

    /// The repositories the cache holds a manifest of, but not private ones (their names
    /// are the origin's to show, to the clients it lets read them) nor those of hosts the
    /// allow list no longer names.
    async fn catalog(&self) -> Result<Vec<Repository>> {
        let manifests: HashSet<Digest> = self.meta.manifests().await?.into_iter().collect();
        let mut names: HashSet<String> = self.meta.tags().await?.into_iter().map(|e| e.repository).collect();
        for (digest, repos) in self.meta.linked_repositories().await? {
            if manifests.contains(&digest) {
                names.extend(repos);
            }
        }
        Ok(names
            .into_iter()
            .filter(|n| !self.access.is_private_name(n))
            .filter_map(|n| {
                let (registry, path) = n.split_once('/')?;
                Repository::new(registry, path).ok()
            })
            .filter(|r| self.allowed(r))
            .collect())
    }

    async fn status(&self) -> BackendStatus {
        BackendStatus {
            name: self.name().to_string(),
            kind: "upstream".into(),
            reachable: true,
            location: self.store.root().display().to_string(),
            ..BackendStatus::default()
        }
    }

    /// The images in the cache, most recently used first; a manifest digest is their id.
    async fn cached_images(&self) -> Result<Vec<CachedImage>> {
        Ok(inventory::images(&self.store, &self.meta)
            .await?
            .into_iter()
            .map(|i| CachedImage {
                image_id: i.digest.to_string(),
                digest: i.digest.to_string(),
                names: i.names,
                size: i.size,
                last_used_ms: i.last_used_ms,
                backend: self.name().to_string(),
                private: i.repositories.iter().any(|r| self.access.is_private_name(r)),
            })
            .collect())
    }

    /// Drops the image whose manifest digest or `registry/path:tag` is `image` (what other
    /// images use stays), or empties the cache (`None`).
    async fn evict(&self, image: Option<&str>) -> Result<Option<Evicted>> {
        if let Some(image) = image {
            let (images, bytes) = inventory::evict(&self.store, &self.meta, image).await?;
            let _ = self
                .used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(bytes)));
            if images > 0 {
                tracing::info!(backend = %self.name(), image, freed_bytes = bytes, "evicted from the upstream cache");
            }
            return Ok(Some(Evicted { images, bytes }));
        }
        let mut out = Evicted::default();
        for d in self.store.list().await? {
            let size = self.store.size(&d).await?.unwrap_or(0);
            if self.store.delete(&d).await? {
                out.bytes += size;
            }
        }
        out.images = self.meta.clear_tags().await?;
        self.used.store(0, Ordering::SeqCst);
        tracing::info!(backend = %self.name(), tags = out.images, freed_bytes = out.bytes, "upstream cache emptied");
        Ok(Some(out))
    }
}
