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
    /// Unset: `docker.host` (`DOCKER_HOST`), else `unix:///var/run/docker.sock`.
    pub socket: Option<String>,
    /// For a `tcp://` engine behind TLS: a directory with `ca.pem`, `cert.pem` and `key.pem`
    /// (as `DOCKER_CERT_PATH`). Unset: `docker.cert_path` when `docker.tls_verify` is set.
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

/// `[docker]`: what every docker backend shares. Docker's own variables set it as they set
/// the docker CLI (`DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`), and
/// `FERRY_PULL_MISSING` is one switch for a container image whose config file is baked in.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerShared {
    /// The engine of backends without a `socket` of their own.
    pub host: Option<String>,
    /// With `cert_path`: the TLS directory of `tcp://` backends without a `tls_dir`.
    #[serde(deserialize_with = "docker_flag")]
    pub tls_verify: bool,
    /// The directory `tls_verify` names.
    pub cert_path: Option<PathBuf>,
    /// When set, every docker backend's `pull_missing`, whatever its own table says.
    #[serde(deserialize_with = "switch")]
    pub pull_missing: Option<bool>,
}

impl DockerShared {
    /// `backend` with what it leaves unset taken from here, and `pull_missing` when set.
    pub fn apply(&self, backend: &mut DockerConfig) {
        if backend.socket.is_none() {
            backend.socket = self.host.clone().filter(|h| !h.is_empty());
        }
        if backend.tls_dir.is_none() && self.tls_verify {
            backend.tls_dir = self.cert_path.clone();
        }
        if let Some(on) = self.pull_missing {
            backend.pull_missing = on;
        }
    }
}

/// The docker CLI's reading of `DOCKER_TLS_VERIFY`: set to anything but empty or `0`.
fn docker_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Loose::deserialize(d)? {
        Loose::Bool(b) => b,
        Loose::Int(n) => n != 0,
        Loose::Text(s) => !s.is_empty() && s != "0",
    })
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
fn switch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let on = match Option::<Loose>::deserialize(d)? {
        None => return Ok(None),
        Some(Loose::Bool(b)) => b,
        Some(Loose::Int(1)) => true,
        Some(Loose::Int(0)) => false,
        Some(Loose::Text(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err(serde::de::Error::custom(format!("{s:?}: expected true or false"))),
        },
        Some(Loose::Int(n)) => return Err(serde::de::Error::custom(format!("{n}: expected true or false"))),
    };
    Ok(Some(on))
}

/// A switch as a file or an environment variable may give it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Loose {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl DockerConfig {
    /// The engine's address: `socket` (which `[docker]` fills when the table leaves it out),
    /// else Docker's default socket.
    pub fn socket_url(&self) -> String {
        self.socket
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }

    /// Opens the export cache under `data_dir` and starts following the engine (which may
    /// come up later); fails only when the cache directory cannot be used.
    pub async fn build(&self, data_dir: &Path, origins: Arc<OriginPolicy>) -> Result<Arc<DockerBackend>> {
        let socket = self.socket_url();
        let max_bytes = self.max_cache_size.as_ref().map(crate::size::Size::bytes);
        let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("docker"));
        let cache = Arc::new(Cache::open(&self.name, dir.clone(), self.max_parallel_exports, max_bytes).await?);
        let engine = Arc::new(Engine::new(&self.name, &socket, self.tls_dir.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shared(v: serde_json::Value) -> std::result::Result<DockerShared, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn the_shared_table_fills_what_a_backend_leaves_unset_and_switches_pulls() {
        let s = shared(json!({"host": "unix:///run/other.sock", "tls_verify": "1",
            "cert_path": "/certs", "pull_missing": "off"}))
        .unwrap();
        let mut own = DockerConfig {
            socket: Some("unix:///run/own.sock".into()),
            tls_dir: Some("/own-certs".into()),
            pull_missing: true,
            ..DockerConfig::default()
        };
        s.apply(&mut own);
        assert_eq!(own.socket_url(), "unix:///run/own.sock");
        assert_eq!(own.tls_dir, Some(PathBuf::from("/own-certs")));
        assert!(!own.pull_missing, "pull_missing = \"off\" is every backend's");
        let mut bare = DockerConfig::default();
        s.apply(&mut bare);
        assert_eq!(bare.socket_url(), "unix:///run/other.sock");
        assert_eq!(bare.tls_dir, Some(PathBuf::from("/certs")));

        // An empty DOCKER_HOST is no host; unset pull_missing leaves each backend's own.
        let mut own = DockerConfig {
            pull_missing: true,
            ..DockerConfig::default()
        };
        shared(json!({"host": ""})).unwrap().apply(&mut own);
        assert_eq!(own.socket_url(), "unix:///var/run/docker.sock");
        assert!(own.pull_missing);
    }

    #[test]
    fn switches_read_as_docker_and_ferry_read_them() {
        for (v, on) in [
            (json!("0"), false),
            (json!(""), false),
            (json!(0), false),
            (json!("1"), true),
            (json!(true), true),
        ] {
            assert_eq!(shared(json!({"tls_verify": v})).unwrap().tls_verify, on, "{v}");
        }
        for (v, on) in [
            (json!("yes"), true),
            (json!("ON"), true),
            (json!(1), true),
            (json!("no"), false),
            (json!(false), false),
        ] {
            assert_eq!(
                shared(json!({"pull_missing": v})).unwrap().pull_missing,
                Some(on),
                "{v}"
            );
        }
        for v in [json!("maybe"), json!(2)] {
            let e = shared(json!({"pull_missing": v})).unwrap_err().to_string();
            assert!(e.contains("expected true or false"), "{e}");
        }
    }
}
