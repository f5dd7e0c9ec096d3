//! containerd's content and image stores over gRPC (containerd-client): reads by digest,
//! image lookups by name, and writes of healed blobs under a lease. The channel is made
//! lazily and dropped when the connection fails, so containerd going away makes the backend
//! unavailable and its return is picked up by the next request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    AbortRequest, CreateRequest, DeleteRequest, GetImageRequest, Info, InfoRequest, ListContentRequest,
    ReadContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use futures::StreamExt;
use tokio::sync::{mpsc, Mutex, RwLock};

use ferry_core::{ByteStream, Digest, Error, Repository, Result};

/// Time allowed for one unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Label containerd uses to remember where content came from.
pub const SOURCE_LABEL: &str = "containerd.io/distribution.source.";
/// How long a listing of what content names answers "nothing names it" before the next
/// such question lists the store again: a client asking for blobs nothing names makes ferry
/// list containerd's whole content store at most once this often, and an image pulled just
/// now is seen within it.
const NAMES_FRESH: Duration = Duration::from_secs(1);

/// Every digest content in the namespace names (or is), with the origins recorded on the
/// content that names it.
type Names = HashMap<String, Vec<Repository>>;

pub struct Store {
    backend: String,
    socket: PathBuf,
    namespace: String,
    channel: RwLock<Option<Channel>>,
    /// containerd's content directory, when this process can read it: committed blobs are
    /// immutable files there, served without a trip through the Read API.
    content_root: RwLock<Option<PathBuf>>,
    direct_reads: bool,
    /// The last listing of what content names, and when it was made; the lock makes
    /// concurrent questions wait for one listing.
    names: Mutex<Option<(Instant, Names)>>,
}

impl Store {
    pub fn new(backend: &str, socket: PathBuf, namespace: &str, direct_reads: bool) -> Self {
        Store {
            backend: backend.to_string(),
            socket,
            namespace: namespace.to_string(),
            channel: RwLock::new(None),
            content_root: RwLock::new(None),
            direct_reads,
            names: Mutex::new(None),
        }
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unavailable {
            backend: self.backend.clone(),
            reason: format!("containerd at {}: {reason}", self.socket.display()),
        }
    }

    pub async fn channel(&self) -> Result<Channel> {
        if let Some(c) = self.channel.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.channel.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let channel = tokio::time::timeout(CALL_TIMEOUT, connect(self.socket.clone()))
            .await
            .map_err(|_| self.unavailable("no answer within 5 s"))?
            .map_err(|e| self.unavailable(e))?;
        let root = if self.direct_reads {
            content_root(&channel).await
        } else {
            None
        };
        tracing::info!(backend = %self.backend, socket = %self.socket.display(), namespace = %self.namespace,
            content_dir = %root.as_ref().map_or("not readable here: blobs go through the Read API".to_string(), |r| r.display().to_string()),
            "connected to containerd");
        *self.content_root.write().await = root;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// containerd's version, as its Version service reports it.
    pub async fn version(&self) -> Result<String> {
        let mut client = containerd_client::services::v1::version_client::VersionClient::new(self.channel().await?);
        match self.timed(client.version(())).await? {
            Ok(r) => Ok(r.into_inner().version),
            Err(s) => Err(self.fail(s).await),
        }
    }

    /// The socket and namespace, for status pages.
    pub fn location(&self) -> (String, &str) {
        (self.socket.display().to_string(), &self.namespace)
    }

    /// Whether committed blobs are read from containerd's content directory (it was found
    /// and is readable by this process) rather than through the Read API.
    pub async fn reads_directly(&self) -> bool {
        self.content_root.read().await.is_some()
    }

    /// A request in our namespace, optionally under a lease.
    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(l) = lease.and_then(|l| l.parse().ok()) {
            req.metadata_mut().insert("containerd-lease", l);
        }
        req
    }

    /// Maps a gRPC status; transport trouble drops the channel and means unavailable.
    async fn fail(&self, status: Status) -> Error {
        match status.code() {
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown
                if status.message().contains("transport") || status.code() != Code::Unknown =>
            {
                if self.channel.write().await.take().is_some() {
                    tracing::warn!(backend = %self.backend, error = %status.message(), "lost containerd; will reconnect");
                }
                self.unavailable(status.message())
            }
            _ => Error::Internal(format!("containerd: {}: {}", status.code(), status.message())),
        }
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = std::result::Result<T, Status>>,
    ) -> Result<std::result::Result<T, Status>> {
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| self.unavailable("call timed out"))
    }

    /// Content info (size, labels) of a digest; `None` when the store lacks it.
    pub async fn info(&self, digest: &Digest) -> Result<Option<Info>> {
        let mut client = ContentClient::new(self.channel().await?);
        let req = self.req(
            InfoRequest {
                digest: digest.to_string(),
            },
            None,
        );
        match self.timed(client.info(req)).await? {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.fail(s).await),
        }
    }

    /// The committed file of a blob the namespace holds, when containerd's content directory
    /// is readable here.
    pub async fn blob_file(&self, digest: &Digest) -> Result<Option<PathBuf>> {
        let Some(root) = self.content_root.read().await.clone() else {
            return Ok(None);
        };
        if self.info(digest).await?.is_none() {
            return Ok(None);
        }
        let path = root.join("blobs/sha256").join(digest.hex());
        Ok(tokio::fs::try_exists(&path).await.unwrap_or(false).then_some(path))
    }

    /// Streams `len` bytes of a blob from `offset`: from containerd's content directory when
    /// it is readable here, else through the Read API.
    pub async fn read(&self, digest: &Digest, offset: u64, len: u64) -> Result<ByteStream> {
        let root = self.content_root.read().await.clone();
        if let Some(path) = root.map(|r| r.join("blobs/sha256").join(digest.hex())) {
            if let Ok(Ok(file)) = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
                return Ok(ferry_core::chunks::file_stream(file, offset, len));
            }
        }
        let mut client = ContentClient::new(self.channel().await?);
        let req = self.req(
            ReadContentRequest {
                digest: digest.to_string(),
                offset: offset as i64,
                size: len as i64,
            },
            None,
        );
        let stream = match self.timed(client.read(req)).await? {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.fail(s).await),
        };
        Ok(stream
            .map(|r| r.map(|m| Bytes::from(m.data)).map_err(std::io::Error::other))
            .boxed())
    }

    /// Reads a small blob (a manifest) whole.
    pub async fn read_small(&self, digest: &Digest, size: u64) -> Result<Bytes> {
        let mut stream = self.read(digest, 0, size).await?;
        let mut buf = bytes::BytesMut::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.map_err(|e| Error::io(format!("reading {digest} from containerd"), e))?);
        }
        Ok(buf.freeze())
    }

    /// The target (digest, media type) of an image record, by its full name.
    pub async fn image_target(&self, name: &str) -> Result<Option<(Digest, String)>> {
        let mut client = ImagesClient::new(self.channel().await?);
        let req = self.req(GetImageRequest { name: name.to_string() }, None);
        match self.timed(client.get(req)).await? {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .and_then(|t| Some((t.digest.parse().ok()?, t.media_type)))),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.fail(s).await),
        }
    }

    /// Origin repositories of content that references `digest`: the distribution-source
    /// labels containerd put on the manifests (and configs) that name it. `None` when no
    /// content names it (nor is it), as of a listing at most [`NAMES_FRESH`] old.
    pub async fn sources_of(&self, digest: &Digest) -> Result<Option<Vec<Repository>>> {
        let wanted = digest.to_string();
        let mut last = self.names.lock().await;
        if let Some((at, names)) = last.as_ref() {
            if let Some(sources) = names.get(&wanted) {
                return Ok(Some(sources.clone()));
            }
            if at.elapsed() < NAMES_FRESH {
                return Ok(None);
            }
        }
        let started = Instant::now();
        let names = self.list_names().await?;
        tracing::debug!(backend = %self.backend, namespace = %self.namespace, digests = names.len(),
            elapsed_ms = started.elapsed().as_millis() as u64, "listed what containerd's content names");
        let sources = names.get(&wanted).cloned();
        *last = Some((Instant::now(), names));
        Ok(sources)
    }

    /// Lists the content store: every digest a label names (or content is), with the
    /// origins of the content that names it.
    async fn list_names(&self) -> Result<Names> {
        let mut client = ContentClient::new(self.channel().await?);
        let req = self.req(ListContentRequest { filters: Vec::new() }, None);
        let mut stream = match self.timed(client.list(req)).await? {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.fail(s).await),
        };
        let mut names = Names::new();
        while let Some(msg) = stream.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(s) => return Err(self.fail(s).await),
            };
            for info in msg.info {
                let mut origins = Vec::new();
                for (k, v) in &info.labels {
                    if let Some(host) = k.strip_prefix(SOURCE_LABEL) {
                        origins.extend(v.split(',').filter_map(|path| Repository::new(host, path).ok()));
                    }
                }
                let named = info
                    .labels
                    .values()
                    .filter(|v| v.starts_with("sha256:") || v.starts_with("sha512:"))
                    .chain(std::iter::once(&info.digest));
                for d in named {
                    let sources = names.entry(d.clone()).or_default();
                    for r in &origins {
                        if !sources.contains(r) {
                            sources.push(r.clone());
                        }
                    }
                }
            }
        }
        Ok(names)
    }

    /// Starts writing a blob into the content store under a fresh lease.
    pub async fn writer(&self, digest: &Digest, total: u64, labels: HashMap<String, String>) -> Result<ContentWriter> {
        let channel = self.channel().await?;
        let lease_id = format!("ferry-heal-{}", uuid::Uuid::new_v4());
        let mut lease_labels = HashMap::new();
        // containerd drops the lease by itself after an hour, also when ferry dies mid-write.
        lease_labels.insert(
            "containerd.io/gc.expire".to_string(),
            rfc3339(SystemTime::now() + Duration::from_secs(3600)),
        );
        let mut leases = LeasesClient::new(channel.clone());
        let req = self.req(
            CreateRequest {
                id: lease_id.clone(),
                labels: lease_labels,
            },
            None,
        );
        if let Err(s) = self.timed(leases.create(req)).await? {
            return Err(self.fail(s).await);
        }
        let reference = format!("ferry-{}-{}", digest.hex(), uuid::Uuid::new_v4().simple());
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.clone(),
            total: total as i64,
            expected: digest.to_string(),
            ..Default::default()
        };
        tx.send(stat)
            .await
            .map_err(|_| Error::Internal("content write channel closed".into()))?;
        let mut client = ContentClient::new(channel.clone());
        let req = self.req(tokio_stream_of(rx), Some(&lease_id));
        let responses = match self.timed(client.write(req)).await? {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.fail(s).await),
        };
        // Responses are drained on their own task so writes never wait for a round trip.
        let drain = tokio::spawn(async move {
            let mut responses = responses;
            let mut last = None;
            loop {
                match responses.message().await {
                    Ok(Some(r)) => last = Some(r),
                    Ok(None) => return Ok(last),
                    Err(s) => return Err(s),
                }
            }
        });
        Ok(ContentWriter {
            tx: Some(tx),
            drain,
            offset: 0,
            total,
            digest: digest.clone(),
            labels,
            reference,
            lease: lease_id,
            channel,
            namespace: self.namespace.clone(),
        })
    }
}

/// containerd's content directory as its content plugin reports it, if this process can read
/// it (same machine, enough permissions; not so in a container with only the socket mounted).
async fn content_root(channel: &Channel) -> Option<PathBuf> {
    use containerd_client::services::v1::introspection_client::IntrospectionClient;
    use containerd_client::services::v1::PluginsRequest;
    let mut client = IntrospectionClient::new(channel.clone());
    let req = Request::new(PluginsRequest {
        filters: vec!["type==io.containerd.content.v1".to_string()],
    });
    let plugins = tokio::time::timeout(CALL_TIMEOUT, client.plugins(req))
        .await
        .ok()?
        .ok()?
        .into_inner()
        .plugins;
    let root = PathBuf::from(plugins.into_iter().find_map(|p| p.exports.get("root").cloned())?);
    std::fs::read_dir(root.join("blobs/sha256")).ok().map(|_| root)
}

/// Connects to containerd's socket. Unlike `containerd_client::connect`, with HTTP/2 windows
/// large enough that streaming a healed blob into the content store is not held to 64 KiB per
/// round trip.
async fn connect(socket: PathBuf) -> std::result::Result<Channel, containerd_client::tonic::transport::Error> {
    const WINDOW: u32 = 8 * 1024 * 1024;
    containerd_client::tonic::transport::Endpoint::from_static("http://[::]")
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(WINDOW))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}

fn tokio_stream_of(mut rx: mpsc::Receiver<WriteContentRequest>) -> impl futures::Stream<Item = WriteContentRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A blob being written into containerd's content store.
pub struct ContentWriter {
    tx: Option<mpsc::Sender<WriteContentRequest>>,
    drain: tokio::task::JoinHandle<
        std::result::Result<Option<containerd_client::services::v1::WriteContentResponse>, Status>,
    >,
    offset: u64,
    total: u64,
    digest: Digest,
    labels: HashMap<String, String>,
    reference: String,
    lease: String,
    channel: Channel,
    namespace: String,
}

impl ContentWriter {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        req
    }

    async fn send(&mut self, msg: WriteContentRequest) -> Result<()> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::Internal("content writer closed".into()))?;
        tx.send(msg)
            .await
            .map_err(|_| Error::Internal(format!("containerd stopped accepting {}", self.digest)))
    }

    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        let msg = WriteContentRequest {
            action: WriteAction::Write as i32,
            offset: self.offset as i64,
            total: self.total as i64,
            data: data.to_vec(),
            ..Default::default()
        };
        self.send(msg).await?;
        self.offset += len;
        Ok(())
    }

    /// Commits with the expected digest and size; containerd verifies both.
    pub async fn commit(mut self) -> Result<()> {
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            offset: self.offset as i64,
            total: self.offset as i64,
            expected: self.digest.to_string(),
            labels: std::mem::take(&mut self.labels),
            ..Default::default()
        };
        self.send(msg).await?;
        self.tx.take();
        let result = match (&mut self.drain).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(Error::Internal(format!(
                "containerd refused {}: {}",
                self.digest,
                s.message()
            ))),
            Err(e) => Err(Error::Internal(format!("content write task failed: {e}"))),
        };
        self.finish(result.is_err()).await;
        result
    }

    /// Gives up: aborts the ingest and drops the lease.
    pub async fn abort(mut self) {
        self.tx.take();
        self.drain.abort();
        self.finish(true).await;
    }

    /// On a failed write, aborts the ingest and drops the lease at once. On success the lease
    /// is left to expire by itself (an hour): the blob stays protected meanwhile, and is kept
    /// for good by the gc.ref labels of a manifest that names it (the moby#49473 case).
    async fn finish(&self, abort: bool) {
        if !abort {
            return;
        }
        let mut client = ContentClient::new(self.channel.clone());
        let _ = client
            .abort(self.req(AbortRequest {
                r#ref: self.reference.clone(),
            }))
            .await;
        let mut leases = LeasesClient::new(self.channel.clone());
        let _ = leases
            .delete(self.req(DeleteRequest {
                id: self.lease.clone(),
                sync: false,
            }))
            .await;
    }
}

/// Formats a time as RFC 3339 in UTC (for containerd's gc.expire label).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
