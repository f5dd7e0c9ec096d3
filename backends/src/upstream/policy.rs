//! Which origins this backend asks, and who may be served what it cached: a repository
//! fetched with a client's credentials is private to clients the origin accepts (the
//! data of it lives in `access.rs`).

use reqwest::Method;

use crate::registry::{RegistryClient, Target};
use ferry_core::{Backend, Digest, Error, Repository, RequestCtx, Result};

use super::access::PrivateRepos;
use super::UpstreamBackend;

/// The flight key part that keeps one client's fetch from answering another's credentials.
pub(super) fn credentials_key(ctx: &RequestCtx) -> String {
    ctx.authorization
        .as_deref()
        .map(|a| Digest::of(a.as_bytes()).hex()[..16].to_string())
        .unwrap_or_default()
}

/// Marks `repo` private after a fetch with a client's credentials, unless the origin serves
/// `target` without any: a public repository the client sent credentials for anyway (Docker
/// and containerd send them to every host they are logged in to) stays public, so that it is
/// served offline to every client. One anonymous `HEAD`, its answer remembered for the TTL.
pub(super) async fn mark_if_private(
    client: &RegistryClient,
    access: &PrivateRepos,
    repo: &Repository,
    target: Target<'_>,
    creds: &str,
) -> Result<()> {
    if !access.is_private(repo) {
        if access.known_public(repo) {
            return Ok(());
        }
        if let Ok(Some(_)) = client.fetch(Method::HEAD, repo, target, &[], None).await {
            access.note_public(repo);
            return Ok(());
        }
    }
    access.mark_private(repo, creds).await
}

impl UpstreamBackend {
    /// Whether the origin may be contacted at all; logged once per request when not.
    pub(super) fn allowed(&self, repo: &Repository) -> bool {
        match self.client.policy().check_registry(repo.registry()) {
            Ok(()) => true,
            Err(reason) => {
                tracing::debug!(backend = %self.name(), origin = %repo, %reason, "origin not in this backend's allow list");
                false
            }
        }
    }

    /// Whether a fetch for this request goes with the client's own credentials (ferry has
    /// none for the origin): what it brings is then private to clients the origin accepts.
    pub(super) fn with_client_credentials(&self, repo: &Repository, ctx: &RequestCtx) -> bool {
        !self.config.share_private && ctx.authorization.is_some() && !self.client.has_credentials(repo.registry())
    }

    /// Whether the cache may serve `repo`'s `target` to this client: always for a repository
    /// that is not private; else when the origin let the client's credentials read it within
    /// the TTL, or does now (a `HEAD`; one that answers a client without credentials makes
    /// the repository public); when the origin cannot be asked, when it ever did since ferry
    /// started. `false` when the origin does not have it (for this client).
    pub(super) async fn may_serve(&self, repo: &Repository, target: Target<'_>, ctx: &RequestCtx) -> Result<bool> {
        if !self.access.is_private(repo) {
            return Ok(true);
        }
        let key = credentials_key(ctx);
        if self.access.granted(repo, &key, true) {
            return Ok(true);
        }
        match self
            .client
            .fetch(Method::HEAD, repo, target, &[], ctx.authorization.as_deref())
            .await
        {
            Ok(Some(_)) if ctx.authorization.is_none() => {
                tracing::info!(backend = %self.name(), origin = %repo,
                    "origin serves a private repository without credentials now: its cache is public");
                self.access.unmark_private(repo).await?;
                Ok(true)
            }
            Ok(Some(_)) => {
                self.access.grant(repo, &key);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e @ Error::Unavailable { .. }) if self.access.granted(repo, &key, false) => {
                tracing::warn!(backend = %self.name(), origin = %repo, error = %e,
                    "origin unreachable: serving a private repository to credentials it accepted before");
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}
