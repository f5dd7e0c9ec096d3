//! `[[backends]] type = "push"`: its settings, and the store built from them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use ferry_core::Result;

use super::PushBackend;

/// `[[backends]] type = "push"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Name in logs and the `Ferry-Backend` header.
    pub name: String,
    /// Where pushed content lives; defaults to `<cache.dir>/push`.
    pub dir: Option<PathBuf>,
    /// Whether `DELETE` of manifests and blobs is allowed (off, as in distribution).
    pub allow_delete: bool,
    /// Let pushed images stand in for an origin's: pushes to names with a registry host are
    /// accepted, and clients using ferry as a mirror (`?ns=`) are served pushed images too.
    pub shadow_origins: bool,
    /// Upload sessions idle for longer than this many seconds are removed.
    pub upload_ttl_secs: u64,
    /// Largest blob accepted, e.g. "16GiB".
    pub max_blob_size: crate::size::Size,
    /// Total size the push store may grow to (blobs and uploads in progress), e.g.
    /// "200GiB"; unset: no limit.
    pub quota: Option<crate::size::Size>,
    /// Run a garbage collection this often (seconds; 0: only `ferry gc`).
    pub gc_interval_secs: u64,
    /// Blobs younger than this, or asked for or linked this recently, are never collected
    /// (seconds): the manifest of a push under way may be about to name them.
    pub gc_min_age_secs: u64,
    /// Upload sessions open at once, in all and per client address.
    pub max_upload_sessions: usize,
    /// Upload sessions open at once per client address.
    pub max_upload_sessions_per_client: usize,
}

impl Default for PushConfig {
    /// The defaults of an empty `[[backends]] type = "push"` table.
    fn default() -> Self {
        PushConfig {
            name: "push".into(),
            dir: None,
            allow_delete: false,
            shadow_origins: false,
            upload_ttl_secs: 3600,
            max_blob_size: crate::size::Size::sixteen_gib(),
            quota: None,
            max_upload_sessions: 1000,
            max_upload_sessions_per_client: 100,
            gc_interval_secs: 0,
            gc_min_age_secs: 3600,
        }
    }
}

impl PushConfig {
    /// Where the store lives: `dir`, else `<data_dir>/push`.
    pub fn store_dir(&self, data_dir: &std::path::Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("push"))
    }

    /// Opens the store under `data_dir` (or `dir`) and starts expiring idle upload sessions.
    pub async fn build(&self, data_dir: &std::path::Path) -> Result<Arc<PushBackend>> {
        let backend = Arc::new(PushBackend::open(self.clone(), self.store_dir(data_dir)).await?);
        let weak = Arc::downgrade(&backend);
        let period = Duration::from_secs(self.upload_ttl_secs.clamp(1, 3600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(b) = weak.upgrade() else { break };
                if let Err(e) = b.uploads.expire().await {
                    tracing::warn!(backend = %b.config.name, error = %e, "expiring upload sessions failed");
                }
            }
        });
        if self.gc_interval_secs > 0 {
            let weak = Arc::downgrade(&backend);
            let (every, min_age) = (
                Duration::from_secs(self.gc_interval_secs),
                Duration::from_secs(self.gc_min_age_secs),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(b) = weak.upgrade() else { break };
                    if let Err(e) = b.collect_garbage(min_age, false).await {
                        tracing::warn!(backend = %b.config.name, error = %e, "garbage collection failed");
                    }
                }
            });
        }
        Ok(backend)
    }
}
