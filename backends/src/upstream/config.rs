//! `[[backends]] type = "upstream"`: its settings, the backend built from them, and the
//! registry client its fetches go through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::origin::OriginPolicy;

use crate::registry::{ClientSettings, HostConfig, RegistryClient};
use ferry_core::{BlobStore, Result};

use super::access::PrivateRepos;
use super::meta::Meta;
use super::tag_list::TagLists;
use super::UpstreamBackend;
use crate::fill::Fills;

/// `[[backends]] type = "upstream"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name in logs and the `Ferry-Backend` header.
    pub name: String,
    /// Where the cache lives; `<cache.dir>/upstream` by default.
    pub dir: Option<PathBuf>,
    /// The only origins ever contacted: `host`, `host:port`, `*.domain`, or `*` (any host
    /// on the public internet). Loopback and private addresses must be named exactly, here or
    /// in `hosts`.
    pub allow: Vec<String>,
    /// How long a tag's digest is served before the origin is asked again.
    pub tag_ttl_secs: u64,
    /// The cache's size limit ("20GiB"); least recently used blobs go first. No limit when
    /// unset.
    pub max_cache_size: Option<crate::size::Size>,
    /// The largest blob fetched ("16GiB"): a bigger one is refused before its body is read,
    /// so no client can fill the disk with one huge blob from an allowed origin.
    pub max_blob_size: crate::size::Size,
    /// A fetch whose clients all went away goes on when at least this share of the blob
    /// arrived (0: always finish, 100: stop unless done).
    pub keep_fill_from_percent: u8,
    /// Serve what was fetched with one client's own credentials to every client, from the
    /// cache (a one-user machine that must pull private images offline after a restart).
    /// Off: such a repository is served only to clients whose credentials the origin accepts.
    pub share_private: bool,
    /// A Docker `config.json` whose `auths` are ferry's credentials per host.
    pub docker_config: Option<PathBuf>,
    /// A PEM CA certificate trusted for every host.
    pub ca_file: Option<PathBuf>,
    /// Per-host settings: plain HTTP, CA, endpoint, credentials.
    pub hosts: BTreeMap<String, HostConfig>,
}

impl Default for UpstreamConfig {
    /// The defaults of an empty `[[backends]] type = "upstream"` table.
    fn default() -> Self {
        UpstreamConfig {
            name: "upstream".into(),
            dir: None,
            allow: vec!["*".into()],
            tag_ttl_secs: 300,
            max_cache_size: None,
            max_blob_size: crate::size::Size::sixteen_gib(),
            keep_fill_from_percent: 50,
            share_private: false,
            docker_config: None,
            ca_file: None,
            hosts: BTreeMap::new(),
        }
    }
}

impl UpstreamConfig {
    /// Opens the cache under `data_dir` and builds the backend; fails on an unusable cache
    /// directory, CA, password file or Docker config.
    pub async fn build(&self, data_dir: &Path) -> Result<Arc<UpstreamBackend>> {
        let client = self.client()?;
        let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("upstream"));
        let store = BlobStore::open(&dir).await?;
        let meta = Meta::open(&dir).await?;
        let access = PrivateRepos::open(&dir, Duration::from_secs(self.tag_ttl_secs)).await?;
        let max_bytes = self.max_cache_size.as_ref().map(crate::size::Size::bytes);
        let max_blob = self.max_blob_size.bytes();
        let used = Arc::new(AtomicU64::new(0));
        tracing::info!(backend = %self.name, dir = %dir.display(), allow = ?self.allow, "upstream cache open");
        if max_bytes.is_some() {
            // The size limit needs what the cache holds: counted beside serving, not before
            // it (one stat per blob). A fill that ends meanwhile may count twice; the
            // eviction it might trigger early recounts exactly.
            let (store, used, name) = (store.clone(), used.clone(), self.name.clone());
            tokio::spawn(async move {
                let blobs = match store.list().await {
                    Ok(b) => b,
                    Err(e) => {
                        return tracing::warn!(backend = %name, error = %e,
                            "cannot count the upstream cache: its size limit applies from the next fill on")
                    }
                };
                let mut total = 0;
                for d in blobs {
                    total += store.size(&d).await.ok().flatten().unwrap_or(0);
                }
                used.fetch_add(total, Ordering::SeqCst);
                tracing::info!(backend = %name, cached_bytes = total, "upstream cache counted");
            });
        }
        Ok(Arc::new(UpstreamBackend {
            config: self.clone(),
            client: Arc::new(client),
            store,
            meta: Arc::new(meta),
            access: Arc::new(access),
            fills: Arc::new(Fills::default()),
            starting: Arc::new(Flights::default()),
            manifests: Flights::default(),
            tag_lists: TagLists::new(Duration::from_secs(self.tag_ttl_secs)),
            ttl: Duration::from_secs(self.tag_ttl_secs),
            max_bytes,
            max_blob,
            used,
        }))
    }

    /// The registry client of this backend: its hosts' settings, credentials and CAs, and
    /// the allow-list.
    pub fn client(&self) -> Result<RegistryClient> {
        let settings = ClientSettings {
            hosts: self.hosts.clone(),
            plain_http: Vec::new(),
            ca_file: self.ca_file.clone(),
            docker_config: self.docker_config.clone(),
            metric_hosts: self.named_origins(),
        };
        let mut allowed = self.allow.clone();
        allowed.extend(settings.named_hosts());
        RegistryClient::new(settings, Arc::new(OriginPolicy::new(&allowed, false)))
    }

    /// The origins the config names one by one (`allow` without patterns, and `hosts`).
    pub fn named_origins(&self) -> Vec<String> {
        let mut named: Vec<String> = self.allow.iter().filter(|h| !h.contains('*')).cloned().collect();
        named.extend(
            self.hosts
                .keys()
                .filter(|h| !named.contains(h))
                .cloned()
                .collect::<Vec<_>>(),
        );
        named
    }
}
