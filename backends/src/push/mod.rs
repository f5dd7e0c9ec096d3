//! The push store: what `docker push`, skopeo and Tilt upload, kept under the data directory
//! and served back.
//!
//! Layout: blobs (and manifest bytes) in a [`BlobStore`]; per repository
//! `repos/<registry>/<path>/_manifests/<hex>` (holding the manifest's media type),
//! `_tags/<tag>` (holding the digest) and `_referrers/<subject hex>/<hex>` (a descriptor).
//! Every file is written atomically, so a crash leaves the previous state or the new one.

mod uploads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;

use ferry_core::manifest::MAX_MANIFEST_SIZE;
use ferry_core::{
    Backend, BlobBody, BlobStore, ByteRange, ByteStream, Descriptor, Digest, Error, ImageRef, Manifest, ManifestInfo,
    Reference, Registry, Repository, RequestCtx, Result, UploadState,
};

use crate::fsutil::{list_names, read_optional, remove_optional, write_atomic};
use uploads::Uploads;

/// `[[backends]] type = "push"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Name in logs and the `Ferry-Backend` header.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where pushed content lives; defaults to `<cache.dir>/push`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Whether `DELETE` of manifests and blobs is allowed.
    #[serde(default = "default_true")]
    pub allow_delete: bool,
    /// Upload sessions idle for longer than this many seconds are removed.
    #[serde(default = "default_upload_ttl")]
    pub upload_ttl_secs: u64,
}

fn default_name() -> String {
    "push".into()
}
fn default_true() -> bool {
    true
}
fn default_upload_ttl() -> u64 {
    24 * 3600
}

impl PushConfig {
    pub async fn build(&self, data_dir: &std::path::Path) -> Result<Arc<PushBackend>> {
        let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("push"));
        let backend = Arc::new(PushBackend::open(self.clone(), dir).await?);
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
        Ok(backend)
    }
}

/// The push store.
pub struct PushBackend {
    config: PushConfig,
    root: PathBuf,
    blobs: BlobStore,
    uploads: Uploads,
}

impl PushBackend {
    pub async fn open(config: PushConfig, root: PathBuf) -> Result<Self> {
        let blobs = BlobStore::open(&root).await?;
        let uploads = Uploads::open(root.join("uploads"), Duration::from_secs(config.upload_ttl_secs)).await?;
        tracing::info!(backend = %config.name, dir = %root.display(), "push store ready");
        Ok(PushBackend {
            config,
            root,
            blobs,
            uploads,
        })
    }

    fn repo_dir(&self, repo: &Repository) -> PathBuf {
        self.root.join("repos").join(repo.registry()).join(repo.path())
    }

    fn manifest_marker(&self, repo: &Repository, digest: &Digest) -> PathBuf {
        self.repo_dir(repo).join("_manifests").join(digest.hex())
    }

    fn tag_path(&self, repo: &Repository, tag: &str) -> PathBuf {
        self.repo_dir(repo).join("_tags").join(tag)
    }

    fn referrer_path(&self, repo: &Repository, subject: &Digest, digest: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_referrers")
            .join(subject.hex())
            .join(digest.hex())
    }

    /// The digest a reference names in this repository and the manifest's media type (from
    /// its marker), if the repository holds it.
    async fn resolve(&self, repo: &Repository, reference: &Reference) -> Result<Option<(Digest, String)>> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => match read_optional(&self.tag_path(repo, t)).await? {
                Some(b) => String::from_utf8_lossy(&b)
                    .trim()
                    .parse()
                    .map_err(|e| Error::Internal(format!("corrupt tag file {repo}:{t}: {e}")))?,
                None => return Ok(None),
            },
        };
        let marker = read_optional(&self.manifest_marker(repo, &digest)).await?;
        Ok(marker.map(|m| (digest, String::from_utf8_lossy(&m).into_owned())))
    }

    fn check_delete_allowed(&self) -> Result<()> {
        if self.config.allow_delete {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "deletes are disabled (allow_delete = false on backend {})",
                self.config.name
            )))
        }
    }

    /// Checks everything a manifest references is stored, so a pull of it cannot fail later.
    async fn check_references(&self, info: &ManifestInfo) -> Result<()> {
        for d in info.blobs.iter().chain(&info.manifests) {
            if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue; // foreign layer, fetched by clients from its URL
            }
            if self.blobs.size(&d.digest).await?.is_none() {
                return Err(Error::ManifestBlobUnknown(d.digest.to_string()));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for PushBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn manifest(&self, image: &ImageRef, _ctx: &RequestCtx) -> Result<Option<Manifest>> {
        let Some((digest, media_type)) = self.resolve(&image.repository, &image.reference).await? else {
            return Ok(None);
        };
        let Some(bytes) = self.blobs.read(&digest).await? else {
            return Err(Error::Internal(format!(
                "manifest {digest} of {image} is recorded but its bytes are missing"
            )));
        };
        let media_type = if media_type.is_empty() {
            ManifestInfo::parse(&bytes, None)?.media_type
        } else {
            media_type
        };
        Ok(Some(Manifest {
            bytes,
            media_type,
            digest,
            missing: Vec::new(),
        }))
    }

    async fn blob_size(&self, _repo: &Repository, digest: &Digest, _ctx: &RequestCtx) -> Result<Option<u64>> {
        self.blobs.size(digest).await
    }

    async fn blob(
        &self,
        _repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        _ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        self.blobs.open_blob(digest, range).await
    }

    async fn tags(&self, repo: &Repository) -> Result<Option<Vec<String>>> {
        if !tokio::fs::try_exists(self.repo_dir(repo).join("_manifests"))
            .await
            .unwrap_or(false)
        {
            return Ok(None);
        }
        Ok(Some(list_names(&self.repo_dir(repo).join("_tags")).await?))
    }

    async fn catalog(&self) -> Result<Vec<Repository>> {
        let mut out = Vec::new();
        let base = self.root.join("repos");
        for registry in list_names(&base).await? {
            // Walk the repository paths below each registry: a directory holding
            // `_manifests` is a repository.
            let mut stack = vec![String::new()];
            while let Some(rel) = stack.pop() {
                let dir = base.join(&registry).join(&rel);
                for name in list_names(&dir).await? {
                    if name == "_manifests" {
                        if let Ok(r) = Repository::new(&registry, &rel) {
                            out.push(r);
                        }
                    } else if !name.starts_with('_') {
                        stack.push(if rel.is_empty() { name } else { format!("{rel}/{name}") });
                    }
                }
            }
        }
        Ok(out)
    }

    async fn referrers(&self, repo: &Repository, digest: &Digest) -> Result<Vec<Descriptor>> {
        let dir = self.repo_dir(repo).join("_referrers").join(digest.hex());
        let mut out = Vec::new();
        for name in list_names(&dir).await? {
            if let Some(b) = read_optional(&dir.join(&name)).await? {
                let d: Descriptor = serde_json::from_slice(&b)
                    .map_err(|e| Error::Internal(format!("corrupt referrer record {name}: {e}")))?;
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }
}

#[async_trait]
impl Registry for PushBackend {
    async fn start_upload(&self, repo: &Repository) -> Result<UploadState> {
        self.uploads.start(repo).await
    }

    async fn upload_state(&self, repo: &Repository, id: &str) -> Result<UploadState> {
        self.uploads.state(repo, id).await
    }

    async fn append(&self, repo: &Repository, id: &str, start: Option<u64>, body: ByteStream) -> Result<UploadState> {
        self.uploads.append(repo, id, start, body).await
    }

    async fn finish_upload(&self, repo: &Repository, id: &str, digest: &Digest, body: ByteStream) -> Result<u64> {
        self.uploads.finish(repo, id, body, digest, &self.blobs).await
    }

    async fn cancel_upload(&self, repo: &Repository, id: &str) -> Result<()> {
        self.uploads.cancel(repo, id).await
    }

    async fn put_blob(&self, _repo: &Repository, digest: &Digest, body: ByteStream) -> Result<u64> {
        Ok(self.blobs.write_stream(Some(digest.clone()), body).await?.1)
    }

    async fn link_blob(&self, _repo: &Repository, digest: &Digest, from: &BlobStore) -> Result<bool> {
        self.blobs.link_from(from, digest).await
    }

    async fn mount_blob(&self, _repo: &Repository, digest: &Digest) -> Result<bool> {
        Ok(self.blobs.size(digest).await?.is_some())
    }

    async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<(Manifest, Option<Digest>)> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(Error::ManifestTooLarge {
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let info = ManifestInfo::parse(&bytes, content_type)?;
        let digest = Digest::of(&bytes);
        if let Reference::Digest(d) = reference {
            if *d != digest {
                return Err(Error::DigestInvalid(format!("manifest hashes to {digest}, not {d}")));
            }
        }
        self.check_references(&info).await?;
        self.blobs.write_bytes(bytes.clone()).await?;
        write_atomic(&self.manifest_marker(repo, &digest), info.media_type.as_bytes()).await?;
        if let Some(subject) = &info.subject {
            let descriptor = Descriptor {
                media_type: info.media_type.clone(),
                digest: digest.clone(),
                size: bytes.len() as u64,
                urls: None,
                annotations: info.annotations.clone(),
                artifact_type: info.artifact_type.clone(),
                platform: None,
            };
            let json = serde_json::to_vec(&descriptor).map_err(|e| Error::Internal(e.to_string()))?;
            write_atomic(&self.referrer_path(repo, &subject.digest, &digest), &json).await?;
        }
        if let Reference::Tag(t) = reference {
            write_atomic(&self.tag_path(repo, t), digest.to_string().as_bytes()).await?;
        }
        let subject = info.subject.map(|s| s.digest);
        Ok((
            Manifest {
                bytes,
                media_type: info.media_type,
                digest,
                missing: Vec::new(),
            },
            subject,
        ))
    }

    async fn delete_manifest(&self, repo: &Repository, reference: &Reference) -> Result<()> {
        self.check_delete_allowed()?;
        let Some((digest, _)) = self.resolve(repo, reference).await? else {
            return Err(Error::ManifestUnknown(format!("{repo}:{reference}")));
        };
        if let Reference::Tag(t) = reference {
            remove_optional(&self.tag_path(repo, t)).await?;
            return Ok(());
        }
        let tags_dir = self.repo_dir(repo).join("_tags");
        for tag in list_names(&tags_dir).await? {
            if let Some(b) = read_optional(&tags_dir.join(&tag)).await? {
                if String::from_utf8_lossy(&b).trim() == digest.to_string() {
                    remove_optional(&tags_dir.join(&tag)).await?;
                }
            }
        }
        if let Some(bytes) = self.blobs.read(&digest).await? {
            if let Ok(Some(subject)) = ManifestInfo::parse(&bytes, None).map(|i| i.subject) {
                remove_optional(&self.referrer_path(repo, &subject.digest, &digest)).await?;
            }
        }
        remove_optional(&self.manifest_marker(repo, &digest)).await?;
        Ok(())
    }

    async fn delete_blob(&self, _repo: &Repository, digest: &Digest) -> Result<()> {
        self.check_delete_allowed()?;
        if self.blobs.delete(digest).await? {
            Ok(())
        } else {
            Err(Error::BlobUnknown(digest.to_string()))
        }
    }
}
