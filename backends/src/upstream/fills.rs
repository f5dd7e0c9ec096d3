//! Starting the fill of a blob from its origin: one per digest, within `max_blob_size`, the
//! disk's room and the cache's size limit (see `fill.rs` for the fill itself).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use reqwest::Method;

use crate::registry::Target;
use ferry_core::{Backend, Digest, Error, Repository, RequestCtx, Result};

use super::{credentials_key, evict, mark_if_private, UpstreamBackend};
use crate::fill::{Commit, Fill, Wanted};

/// Bytes free for this user on the file system of `dir`.
pub(super) fn free_bytes(dir: &Path) -> Result<u64> {
    let v =
        nix::sys::statvfs::statvfs(dir).map_err(|e| Error::io(format!("free space of {}", dir.display()), e.into()))?;
    Ok(v.blocks_available().saturating_mul(v.fragment_size()))
}

/// Whether a blob of `size` bytes fits in `free` bytes beside what fetches under way will
/// still write (`promised`), leaving a sixty-fourth of the room for everything else.
pub(super) fn fits(size: u64, free: u64, promised: u64) -> bool {
    let room = free.saturating_sub(promised);
    size <= room - room / 64
}

impl UpstreamBackend {
    /// Whether the origin serves `digest` for `repo` (a `HEAD`), with its size; records the
    /// link when it does.
    pub(super) async fn origin_blob_size(
        &self,
        repo: &Repository,
        digest: &Digest,
        ctx: &RequestCtx,
    ) -> Result<Option<u64>> {
        let resp = self
            .client
            .fetch(
                Method::HEAD,
                repo,
                Target::Blob(digest),
                &[],
                ctx.authorization.as_deref(),
            )
            .await?;
        let Some(size) = resp.as_ref().and_then(crate::registry::declared_length) else {
            return Ok(None);
        };
        if self.access.is_private(repo) {
            self.access.grant(repo, &credentials_key(ctx));
        }
        if self.store.size(digest).await?.is_some() {
            self.meta.link(repo, digest).await?;
        }
        Ok(Some(size))
    }

    /// Starts the fill of `digest` from `repo`'s origin, or joins the one under way (or
    /// just done: joining it then says the blob is in the store). `None` when the origin
    /// does not have the blob, or a fill stored it meanwhile.
    pub(super) async fn fill(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<Arc<Fill>>> {
        if let Some(f) = self.fills.get(digest).filter(|f| !f.failed()) {
            return Ok(Some(f));
        }
        let (client, fills, store, meta) = (
            self.client.clone(),
            self.fills.clone(),
            self.store.clone(),
            self.meta.clone(),
        );
        let (repo, digest, authorization) = (repo.clone(), digest.clone(), ctx.authorization.clone());
        // One start per digest and credentials: a caller whose credentials the origin refuses
        // does not answer for another's. Callers with other credentials may each ask the
        // origin; the first fill to start is the one all of them read.
        let creds = credentials_key(ctx);
        let key = format!("{digest}:{creds}");
        let (private, access) = (self.with_client_credentials(&repo, ctx), self.access.clone());
        let (backend, keep, used, max, max_blob) = (
            self.name().to_string(),
            self.config.keep_fill_from_percent,
            self.used.clone(),
            self.max_bytes,
            self.max_blob,
        );
        self.starting
            .clone()
            .run(&key, async move {
                if let Some(f) = fills.get(&digest).filter(|f| !f.failed()) {
                    return Ok(Some(f));
                }
                if store.size(&digest).await?.is_some() {
                    return Ok(None); // stored by a fill that just ended
                }
                let Some(resp) = client
                    .fetch(
                        Method::GET,
                        &repo,
                        Target::Blob(&digest),
                        &[],
                        authorization.as_deref(),
                    )
                    .await?
                else {
                    return Ok(None);
                };
                // Before any other client can join the fill.
                if private {
                    mark_if_private(&client, &access, &repo, Target::Blob(&digest), &creds).await?;
                }
                let Some(size) = resp.content_length() else {
                    return Err(Error::Unavailable {
                        backend,
                        reason: format!("origin {repo} sent {digest} without a Content-Length"),
                    });
                };
                if let Some(max) = max.filter(|m| size > *m) {
                    return Err(Error::TooLarge(format!(
                        "{digest} from {repo} is {size} bytes, more than the whole cache may hold ({max})"
                    )));
                }
                if size > max_blob {
                    return Err(Error::TooLarge(format!(
                        "{digest} from {repo} is {size} bytes, more than a blob may be (max_blob_size: {max_blob})"
                    )));
                }
                let free = free_bytes(store.root())?;
                let promised = fills.promised();
                if !fits(size, free, promised) {
                    // Unavailable, not an error of the request: the chain answers 404 and the
                    // client pulls from the origin itself.
                    return Err(Error::Unavailable {
                        backend,
                        reason: format!(
                            "{digest} from {repo} is {size} bytes and the cache's disk has {free} bytes free \
                             ({promised} promised to fetches under way): not fetching it"
                        ),
                    });
                }
                let done = {
                    let (fills, digest, repo, store, backend) = (
                        fills.clone(),
                        digest.clone(),
                        repo.clone(),
                        store.clone(),
                        backend.clone(),
                    );
                    move |outcome: &Result<()>| {
                        let stored = outcome.is_ok();
                        tokio::spawn(async move {
                            if stored {
                                if let Err(e) = meta.link(&repo, &digest).await {
                                    tracing::warn!(backend = %backend, %digest, error = %e, "cannot record the blob's repository");
                                }
                                let total = used.fetch_add(size, Ordering::SeqCst) + size;
                                if let Some(max) = max.filter(|m| total > *m) {
                                    evict(&backend, &store, &used, max).await;
                                }
                            }
                            fills.remove(&digest);
                        });
                    }
                };
                let wanted = Wanted {
                    repo: repo.clone(),
                    digest: digest.clone(),
                    size,
                };
                let (fill, started) = fills.start(&digest, || Fill::spawn(&backend, &store, wanted, resp, keep, Commit::Store, done))?;
                if started {
                    tracing::info!(backend = %backend, origin = %repo, %digest, size, "cache miss: fetching blob from its origin");
                    ferry_core::metrics::upstream_cache(&backend, "miss");
                }
                Ok(Some(fill))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::fits;

    #[test]
    fn a_blob_fits_only_beside_what_fetches_under_way_will_write() {
        let gib = 1u64 << 30;
        assert!(fits(gib, 10 * gib, 0));
        assert!(fits(9 * gib, 10 * gib, 0));
        // A sixty-fourth of the room stays free.
        assert!(!fits(10 * gib, 10 * gib, 0));
        assert!(!fits(5 * gib, 10 * gib, 6 * gib));
        assert!(fits(3 * gib, 10 * gib, 6 * gib));
        // More promised than free (another writer filled the disk): nothing fits.
        assert!(!fits(1, gib, 2 * gib));
        assert!(fits(0, 0, 0));
    }
}
