//! The containerd backend: serves blobs and manifests straight from containerd's content
//! store, and heals blobs the store lacks by fetching them from the image's origin registry
//! into the content store (what `ctr content fetch` does) while streaming them to the client.
//!
//! With namespace `moby` this reads the images of a Docker that uses the containerd image
//! store without any `docker save`, and supplies the blobs that Docker's export drops when
//! images share layers (moby#49473).

mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch, Mutex};

use ferry_core::manifest::MAX_MANIFEST_SIZE;
use ferry_core::status::BackendStatus;
use ferry_core::{
    Backend, BlobBody, ByteRange, Digest, Error, ImageRef, Manifest, ManifestInfo, Reference, Repository, RequestCtx,
    Result,
};

use crate::registry::{ClientSettings, HostConfig, RegistryClient, Target};
use store::{Store, SOURCE_LABEL};

/// `[[backends]] type = "containerd"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerdConfig {
    /// Name in logs and the `Ferry-Backend` header.
    #[serde(default = "default_name")]
    pub name: String,
    /// containerd's gRPC socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// `moby` for Docker's containerd image store, `k8s.io` for k3s/kind nodes, `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Fetch blobs the content store lacks, and content in it names, from the image's
    /// origin registry into it.
    #[serde(default = "default_true")]
    pub fetch_missing: bool,
    /// Registry hosts (`host:port`) reached over plain HTTP; loopback hosts are too unless
    /// `hosts` says otherwise.
    #[serde(default)]
    pub plain_http: Vec<String>,
    /// A PEM CA certificate to trust for origin registries.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `[backends.hosts."<host>"]`: how heals reach one origin (TLS on a loopback host, its
    /// own CA).
    #[serde(default)]
    pub hosts: BTreeMap<String, HealHost>,
    /// Read committed blobs straight from containerd's content directory when this process
    /// can (same machine, enough permissions), instead of through the Read API.
    #[serde(default = "default_true")]
    pub direct_reads: bool,
}

/// How heals reach one origin host. No credentials: a heal runs for any client, from the
/// repository it names, so ferry's own would let anyone who reaches ferry fetch through them
/// what the origin keeps private; each client's are passed on instead.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealHost {
    /// Plain HTTP (`true`) or TLS (`false`). Unset: plain HTTP for loopback hosts without a
    /// `ca_file`, TLS for every other.
    #[serde(default)]
    pub plain_http: Option<bool>,
    /// A PEM CA certificate to trust for this host.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_name() -> String {
    "containerd".into()
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/containerd/containerd.sock")
}
fn default_namespace() -> String {
    "moby".into()
}
fn default_true() -> bool {
    true
}

/// Coalesce fetched bytes into writes of this size (a gRPC message each).
const WRITE_CHUNK: usize = 1024 * 1024;
/// How long a heal waits on its client to take a chunk: one that stops reading must not hold
/// the heal, nor the requests waiting for it, for ever.
const CLIENT_WAIT: Duration = Duration::from_secs(60);

impl Default for ContainerdConfig {
    /// The defaults of an empty `[[backends]] type = "containerd"` table.
    fn default() -> Self {
        ContainerdConfig {
            name: default_name(),
            socket: default_socket(),
            namespace: default_namespace(),
            fetch_missing: true,
            plain_http: Vec::new(),
            ca_file: None,
            hosts: BTreeMap::new(),
            direct_reads: true,
        }
    }
}

impl ContainerdConfig {
    /// Connects (lazily: containerd may come up later) and builds the backend; fails only on
    /// an unreadable `ca_file`.
    pub async fn build(&self, policy: Arc<ferry_core::origin::OriginPolicy>) -> Result<Arc<ContainerdBackend>> {
        let store = Store::new(&self.name, self.socket.clone(), &self.namespace, self.direct_reads);
        if let Err(e) = store.channel().await {
            tracing::warn!(backend = %self.name, error = %e,
                "containerd not reachable now; the backend answers 'unavailable' until it is");
        }
        self.with_store(store, policy)
    }

    /// Builds the backend only when containerd answers on the socket now (a containerd found
    /// rather than configured: one that does not answer is not this one).
    pub async fn connect(&self, policy: Arc<ferry_core::origin::OriginPolicy>) -> Result<Arc<ContainerdBackend>> {
        let store = Store::new(&self.name, self.socket.clone(), &self.namespace, self.direct_reads);
        store.channel().await?;
        self.with_store(store, policy)
    }

    fn with_store(
        &self,
        store: Store,
        policy: Arc<ferry_core::origin::OriginPolicy>,
    ) -> Result<Arc<ContainerdBackend>> {
        let origins = self.heal_client(&policy)?;
        Ok(Arc::new(ContainerdBackend {
            config: self.clone(),
            store: Arc::new(store),
            origins: Arc::new(origins),
            healing: Arc::new(Mutex::new(HashMap::new())),
        }))
    }

    /// The client heals fetch with: this backend's plain-HTTP hosts, CA and per-host
    /// settings, no credentials of its own (each client's are passed on). The hosts these
    /// name are named hosts of the origin policy too.
    pub fn heal_client(&self, policy: &ferry_core::origin::OriginPolicy) -> Result<RegistryClient> {
        let hosts = self
            .hosts
            .iter()
            .map(|(host, h)| {
                let config = HostConfig {
                    plain_http: h.plain_http,
                    ca_file: h.ca_file.clone(),
                    ..HostConfig::default()
                };
                (host.clone(), config)
            })
            .collect();
        let settings = ClientSettings {
            hosts,
            plain_http: self.plain_http.clone(),
            ca_file: self.ca_file.clone(),
            ..ClientSettings::default()
        };
        let policy = Arc::new(policy.with_named(&settings.named_hosts()));
        RegistryClient::new(settings, policy)
    }

    /// The origins this backend names one by one (`plain_http`, `hosts`).
    pub fn named_origins(&self) -> Vec<String> {
        let mut named = self.plain_http.clone();
        named.extend(self.hosts.keys().filter(|h| !self.plain_http.contains(h)).cloned());
        named
    }
}

/// How a heal ended, for requests that waited on it.
type HealDone = Option<std::result::Result<(), String>>;

/// Serves containerd's content store and heals blobs it lacks from their origin.
pub struct ContainerdBackend {
    config: ContainerdConfig,
    store: Arc<Store>,
    origins: Arc<RegistryClient>,
    /// Heals in progress: later requests for the digest wait for the first one.
    healing: Arc<Mutex<HashMap<Digest, watch::Receiver<HealDone>>>>,
}

impl ContainerdBackend {
    /// Where a blob may be fetched from: nowhere unless content in the namespace names it
    /// (an image containerd has lacks it, the moby#49473 case) — heals repair images, they
    /// do not fetch whatever a client names into containerd (nor ask Docker Hub about every
    /// blob that falls through); then the request's repository first, then the origins
    /// containerd recorded on that content.
    async fn origins_for(&self, repo: &Repository, digest: &Digest) -> Result<Vec<Repository>> {
        let Some(sources) = self.store.sources_of(digest).await? else {
            tracing::debug!(backend = %self.config.name, %digest, repository = %repo,
                "no content in the namespace names the blob: not fetched from an origin");
            return Ok(Vec::new());
        };
        let mut out = vec![repo.clone()];
        for r in sources {
            if !out.contains(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn read_body(&self, digest: &Digest, size: u64, range: Option<ByteRange>) -> Result<BlobBody> {
        let (offset, len) = match range {
            Some(r) => r.resolve(size)?,
            None => (0, size),
        };
        Ok(BlobBody {
            size,
            range: range.map(|_| (offset, len)),
            stream: self.store.read(digest, offset, len).await?,
        })
    }

    /// Waits for a heal of `digest` already under way; `true` when there was one.
    async fn wait_for_heal(&self, digest: &Digest) -> bool {
        let rx = self.healing.lock().await.get(digest).cloned();
        let Some(mut rx) = rx else { return false };
        let _ = rx.wait_for(|done| done.is_some()).await;
        true
    }

    /// Fetches a missing blob from its origin into the content store and streams it to the
    /// caller as it arrives. `None` when no origin has it.
    async fn heal(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        let (tx_done, rx_done) = watch::channel::<HealDone>(None);
        {
            let mut healing = self.healing.lock().await;
            if healing.contains_key(digest) {
                drop(healing);
                self.wait_for_heal(digest).await;
                return self.stored(digest, range).await;
            }
            healing.insert(digest.clone(), rx_done);
        }
        let result = self.start_heal(repo, digest, range, ctx, tx_done).await;
        if !matches!(result, Ok(Some(_))) {
            self.healing.lock().await.remove(digest);
        }
        result
    }

    async fn stored(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobBody>> {
        match self.store.info(digest).await? {
            Some(info) => Ok(Some(self.read_body(digest, info.size as u64, range).await?)),
            None => Ok(None),
        }
    }

    async fn start_heal(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
        done: watch::Sender<HealDone>,
    ) -> Result<Option<BlobBody>> {
        let mut refused = None;
        for origin in self.origins_for(repo, digest).await? {
            let resp = match self
                .origins
                .fetch(
                    reqwest::Method::GET,
                    &origin,
                    Target::Blob(digest),
                    &[],
                    ctx.authorization.as_deref(),
                )
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e @ Error::Unauthorized { .. }) => {
                    tracing::warn!(backend = %self.config.name, %digest, origin = %origin, error = %e, "origin refused the fetch");
                    refused = Some(e);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(backend = %self.config.name, %digest, origin = %origin, error = %e, "origin fetch failed");
                    continue;
                }
            };
            let Some(size) = resp.content_length() else {
                tracing::warn!(backend = %self.config.name, %digest, origin = %origin, "origin sent no Content-Length");
                continue;
            };
            let mut labels = HashMap::new();
            labels.insert(
                format!("{SOURCE_LABEL}{}", origin.registry()),
                origin.path().to_string(),
            );
            let writer = self.store.writer(digest, size, labels).await?;
            tracing::info!(backend = %self.config.name, %digest, origin = %origin, size,
                "healing: fetching a blob the content store lacks from its origin");
            let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
            let task = HealTask {
                backend: self.config.name.clone(),
                digest: digest.clone(),
                origin,
                size,
            };
            let healing = self.healing.clone();
            tokio::spawn(async move {
                let outcome = task.run(resp, writer, tx).await;
                healing.lock().await.remove(&task.digest);
                let _ = done.send(Some(outcome.map_err(|e| e.to_string())));
            });
            if range.is_some() {
                // A range of a blob being fetched: serve it from the store once it is there.
                drop(rx);
                self.wait_for_heal(digest).await;
                return self.stored(digest, range).await;
            }
            let stream = futures::stream::poll_fn({
                let mut rx = rx;
                move |cx| rx.poll_recv(cx)
            })
            .boxed();
            return Ok(Some(BlobBody {
                size,
                range: None,
                stream,
            }));
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

/// One blob being fetched from its origin into the content store and to a client.
struct HealTask {
    backend: String,
    digest: Digest,
    origin: Repository,
    size: u64,
}

impl HealTask {
    /// Sends to the client while it listens. A client that went away is forgotten, and so is
    /// one that took nothing for [`CLIENT_WAIT`] (its response is cut short; asked again, the
    /// blob comes from the store).
    async fn send(&self, client: &mut Option<mpsc::Sender<std::io::Result<Bytes>>>, item: std::io::Result<Bytes>) {
        let Some(c) = client else { return };
        match tokio::time::timeout(CLIENT_WAIT, c.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => *client = None,
            Err(_) => {
                tracing::warn!(backend = %self.backend, digest = %self.digest, origin = %self.origin,
                    wait_s = CLIENT_WAIT.as_secs(), "the heal's client took nothing for too long; the heal goes on without it");
                *client = None;
            }
        }
    }

    /// Copies the origin's body into containerd (in 1 MiB writes) and to the client channel,
    /// hashing it on the way. The last chunk is held back until the whole body hashes to the
    /// digest: on a mismatch the client's response is cut short instead (it never receives a
    /// complete wrong blob), and the ingest is aborted, so nothing wrong is committed either.
    /// The fetch goes on when the client goes away, so the store is healed regardless.
    async fn run(
        &self,
        resp: reqwest::Response,
        mut writer: store::ContentWriter,
        tx: mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut body = resp.bytes_stream();
        let mut pending = BytesMut::with_capacity(WRITE_CHUNK);
        let mut client = Some(tx);
        let mut received = 0u64;
        let mut hasher = Sha256::new();
        let mut held: Option<Bytes> = None;
        let failed: Option<Error> = loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if received > self.size {
                        break Some(Error::Internal(format!(
                            "origin {} sent more than the {} bytes it announced",
                            self.origin, self.size
                        )));
                    }
                    hasher.update(&chunk);
                    if let Some(previous) = held.replace(chunk.clone()) {
                        self.send(&mut client, Ok(previous)).await;
                    }
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= WRITE_CHUNK {
                        if let Err(e) = writer.write(pending.split().freeze()).await {
                            break Some(e);
                        }
                    }
                }
                Some(Err(e)) => {
                    break Some(Error::Unavailable {
                        backend: self.backend.clone(),
                        reason: format!("origin {}: {}", self.origin, ferry_core::error::with_causes(&e)),
                    })
                }
                None if received != self.size => {
                    break Some(Error::Internal(format!(
                        "origin {} sent {received} of {} bytes",
                        self.origin, self.size
                    )))
                }
                None => {
                    let actual = Digest::from_hasher(std::mem::take(&mut hasher));
                    if actual != self.digest {
                        break Some(Error::DigestInvalid(format!(
                            "origin {} sent content hashing to {actual} for {}",
                            self.origin, self.digest
                        )));
                    }
                    break None;
                }
            }
        };
        let result = match failed {
            Some(e) => {
                writer.abort().await;
                Err(e)
            }
            None => match writer.write(pending.split().freeze()).await {
                Ok(()) => writer.commit().await,
                Err(e) => {
                    writer.abort().await;
                    Err(e)
                }
            },
        };
        ferry_core::metrics::heal(&self.backend, result.is_ok());
        match &result {
            Ok(()) => {
                if let Some(last) = held.take() {
                    self.send(&mut client, Ok(last)).await;
                }
                tracing::info!(backend = %self.backend, digest = %self.digest, origin = %self.origin, size = self.size,
                elapsed_ms = started.elapsed().as_millis() as u64, "healed: blob verified and committed to the content store")
            }
            Err(e) => {
                tracing::error!(backend = %self.backend, digest = %self.digest, origin = %self.origin, error = %e,
                    "heal failed; nothing was committed and the client's response was cut short");
                self.send(&mut client, Err(std::io::Error::other(e.to_string()))).await;
            }
        }
        result
    }
}

#[async_trait]
impl Backend for ContainerdBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn manifest(&self, image: &ImageRef, _ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let (digest, size) = match &image.reference {
            Reference::Tag(tag) => {
                let name = format!("{}:{tag}", image.repository.canonical());
                let Some((digest, _)) = self.store.image_target(&name).await? else {
                    return Ok(None);
                };
                let Some(info) = self.store.info(&digest).await? else {
                    return Ok(None);
                };
                (digest, info.size as u64)
            }
            Reference::Digest(d) => match self.store.info(d).await? {
                Some(info) => (d.clone(), info.size as u64),
                None => return Ok(None),
            },
        };
        if size > MAX_MANIFEST_SIZE {
            return Ok(None);
        }
        let bytes = self.store.read_small(&digest, size).await?;
        // containerd keeps no media types: read it from the JSON, and only serve manifests.
        match ManifestInfo::parse(&bytes, None) {
            Ok(info) => Ok(Some(Manifest {
                bytes,
                media_type: info.media_type,
                digest,
                missing: Vec::new(),
            })),
            Err(_) => Ok(None),
        }
    }

    async fn ready(&self) -> bool {
        self.store.channel().await.is_ok()
    }

    async fn blob_file(&self, digest: &Digest) -> Result<Option<std::path::PathBuf>> {
        self.store.blob_file(digest).await
    }

    async fn status(&self) -> BackendStatus {
        let (socket, namespace) = self.store.location();
        let mut status = BackendStatus {
            name: self.config.name.clone(),
            kind: "containerd".into(),
            location: socket,
            product: Some("containerd".into()),
            storage: Some(format!("content store, namespace {namespace}")),
            ..BackendStatus::default()
        };
        match self.store.version().await {
            Ok(v) => {
                status.reachable = true;
                status.version = Some(v);
                status.direct_reads = self.store.reads_directly().await;
            }
            Err(e) => status.error = Some(e.to_string()),
        }
        status
    }

    async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>> {
        if let Some(info) = self.store.info(digest).await? {
            return Ok(Some(info.size as u64));
        }
        if !self.config.fetch_missing {
            return Ok(None);
        }
        let mut refused = None;
        for origin in self.origins_for(repo, digest).await? {
            match self
                .origins
                .fetch(
                    reqwest::Method::HEAD,
                    &origin,
                    Target::Blob(digest),
                    &[],
                    ctx.authorization.as_deref(),
                )
                .await
            {
                Ok(Some(resp)) => {
                    if let Some(len) = resp.content_length() {
                        return Ok(Some(len));
                    }
                }
                Ok(None) => {}
                Err(e @ Error::Unauthorized { .. }) => refused = Some(e),
                Err(e) => {
                    tracing::debug!(backend = %self.config.name, %digest, origin = %origin, error = %e, "origin HEAD failed")
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        if let Some(body) = self.stored(digest, range).await? {
            return Ok(Some(body));
        }
        if !self.config.fetch_missing {
            return Ok(None);
        }
        self.heal(repo, digest, range, ctx).await
    }
}
