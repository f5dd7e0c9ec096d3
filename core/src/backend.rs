//! The traits every backend implements: reading for all of them, writing for the push store.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::digest::Digest;
use crate::error::Result;
use crate::manifest::{Descriptor, Manifest};
use crate::range::ByteRange;
use crate::reference::{ImageRef, Reference, Repository};
use crate::status::{BackendStatus, CachedImage, Evicted, RepositoryUsage};

/// A byte stream: request bodies going in, blob bodies going out.
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// What a request carries that a backend may need besides the reference.
#[derive(Clone, Debug, Default)]
pub struct RequestCtx {
    /// Short id that ties a request's log lines together.
    pub request_id: String,
    /// The client's `Authorization` header, passed on when a backend pulls for the client.
    pub authorization: Option<String>,
    /// The client's address, for limits that are per client.
    pub client: Option<std::net::IpAddr>,
    /// The `ns` the request carried: the client uses ferry as a mirror of this registry
    /// (containerd's hosts.toml), not as a registry of its own.
    pub mirror_for: Option<String>,
}

/// A blob, or one range of it, ready to stream.
pub struct BlobBody {
    /// Size of the whole blob.
    pub size: u64,
    /// `(offset, length)` when a range was asked for and served.
    pub range: Option<(u64, u64)>,
    /// The bytes.
    pub stream: ByteStream,
}

impl BlobBody {
    /// Bytes the stream will yield.
    pub fn len(&self) -> u64 {
        self.range.map_or(self.size, |(_, len)| len)
    }

    /// Whether the stream yields nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Read access to images. Every method answers `Ok(None)` for "not here" so the chain can ask
/// the next backend, and an error only when something actually failed;
/// [`crate::Error::Unavailable`] means the backend cannot be reached right now.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The name used in logs and the `Ferry-Backend` response header.
    fn name(&self) -> &str;

    /// Resolves a tag or digest to a manifest.
    async fn manifest(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<Option<Manifest>>;

    /// The size of a blob, without opening it (for `HEAD`).
    async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>>;

    /// Opens a blob, whole or one range of it.
    async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>>;

    /// The tags of a repository, or `None` when this backend does not know the repository.
    async fn tags(&self, _repo: &Repository, _ctx: &RequestCtx) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// Repositories this backend can list.
    async fn catalog(&self) -> Result<Vec<Repository>> {
        Ok(Vec::new())
    }

    /// Manifests whose `subject` is `digest`.
    async fn referrers(&self, _repo: &Repository, _digest: &Digest, _ctx: &RequestCtx) -> Result<Vec<Descriptor>> {
        Ok(Vec::new())
    }

    /// Whether the backend can answer now (its engine or containerd reachable), for `/readyz`.
    async fn ready(&self) -> bool {
        true
    }

    /// A file on this machine holding exactly the blob, verified and never changed in place
    /// (a committed blob of a content-addressed store): lets the push store take it in as a
    /// hard link instead of a copy. `None` when there is none.
    async fn blob_file(&self, _digest: &Digest) -> Result<Option<std::path::PathBuf>> {
        Ok(None)
    }

    /// What the admin API and `ferry doctor` show of this backend: what answers, its
    /// version and storage, or why it cannot be reached.
    async fn status(&self) -> BackendStatus {
        BackendStatus {
            name: self.name().to_string(),
            reachable: self.ready().await,
            ..BackendStatus::default()
        }
    }

    /// The images this backend keeps in a cache of its own (the docker backend's exports).
    async fn cached_images(&self) -> Result<Vec<CachedImage>> {
        Ok(Vec::new())
    }

    /// Drops cached images: the one whose image id or manifest digest is `image`, or all of
    /// them. `None` when this backend has no cache. Blobs being served stay until they end.
    async fn evict(&self, _image: Option<&str>) -> Result<Option<Evicted>> {
        Ok(None)
    }

    /// The repositories this backend stores, with their tags and sizes (the push store).
    async fn usage(&self) -> Result<Vec<RepositoryUsage>> {
        Ok(Vec::new())
    }
}

/// Where an upload stands: its id and how many bytes it holds.
#[derive(Clone, Debug)]
pub struct UploadState {
    /// The session id, in the upload URL.
    pub id: String,
    /// Bytes received so far.
    pub offset: u64,
}

/// Write access: blob uploads, manifest pushes and deletes. Only the push store has it.
#[async_trait]
pub trait Registry: Backend {
    /// Opens an upload session.
    async fn start_upload(&self, repo: &Repository, ctx: &RequestCtx) -> Result<UploadState>;

    /// Where an upload stands; [`crate::Error::UploadUnknown`] when it does not exist.
    async fn upload_state(&self, repo: &Repository, id: &str) -> Result<UploadState>;

    /// Appends a chunk. `range` is the chunk's first and last byte as the client's
    /// `Content-Range` says: when it does not start at the upload's current size,
    /// [`crate::Error::UploadOutOfOrder`]; when the body is not that long,
    /// [`crate::Error::UploadInvalid`] and nothing of it is kept.
    async fn append(
        &self,
        repo: &Repository,
        id: &str,
        range: Option<(u64, u64)>,
        body: ByteStream,
    ) -> Result<UploadState>;

    /// Appends a last chunk (possibly empty) and stores the blob when it hashes to `digest`.
    /// On a mismatch nothing is stored and the session is discarded.
    async fn finish_upload(&self, repo: &Repository, id: &str, digest: &Digest, body: ByteStream) -> Result<u64>;

    /// Discards an upload session.
    async fn cancel_upload(&self, repo: &Repository, id: &str) -> Result<()>;

    /// Stores a whole blob sent in one request.
    async fn put_blob(&self, repo: &Repository, digest: &Digest, body: ByteStream) -> Result<u64>;

    /// Takes in a blob another backend holds in `file` (see [`Backend::blob_file`]), as a
    /// hard link; `false` when it cannot (gone, another file system), so the caller copies it
    /// with [`Registry::put_blob`].
    async fn link_blob(&self, repo: &Repository, digest: &Digest, file: &std::path::Path) -> Result<bool>;

    /// Makes a blob of repository `from` known in `repo` too (cross-repository mount);
    /// `false` when `from` does not hold it.
    async fn mount_blob(&self, repo: &Repository, digest: &Digest, from: &Repository) -> Result<bool>;

    /// Validates and stores a manifest under a tag or digest. Returns the stored manifest and
    /// its subject, if it has one.
    async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<(Manifest, Option<Digest>)>;

    /// Deletes a manifest by digest (with every tag pointing at it) or one tag.
    async fn delete_manifest(&self, repo: &Repository, reference: &Reference) -> Result<()>;

    /// Deletes a blob.
    async fn delete_blob(&self, repo: &Repository, digest: &Digest) -> Result<()>;
}

/// A backend as the chain holds it, plus its writable side when it has one.
#[derive(Clone)]
pub struct BackendHandle {
    /// How the chain reads from it.
    pub backend: Arc<dyn Backend>,
    /// Its writable side, for the push store.
    pub registry: Option<Arc<dyn Registry>>,
}

impl BackendHandle {
    /// A backend that only serves.
    pub fn read_only(backend: Arc<dyn Backend>) -> Self {
        BackendHandle {
            backend,
            registry: None,
        }
    }

    /// A backend that also accepts pushes.
    pub fn writable<R: Registry + 'static>(registry: Arc<R>) -> Self {
        BackendHandle {
            backend: registry.clone(),
            registry: Some(registry),
        }
    }
}
