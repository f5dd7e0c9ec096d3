//! What backends say about themselves: for the admin API, `/readyz` and `ferry doctor`.
//! Plain data, so the server can turn it into JSON and the doctor into advice.

use serde::Serialize;

/// One backend's state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackendStatus {
    /// The configured name (`Ferry-Backend` header).
    pub name: String,
    /// `docker`, `containerd` or `push`.
    pub kind: String,
    /// Whether the engine, containerd or the directory can be used right now.
    pub reachable: bool,
    /// Why not, when it cannot.
    pub error: Option<String>,
    /// The socket or directory it uses.
    pub location: String,
    /// For an engine: `Docker Engine` or `Podman`; for containerd: `containerd`.
    pub product: Option<String>,
    /// The engine's (or containerd's) version.
    pub version: Option<String>,
    /// The engine's API version as negotiated.
    pub api_version: Option<String>,
    /// How the engine stores images: its graph driver (`overlay2`, `vfs`), `containerd image
    /// store`, or containerd's namespace.
    pub storage: Option<String>,
    /// Whether blobs are read straight from the engine's files instead of through its API.
    pub direct_reads: bool,
    /// For an engine, where its images are served from: `engine storage` (direct reads),
    /// `containerd content store` (an engine on the containerd image store, read through
    /// its containerd) or `export`.
    pub serves_from: Option<String>,
}

/// An engine image the export cache holds.
#[derive(Clone, Debug, Serialize)]
pub struct CachedImage {
    /// The engine's image id (`sha256:…`).
    pub image_id: String,
    /// The engine's names for it (`name:tag`), as far as the engine still has them.
    pub names: Vec<String>,
    /// The manifest (or index) served for it.
    pub digest: String,
    /// Bytes of its blobs and manifests in the cache.
    pub size: u64,
    /// Milliseconds since the epoch of the last request it served.
    pub last_used_ms: u64,
    /// The backend whose cache holds it.
    pub backend: String,
    /// Fetched with a client's own credentials: its names are shown only to the admin.
    pub private: bool,
}

/// One repository of the push store.
#[derive(Clone, Debug, Serialize)]
pub struct RepositoryUsage {
    /// `registry/path`, e.g. `docker.io/library/app`.
    pub name: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Manifests stored in it.
    pub manifests: usize,
    /// Bytes of the blobs and manifests linked in it (a blob shared with another repository
    /// counts in both).
    pub size: u64,
}

/// What an eviction removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evicted {
    /// Images dropped.
    pub images: usize,
    /// Bytes of blobs deleted (blobs still served, or used by another image, stay).
    pub bytes: u64,
}
