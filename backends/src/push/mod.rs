//! The push store: what `docker push`, skopeo and Tilt upload, kept under the data directory
//! and served back.
//!
//! Layout: blobs (and manifest bytes) in a [`BlobStore`]; per repository
//! `repos/<registry>/<path>/_blobs/<hex>` (an empty file: the blob is linked into this
//! repository), `_manifests/<hex>` (holding the manifest's media type), `_tags/<tag>` (holding
//! the digest) and `_referrers/<subject hex>/<hex>` (a descriptor). Every file is written
//! atomically, so a crash leaves the previous state or the new one.
//!
//! A blob is readable, mountable and deletable only through a repository it is linked in (as
//! in distribution): knowing a digest gives nobody another repository's content, and a delete
//! unlinks it from one repository, never removes the file another repository needs.
//!
//! Pushed names do not shadow an origin's images unless `shadow_origins` says so: a push to a
//! name with a registry host (`registry.k8s.io/pause`) is refused, and a request that comes
//! through a mirror (`?ns=`, containerd's hosts.toml) is not answered from the push store, so
//! a cluster that uses ferry as its docker.io mirror never gets a pushed `library/nginx`.

mod config;
mod gc;
mod layout;
mod uploads;

pub use config::PushConfig;

pub use gc::GcReport;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use ferry_core::manifest::MAX_MANIFEST_SIZE;
use ferry_core::status::{BackendStatus, RepositoryUsage};
use ferry_core::{
    Backend, BlobBody, BlobStore, ByteRange, ByteStream, Descriptor, Digest, Error, ImageRef, Manifest, ManifestInfo,
    Reference, Registry, Repository, RequestCtx, Result, UploadState, DOCKER_HUB,
};

use crate::fsutil::{list_names, probe_writable, read_optional, remove_optional, sweep_temp_files, write_atomic};
use uploads::Uploads;

/// The push store.
pub struct PushBackend {
    config: PushConfig,
    root: PathBuf,
    blobs: BlobStore,
    uploads: Uploads,
    /// Held shared by manifest pushes, exclusively by garbage collection.
    lock: gc::StoreLock,
}

impl PushBackend {
    /// The store at `root` as another process (the server) keeps it: nothing swept,
    /// expired or created, for `ferry gc` running beside the server.
    pub fn attach(config: PushConfig, root: PathBuf) -> Result<Self> {
        let limits = Self::limits(&config)?;
        Ok(PushBackend {
            uploads: Uploads::attach(
                root.join("uploads"),
                Duration::from_secs(config.upload_ttl_secs),
                limits,
            ),
            blobs: BlobStore::attach(&root),
            lock: gc::StoreLock::new(&root),
            config,
            root,
        })
    }

    fn limits(config: &PushConfig) -> Result<uploads::UploadLimits> {
        Ok(uploads::UploadLimits {
            max_blob_size: config.max_blob_size.bytes(),
            quota: config.quota.as_ref().map(crate::size::Size::bytes),
            max_sessions: config.max_upload_sessions,
            max_sessions_per_client: config.max_upload_sessions_per_client,
        })
    }

    /// Opens the store at `root`, sweeping temp files a crash left there.
    pub async fn open(config: PushConfig, root: PathBuf) -> Result<Self> {
        let blobs = BlobStore::open(&root).await?;
        let limits = Self::limits(&config)?;
        let uploads = Uploads::open(
            root.join("uploads"),
            Duration::from_secs(config.upload_ttl_secs),
            limits,
            &root,
        )
        .await?;
        let store = PushBackend {
            config,
            lock: gc::StoreLock::new(&root),
            root,
            blobs,
            uploads,
        };
        let swept = sweep_temp_files(&store.root.join("repos")).await?;
        store.link_existing_manifests().await?;
        tracing::info!(backend = %store.config.name, dir = %store.root.display(), swept_temp_files = swept, "push store ready");
        Ok(store)
    }

    /// Links the blobs of every manifest into its repository where no link exists yet: a
    /// store written before blobs were linked per repository keeps serving what it holds.
    async fn link_existing_manifests(&self) -> Result<()> {
        for repo in self.catalog().await? {
            if tokio::fs::try_exists(self.repo_dir(&repo).join("_blobs"))
                .await
                .unwrap_or(false)
            {
                continue;
            }
            for hex in list_names(&self.repo_dir(&repo).join("_manifests")).await? {
                let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else {
                    continue;
                };
                let Some(bytes) = self.blobs.read(&digest).await? else {
                    continue;
                };
                let Ok(info) = ManifestInfo::parse(&bytes, None) else {
                    continue;
                };
                for d in &info.blobs {
                    if self.blobs.size(&d.digest).await?.is_some() {
                        self.link(&repo, &d.digest).await?;
                    }
                }
            }
            tokio::fs::create_dir_all(self.repo_dir(&repo).join("_blobs"))
                .await
                .map_err(|e| Error::io("creating a repository's blob links", e))?;
        }
        Ok(())
    }

    /// Whether this request is answered from the push store: not when it comes through a
    /// mirror for an origin (see the module's doc), unless `shadow_origins`.
    fn serves(&self, ctx: &RequestCtx) -> bool {
        self.config.shadow_origins || ctx.mirror_for.is_none()
    }

    /// Refuses pushes to a name with a registry host unless `shadow_origins`.
    fn check_push_name(&self, repo: &Repository) -> Result<()> {
        if self.config.shadow_origins || repo.registry() == DOCKER_HUB {
            return Ok(());
        }
        Err(Error::Denied(format!(
            "pushes to {repo} would stand in for the images of registry {}; push under a name without a \
             registry host, or set shadow_origins = true on backend {}",
            repo.registry(),
            self.config.name
        )))
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
}

#[async_trait]
impl Backend for PushBackend {
    fn name(&self) -> &str {
        &self.config.name
    }

    async fn manifest(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<Option<Manifest>> {
        if !self.serves(ctx) {
            return Ok(None);
        }
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

    async fn blob_size(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Option<u64>> {
        if !self.serves(ctx) || !self.linked(repo, digest).await {
            return Ok(None);
        }
        // A pusher asks before it skips an upload: keep the blob through a collection until
        // its manifest arrives.
        self.touch_link(repo, digest);
        self.blobs.size(digest).await
    }

    async fn blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Option<ByteRange>,
        ctx: &RequestCtx,
    ) -> Result<Option<BlobBody>> {
        if !self.serves(ctx) || !self.linked(repo, digest).await {
            return Ok(None);
        }
        self.blobs.open_blob(digest, range).await
    }

    async fn tags(&self, repo: &Repository, ctx: &RequestCtx) -> Result<Option<Vec<String>>> {
        if !self.serves(ctx) {
            return Ok(None);
        }
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

    async fn status(&self) -> BackendStatus {
        let writable = probe_writable(&self.root).await;
        BackendStatus {
            name: self.config.name.clone(),
            kind: "push".into(),
            location: self.root.display().to_string(),
            reachable: writable.is_ok(),
            error: writable.err(),
            ..BackendStatus::default()
        }
    }

    async fn usage(&self) -> Result<Vec<RepositoryUsage>> {
        let mut out = Vec::new();
        for repo in self.catalog().await? {
            let dir = self.repo_dir(&repo);
            let manifests = list_names(&dir.join("_manifests")).await?;
            let mut size = 0;
            for hex in list_names(&dir.join("_blobs")).await?.iter().chain(&manifests) {
                if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                    size += self.blobs.size(&d).await?.unwrap_or(0);
                }
            }
            let mut tags = list_names(&dir.join("_tags")).await?;
            tags.sort();
            out.push(RepositoryUsage {
                name: repo.canonical(),
                tags,
                manifests: manifests.len(),
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn referrers(&self, repo: &Repository, digest: &Digest, ctx: &RequestCtx) -> Result<Vec<Descriptor>> {
        if !self.serves(ctx) {
            return Ok(Vec::new());
        }
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
    async fn start_upload(&self, repo: &Repository, ctx: &RequestCtx) -> Result<UploadState> {
        self.check_push_name(repo)?;
        self.uploads.start(repo, ctx.client).await
    }

    async fn upload_state(&self, repo: &Repository, id: &str) -> Result<UploadState> {
        self.uploads.state(repo, id).await
    }

    async fn append(
        &self,
        repo: &Repository,
        id: &str,
        range: Option<(u64, u64)>,
        body: ByteStream,
    ) -> Result<UploadState> {
        self.uploads.append(repo, id, range, body).await
    }

    async fn finish_upload(&self, repo: &Repository, id: &str, digest: &Digest, body: ByteStream) -> Result<u64> {
        let size = self.uploads.finish(repo, id, body, digest, &self.blobs).await?;
        self.link(repo, digest).await?;
        Ok(size)
    }

    async fn cancel_upload(&self, repo: &Repository, id: &str) -> Result<()> {
        self.uploads.cancel(repo, id).await
    }

    async fn put_blob(&self, repo: &Repository, digest: &Digest, body: ByteStream) -> Result<u64> {
        self.check_push_name(repo)?;
        let body = self.uploads.limited(body, 0)?;
        let size = match self.blobs.write_stream(Some(digest.clone()), body).await {
            Ok((_, size)) => size,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::FileTooLarge => {
                return Err(Error::TooLarge(source.to_string()))
            }
            Err(e) => return Err(e),
        };
        self.uploads.grew(size);
        self.link(repo, digest).await?;
        Ok(size)
    }

    async fn link_blob(&self, repo: &Repository, digest: &Digest, file: &std::path::Path) -> Result<bool> {
        self.check_push_name(repo)?;
        if !self.blobs.link_file(file, digest).await? {
            return Ok(false);
        }
        self.link(repo, digest).await?;
        Ok(true)
    }

    async fn mount_blob(&self, repo: &Repository, digest: &Digest, from: &Repository) -> Result<bool> {
        self.check_push_name(repo)?;
        if !self.linked(from, digest).await || self.blobs.size(digest).await?.is_none() {
            return Ok(false);
        }
        self.link(repo, digest).await?;
        Ok(true)
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
        self.check_push_name(repo)?;
        let info = ManifestInfo::parse(&bytes, content_type)?;
        let digest = Digest::of(&bytes);
        if let Reference::Digest(d) = reference {
            if *d != digest {
                return Err(Error::DigestInvalid(format!("manifest hashes to {digest}, not {d}")));
            }
        }
        // A collection must not remove what this manifest names between the check and the
        // record.
        let _collecting = self.lock.shared().await?;
        self.check_references(repo, &info).await?;
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

    /// Unlinks a blob from one repository. The file stays (other repositories may hold it;
    /// unreferenced files are garbage for a collector), and a blob a manifest of the
    /// repository references is not unlinked at all.
    async fn delete_blob(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.check_delete_allowed()?;
        if !tokio::fs::try_exists(self.link_path(repo, digest))
            .await
            .unwrap_or(false)
        {
            return Err(Error::BlobUnknown(format!("{repo}@{digest}")));
        }
        if let Some(m) = self.referenced_by(repo, digest).await? {
            return Err(Error::Denied(format!(
                "{repo}@{digest} is referenced by manifest {m}; delete the manifest first"
            )));
        }
        remove_optional(&self.link_path(repo, digest)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
