//! The chain: backends asked in configured order. For a manifest the first backend that
//! resolves the reference wins; for a blob the first that holds the digest. A backend that
//! is unavailable is skipped with a warning. A backend that fails otherwise is skipped too
//! when what is asked for is content-addressed (a blob, a manifest by digest: any backend
//! that holds it has the same bytes), and its error is the answer when no later backend has
//! it, so a failure never turns into "not found". For a tag, a failure stops the chain: a
//! later backend's image under the same tag may be another one.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{BackendHandle, BlobBody, Registry, RequestCtx};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{Descriptor, Manifest};
use crate::range::ByteRange;
use crate::reference::{ImageRef, Reference, Repository};

/// Keeps the first failure of a content-addressed lookup, to answer with when no later
/// backend has the content.
fn held_back(failed: &mut Option<Error>, e: Error, ctx: &RequestCtx, backend: &str, what: &str) {
    tracing::warn!(request = %ctx.request_id, backend, what, error = %e,
        "backend failed; asking the next one (this error is the answer if none has it)");
    failed.get_or_insert(e);
}

/// Something a backend answered, with the backend's name for logs and headers.
pub struct Found<T> {
    /// The name of the backend that answered.
    pub backend: String,
    /// What it answered.
    pub value: T,
}

/// The ordered list of backends.
#[derive(Clone)]
pub struct Chain {
    backends: Vec<BackendHandle>,
}

impl Chain {
    /// A chain asking `backends` in this order.
    pub fn new(backends: Vec<BackendHandle>) -> Self {
        Chain { backends }
    }

    /// The backends in query order.
    pub fn backends(&self) -> impl Iterator<Item = &std::sync::Arc<dyn crate::Backend>> {
        self.backends.iter().map(|h| &h.backend)
    }

    /// Names of the backends in query order.
    pub fn names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.backend.name().to_string()).collect()
    }

    /// The first writable backend: where pushes go.
    pub fn registry(&self) -> Option<(String, Arc<dyn Registry>)> {
        self.backends
            .iter()
            .find_map(|b| b.registry.clone().map(|r| (b.backend.name().to_string(), r)))
    }

    /// Asks each backend in turn with `ask` until one answers `Some` (for content-addressed
    /// lookups: a failure is held back while later backends are asked).
    async fn first<'s, T, F>(&'s self, what: &str, ctx: &RequestCtx, ask: F) -> Result<Option<Found<T>>>
    where
        F: Fn(&'s BackendHandle) -> futures::future::BoxFuture<'s, Result<Option<T>>>,
    {
        self.first_but(None, what, ctx, ask).await
    }

    /// [`Chain::first`] over every backend but the writable one named `writable`: where a
    /// push finds what its client did not upload.
    pub(crate) async fn first_of_others<'s, T, F>(
        &'s self,
        writable: &str,
        ctx: &RequestCtx,
        ask: F,
    ) -> Result<Option<Found<T>>>
    where
        F: Fn(&'s BackendHandle) -> futures::future::BoxFuture<'s, Result<Option<T>>>,
    {
        self.first_but(Some(writable), "content a push references", ctx, ask)
            .await
    }

    async fn first_but<'s, T, F>(
        &'s self,
        skip: Option<&str>,
        what: &str,
        ctx: &RequestCtx,
        ask: F,
    ) -> Result<Option<Found<T>>>
    where
        F: Fn(&'s BackendHandle) -> futures::future::BoxFuture<'s, Result<Option<T>>>,
    {
        let mut failed = None;
        let skipped = |h: &BackendHandle| h.registry.is_some() && Some(h.backend.name()) == skip;
        for handle in self.backends.iter().filter(|h| !skipped(h)) {
            let name = handle.backend.name();
            let started = Instant::now();
            match ask(handle).await {
                Ok(Some(value)) => {
                    tracing::debug!(request = %ctx.request_id, backend = name, what,
                        elapsed_ms = started.elapsed().as_millis() as u64, "found");
                    return Ok(Some(Found {
                        backend: name.to_string(),
                        value,
                    }));
                }
                Ok(None) => {
                    tracing::debug!(request = %ctx.request_id, backend = name, what, "not here");
                }
                Err(e) if e.is_not_found() => {
                    tracing::debug!(request = %ctx.request_id, backend = name, what, error = %e, "not here");
                }
                Err(e @ Error::Unavailable { .. }) => {
                    tracing::warn!(request = %ctx.request_id, backend = name, what, error = %e,
                        "backend unavailable, asking the next one");
                }
                Err(e) => {
                    held_back(&mut failed, e, ctx, name, what);
                }
            }
        }
        failed.map_or(Ok(None), Err)
    }

    /// Resolves a manifest, or [`Error::ManifestUnknown`].
    ///
    /// A manifest whose backend reports blobs it lacks is served only when later backends
    /// hold each of them; otherwise the chain goes on, so a client gets a 404 it can fall back
    /// on rather than a pull that fails half-way. An [`Error::Unauthorized`] (and, for a
    /// digest, any failure) is held back while later backends are asked, and returned only
    /// when none has the manifest.
    pub async fn manifest(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<Found<Manifest>> {
        let what = image.to_string();
        let by_digest = matches!(image.reference, Reference::Digest(_));
        let mut failed = None;
        for (i, handle) in self.backends.iter().enumerate() {
            let name = handle.backend.name();
            let started = Instant::now();
            match handle.backend.manifest(image, ctx).await {
                Ok(Some(m)) => {
                    let elapsed_ms = started.elapsed().as_millis() as u64;
                    if !m.missing.is_empty() && !self.later_hold_all(i + 1, image, &m, ctx).await? {
                        continue;
                    }
                    tracing::debug!(request = %ctx.request_id, backend = name, image = %what, elapsed_ms, "manifest found");
                    return Ok(Found {
                        backend: name.to_string(),
                        value: m,
                    });
                }
                Ok(None) => {
                    tracing::debug!(request = %ctx.request_id, backend = name, image = %what, "not here")
                }
                Err(e) if e.is_not_found() => {
                    tracing::debug!(request = %ctx.request_id, backend = name, image = %what, error = %e, "not here")
                }
                Err(e @ Error::Unavailable { .. }) => {
                    tracing::warn!(request = %ctx.request_id, backend = name, image = %what, error = %e,
                        "backend unavailable, asking the next one")
                }
                Err(e @ Error::Unauthorized { .. }) => {
                    failed.get_or_insert(e);
                }
                Err(e) if by_digest => held_back(&mut failed, e, ctx, name, &what),
                Err(e) => return Err(e),
            }
        }
        Err(failed.unwrap_or(Error::ManifestUnknown(what)))
    }

    /// True when the backends from index `from` on hold every blob `m` lacks. When one of
    /// them could fetch a blob but needs the client's credentials, that is the answer, so the
    /// client authenticates and asks again.
    async fn later_hold_all(&self, from: usize, image: &ImageRef, m: &Manifest, ctx: &RequestCtx) -> Result<bool> {
        let mut lacking = Vec::new();
        let mut unauthorized = None;
        'blobs: for digest in &m.missing {
            for h in &self.backends[from..] {
                match h.backend.blob_size(&image.repository, digest, ctx).await {
                    Ok(Some(_)) => continue 'blobs,
                    Err(e @ Error::Unauthorized { .. }) => unauthorized = Some(e),
                    Ok(None) | Err(_) => {}
                }
            }
            lacking.push(digest.to_string());
        }
        if lacking.is_empty() {
            return Ok(true);
        }
        if let Some(e) = unauthorized {
            return Err(e);
        }
        tracing::warn!(request = %ctx.request_id, image = %image, manifest = %m.digest, missing = ?lacking,
            "the manifest's backend lacks blobs it references and no later backend holds them (its own \
             log line says why and what supplies them); answering 404 so the client falls back");
        Ok(false)
    }

    /// A blob's size, or [`Error::BlobUnknown`].
    pub async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Found<u64>> {
        let what = format!("{repo}@{digest}");
        self.first(&what, ctx, |h| Box::pin(h.backend.blob_size(repo, digest, ctx)))
            .await?
            .ok_or(Error::BlobUnknown(what))
    }

    /// Opens a blob, or [`Error::BlobUnknown`].
    pub async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Found<BlobBody>> {
        let what = format!("{repo}@{digest}");
        self.first(&what, ctx, |h| Box::pin(h.backend.blob(repo, digest, range, ctx)))
            .await?
            .ok_or(Error::BlobUnknown(what))
    }

    /// The union of every backend's tags, sorted; [`Error::NameUnknown`] when none knows
    /// the repository. An origin's refusal (the upstream backend) is the answer only when no
    /// backend knows the repository: a local image's name is often one an origin refuses.
    pub async fn tags(&self, repo: &Repository, ctx: &RequestCtx) -> Result<Vec<String>> {
        let mut all: Option<Vec<String>> = None;
        let mut refused = None;
        for h in &self.backends {
            match h.backend.tags(repo, ctx).await {
                Ok(Some(t)) => all.get_or_insert_with(Vec::new).extend(t),
                Ok(None) => {}
                Err(e @ Error::Unavailable { .. }) => {
                    tracing::warn!(backend = h.backend.name(), error = %e, "backend unavailable for tags list")
                }
                Err(e @ (Error::Unauthorized { .. } | Error::Denied(_))) => {
                    tracing::debug!(backend = h.backend.name(), error = %e, "tags list refused");
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        let mut all = match (all, refused) {
            (Some(all), _) => all,
            (None, Some(e)) => return Err(e),
            (None, None) => return Err(Error::NameUnknown(repo.to_string())),
        };
        all.sort();
        all.dedup();
        Ok(all)
    }

    /// Every repository any backend can list, sorted by the name a client would use.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut all = Vec::new();
        for h in &self.backends {
            match h.backend.catalog().await {
                Ok(repos) => all.extend(repos.iter().map(Repository::request_name)),
                Err(e @ Error::Unavailable { .. }) => {
                    tracing::warn!(backend = h.backend.name(), error = %e, "backend unavailable for catalog")
                }
                Err(e) => return Err(e),
            }
        }
        all.sort();
        all.dedup();
        Ok(all)
    }

    /// The names of the backends that can answer now, and of those that cannot.
    pub async fn readiness(&self) -> (Vec<String>, Vec<String>) {
        let (mut ready, mut down) = (Vec::new(), Vec::new());
        for h in &self.backends {
            let name = h.backend.name().to_string();
            if h.backend.ready().await {
                ready.push(name);
            } else {
                down.push(name);
            }
        }
        (ready, down)
    }

    /// Every backend's referrers of `digest`.
    pub async fn referrers(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Vec<Descriptor>> {
        let mut all = Vec::new();
        for h in &self.backends {
            all.extend(h.backend.referrers(repo, digest, ctx).await?);
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use bytes::Bytes;

    /// A backend that either fails every lookup or holds one manifest and one blob.
    struct Stub {
        name: &'static str,
        fails: bool,
        manifest: Manifest,
    }

    impl Stub {
        fn answer<T>(&self, found: bool, value: impl FnOnce() -> T) -> Result<Option<T>> {
            if self.fails {
                return Err(Error::Internal(format!("{} broke", self.name)));
            }
            Ok(found.then(value))
        }
    }

    #[async_trait]
    impl crate::Backend for Stub {
        fn name(&self) -> &str {
            self.name
        }
        async fn manifest(&self, image: &ImageRef, _: &RequestCtx) -> Result<Option<Manifest>> {
            let found = match &image.reference {
                Reference::Tag(t) => t == "v1",
                Reference::Digest(d) => *d == self.manifest.digest,
            };
            self.answer(found, || self.manifest.clone())
        }
        async fn blob_size(&self, _: &Repository, d: &Digest, _: &RequestCtx) -> Result<Option<u64>> {
            self.answer(*d == blob_digest(), || 4)
        }
        async fn blob(
            &self,
            _: &Repository,
            d: &Digest,
            _: Option<ByteRange>,
            _: &RequestCtx,
        ) -> Result<Option<BlobBody>> {
            self.answer(*d == blob_digest(), || BlobBody {
                size: 4,
                range: None,
                stream: Box::pin(futures::stream::iter([Ok(Bytes::from_static(b"blob"))])),
            })
        }
    }

    fn blob_digest() -> Digest {
        Digest::of(b"blob")
    }

    fn chain(backends: &[(&'static str, bool)]) -> Chain {
        let manifest = Manifest {
            bytes: Bytes::from_static(b"{}"),
            media_type: crate::media::OCI_MANIFEST.into(),
            digest: Digest::of(b"{}"),
            missing: Vec::new(),
        };
        Chain::new(
            backends
                .iter()
                .map(|&(name, fails)| {
                    let stub = Stub {
                        name,
                        fails,
                        manifest: manifest.clone(),
                    };
                    BackendHandle::read_only(Arc::new(stub))
                })
                .collect(),
        )
    }

    fn image(reference: Reference) -> ImageRef {
        ImageRef::new(Repository::new("docker.io", "library/x").unwrap(), reference)
    }

    #[tokio::test]
    async fn a_failing_backend_does_not_hide_content_a_later_one_holds() {
        let ctx = RequestCtx::default();
        let c = chain(&[("broken", true), ("push", false)]);
        let repo = Repository::new("docker.io", "library/x").unwrap();
        assert_eq!(c.blob(&repo, &blob_digest(), None, &ctx).await.unwrap().backend, "push");
        assert_eq!(c.blob_size(&repo, &blob_digest(), &ctx).await.unwrap().backend, "push");
        let by_digest = image(Reference::Digest(Digest::of(b"{}")));
        assert_eq!(c.manifest(&by_digest, &ctx).await.unwrap().backend, "push");
    }

    #[tokio::test]
    async fn the_failure_is_the_answer_when_nobody_has_it() {
        let ctx = RequestCtx::default();
        let c = chain(&[("broken", true), ("push", false)]);
        let repo = Repository::new("docker.io", "library/x").unwrap();
        let absent = Digest::of(b"absent");
        let err = c.blob(&repo, &absent, None, &ctx).await.err().unwrap();
        assert!(matches!(err, Error::Internal(ref m) if m == "broken broke"), "{err}");
        let err = c.manifest(&image(Reference::Digest(absent)), &ctx).await.err().unwrap();
        assert!(matches!(err, Error::Internal(_)), "{err}");
    }

    #[tokio::test]
    async fn a_failure_on_a_tag_stops_the_chain() {
        let ctx = RequestCtx::default();
        let c = chain(&[("broken", true), ("push", false)]);
        let err = c
            .manifest(&image(Reference::Tag("v1".into())), &ctx)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::Internal(_)), "{err}");
    }
}
