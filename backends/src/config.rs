//! The `[[backends]]` entries of the config file, and the one factory that turns them into
//! the chain's backends.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use ferry_core::origin::OriginPolicy;
use ferry_core::{BackendHandle, Result};

use crate::containerd::ContainerdConfig;
use crate::docker::DockerConfig;
use crate::push::PushConfig;
use crate::upstream::UpstreamConfig;

/// One `[[backends]]` table, tagged by `type`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    /// A Docker or Podman engine.
    Docker(DockerConfig),
    /// containerd's content store.
    Containerd(ContainerdConfig),
    /// The push store.
    Push(PushConfig),
    /// A pull-through cache of origin registries.
    Upstream(UpstreamConfig),
}

impl BackendConfig {
    /// Its `name`: in logs, the `Ferry-Backend` header and the status pages.
    pub fn name(&self) -> &str {
        match self {
            BackendConfig::Docker(c) => &c.name,
            BackendConfig::Containerd(c) => &c.name,
            BackendConfig::Push(c) => &c.name,
            BackendConfig::Upstream(c) => &c.name,
        }
    }

    /// Its `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Docker(_) => "docker",
            BackendConfig::Containerd(_) => "containerd",
            BackendConfig::Push(_) => "push",
            BackendConfig::Upstream(_) => "upstream",
        }
    }

    /// The Unix socket this backend talks to, when it talks to one (not a `tcp://` engine,
    /// not the push store).
    pub fn unix_socket(&self) -> Option<std::path::PathBuf> {
        match self {
            BackendConfig::Docker(c) => {
                let url = c.socket_url();
                match url.strip_prefix("unix://") {
                    Some(p) => Some(p.into()),
                    None => url.starts_with('/').then(|| url.into()),
                }
            }
            BackendConfig::Containerd(c) => Some(c.socket.clone()),
            BackendConfig::Push(_) | BackendConfig::Upstream(_) => None,
        }
    }

    /// Builds the backend; `data_dir` is the directory for on-disk state (`cache.dir`),
    /// `origins` what may be fetched from on a client's behalf.
    pub async fn build(&self, data_dir: &Path, origins: &Arc<OriginPolicy>) -> Result<BackendHandle> {
        match self {
            BackendConfig::Docker(c) => Ok(BackendHandle::read_only(c.build(data_dir, origins.clone()).await?)),
            BackendConfig::Containerd(c) => Ok(BackendHandle::read_only(
                c.build(&data_dir.join("heal").join(&c.name), origins.clone()).await?,
            )),
            BackendConfig::Push(c) => Ok(BackendHandle::writable(c.build(data_dir).await?)),
            BackendConfig::Upstream(c) => Ok(BackendHandle::read_only(c.build(data_dir).await?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each backend's defaults are written twice (serde's field defaults, and the `Default`
    /// the default chain and the doctor build from): an empty table must read as `Default`.
    #[test]
    fn an_empty_table_reads_as_the_defaults() {
        for (kind, default) in [
            ("docker", BackendConfig::Docker(Default::default())),
            ("containerd", BackendConfig::Containerd(Default::default())),
            ("push", BackendConfig::Push(Default::default())),
            ("upstream", BackendConfig::Upstream(Default::default())),
        ] {
            let parsed: BackendConfig = serde_json::from_str(&format!(r#"{{"type": "{kind}"}}"#)).unwrap();
            assert_eq!(
                serde_json::to_value(&parsed).unwrap(),
                serde_json::to_value(&default).unwrap(),
                "{kind}"
            );
        }
    }
}
