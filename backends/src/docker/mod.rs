//! The docker backend: serves images straight from a local Docker or Podman engine by
//! exporting them (`docker save`) into a content-addressed cache.

mod archive;
mod cache;
mod containerd_store;
mod direct;
mod engine;
mod export;
mod index;
mod pins;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use base64::Engine as _;
use bollard::auth::DockerCredentials;
use futures::StreamExt;
use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::origin::OriginPolicy;
use ferry_core::status::{BackendStatus, CachedImage, Evicted};
use ferry_core::{
    Backend, BlobBody, ByteRange, Digest, Error, ImageRef, Manifest, ManifestInfo, Reference, Repository, RequestCtx,
    Result, DOCKER_HUB,
};

use cache::{Cache, Entry};
use engine::Engine;
use export::Exported;
use index::ImageIndex;

/// How many chunks of an export are read from the engine ahead of the tar reader (hyper's
/// chunks are at most its read buffer, some hundred KiB, so this bounds memory to a few MiB).
const EXPORT_PREFETCH_CHUNKS: usize = 16;

/// Images of one repository exported at most to find a blob asked for before its manifest.
const MAX_EXPORTS_PER_BLOB_LOOKUP: usize = 8;

/// `[[backends]] type = "docker"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// Name in logs and the `Ferry-Backend` header.
    #[serde(default = "default_name")]
    pub name: String,
    /// Engine API socket: `unix:///var/run/docker.sock`, a Podman socket, or `tcp://host:port`.
    /// Unset: `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    #[serde(default)]
    pub socket: Option<String>,
    /// For a `tcp://` engine behind TLS: a directory with `ca.pem`, `cert.pem` and `key.pem`
    /// (as `DOCKER_CERT_PATH`). Unset: `DOCKER_CERT_PATH` when `DOCKER_TLS_VERIFY` is set.
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    /// Pull images the engine lacks through the engine, with the client's credentials.
    #[serde(default)]
    pub pull_missing: bool,
    /// How many different images may be exported at once.
    #[serde(default = "default_parallel")]
    pub max_parallel_exports: usize,
    /// Cache size limit, e.g. "20GiB"; unset means no limit.
    #[serde(default)]
    pub max_cache_size: Option<crate::size::Size>,
    /// Where exported blobs are cached; defaults to `<cache.dir>/docker`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Serve images from the engine's own storage (Docker's graph driver: overlay2, vfs)
    /// when ferry can read its data root, with no export; anything else is exported.
    #[serde(default = "default_true")]
    pub direct_reads: bool,
}

fn default_true() -> bool {
    true
}

fn default_name() -> String {
    "docker".into()
}
fn default_parallel() -> usize {
    2
}

impl Default for DockerConfig {
    /// The defaults of an empty `[[backends]] type = "docker"` table.
    fn default() -> Self {
        DockerConfig {
            name: default_name(),
            socket: None,
            tls_dir: None,
            pull_missing: false,
            max_parallel_exports: default_parallel(),
            max_cache_size: None,
            dir: None,
            direct_reads: true,
        }
    }
}

impl DockerConfig {
    /// The engine's address: `socket`, else `DOCKER_HOST`, else Docker's default socket.
    pub fn socket_url(&self) -> String {
        self.socket
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }

    /// Opens the export cache under `data_dir` and starts following the engine (which may
    /// come up later); fails only when the cache directory cannot be used.
    pub async fn build(&self, data_dir: &Path, origins: Arc<OriginPolicy>) -> Result<Arc<DockerBackend>> {
        let socket = self.socket_url();
        let max_bytes = self.max_cache_size.as_ref().map(crate::size::Size::bytes);
        let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("docker"));
        let cache = Arc::new(Cache::open(&self.name, dir, self.max_parallel_exports, max_bytes).await?);
        let tls_dir = self.tls_dir.clone().or_else(|| {
            let verify = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0");
            verify
                .then(|| std::env::var("DOCKER_CERT_PATH").ok())
                .flatten()
                .map(PathBuf::from)
        });
        let engine = Arc::new(Engine::new(&self.name, &socket, tls_dir));
        let index = Arc::new(ImageIndex::new());
        let reachable = match engine.client().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(backend = %self.name, error = %e,
                    "engine not reachable now; the backend answers 'unavailable' until it is");
                false
            }
        };
        index.follow(engine.clone());
        let (i, e, name) = (index.clone(), engine.clone(), self.name.clone());
        tokio::spawn(async move {
            if let Err(err) = i.refresh(&e).await {
                tracing::debug!(backend = %name, error = %err, "engine image index not built at start");
            }
        });
        let direct = Arc::new(direct::Direct::new(&self.name, self.direct_reads));
        let containerd = containerd_store::EngineContainerd::new(&self.name, origins.clone());
        if reachable {
            // Whether the engine's storage can be read is asked at start, not on the first
            // request (Podman's `info` takes a quarter of a second).
            if containerd.get(&engine).await.is_none() {
                direct.in_use(&engine).await;
            }
        }
        Ok(Arc::new(DockerBackend {
            containerd,
            direct,
            config: self.clone(),
            engine,
            cache,
            index,
            pulls: Flights::default(),
            direct_image_reads: Flights::default(),
            origins,
        }))
    }
}

/// Serves a Docker or Podman engine's images through exports cached on disk.
pub struct DockerBackend {
    config: DockerConfig,
    engine: Arc<Engine>,
    cache: Arc<Cache>,
    index: Arc<ImageIndex>,
    /// Engine pulls under way, one per image and credentials.
    pulls: Flights<bool>,
    /// Which registries the engine may pull from for a client.
    origins: Arc<OriginPolicy>,
    /// Images read from the engine's storage instead of exported.
    direct: Arc<direct::Direct>,
    /// Direct reads of an image's metadata under way, one per image: the first requests for
    /// an image, coming in at once, share one.
    direct_image_reads: Flights<Option<Arc<Entry>>>,
    /// The engine's containerd content store, when the engine keeps its images there.
    containerd: containerd_store::EngineContainerd,
}

/// One export of an engine image, owning what it needs: it runs as a task of its own.
struct Export {
    backend: String,
    engine: Arc<Engine>,
    cache: Arc<Cache>,
    name: String,
    id: String,
    repo: Repository,
}

impl Export {
    /// Streams the archive into the cache and interprets it. Blobs it stored but nothing
    /// references (all of them, when the archive is unusable) are discarded; the rest come
    /// back pinned until the cache records the entry.
    async fn run(self) -> Result<(Exported, Vec<pins::Pin>)> {
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

    async fn read(
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
                "export lacks blobs its manifest references (moby#49473); later backends are asked for them");
        }
        Ok((exported, used))
    }
}

/// An engine image found for a request: its id and the name it was found under.
struct Found {
    id: String,
    name: String,
}

impl DockerBackend {
    /// Names to look a tagged image up under, most specific first: Docker's short form
    /// (`alpine:3.20`, `registry.k8s.io/pause:3.9`), the full one, and for Docker Hub names
    /// Podman's `localhost/` for locally built images.
    fn candidates(repo: &Repository, tag: &str) -> Vec<String> {
        let mut names = vec![
            format!("{}:{tag}", repo.familiar()),
            format!("{}:{tag}", repo.canonical()),
        ];
        if repo.registry() == DOCKER_HUB {
            let short = repo.path().strip_prefix("library/").unwrap_or(repo.path());
            names.push(format!("localhost/{short}:{tag}"));
        }
        names.dedup();
        names
    }

    async fn find(&self, names: &[String]) -> Result<Option<Found>> {
        for name in names {
            if let Some(i) = self.engine.inspect(name).await? {
                if let Some(id) = i.id {
                    return Ok(Some(Found { id, name: name.clone() }));
                }
            }
        }
        Ok(None)
    }

    /// The cache entry of an engine image: read from the engine's storage when ferry can,
    /// else exported when the cache has none.
    async fn entry(&self, found: &Found, repo: &Repository) -> Result<Arc<Entry>> {
        let cached = self.cache.get(&found.id).await;
        if let Some(e) = &cached {
            if self.direct.knows(&e.export).await {
                self.cache.touch(&found.id).await;
                return Ok(e.clone());
            }
        }
        // An exported entry is served as it is; none, or a direct one whose layers are not
        // known yet, is read from the engine's storage first.
        let exported = cached
            .as_ref()
            .is_some_and(|e| e.export.format != export::Format::Direct);
        if !exported {
            if let Some(entry) = self.read_directly(&found.id).await? {
                ferry_core::metrics::cache_lookup(&self.config.name, cached.is_some());
                return Ok(entry);
            }
            if let Some(e) = cached.filter(|e| e.export.format == export::Format::Direct) {
                // Direct reads failed for it: drop the entry so the export below runs.
                let id = e.image_id.clone();
                self.cache.evict_where(|x| x.image_id == id).await?;
            }
        }
        let export = Export {
            backend: self.config.name.clone(),
            engine: self.engine.clone(),
            cache: self.cache.clone(),
            name: found.name.clone(),
            id: found.id.clone(),
            repo: repo.clone(),
        };
        let entry = self.cache.get_or_export(&found.id, move || export.run()).await?;
        self.cache.touch(&found.id).await;
        Ok(entry)
    }

    /// Reads image `id` from the engine's storage and records it, once however many
    /// requests ask at the same time; `None` when it cannot be read there (it is exported).
    async fn read_directly(&self, id: &str) -> Result<Option<Arc<Entry>>> {
        let (direct, engine, cache, id_owned) = (
            self.direct.clone(),
            self.engine.clone(),
            self.cache.clone(),
            id.to_string(),
        );
        self.direct_image_reads
            .run(id, async move {
                // A read that ended just before this one started left its entry.
                if let Some(e) = cache.get(&id_owned).await {
                    if direct.knows(&e.export).await {
                        return Ok(Some(e));
                    }
                }
                match direct.read_image(&engine, &cache.store, &id_owned).await {
                    Some(exported) => Ok(Some(cache.record(&id_owned, exported).await?)),
                    None => Ok(None),
                }
            })
            .await
    }

    async fn serve_manifest(&self, entry: &Entry, digest: &Digest) -> Result<Option<Manifest>> {
        let Some(bytes) = self.cache.store.read(digest).await? else {
            return Ok(None);
        };
        let media_type = if *digest == entry.export.top {
            entry.export.media_type.clone()
        } else {
            ManifestInfo::parse(&bytes, None)?.media_type
        };
        Ok(Some(Manifest {
            bytes,
            media_type,
            digest: digest.clone(),
            missing: entry.export.missing.clone(),
        }))
    }

    /// The client's Basic credentials, in the form the engine's pull takes.
    fn credentials(ctx: &RequestCtx, repo: &Repository) -> Option<DockerCredentials> {
        let b64 = ctx.authorization.as_deref()?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
        let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        let server = if repo.registry() == DOCKER_HUB {
            "https://index.docker.io/v1/".to_string()
        } else {
            repo.registry().to_string()
        };
        Some(DockerCredentials {
            username: Some(user.to_string()),
            password: Some(pass.to_string()),
            serveraddress: Some(server),
            ..Default::default()
        })
    }

    /// Pulls a missing image through the engine, once however many requests ask for it at
    /// the same time (with the same credentials). Without credentials a failure asks the
    /// client to authenticate (kubelet then retries with its pull secret); with them it is
    /// "not found".
    async fn pull(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<bool> {
        let repo = &image.repository;
        let from = if repo.registry() == DOCKER_HUB {
            repo.familiar()
        } else {
            repo.canonical()
        };
        if let Err(reason) = self.may_pull_from(repo.registry()).await {
            tracing::warn!(backend = %self.config.name, image = %image, %reason, "not pulling through the engine");
            return Ok(false);
        }
        let credentials = Self::credentials(ctx, repo);
        let key = format!(
            "{from}:{}\n{}",
            image.reference,
            ctx.authorization.as_deref().unwrap_or("")
        );
        let (engine, index, backend, image) = (
            self.engine.clone(),
            self.index.clone(),
            self.config.name.clone(),
            image.clone(),
        );
        let work = async move {
            let with_credentials = credentials.is_some();
            let started = Instant::now();
            tracing::info!(backend = %backend, image = %image, with_credentials, "pulling missing image through the engine");
            match engine.pull(&from, &image.reference.to_string(), credentials).await? {
                Ok(()) => {
                    ferry_core::metrics::engine_pull(&backend, true);
                    tracing::info!(backend = %backend, image = %image,
                        elapsed_ms = started.elapsed().as_millis() as u64, "pull finished");
                    index.mark_stale();
                    Ok(true)
                }
                Err(message) => {
                    ferry_core::metrics::engine_pull(&backend, false);
                    tracing::warn!(backend = %backend, image = %image, with_credentials, error = %message, "pull failed");
                    // The engine's words stay in the log: they would tell a client which hosts
                    // and ports answer, and how.
                    if with_credentials {
                        Ok(false)
                    } else {
                        Err(Error::Unauthorized {
                            realm: "ferry".into(),
                            message: format!(
                                "{image} is not in the engine and could not be pulled without credentials"
                            ),
                            challenge: None,
                        })
                    }
                }
            }
        };
        self.pulls.run(&key, work).await
    }

    /// Whether the engine may pull from `registry` for a client: the registry must pass the
    /// origin policy, and a name must not resolve to an internal address the policy does not
    /// name (the engine resolves it again itself; this keeps listed names honest).
    async fn may_pull_from(&self, registry: &str) -> std::result::Result<(), String> {
        self.origins.check_registry(registry)?;
        let host = if registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            registry
        };
        let (name, _) = ferry_core::origin::split_host(host);
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Ok(()); // an IP literal: check_registry judged it
        }
        if let Ok(addrs) = tokio::net::lookup_host((name, 0)).await {
            for a in addrs {
                self.origins.check_address(registry, a.ip())?;
            }
        }
        Ok(())
    }

    /// The manifest (or index) of engine image `id` from the engine's containerd content
    /// store, when the engine keeps its images there: on that store an image's id is the
    /// digest of its index or manifest, so these are the bytes `docker push` and `docker
    /// inspect` name.
    async fn containerd_manifest_of(&self, image: &ImageRef, id: &str, ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let Some(store) = self.containerd.get(&self.engine).await else {
            return Ok(None);
        };
        let Ok(digest) = id.parse::<Digest>() else {
            return Ok(None);
        };
        let by_id = ImageRef::new(image.repository.clone(), Reference::Digest(digest));
        store.manifest(&by_id, ctx).await
    }

    /// Finds an image, pulling it first when it is missing and `pull_missing` is on.
    async fn find_or_pull(&self, names: &[String], image: &ImageRef, ctx: &RequestCtx) -> Result<Option<Found>> {
        if let Some(f) = self.find(names).await? {
            return Ok(Some(f));
        }
        if !self.config.pull_missing || !self.pull(image, ctx).await? {
            return Ok(None);
        }
        self.find(names).await
    }

    /// The engine's tagged images as (repository, tag, image id). Podman's `localhost/NAME`
    /// (its locally built images) also counts as Docker Hub's `library/NAME`, as in
    /// [`Self::candidates`].
    async fn engine_tags(&self) -> Result<Vec<(Repository, String, String)>> {
        let mut out = Vec::new();
        for image in self.engine.list().await? {
            for repo_tag in &image.repo_tags {
                let Some((name, tag)) = repo_tag.rsplit_once(':').filter(|(n, _)| !n.ends_with('/')) else {
                    continue;
                };
                let Ok(repo) = Repository::from_request(name, None) else {
                    continue;
                };
                if repo.registry() == "localhost" {
                    if let Ok(hub) = Repository::new(DOCKER_HUB, repo.path()) {
                        out.push((hub, tag.to_string(), image.id.clone()));
                    }
                }
                out.push((repo, tag.to_string(), image.id.clone()));
            }
        }
        Ok(out)
    }

    /// Exports the engine images tagged under `repo` that the cache holds no export of, until
    /// one holds `digest`. For a blob asked for before any manifest (a client resuming a pull
    /// after a restart with an empty cache, or after an eviction) on an engine whose image
    /// ids and layer ids are not blob digests — the containerd image store: ids are manifest
    /// digests, layers are stored compressed — only an export tells which image holds it.
    /// The repository narrows it to a few images, each exported once.
    async fn find_by_export(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
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
            let found = Found { name: id.clone(), id };
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
    async fn direct_layer(&self, repo: &Repository, digest: &Digest) -> Result<Option<Arc<direct::Layer>>> {
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
                let found = Found { name: id.clone(), id };
                self.entry(&found, repo).await?;
                return Ok(self.direct.layer(digest).await.filter(|l| !l.is_bad()));
            }
        }
        Ok(None)
    }

    /// The layer `digest` from the engine's storage, when it is served from there.
    async fn direct_blob(
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
    async fn fall_back_to_export(&self, image: &str) -> Result<()> {
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
    async fn ensure_blob(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
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
        let found = Found { name: id.clone(), id };
        self.entry(&found, repo).await?;
        self.cache.store.size(digest).await
    }
}

#[async_trait]
impl Backend for DockerBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn manifest(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let repo = &image.repository;
        match &image.reference {
            Reference::Tag(tag) => {
                let Some(found) = self.find_or_pull(&Self::candidates(repo, tag), image, ctx).await? else {
                    return Ok(None);
                };
                if let Some(m) = self.containerd_manifest_of(image, &found.id, ctx).await? {
                    return Ok(Some(m));
                }
                let entry = self.entry(&found, repo).await?;
                self.serve_manifest(&entry, &entry.export.top).await
            }
            Reference::Digest(digest) => {
                if let Some(store) = self.containerd.get(&self.engine).await {
                    if let Some(m) = store.manifest(image, ctx).await? {
                        return Ok(Some(m));
                    }
                    if let Some(found) = self.find_or_pull(&[], image, ctx).await? {
                        if let Some(m) = self.containerd_manifest_of(image, &found.id, ctx).await? {
                            return Ok(Some(m));
                        }
                    }
                }
                if let Some(entry) = self.cache.by_manifest(digest).await {
                    if let Some(m) = self.serve_manifest(&entry, digest).await? {
                        self.cache.touch(&entry.image_id).await;
                        return Ok(Some(m));
                    }
                }
                let names = [
                    format!("{}@{digest}", repo.familiar()),
                    format!("{}@{digest}", repo.canonical()),
                    digest.to_string(),
                ];
                let Some(found) = self.find_or_pull(&names, image, ctx).await? else {
                    return Ok(None);
                };
                let found = Found {
                    name: found.id.clone(),
                    id: found.id,
                };
                let entry = self.entry(&found, repo).await?;
                if entry.export.manifests.contains(digest) {
                    return self.serve_manifest(&entry, digest).await;
                }
                tracing::warn!(backend = %self.config.name, image = %image, engine_image = %found.id,
                    exported_as = %entry.export.top,
                    "the engine knows this digest (RepoDigests) but its export yields a different manifest: \
                     Docker's legacy image store keeps no registry manifests, so digest references cannot be \
                     served from it (enable the containerd image store, or pull by tag); answering 404");
                Ok(None)
            }
        }
    }

    async fn tags(&self, repo: &Repository, _ctx: &RequestCtx) -> Result<Option<Vec<String>>> {
        let tags: Vec<String> = self
            .engine_tags()
            .await?
            .into_iter()
            .filter(|(r, _, _)| r == repo)
            .map(|(_, t, _)| t)
            .collect();
        Ok((!tags.is_empty()).then_some(tags))
    }

    async fn catalog(&self) -> Result<Vec<Repository>> {
        Ok(self.engine_tags().await?.into_iter().map(|(r, _, _)| r).collect())
    }

    async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>> {
        if let Some(store) = self.containerd.get(&self.engine).await {
            return store.blob_size(repo, digest, ctx).await;
        }
        if let Some(layer) = self.direct_layer(repo, digest).await? {
            return Ok(Some(layer.size));
        }
        let size = self.ensure_blob(repo, digest).await?;
        if size.is_none() {
            // Found through the engine's index and read directly just now.
            if let Some(layer) = self.direct_layer(repo, digest).await? {
                return Ok(Some(layer.size));
            }
        }
        Ok(size)
    }

    async fn blob_file(&self, digest: &Digest) -> Result<Option<std::path::PathBuf>> {
        if let Some(store) = self.containerd.get(&self.engine).await {
            return store.blob_file(digest).await;
        }
        let path = self.cache.store.path(digest);
        Ok(tokio::fs::try_exists(&path).await.unwrap_or(false).then_some(path))
    }

    async fn ready(&self) -> bool {
        self.engine.client().await.is_ok()
    }

    async fn status(&self) -> BackendStatus {
        let mut status = BackendStatus {
            name: self.config.name.clone(),
            kind: "docker".into(),
            location: self.engine.socket().to_string(),
            ..BackendStatus::default()
        };
        match self.engine.client().await {
            Ok((_, info)) => {
                status.reachable = true;
                status.product = Some(info.product.clone());
                status.version = Some(info.version.clone());
                status.api_version = Some(info.api_version.clone());
                match self.engine.storage().await {
                    Ok(s) => status.storage = Some(s),
                    Err(e) => status.error = Some(format!("storage driver unknown: {e}")),
                }
                if let Some(store) = self.containerd.get(&self.engine).await {
                    let ctd = store.status().await;
                    status.direct_reads = ctd.direct_reads;
                    status.serves_from = Some(format!(
                        "containerd content store at {}, {}",
                        ctd.location,
                        ctd.storage.unwrap_or_default().trim_start_matches("content store, ")
                    ));
                } else {
                    status.direct_reads = self.direct.in_use(&self.engine).await;
                    status.serves_from = Some(
                        if status.direct_reads {
                            "engine storage"
                        } else {
                            "export"
                        }
                        .to_string(),
                    );
                }
            }
            Err(e) => status.error = Some(e.to_string()),
        }
        status
    }

    async fn cached_images(&self) -> Result<Vec<CachedImage>> {
        // Names as the engine has them now; an engine that is down leaves them empty.
        let mut names: std::collections::HashMap<String, Vec<String>> = Default::default();
        if let Ok(images) = self.engine.list().await {
            for i in images {
                names.insert(i.id.trim_start_matches("sha256:").to_string(), i.repo_tags);
            }
        }
        let mut out: Vec<CachedImage> = self
            .cache
            .list()
            .await
            .into_iter()
            .map(|(e, size)| CachedImage {
                names: names
                    .get(e.image_id.trim_start_matches("sha256:"))
                    .cloned()
                    .unwrap_or_default(),
                image_id: e.image_id.clone(),
                digest: e.export.top.to_string(),
                size,
                last_used_ms: e.last_used_ms,
                backend: self.config.name.clone(),
                private: false,
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used_ms));
        Ok(out)
    }

    async fn evict(&self, image: Option<&str>) -> Result<Option<Evicted>> {
        let matches = |e: &Entry| match image {
            None => true,
            Some(i) => {
                let id = e.image_id.trim_start_matches("sha256:");
                id == i.trim_start_matches("sha256:") || e.export.manifests.iter().any(|d| d.to_string() == i)
            }
        };
        let (images, bytes) = self.cache.evict_where(matches).await?;
        tracing::info!(backend = %self.config.name, image = image.unwrap_or("*"), images, freed_bytes = bytes,
            "evicted from the export cache");
        Ok(Some(Evicted { images, bytes }))
    }

    async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        if let Some(store) = self.containerd.get(&self.engine).await {
            return store.blob(repo, digest, range, ctx).await;
        }
        if let Some(body) = self.direct_blob(repo, digest, range).await? {
            return Ok(Some(body));
        }
        if self.ensure_blob(repo, digest).await?.is_none() {
            // Found through the engine's index and read directly just now.
            return self.direct_blob(repo, digest, range).await;
        }
        let guard = self.cache.pins.pin(digest);
        let Some(mut body) = self.cache.store.open_blob(digest, range).await? else {
            return Ok(None);
        };
        body.stream = body
            .stream
            .map(move |chunk| {
                let _keep = &guard;
                chunk
            })
            .boxed();
        Ok(Some(body))
    }
}

/// Entry points for the fuzz targets in `fuzz/`: an export archive read and interpreted
/// exactly as an engine's would be.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Reads `bytes` as `docker save` output into `store` and interprets it.
    pub async fn read_export(bytes: &[u8], store: &ferry_core::BlobStore) -> Result<()> {
        let pins = pins::Pins::default();
        let mut archive = archive::Archive::new(&pins);
        archive::read(std::io::Cursor::new(bytes), store, &mut archive)?;
        let repo = Repository::from_request("fuzz/image", None)?;
        export::interpret(&mut archive, store, &repo, "fuzz/image:latest").await?;
        Ok(())
    }

    /// The lengths of the pieces of an (uncompressed) tar-split stream.
    pub fn tar_split_pieces(lines: &[u8]) -> impl Iterator<Item = Result<u64>> + '_ {
        direct::tarsplit::Pieces::new(lines).map(|p| p.map(|p| p.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_names() {
        let r = Repository::from_request("library/my-image", Some("docker.io")).unwrap();
        assert_eq!(
            DockerBackend::candidates(&r, "latest"),
            vec![
                "my-image:latest",
                "docker.io/library/my-image:latest",
                "localhost/my-image:latest"
            ]
        );
        let r = Repository::from_request("pause", Some("registry.k8s.io")).unwrap();
        assert_eq!(DockerBackend::candidates(&r, "3.9"), vec!["registry.k8s.io/pause:3.9"]);
    }
}
