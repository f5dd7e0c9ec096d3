//! The docker backend: serves images straight from a local Docker or Podman engine by
//! exporting them (`docker save`) into a content-addressed cache.

mod archive;
mod blobs;
mod cache;
mod config;
mod containerd_store;
mod direct;
mod engine;
mod export;
mod export_task;
mod index;
mod pins;
mod pull;

pub use config::{DockerConfig, DockerShared};

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;

use ferry_core::flight::Flights;
use ferry_core::origin::OriginPolicy;
use ferry_core::status::{BackendStatus, CachedImage, Evicted};
use ferry_core::{
    Backend, BlobBody, ByteRange, Digest, ImageRef, Manifest, ManifestInfo, Reference, Repository, RequestCtx, Result,
    DOCKER_HUB,
};

use cache::{Cache, Entry};
use engine::Engine;
use export_task::Export;
use index::ImageIndex;

/// How many chunks of an export are read from the engine ahead of the tar reader (hyper's
/// chunks are at most its read buffer, some hundred KiB, so this bounds memory to a few MiB).
const EXPORT_PREFETCH_CHUNKS: usize = 16;

/// Images of one repository exported at most to find a blob asked for before its manifest.
const MAX_EXPORTS_PER_BLOB_LOOKUP: usize = 8;

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

/// An engine image found for a request: its id and the name it was found under.
struct EngineImage {
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

    async fn find(&self, names: &[String]) -> Result<Option<EngineImage>> {
        for name in names {
            if let Some(i) = self.engine.inspect(name).await? {
                if let Some(id) = i.id {
                    return Ok(Some(EngineImage { id, name: name.clone() }));
                }
            }
        }
        Ok(None)
    }

    /// The cache entry of an engine image: read from the engine's storage when ferry can,
    /// else exported when the cache has none.
    async fn entry(&self, found: &EngineImage, repo: &Repository) -> Result<Arc<Entry>> {
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
                let found = EngineImage {
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
