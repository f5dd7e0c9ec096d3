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
use std::time::Instant;

use async_trait::async_trait;
use bytes::BytesMut;
use reqwest::Method;
use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::manifest::MAX_MANIFEST_SIZE;
use ferry_core::status::BackendStatus;
use ferry_core::{
    Backend, BlobBody, BlobStore, ByteRange, Digest, Error, ImageRef, Manifest, ManifestInfo, Reference, Repository,
    RequestCtx, Result,
};

use crate::fill::{Commit, Fill, Fills, HandOff, Joined, Wanted};
use crate::registry::{ClientSettings, HostConfig, RegistryClient, Target};
use store::{Store, SOURCE_LABEL};

/// `[[backends]] type = "containerd"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// Name in logs and the `Ferry-Backend` header.
    pub name: String,
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// `moby` for Docker's containerd image store, `k8s.io` for k3s/kind nodes, `default`.
    pub namespace: String,
    /// Fetch blobs the content store lacks, and content in it names, from the image's
    /// origin registry into it.
    pub fetch_missing: bool,
    /// Registry hosts (`host:port`) reached over plain HTTP; loopback hosts are too unless
    /// `hosts` says otherwise.
    pub plain_http: Vec<String>,
    /// A PEM CA certificate to trust for origin registries.
    pub ca_file: Option<PathBuf>,
    /// `[backends.hosts."<host>"]`: how heals reach one origin (TLS on a loopback host, its
    /// own CA).
    pub hosts: BTreeMap<String, HealHost>,
    /// Read committed blobs straight from containerd's content directory when this process
    /// can (same machine, enough permissions), instead of through the Read API.
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

/// Coalesce fetched bytes into writes of this size (a gRPC message each).
const WRITE_CHUNK: usize = 1024 * 1024;

impl Default for ContainerdConfig {
    /// The defaults of an empty `[[backends]] type = "containerd"` table.
    fn default() -> Self {
        ContainerdConfig {
            name: "containerd".into(),
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "moby".into(),
            fetch_missing: true,
            plain_http: Vec::new(),
            ca_file: None,
            hosts: BTreeMap::new(),
            direct_reads: true,
        }
    }
}

impl ContainerdConfig {
    /// Connects (lazily: containerd may come up later) and builds the backend, heals keeping
    /// their temp files under `heal_dir`; fails only on an unreadable `ca_file` or a
    /// directory that cannot be used.
    pub async fn build(
        &self,
        heal_dir: &std::path::Path,
        policy: Arc<ferry_core::origin::OriginPolicy>,
    ) -> Result<Arc<ContainerdBackend>> {
        let store = Store::new(&self.name, self.socket.clone(), &self.namespace, self.direct_reads);
        if let Err(e) = store.channel().await {
            tracing::warn!(backend = %self.name, error = %e,
                "containerd not reachable now; the backend answers 'unavailable' until it is");
        }
        self.with_store(store, heal_dir, policy).await
    }

    /// Builds the backend only when containerd answers on the socket now (a containerd found
    /// rather than configured: one that does not answer is not this one).
    pub async fn connect(
        &self,
        heal_dir: &std::path::Path,
        policy: Arc<ferry_core::origin::OriginPolicy>,
    ) -> Result<Arc<ContainerdBackend>> {
        let store = Store::new(&self.name, self.socket.clone(), &self.namespace, self.direct_reads);
        store.channel().await?;
        self.with_store(store, heal_dir, policy).await
    }

    async fn with_store(
        &self,
        store: Store,
        heal_dir: &std::path::Path,
        policy: Arc<ferry_core::origin::OriginPolicy>,
    ) -> Result<Arc<ContainerdBackend>> {
        let origins = self.heal_client(&policy)?;
        Ok(Arc::new(ContainerdBackend {
            config: self.clone(),
            store: Arc::new(store),
            origins: Arc::new(origins),
            scratch: BlobStore::open(heal_dir).await?,
            fills: Arc::new(Fills::default()),
            starting: Arc::new(Flights::default()),
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

/// Serves containerd's content store and heals blobs it lacks from their origin.
pub struct ContainerdBackend {
    config: ContainerdConfig,
    store: Arc<Store>,
    origins: Arc<RegistryClient>,
    /// Where heals keep a blob while it is fetched and verified (temp files only: a verified
    /// blob goes to containerd, then the file goes).
    scratch: BlobStore,
    /// Heals under way, by digest: later clients join them mid-stream.
    fills: Arc<Fills>,
    /// Single flight for starting a heal: one origin request per digest.
    starting: Arc<Flights<Option<Arc<Fill>>>>,
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

    async fn stored(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<BlobBody>> {
        match self.store.info(digest).await? {
            Some(info) => Ok(Some(self.read_body(digest, info.size as u64, range).await?)),
            None => Ok(None),
        }
    }

    /// Fetches a missing blob from its origin into the content store and streams it to the
    /// caller as it arrives (the shared verified fetch, [`crate::fill`]): the last byte goes
    /// out once the blob hashed to its digest and containerd committed it. Clients asking
    /// meanwhile join the same fetch. `None` when no origin has it.
    async fn heal(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        for _ in 0..3 {
            let fill = match self.fills.get(digest).filter(|f| !f.failed()) {
                Some(f) => f,
                None => match self.start_heal(repo, digest, ctx).await? {
                    Some(f) => f,
                    // Healed meanwhile, or no origin has it.
                    None => return self.stored(digest, range).await,
                },
            };
            match fill.join(range).await? {
                Joined::Body(body) => return Ok(Some(body)),
                Joined::Gone => {
                    if let Some(body) = self.stored(digest, range).await? {
                        return Ok(Some(body));
                    }
                }
            }
        }
        Err(Error::Unavailable {
            backend: self.config.name.clone(),
            reason: format!("healing {digest} from {repo} kept failing"),
        })
    }

    /// Starts the heal of `digest` from the first origin that has it, or joins the one just
    /// started; `None` when it is in the store now or no origin has it.
    async fn start_heal(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<Arc<Fill>>> {
        let origins = self.origins_for(repo, digest).await?;
        let (client, store, scratch, fills) = (
            self.origins.clone(),
            self.store.clone(),
            self.scratch.clone(),
            self.fills.clone(),
        );
        let (backend, digest, authorization) = (self.config.name.clone(), digest.clone(), ctx.authorization.clone());
        self.starting
            .clone()
            .run(&digest.to_string(), async move {
                if let Some(f) = fills.get(&digest).filter(|f| !f.failed()) {
                    return Ok(Some(f));
                }
                if store.info(&digest).await?.is_some() {
                    return Ok(None);
                }
                let mut refused = None;
                for origin in origins {
                    let resp = match client
                        .fetch(Method::GET, &origin, Target::Blob(&digest), &[], authorization.as_deref())
                        .await
                    {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(e @ Error::Unauthorized { .. }) => {
                            tracing::warn!(backend = %backend, %digest, origin = %origin, error = %e, "origin refused the fetch");
                            refused = Some(e);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(backend = %backend, %digest, origin = %origin, error = %e, "origin fetch failed");
                            continue;
                        }
                    };
                    let Some(size) = resp.content_length() else {
                        tracing::warn!(backend = %backend, %digest, origin = %origin, "origin sent no Content-Length");
                        continue;
                    };
                    tracing::info!(backend = %backend, %digest, origin = %origin, size,
                        "healing: fetching a blob the content store lacks from its origin");
                    let commit = into_containerd(store.clone(), origin.clone(), digest.clone(), size);
                    let done = {
                        let (fills, backend, digest, origin) =
                            (fills.clone(), backend.clone(), digest.clone(), origin.clone());
                        let started = Instant::now();
                        move |outcome: &Result<()>| {
                            ferry_core::metrics::heal(&backend, outcome.is_ok());
                            match outcome {
                                Ok(()) => tracing::info!(backend = %backend, %digest, origin = %origin, size,
                                    elapsed_ms = started.elapsed().as_millis() as u64,
                                    "healed: blob verified and committed to the content store"),
                                Err(e) => tracing::error!(backend = %backend, %digest, origin = %origin, error = %e,
                                    "heal failed; nothing was committed and the client's response was cut short"),
                            }
                            fills.remove(&digest);
                        }
                    };
                    let wanted = Wanted {
                        repo: origin,
                        digest: digest.clone(),
                        size,
                    };
                    // A heal goes on when its client leaves: the store is repaired regardless.
                    let (fill, _) = fills.start(&digest, || {
                        Fill::spawn(&backend, &scratch, wanted, resp, 0, Commit::Hand(commit), done)
                    })?;
                    return Ok(Some(fill));
                }
                match refused {
                    Some(e) => Err(e),
                    None => Ok(None),
                }
            })
            .await
    }
}

/// Commits a verified heal's file into containerd's content store, labelled with the origin
/// it came from (as a pull labels it), in writes of [`WRITE_CHUNK`].
fn into_containerd(store: Arc<Store>, origin: Repository, digest: Digest, size: u64) -> HandOff {
    Box::new(move |file: PathBuf| {
        Box::pin(async move {
            let mut labels = HashMap::new();
            labels.insert(
                format!("{SOURCE_LABEL}{}", origin.registry()),
                origin.path().to_string(),
            );
            let mut writer = store.writer(&digest, size, labels).await?;
            let copied = async {
                let mut f = tokio::fs::File::open(&file)
                    .await
                    .map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
                loop {
                    let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
                    while buf.len() < WRITE_CHUNK {
                        let n = tokio::io::AsyncReadExt::read_buf(&mut f, &mut buf)
                            .await
                            .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
                        if n == 0 {
                            break;
                        }
                    }
                    if buf.is_empty() {
                        return Ok::<_, Error>(());
                    }
                    writer.write(buf.freeze()).await?;
                }
            }
            .await;
            match copied {
                Ok(()) => writer.commit().await,
                Err(e) => {
                    writer.abort().await;
                    Err(e)
                }
            }
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>
    })
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
                    if let Some(len) = crate::registry::declared_length(&resp) {
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
