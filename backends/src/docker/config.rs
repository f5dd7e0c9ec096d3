//! `[[backends]] type = "docker"`: its settings, and the backend built from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::origin::OriginPolicy;
use ferry_core::Result;

use super::cache::Cache;
use super::engine::Engine;
use super::index::ImageIndex;
use super::{containerd_store, direct, DockerBackend};

/// `[[backends]] type = "docker"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Name in logs and the `Ferry-Backend` header.
    pub name: String,
    /// Engine API socket: `unix:///var/run/docker.sock`, a Podman socket, or `tcp://host:port`.
    /// Unset: `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    pub socket: Option<String>,
    /// For a `tcp://` engine behind TLS: a directory with `ca.pem`, `cert.pem` and `key.pem`
    /// (as `DOCKER_CERT_PATH`). Unset: `DOCKER_CERT_PATH` when `DOCKER_TLS_VERIFY` is set.
    pub tls_dir: Option<PathBuf>,
    /// Pull images the engine lacks through the engine, with the client's credentials.
    pub pull_missing: bool,
    /// How many different images may be exported at once.
    pub max_parallel_exports: usize,
    /// Cache size limit, e.g. "20GiB"; unset means no limit.
    pub max_cache_size: Option<crate::size::Size>,
    /// Where exported blobs are cached; defaults to `<cache.dir>/docker`.
    pub dir: Option<PathBuf>,
    /// Serve images from the engine's own storage (Docker's graph driver: overlay2, vfs)
    /// when ferry can read its data root, with no export; anything else is exported.
    pub direct_reads: bool,
}

impl Default for DockerConfig {
    /// The defaults of an empty `[[backends]] type = "docker"` table.
    fn default() -> Self {
        DockerConfig {
            name: "docker".into(),
            socket: None,
            tls_dir: None,
            pull_missing: false,
            max_parallel_exports: 2,
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
        let cache = Arc::new(Cache::open(&self.name, dir.clone(), self.max_parallel_exports, max_bytes).await?);
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
        let containerd = containerd_store::EngineContainerd::new(&self.name, dir.join("heal"), origins.clone());
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
