//! An engine on the containerd image store (the default of Docker 29 and Docker Desktop, a
//! switch on Docker 24–28) keeps every image's manifests, configs and compressed layers in
//! containerd's content store, namespace `moby`: ferry serves them from there, with no export
//! and nothing to configure. The engine's own `info` names its containerd (API 1.46+);
//! otherwise the well-known sockets are tried. Blobs the store lacks (moby#49473) are healed
//! from their origin as a containerd backend heals them, under the same origin policy. When
//! no socket can be reached from here (ferry in a container with only the engine socket
//! mounted), images are exported, and the log says once which mount fixes it.

use std::sync::Arc;

use tokio::sync::Mutex;

use ferry_core::origin::OriginPolicy;
use ferry_core::{Backend, Digest, ImageRef, Reference, Repository, RequestCtx};

use super::engine::Engine;
use crate::containerd::{ContainerdBackend, ContainerdConfig};

/// The engine's containerd content store, found on first use.
pub struct EngineContainerd {
    backend: String,
    /// Where heals keep a blob while it is fetched and verified.
    heal_dir: std::path::PathBuf,
    origins: Arc<OriginPolicy>,
    /// `None` until decided: the store, or `Some(None)` when images are exported.
    found: Mutex<Option<Option<Arc<ContainerdBackend>>>>,
}

/// What a probe of one socket showed.
enum Probe {
    /// The engine's containerd: its images are there.
    Engines(Arc<ContainerdBackend>),
    /// Not this socket (no answer, or another containerd).
    Not(String),
    /// It answers, but the engine has no image yet to tell whose containerd it is.
    Undecided,
}

impl EngineContainerd {
    pub fn new(backend: &str, heal_dir: std::path::PathBuf, origins: Arc<OriginPolicy>) -> Self {
        EngineContainerd {
            backend: backend.to_string(),
            heal_dir,
            origins,
            found: Mutex::new(None),
        }
    }

    /// The content store to serve from, when the engine keeps its images in containerd and
    /// ferry reaches that containerd. Decided once; an engine that cannot be asked now, or
    /// has no image yet to check a well-known socket with, is asked again next time.
    pub async fn get(&self, engine: &Engine) -> Option<Arc<ContainerdBackend>> {
        let mut found = self.found.lock().await;
        if let Some(decided) = found.as_ref() {
            return decided.clone();
        }
        let (sockets, namespace, named) = match engine.containerd().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                *found = Some(None);
                return None;
            }
            Err(_) => return None,
        };
        let mut tried = Vec::new();
        for (i, socket) in sockets.iter().enumerate() {
            match self.probe(engine, socket, &namespace, named && i == 0).await {
                Probe::Engines(store) => {
                    *found = Some(Some(store.clone()));
                    return Some(store);
                }
                Probe::Not(why) => tried.push(why),
                Probe::Undecided => return None,
            }
        }
        let first = sockets.first().map(|s| s.display().to_string()).unwrap_or_default();
        tracing::warn!(backend = %self.backend, tried = ?tried,
            fix = %format!("-v {first}:{first} (and run ferry as root, or as a user that may use that socket)"),
            "the engine keeps its images in containerd's image store, but its containerd cannot be reached from here: images are exported");
        *found = Some(None);
        None
    }

    /// Connects to `socket`; a socket the engine did not name itself must hold the engine's
    /// images to count as its containerd.
    async fn probe(&self, engine: &Engine, socket: &std::path::Path, namespace: &str, named: bool) -> Probe {
        let config = ContainerdConfig {
            name: self.backend.clone(),
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            ..ContainerdConfig::default()
        };
        let store = match config.connect(&self.heal_dir, self.origins.clone()).await {
            Ok(s) => s,
            Err(e) => return Probe::Not(format!("{}: {e}", socket.display())),
        };
        if !named {
            let ids: Vec<String> = match engine.list().await {
                Ok(images) => images.into_iter().map(|i| i.id).take(3).collect(),
                Err(_) => return Probe::Undecided,
            };
            if ids.is_empty() {
                return Probe::Undecided;
            }
            let mut holds = false;
            for id in ids {
                if holds_manifest(&store, &id).await {
                    holds = true;
                    break;
                }
            }
            if !holds {
                return Probe::Not(format!(
                    "{}: a containerd whose namespace {namespace} lacks the engine's images",
                    socket.display()
                ));
            }
        }
        let status = store.status().await;
        tracing::info!(backend = %self.backend, socket = %socket.display(), %namespace,
            content_dir_read = status.direct_reads,
            "containerd image store: images are served from the engine's containerd content store, with no export");
        Probe::Engines(store)
    }
}

/// Whether `store` holds the manifest or index that is engine image `id`.
async fn holds_manifest(store: &ContainerdBackend, id: &str) -> bool {
    let (Ok(digest), Ok(repo)) = (id.parse::<Digest>(), Repository::new("docker.io", "library/probe")) else {
        return false;
    };
    let image = ImageRef::new(repo, Reference::Digest(digest));
    matches!(store.manifest(&image, &RequestCtx::default()).await, Ok(Some(_)))
}
