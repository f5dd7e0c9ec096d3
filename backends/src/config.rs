//! The `[[backends]]` entries of the config file, and the one factory that turns them into
//! the chain's backends.

use std::path::Path;

use serde::Deserialize;

use ferry_core::{BackendHandle, Result};

use crate::containerd::ContainerdConfig;
use crate::docker::DockerConfig;
use crate::push::PushConfig;

/// One `[[backends]]` table, tagged by `type`.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    Docker(DockerConfig),
    Containerd(ContainerdConfig),
    Push(PushConfig),
}

impl BackendConfig {
    /// Builds the backend; `data_dir` is the directory for on-disk state (`cache.dir`).
    pub async fn build(&self, data_dir: &Path) -> Result<BackendHandle> {
        match self {
            BackendConfig::Docker(c) => Ok(BackendHandle::read_only(c.build(data_dir).await?)),
            BackendConfig::Containerd(c) => Ok(BackendHandle::read_only(c.build().await?)),
            BackendConfig::Push(c) => Ok(BackendHandle::writable(c.build(data_dir).await?)),
        }
    }
}
