//! The connection to a Docker or Podman engine (Engine API over a socket, via bollard).
//!
//! The client is made lazily and dropped on a connection failure, so an engine that is down
//! at start or goes away later makes the backend unavailable, not ferry, and the next request
//! after the engine is back reconnects.

use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ImageInspect, ImageSummary};
use bollard::query_parameters::{CreateImageOptions, ListImagesOptions};
use bollard::{Docker, API_DEFAULT_VERSION};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::RwLock;

use ferry_core::error::with_causes;
use ferry_core::{Error, Result};

/// Time allowed for an API call to answer (headers). Exports get longer: Docker and Podman
/// spool an image to disk before the first byte goes out.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(600);
/// Time allowed to connect and negotiate with an engine (an engine that is down refuses at
/// once; this bounds one that hangs, or answers slowly under load).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);

/// What kind of engine answers on the socket.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub product: String,
    pub version: String,
    pub api_version: String,
    /// Docker 25+ with `containerd-snapshotter`: exports are OCI layouts and may lack blobs.
    pub containerd_store: bool,
}

pub struct Engine {
    backend: String,
    socket: String,
    /// `ca.pem`, `cert.pem`, `key.pem` for a TLS `tcp://` engine.
    tls_dir: Option<std::path::PathBuf>,
    client: RwLock<Option<(Docker, Arc<EngineInfo>)>>,
}

impl Engine {
    pub fn new(backend: &str, socket: &str, tls_dir: Option<std::path::PathBuf>) -> Self {
        Engine {
            backend: backend.to_string(),
            socket: socket.to_string(),
            tls_dir,
            client: RwLock::new(None),
        }
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unavailable {
            backend: self.backend.clone(),
            reason: format!("engine at {}: {reason}", self.socket),
        }
    }

    /// The connected client, connecting (and logging what answered) when there is none.
    pub async fn client(&self) -> Result<(Docker, Arc<EngineInfo>)> {
        if let Some(c) = self.client.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.client.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| self.unavailable(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs())))??;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    async fn connect(&self) -> Result<(Docker, Arc<EngineInfo>)> {
        let s = self.socket.as_str();
        let tcp = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("http://"))
            .or_else(|| s.strip_prefix("https://"));
        let docker = if let (Some(addr), Some(tls)) = (tcp, &self.tls_dir) {
            Docker::connect_with_ssl(
                addr,
                &tls.join("key.pem"),
                &tls.join("cert.pem"),
                &tls.join("ca.pem"),
                CALL_TIMEOUT.as_secs(),
                API_DEFAULT_VERSION,
            )
        } else if let Some(addr) = tcp {
            Docker::connect_with_http(&format!("http://{addr}"), CALL_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_unix(s, CALL_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        }
        .map_err(|e| self.unavailable(with_causes(&e)))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| self.unavailable(with_causes(&e)))?;
        let version = docker.version().await.map_err(|e| self.unavailable(with_causes(&e)))?;
        let product = version
            .components
            .as_ref()
            .and_then(|c| c.first())
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "Engine".into());
        let product = if product.to_lowercase().contains("podman") {
            "Podman".to_string()
        } else {
            format!("Docker {product}")
        };
        // Podman has no containerd store, and its `info` walks its whole storage (seconds
        // with many images on vfs): it is not asked.
        let containerd_store = if product == "Podman" {
            false
        } else {
            match docker.info().await {
                Ok(info) => info
                    .driver_status
                    .unwrap_or_default()
                    .iter()
                    .any(|kv| kv.iter().any(|v| v.contains("io.containerd.snapshotter"))),
                Err(e) => return Err(self.unavailable(with_causes(&e))),
            }
        };
        let info = EngineInfo {
            product,
            version: version.version.unwrap_or_default(),
            api_version: docker.client_version().to_string(),
            containerd_store,
        };
        tracing::info!(backend = %self.backend, socket = %self.socket, tls = self.tls_dir.is_some(), engine = %info.product,
            version = %info.version, api_version = %info.api_version, containerd_store = info.containerd_store,
            "connected to engine");
        Ok((docker, Arc::new(info)))
    }

    /// Maps a bollard error: connection trouble drops the client and means unavailable.
    async fn fail(&self, e: BollardError) -> Error {
        match e {
            BollardError::DockerResponseServerError { status_code, message } => {
                Error::Internal(format!("engine at {} answered {status_code}: {message}", self.socket))
            }
            BollardError::JsonDataError { .. } | BollardError::DockerStreamError { .. } => {
                Error::Internal(format!("engine at {}: {e}", self.socket))
            }
            other => {
                let was_up = self.client.write().await.take().is_some();
                if was_up {
                    tracing::warn!(backend = %self.backend, socket = %self.socket, error = %with_causes(&other),
                        "lost the engine; will reconnect on the next request");
                }
                self.unavailable(with_causes(&other))
            }
        }
    }

    /// The socket (or URL) this engine is reached on.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    /// How the engine stores images: its graph driver (`overlay2`, `vfs`) or, for Docker
    /// with the containerd image store, `containerd image store (DRIVER)`. Asked on demand
    /// (Podman's `info` walks its whole storage), within [`CALL_TIMEOUT`].
    pub async fn storage(&self) -> Result<String> {
        let (_, driver, containerd_store) = self.data_root().await?;
        let driver = if driver.is_empty() {
            "unknown".to_string()
        } else {
            driver
        };
        Ok(if containerd_store {
            format!("containerd image store ({driver})")
        } else {
            driver
        })
    }

    /// The engine's data root and graph driver (`docker info`'s DockerRootDir and Driver),
    /// and whether it keeps images in the containerd store instead.
    pub async fn data_root(&self) -> Result<(std::path::PathBuf, String, bool)> {
        let (docker, info) = self.client().await?;
        let system = match tokio::time::timeout(CALL_TIMEOUT, docker.info()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.fail(e).await),
            Err(_) => return Err(self.unavailable(format!("info: no answer within {} s", CALL_TIMEOUT.as_secs()))),
        };
        Ok((
            system.docker_root_dir.unwrap_or_default().into(),
            system.driver.unwrap_or_default(),
            info.containerd_store,
        ))
    }

    /// Where the engine's containerd is, for an engine on the containerd image store: the
    /// sockets to try (the one `docker info` names on API 1.46+, then the well-known ones) and
    /// the namespace its images live in (`moby` unless the engine says otherwise), and whether
    /// the first socket is the one the engine named. `None` for an engine on a graph driver.
    pub async fn containerd(&self) -> Result<Option<(Vec<std::path::PathBuf>, String, bool)>> {
        let (docker, info) = self.client().await?;
        if !info.containerd_store {
            return Ok(None);
        }
        let system = match tokio::time::timeout(CALL_TIMEOUT, docker.info()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.fail(e).await),
            Err(_) => return Err(self.unavailable(format!("info: no answer within {} s", CALL_TIMEOUT.as_secs()))),
        };
        let named = system.containerd.unwrap_or_default();
        let namespace = named
            .namespaces
            .and_then(|n| n.containers)
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "moby".to_string());
        let mut sockets: Vec<std::path::PathBuf> = named.address.into_iter().map(Into::into).collect();
        let engine_named = !sockets.is_empty();
        for well_known in [
            "/run/containerd/containerd.sock",
            "/var/run/docker/containerd/containerd.sock",
        ] {
            let p = std::path::PathBuf::from(well_known);
            if !sockets.contains(&p) {
                sockets.push(p);
            }
        }
        Ok(Some((sockets, namespace, engine_named)))
    }

    /// What answers on the socket.
    pub async fn info(&self) -> Result<Arc<EngineInfo>> {
        Ok(self.client().await?.1)
    }

    /// Inspects an image by name, id or `name@digest`; `None` when the engine has no such image.
    pub async fn inspect(&self, name: &str) -> Result<Option<ImageInspect>> {
        let (docker, _) = self.client().await?;
        match docker.inspect_image(name).await {
            Ok(i) => Ok(Some(i)),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            // Podman answers 500 for some malformed references instead of 404.
            Err(BollardError::DockerResponseServerError {
                status_code: 400 | 500,
                message,
            }) if message.contains("not known")
                || message.contains("invalid reference")
                || message.contains("No such image") =>
            {
                Ok(None)
            }
            // Docker 28 on its containerd store answers `"RootFS":{}` for an image whose
            // layers it never fetched (moby#49473), which the API's schema does not allow:
            // such an image is still found, by its entry in the image list.
            Err(e @ (BollardError::JsonDataError { .. } | BollardError::JsonSerdeError { .. })) => {
                tracing::debug!(backend = %self.backend, image = %name, error = %e,
                    "the engine's inspect answer does not parse: looking the image up in its list");
                self.inspect_by_listing(name).await
            }
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// The id, names and digests of image `name` (a reference or an id) from the image list.
    async fn inspect_by_listing(&self, name: &str) -> Result<Option<ImageInspect>> {
        let (docker, _) = self.client().await?;
        let id = name.strip_prefix("sha256:").filter(|h| h.len() == 64);
        let options = ListImagesOptions {
            filters: id
                .is_none()
                .then(|| [("reference".to_string(), vec![name.to_string()])].into()),
            ..Default::default()
        };
        let listed = match docker.list_images(Some(options)).await {
            Ok(l) => l,
            Err(e) => return Err(self.fail(e).await),
        };
        let found = listed
            .into_iter()
            .find(|i| id.is_none_or(|h| i.id.trim_start_matches("sha256:") == h));
        Ok(found.map(|i| ImageInspect {
            id: Some(i.id),
            repo_tags: Some(i.repo_tags),
            repo_digests: Some(i.repo_digests),
            ..Default::default()
        }))
    }

    /// Every image the engine holds.
    pub async fn list(&self) -> Result<Vec<ImageSummary>> {
        let (docker, _) = self.client().await?;
        let options = ListImagesOptions {
            all: false,
            digests: false,
            ..Default::default()
        };
        match docker.list_images(Some(options)).await {
            Ok(l) => Ok(l),
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// `docker save NAME` as a byte stream.
    pub async fn export(&self, name: &str) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static> {
        let (docker, _) = self.client().await?;
        let docker = docker.with_timeout(EXPORT_TIMEOUT);
        Ok(docker.export_image(name).map(|r| r.map_err(std::io::Error::other)))
    }

    /// Pulls `image:tag` through the engine with optional credentials; logs progress and
    /// returns the engine's error message on failure.
    pub async fn pull(
        &self,
        image: &str,
        tag: &str,
        credentials: Option<bollard::auth::DockerCredentials>,
    ) -> Result<std::result::Result<(), String>> {
        let (docker, _) = self.client().await?;
        let options = CreateImageOptions {
            from_image: Some(image.to_string()),
            tag: Some(tag.to_string()),
            ..Default::default()
        };
        let mut stream = docker
            .with_timeout(EXPORT_TIMEOUT)
            .create_image(Some(options), None, credentials);
        let mut last_status = String::new();
        let progress = ferry_core::progress::Progress::new("pull", &self.backend, &format!("{image}:{tag}"), 0);
        // Per layer: (bytes downloaded, layer size), as the engine reports them.
        let mut layers: std::collections::HashMap<String, (u64, u64)> = Default::default();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    // The engine's last "Downloading" of a layer need not be at 100%.
                    let downloaded = matches!(
                        info.status.as_deref(),
                        Some("Verifying Checksum" | "Download complete" | "Extracting" | "Pull complete")
                    );
                    let mut moved = false;
                    if let (Some(id), true) = (&info.id, downloaded) {
                        if let Some(l) = layers.get_mut(id) {
                            moved = l.0 != l.1;
                            l.0 = l.1;
                        }
                    }
                    if let (Some(id), Some(detail)) = (&info.id, &info.progress_detail) {
                        if let (Some(current), Some(total)) = (detail.current, detail.total) {
                            if info.status.as_deref() == Some("Downloading") {
                                layers.insert(id.clone(), (current.max(0) as u64, total.max(0) as u64));
                                moved = true;
                            }
                        }
                    }
                    if moved {
                        let (done, all) = layers.values().fold((0, 0), |(d, t), (c, s)| (d + c, t + s));
                        progress.set(done, all);
                    }
                    if let Some(status) = info.status {
                        if status != last_status {
                            tracing::info!(backend = %self.backend, image = %format!("{image}:{tag}"),
                                layer = info.id.as_deref().unwrap_or("-"), %status, "pull progress");
                            last_status = status;
                        }
                    }
                }
                Err(BollardError::DockerStreamError { error }) => return Ok(Err(error)),
                Err(BollardError::DockerResponseServerError { message, .. }) => return Ok(Err(message)),
                Err(e) => return Err(self.fail(e).await),
            }
        }
        let (bytes, secs, rate_mib_s) = progress.summary();
        tracing::info!(backend = %self.backend, image = %format!("{image}:{tag}"), bytes, layers = layers.len(),
            elapsed_s = format!("{secs:.1}"), rate_mib_s, "pull downloaded");
        Ok(Ok(()))
    }

    /// The engine's event stream for images, to keep the blob index current.
    pub async fn image_events(
        &self,
    ) -> Result<impl Stream<Item = std::result::Result<bollard::models::EventMessage, BollardError>>> {
        let (docker, _) = self.client().await?;
        let mut filters = std::collections::HashMap::new();
        filters.insert("type".to_string(), vec!["image".to_string()]);
        let options = bollard::query_parameters::EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        Ok(docker
            .with_timeout(Duration::from_secs(365 * 24 * 3600))
            .events(Some(options)))
    }
}
