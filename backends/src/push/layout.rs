//! Where the push store keeps what: per repository, the links that make a blob readable
//! through it, manifest markers, tags and referrers, beside the shared blob store.

use std::path::PathBuf;

use ferry_core::{Digest, Error, ManifestInfo, Reference, Repository, Result};

use crate::fsutil::{list_names, read_optional, write_atomic};

use super::PushBackend;

impl PushBackend {
    pub(super) fn link_path(&self, repo: &Repository, digest: &Digest) -> PathBuf {
        self.repo_dir(repo).join("_blobs").join(digest.hex())
    }

    /// Links a stored blob into a repository.
    pub(super) async fn link(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        let path = self.link_path(repo, digest);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(());
        }
        write_atomic(&path, b"").await
    }

    /// Whether a repository may read `digest`: a blob linked into it, or one of its manifests.
    pub(super) async fn linked(&self, repo: &Repository, digest: &Digest) -> bool {
        tokio::fs::try_exists(self.link_path(repo, digest))
            .await
            .unwrap_or(false)
            || tokio::fs::try_exists(self.manifest_marker(repo, digest))
                .await
                .unwrap_or(false)
    }

    pub(super) fn repo_dir(&self, repo: &Repository) -> PathBuf {
        self.root.join("repos").join(repo.registry()).join(repo.path())
    }

    pub(super) fn manifest_marker(&self, repo: &Repository, digest: &Digest) -> PathBuf {
        self.repo_dir(repo).join("_manifests").join(digest.hex())
    }

    pub(super) fn tag_path(&self, repo: &Repository, tag: &str) -> PathBuf {
        self.repo_dir(repo).join("_tags").join(tag)
    }

    pub(super) fn referrer_path(&self, repo: &Repository, subject: &Digest, digest: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_referrers")
            .join(subject.hex())
            .join(digest.hex())
    }

    /// The digest a reference names in this repository and the manifest's media type (from
    /// its marker), if the repository holds it.
    pub(super) async fn resolve(&self, repo: &Repository, reference: &Reference) -> Result<Option<(Digest, String)>> {
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

    /// Checks everything a manifest references is stored and linked into the repository,
    /// so a pull of it cannot fail later.
    pub(super) async fn check_references(&self, repo: &Repository, info: &ManifestInfo) -> Result<()> {
        for d in info.blobs.iter().chain(&info.manifests) {
            if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue; // foreign layer, fetched by clients from its URL
            }
            if !self.linked(repo, &d.digest).await || self.blobs.size(&d.digest).await?.is_none() {
                return Err(Error::ManifestBlobUnknown(d.digest.to_string()));
            }
        }
        Ok(())
    }

    /// The manifest of `repo` that references `digest` as a blob, if any.
    pub(super) async fn referenced_by(&self, repo: &Repository, digest: &Digest) -> Result<Option<Digest>> {
        for hex in list_names(&self.repo_dir(repo).join("_manifests")).await? {
            let Ok(m) = format!("sha256:{hex}").parse::<Digest>() else {
                continue;
            };
            let Some(bytes) = self.blobs.read(&m).await? else {
                continue;
            };
            if let Ok(info) = ManifestInfo::parse(&bytes, None) {
                if info.blobs.iter().chain(&info.manifests).any(|d| d.digest == *digest) {
                    return Ok(Some(m));
                }
            }
        }
        Ok(None)
    }
}
