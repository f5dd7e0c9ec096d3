//! Manifests: from the cache by digest, from the origin by tag (re-checked after the TTL,
//! served stale when the origin is down) or by digest, verified and kept.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::Method;

use ferry_core::manifest::MAX_MANIFEST_SIZE;

use crate::registry::Target;
use ferry_core::{Backend, BlobStore, Digest, Error, Manifest, ManifestInfo, Repository, RequestCtx, Result};

use super::meta::Meta;
use super::{credentials_key, mark_if_private, UpstreamBackend};

/// A manifest in the cache, with its media type.
pub(super) async fn stored_manifest(store: &BlobStore, meta: &Meta, digest: &Digest) -> Result<Option<Manifest>> {
    let Some(media_type) = meta.media_type(digest).await? else {
        return Ok(None);
    };
    let Some(bytes) = store.read(digest).await? else {
        return Ok(None);
    };
    Ok(Some(Manifest {
        bytes,
        media_type,
        digest: digest.clone(),
        missing: Vec::new(),
    }))
}

/// The bytes of a response; more than `limit` is the error `too_large` makes of the size.
pub(super) async fn read_limited(
    resp: reqwest::Response,
    limit: u64,
    repo: &Repository,
    too_large: impl Fn(u64) -> Error,
) -> Result<Bytes> {
    if let Some(len) = resp.content_length().filter(|l| *l > limit) {
        return Err(too_large(len));
    }
    let mut out = BytesMut::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Unavailable {
            backend: "origin".into(),
            reason: format!("origin {repo}: {}", ferry_core::error::with_causes(&e)),
        })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large((out.len() + chunk.len()) as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

impl UpstreamBackend {
    /// A manifest in the cache, with its media type.
    pub(super) async fn cached_manifest(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let found = stored_manifest(&self.store, &self.meta, digest).await?;
        if found.is_some() {
            self.touch(digest);
        }
        Ok(found)
    }

    /// Fetches a manifest from the origin (once for concurrent callers with the same
    /// credentials), checks it, and caches it — with the tag it was asked by, when it was,
    /// before any waiting caller sees it. `expected` is the digest asked for.
    pub(super) async fn fetch_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        expected: Option<&Digest>,
        ctx: &RequestCtx,
    ) -> Result<Option<Manifest>> {
        let creds = credentials_key(ctx);
        let key = format!("{repo}:{reference}:{creds}");
        let private = self.with_client_credentials(repo, ctx);
        let (client, store, meta, access) = (
            self.client.clone(),
            self.store.clone(),
            self.meta.clone(),
            self.access.clone(),
        );
        let (repo, reference, expected) = (repo.clone(), reference.to_string(), expected.cloned());
        let authorization = ctx.authorization.clone();
        let (backend, ttl) = (self.name().to_string(), self.ttl);
        self.manifests
            .run(&key, async move {
                // A flight that ended since the caller looked may have stored it: the look
                // and this flight are not one step.
                let stored = match &expected {
                    Some(d) => Some(d.clone()),
                    None => meta
                        .tag(&repo, &reference)
                        .await?
                        .filter(|e| e.fresh(ttl))
                        .map(|e| e.digest),
                };
                let readable = !access.is_private(&repo) || access.granted(&repo, &creds, true);
                if let Some(digest) = stored.filter(|_| readable) {
                    if meta.linked(&repo, &digest).await {
                        if let Some(m) = stored_manifest(&store, &meta, &digest).await? {
                            return Ok(Some(m));
                        }
                    }
                }
                let Some(resp) = client
                    .fetch(
                        Method::GET,
                        &repo,
                        Target::Manifest(&reference),
                        &[],
                        authorization.as_deref(),
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let content_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if private {
                    mark_if_private(&client, &access, &repo, Target::Manifest(&reference), &creds).await?;
                }
                let bytes = read_limited(resp, MAX_MANIFEST_SIZE, &repo, |size| Error::ManifestTooLarge {
                    size,
                    limit: MAX_MANIFEST_SIZE,
                })
                .await?;
                let digest = Digest::of(&bytes);
                if let Some(want) = &expected {
                    if *want != digest {
                        return Err(Error::Unavailable {
                            backend,
                            reason: format!("origin {repo} sent a manifest hashing to {digest} for {want}"),
                        });
                    }
                }
                let info = ManifestInfo::parse(&bytes, content_type.as_deref()).map_err(|e| Error::Unavailable {
                    backend: backend.clone(),
                    reason: format!("origin {repo} sent an unusable manifest for {reference}: {e}"),
                })?;
                store.write_bytes(bytes.clone()).await?;
                meta.put_media_type(&digest, &info.media_type).await?;
                meta.link(&repo, &digest).await?;
                if expected.is_none() {
                    meta.put_tag(&repo, &reference, &digest).await?;
                }
                tracing::info!(backend = %backend, origin = %repo, %reference, %digest, media_type = %info.media_type,
                    "fetched manifest from its origin into the cache");
                Ok(Some(Manifest {
                    bytes,
                    media_type: info.media_type,
                    digest,
                    missing: Vec::new(),
                }))
            })
            .await
    }

    /// The digest the origin has for a tag now (a `HEAD`, which Docker Hub does not count
    /// against its pull limit), when it says so in `Docker-Content-Digest`.
    pub(super) async fn origin_tag_digest(
        &self,
        repo: &Repository,
        tag: &str,
        ctx: &RequestCtx,
    ) -> Result<Option<Option<Digest>>> {
        let resp = self
            .client
            .fetch(
                Method::HEAD,
                repo,
                Target::Manifest(tag),
                &[],
                ctx.authorization.as_deref(),
            )
            .await?;
        Ok(resp.map(|r| {
            r.headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        }))
    }

    pub(super) async fn tagged(&self, repo: &Repository, tag: &str, ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let entry = self.meta.tag(repo, tag).await?;
        let cached = match &entry {
            Some(e) => self.cached_manifest(&e.digest).await?,
            None => None,
        };
        if let (Some(e), Some(m)) = (&entry, &cached) {
            if e.fresh(self.ttl) {
                if !self
                    .may_serve(repo, Target::Manifest(&m.digest.to_string()), ctx)
                    .await?
                {
                    return Ok(None);
                }
                ferry_core::metrics::upstream_cache(self.name(), "hit");
                return Ok(Some(m.clone()));
            }
        }
        let revalidated = match &cached {
            Some(m) => match self.origin_tag_digest(repo, tag, ctx).await {
                Ok(Some(Some(d))) if d == m.digest => {
                    if self.access.is_private(repo) {
                        self.access.grant(repo, &credentials_key(ctx));
                    }
                    Ok(Some(m.clone()))
                }
                Ok(Some(_)) => self.fetch_manifest(repo, tag, None, ctx).await,
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
            None => self.fetch_manifest(repo, tag, None, ctx).await,
        };
        match revalidated {
            Ok(Some(m)) => {
                let moved = cached.as_ref().is_some_and(|c| c.digest != m.digest);
                if moved {
                    tracing::info!(backend = %self.name(), origin = %repo, %tag, digest = %m.digest,
                        "tag moved at the origin");
                }
                let confirmed = cached.is_some() && !moved;
                ferry_core::metrics::upstream_cache(self.name(), if confirmed { "hit" } else { "miss" });
                if confirmed {
                    self.meta.put_tag(repo, tag, &m.digest).await?;
                }
                Ok(Some(m))
            }
            Ok(None) => {
                self.meta.remove_tag(repo, tag).await?;
                Ok(None)
            }
            Err(e @ Error::Unavailable { .. })
                if cached.is_some()
                    && (!self.access.is_private(repo) || self.access.granted(repo, &credentials_key(ctx), false)) =>
            {
                let age_s = entry.as_ref().map(|e| e.age().as_secs()).unwrap_or(0);
                tracing::warn!(backend = %self.name(), origin = %repo, %tag, error = %e, checked_s_ago = age_s,
                    "origin unreachable: serving the tag as last seen (stale)");
                ferry_core::metrics::upstream_cache(self.name(), "stale");
                Ok(cached)
            }
            Err(e) => Err(e),
        }
    }
}
