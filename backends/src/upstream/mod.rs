//! The upstream backend: a pull-through cache for every registry at once. A request's origin
//! (`?ns=`, a host as the first path component, else Docker Hub) is asked for what no
//! earlier backend had; what it answers is kept in a blob store on disk, content-addressed,
//! so later pulls — and pulls while the origin is down — come from the disk. Manifests and
//! blobs keep the origin's exact bytes and digests. A tag is re-checked at the origin once its
//! TTL ran out; a digest never is.

mod access;
mod fill;
mod inventory;
mod meta;
mod tag_list;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::Method;
use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::manifest::MAX_MANIFEST_SIZE;
use ferry_core::origin::OriginPolicy;
use ferry_core::status::{BackendStatus, CachedImage, Evicted};
use ferry_core::{
    Backend, BlobBody, BlobStore, ByteRange, Digest, Error, ImageRef, Manifest, ManifestInfo, Reference, Repository,
    RequestCtx, Result,
};

use crate::registry::{ClientSettings, HostConfig, RegistryClient, Target};
use access::Access;
use fill::{Fill, Fills, Joined, Wanted};
use meta::Meta;
use tag_list::TagLists;

/// `[[backends]] type = "upstream"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name in logs and the `Ferry-Backend` header.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where the cache lives; `<cache.dir>/upstream` by default.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The only origins ever contacted: `host`, `host:port`, `*.domain`, or `*` (any host
    /// on the public internet). Loopback and private addresses must be named exactly, here or
    /// in `hosts`.
    #[serde(default = "default_allow")]
    pub allow: Vec<String>,
    /// How long a tag's digest is served before the origin is asked again.
    #[serde(default = "default_ttl")]
    pub tag_ttl_secs: u64,
    /// The cache's size limit ("20GiB"); least recently used blobs go first. No limit when
    /// unset.
    #[serde(default)]
    pub max_cache_size: Option<crate::size::Size>,
    /// The largest blob fetched ("16GiB"): a bigger one is refused before its body is read,
    /// so no client can fill the disk with one huge blob from an allowed origin.
    #[serde(default = "default_max_blob_size")]
    pub max_blob_size: crate::size::Size,
    /// A fetch whose clients all went away goes on when at least this share of the blob
    /// arrived (0: always finish, 100: stop unless done).
    #[serde(default = "default_keep_percent")]
    pub keep_fill_from_percent: u8,
    /// Serve what was fetched with one client's own credentials to every client, from the
    /// cache (a one-user machine that must pull private images offline after a restart).
    /// Off: such a repository is served only to clients whose credentials the origin accepts.
    #[serde(default)]
    pub share_private: bool,
    /// A Docker `config.json` whose `auths` are ferry's credentials per host.
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// A PEM CA certificate trusted for every host.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per-host settings: plain HTTP, CA, endpoint, credentials.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
}

fn default_name() -> String {
    "upstream".into()
}
fn default_allow() -> Vec<String> {
    vec!["*".into()]
}
fn default_ttl() -> u64 {
    300
}
fn default_keep_percent() -> u8 {
    50
}
fn default_max_blob_size() -> crate::size::Size {
    crate::size::Size::sixteen_gib()
}

impl Default for UpstreamConfig {
    /// The defaults of an empty `[[backends]] type = "upstream"` table.
    fn default() -> Self {
        UpstreamConfig {
            name: default_name(),
            dir: None,
            allow: default_allow(),
            tag_ttl_secs: default_ttl(),
            max_cache_size: None,
            max_blob_size: default_max_blob_size(),
            keep_fill_from_percent: default_keep_percent(),
            share_private: false,
            docker_config: None,
            ca_file: None,
            hosts: BTreeMap::new(),
        }
    }
}

impl UpstreamConfig {
    /// Opens the cache under `data_dir` and builds the backend; fails on an unusable cache
    /// directory, CA, password file or Docker config.
    pub async fn build(&self, data_dir: &Path) -> Result<Arc<UpstreamBackend>> {
        let client = self.client()?;
        let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("upstream"));
        let store = BlobStore::open(&dir).await?;
        let meta = Meta::open(&dir).await?;
        let access = Access::open(&dir, Duration::from_secs(self.tag_ttl_secs)).await?;
        let max_bytes = self.max_cache_size.as_ref().map(crate::size::Size::bytes);
        let max_blob = self.max_blob_size.bytes();
        let used = Arc::new(AtomicU64::new(0));
        tracing::info!(backend = %self.name, dir = %dir.display(), allow = ?self.allow, "upstream cache open");
        if max_bytes.is_some() {
            // The size limit needs what the cache holds: counted beside serving, not before
            // it (one stat per blob). A fill that ends meanwhile may count twice; the
            // eviction it might trigger early recounts exactly.
            let (store, used, name) = (store.clone(), used.clone(), self.name.clone());
            tokio::spawn(async move {
                let blobs = match store.list().await {
                    Ok(b) => b,
                    Err(e) => {
                        return tracing::warn!(backend = %name, error = %e,
                            "cannot count the upstream cache: its size limit applies from the next fill on")
                    }
                };
                let mut total = 0;
                for d in blobs {
                    total += store.size(&d).await.ok().flatten().unwrap_or(0);
                }
                used.fetch_add(total, Ordering::SeqCst);
                tracing::info!(backend = %name, cached_bytes = total, "upstream cache counted");
            });
        }
        Ok(Arc::new(UpstreamBackend {
            config: self.clone(),
            client: Arc::new(client),
            store,
            meta: Arc::new(meta),
            access: Arc::new(access),
            fills: Arc::new(Fills::default()),
            starting: Arc::new(Flights::default()),
            manifests: Flights::default(),
            tag_lists: TagLists::new(Duration::from_secs(self.tag_ttl_secs)),
            ttl: Duration::from_secs(self.tag_ttl_secs),
            max_bytes,
            max_blob,
            used,
        }))
    }

    /// The registry client of this backend: its hosts' settings, credentials and CAs, and
    /// the allow-list.
    pub fn client(&self) -> Result<RegistryClient> {
        let settings = ClientSettings {
            hosts: self.hosts.clone(),
            plain_http: Vec::new(),
            ca_file: self.ca_file.clone(),
            docker_config: self.docker_config.clone(),
            metric_hosts: self.named_origins(),
        };
        let mut allowed = self.allow.clone();
        allowed.extend(settings.named_hosts());
        RegistryClient::new(settings, Arc::new(OriginPolicy::new(&allowed, false)))
    }

    /// The origins the config names one by one (`allow` without patterns, and `hosts`).
    pub fn named_origins(&self) -> Vec<String> {
        let mut named: Vec<String> = self.allow.iter().filter(|h| !h.contains('*')).cloned().collect();
        named.extend(
            self.hosts
                .keys()
                .filter(|h| !named.contains(h))
                .cloned()
                .collect::<Vec<_>>(),
        );
        named
    }
}

/// The pull-through cache.
pub struct UpstreamBackend {
    config: UpstreamConfig,
    client: Arc<RegistryClient>,
    store: BlobStore,
    meta: Arc<Meta>,
    /// Which repositories are private, and who may read them.
    access: Arc<Access>,
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

/// The flight key part that keeps one client's fetch from answering another's credentials.
fn credentials_key(ctx: &RequestCtx) -> String {
    ctx.authorization
        .as_deref()
        .map(|a| Digest::of(a.as_bytes()).hex()[..16].to_string())
        .unwrap_or_default()
}

impl UpstreamBackend {
    /// Whether the origin may be contacted at all; logged once per request when not.
    fn allowed(&self, repo: &Repository) -> bool {
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
    fn with_client_credentials(&self, repo: &Repository, ctx: &RequestCtx) -> bool {
        !self.config.share_private && ctx.authorization.is_some() && !self.client.has_credentials(repo.registry())
    }

    /// Whether the cache may serve `repo`'s `target` to this client: always for a repository
    /// that is not private; else when the origin let the client's credentials read it within
    /// the TTL, or does now (a `HEAD`; one that answers a client without credentials makes
    /// the repository public); when the origin cannot be asked, when it ever did since ferry
    /// started. `false` when the origin does not have it (for this client).
    async fn may_serve(&self, repo: &Repository, target: Target<'_>, ctx: &RequestCtx) -> Result<bool> {
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

    /// A manifest in the cache, with its media type.
    async fn cached_manifest(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let found = stored_manifest(&self.store, &self.meta, digest).await?;
        if found.is_some() {
            self.touch(digest);
        }
        Ok(found)
    }

    /// Marks a blob used now, for the LRU order of eviction.
    fn touch(&self, digest: &Digest) {
        let path = self.store.path(digest);
        tokio::task::spawn_blocking(move || {
            // Times change through the descriptor of a read-only open: the owner may.
            if let Ok(f) = std::fs::File::open(&path) {
                let _ = f.set_modified(SystemTime::now());
            }
        });
    }

    /// Fetches a manifest from the origin (once for concurrent callers with the same
    /// credentials), checks it, and caches it — with the tag it was asked by, when it was,
    /// before any waiting caller sees it. `expected` is the digest asked for.
    async fn fetch_manifest(
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
    async fn origin_tag_digest(
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

    async fn tagged(&self, repo: &Repository, tag: &str, ctx: &RequestCtx) -> Result<Option<Manifest>> {
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

    /// Whether the origin serves `digest` for `repo` (a `HEAD`), with its size; records the
    /// link when it does.
    async fn origin_blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>> {
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
        let Some(size) = resp.and_then(|r| r.content_length()) else {
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
    async fn fill(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<Arc<Fill>>> {
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
                    move |stored: bool| {
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
                let (fill, started) = fills.start(&digest, || Fill::spawn(&backend, &store, wanted, resp, keep, done))?;
                if started {
                    tracing::info!(backend = %backend, origin = %repo, %digest, size, "cache miss: fetching blob from its origin");
                    ferry_core::metrics::upstream_cache(&backend, "miss");
                }
                Ok(Some(fill))
            })
            .await
    }
}

/// A manifest in the cache, with its media type.
async fn stored_manifest(store: &BlobStore, meta: &Meta, digest: &Digest) -> Result<Option<Manifest>> {
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

/// Marks `repo` private after a fetch with a client's credentials, unless the origin serves
/// `target` without any: a public repository the client sent credentials for anyway (Docker
/// and containerd send them to every host they are logged in to) stays public, so that it is
/// served offline to every client. One anonymous `HEAD`, its answer remembered for the TTL.
async fn mark_if_private(
    client: &RegistryClient,
    access: &Access,
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

/// Bytes free for this user on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let v =
        nix::sys::statvfs::statvfs(dir).map_err(|e| Error::io(format!("free space of {}", dir.display()), e.into()))?;
    Ok(v.blocks_available().saturating_mul(v.fragment_size()))
}

/// Whether a blob of `size` bytes fits in `free` bytes beside what fetches under way will
/// still write (`promised`), leaving a sixty-fourth of the room for everything else.
fn fits(size: u64, free: u64, promised: u64) -> bool {
    let room = free.saturating_sub(promised);
    size <= room - room / 64
}

/// The bytes of a response; more than `limit` is the error `too_large` makes of the size.
async fn read_limited(
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

/// Deletes least recently used blobs until the cache is a tenth under `max`. A blob being
/// served stays readable to its reader until the stream ends.
async fn evict(backend: &str, store: &BlobStore, used: &AtomicU64, max: u64) {
    let target = max - max / 10;
    let mut blobs = Vec::new();
    let Ok(all) = store.list().await else { return };
    for d in all {
        if let Ok(m) = tokio::fs::metadata(store.path(&d)).await {
            blobs.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), d));
        }
    }
    blobs.sort_by_key(|(t, ..)| *t);
    let mut total: u64 = blobs.iter().map(|(_, len, _)| len).sum();
    let (mut freed, mut count) = (0u64, 0usize);
    for (_, len, d) in blobs {
        if total <= target {
            break;
        }
        if matches!(store.delete(&d).await, Ok(true)) {
            total -= len;
            freed += len;
            count += 1;
        }
    }
    used.store(total, Ordering::SeqCst);
    tracing::info!(
        backend,
        freed_bytes = freed,
        blobs = count,
        limit_bytes = max,
        "upstream cache over its size limit: evicted least recently used blobs"
    );
}

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
