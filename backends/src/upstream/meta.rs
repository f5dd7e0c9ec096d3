//! What the upstream cache knows besides blob bytes, one small file per fact (each written
//! atomically, so a crash leaves the old fact or the new one):
//! - `tags/<sha256 of repository:tag>.json`: the digest a tag pointed at, and when the
//!   origin last said so;
//! - `types/<hex>`: a cached manifest's media type, as the origin sent it;
//! - `links/<registry>/<path>/<hex>`: the repositories the origin served a blob or manifest
//!   for. A cached blob is served for such a repository only: one a client names without it
//!   is asked of the origin first, so the cache never shows one repository's content
//!   through another's name.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use ferry_core::{Digest, Error, Repository, Result};

use crate::fsutil::{read_optional, remove_optional, write_atomic};

/// A tag as last seen at the origin.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TagEntry {
    /// `registry/path`.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// What it pointed at.
    pub digest: Digest,
    /// When the origin last confirmed it (ms since the epoch).
    pub checked_ms: u64,
}

impl TagEntry {
    /// Whether the origin confirmed it less than `ttl` ago.
    pub fn fresh(&self, ttl: Duration) -> bool {
        self.age() < ttl
    }

    /// How long ago the origin confirmed it.
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.checked_ms))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The metadata directory.
pub struct Meta {
    root: PathBuf,
}

impl Meta {
    /// Metadata under `root`.
    pub async fn open(root: &Path) -> Result<Self> {
        for d in ["tags", "types", "links"] {
            let dir = root.join(d);
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        // What a crash cut short in write_atomic.
        for d in ["tags", "types"] {
            crate::fsutil::sweep_temp_files(&root.join(d)).await?;
        }
        Ok(Meta {
            root: root.to_path_buf(),
        })
    }

    fn tag_path(&self, repo: &Repository, tag: &str) -> PathBuf {
        self.tag_file(&repo.to_string(), tag)
    }

    /// The entry's file: named by the hash of `registry/path:tag`.
    fn tag_file(&self, repository: &str, tag: &str) -> PathBuf {
        let key = Digest::of(format!("{repository}:{tag}").as_bytes());
        self.root.join("tags").join(format!("{}.json", key.hex()))
    }

    /// The tag's entry, if the cache has one.
    pub async fn tag(&self, repo: &Repository, tag: &str) -> Result<Option<TagEntry>> {
        let Some(bytes) = read_optional(&self.tag_path(repo, tag)).await? else {
            return Ok(None);
        };
        // An entry that does not parse (written by another version) is as good as none.
        Ok(serde_json::from_slice::<TagEntry>(&bytes)
            .ok()
            .filter(|e| e.repository == repo.to_string() && e.tag == tag))
    }

    /// Records that the origin says `tag` is `digest`, now.
    pub async fn put_tag(&self, repo: &Repository, tag: &str, digest: &Digest) -> Result<()> {
        let entry = TagEntry {
            repository: repo.to_string(),
            tag: tag.to_string(),
            digest: digest.clone(),
            checked_ms: now_ms(),
        };
        let json = serde_json::to_vec(&entry).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomic(&self.tag_path(repo, tag), &json).await
    }

    /// Forgets a tag the origin no longer has.
    pub async fn remove_tag(&self, repo: &Repository, tag: &str) -> Result<()> {
        remove_optional(&self.tag_path(repo, tag)).await.map(|_| ())
    }

    /// Every tag entry the cache holds.
    pub async fn tags(&self) -> Result<Vec<TagEntry>> {
        let dir = self.root.join("tags");
        let mut out = Vec::new();
        for n in crate::fsutil::list_names(&dir).await? {
            if let Some(bytes) = read_optional(&dir.join(&n)).await? {
                out.extend(serde_json::from_slice::<TagEntry>(&bytes).ok());
            }
        }
        Ok(out)
    }

    /// Forgets a tag entry.
    pub async fn remove_entry(&self, entry: &TagEntry) -> Result<()> {
        remove_optional(&self.tag_file(&entry.repository, &entry.tag))
            .await
            .map(|_| ())
    }

    /// The manifests the cache knows the media type of: every manifest it holds.
    pub async fn manifests(&self) -> Result<Vec<Digest>> {
        Ok(crate::fsutil::list_names(&self.root.join("types"))
            .await?
            .iter()
            .filter_map(|hex| format!("sha256:{hex}").parse().ok())
            .collect())
    }

    /// The repositories (`registry/path`) each digest was served for, by digest.
    pub async fn linked_repositories(&self) -> Result<std::collections::HashMap<Digest, Vec<String>>> {
        let root = self.root.join("links");
        tokio::task::spawn_blocking(move || {
            let mut out: std::collections::HashMap<Digest, Vec<String>> = Default::default();
            let mut dirs = vec![root.clone()];
            while let Some(dir) = dirs.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for e in entries.flatten() {
                    let path = e.path();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        dirs.push(path);
                        continue;
                    }
                    let digest = format!("sha256:{}", e.file_name().to_string_lossy()).parse::<Digest>();
                    if let (Ok(d), Ok(repo)) = (digest, dir.strip_prefix(&root)) {
                        out.entry(d).or_default().push(repo.display().to_string());
                    }
                }
            }
            out
        })
        .await
        .map_err(|e| Error::Internal(format!("listing links: {e}")))
    }

    /// Forgets every tag; how many there were.
    pub async fn clear_tags(&self) -> Result<usize> {
        let dir = self.root.join("tags");
        let names = crate::fsutil::list_names(&dir).await?;
        for n in &names {
            remove_optional(&dir.join(n)).await?;
        }
        Ok(names.len())
    }

    /// A cached manifest's media type.
    pub async fn media_type(&self, digest: &Digest) -> Result<Option<String>> {
        Ok(read_optional(&self.root.join("types").join(digest.hex()))
            .await?
            .and_then(|b| String::from_utf8(b).ok()))
    }

    /// Records a manifest's media type.
    pub async fn put_media_type(&self, digest: &Digest, media_type: &str) -> Result<()> {
        write_atomic(&self.root.join("types").join(digest.hex()), media_type.as_bytes()).await
    }

    fn link_path(&self, repo: &Repository, digest: &Digest) -> PathBuf {
        self.root
            .join("links")
            .join(repo.registry())
            .join(repo.path())
            .join(digest.hex())
    }

    /// Whether the origin served `digest` for `repo`.
    pub async fn linked(&self, repo: &Repository, digest: &Digest) -> bool {
        tokio::fs::try_exists(self.link_path(repo, digest))
            .await
            .unwrap_or(false)
    }

    /// Records that the origin served `digest` for `repo`.
    pub async fn link(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        let path = self.link_path(repo, digest);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        tokio::fs::write(&path, b"")
            .await
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tags_links_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(dir.path()).await.unwrap();
        let repo = Repository::new("127.0.0.2:5000", "e2e/app").unwrap();
        let other = Repository::new("127.0.0.3:5000", "e2e/app").unwrap();
        let d = Digest::of(b"m");
        assert!(meta.tag(&repo, "v1").await.unwrap().is_none());
        meta.put_tag(&repo, "v1", &d).await.unwrap();
        let e = meta.tag(&repo, "v1").await.unwrap().unwrap();
        assert_eq!(e.digest, d);
        assert!(e.fresh(Duration::from_secs(60)));
        assert!(!e.fresh(Duration::ZERO));
        assert!(meta.tag(&other, "v1").await.unwrap().is_none());
        meta.remove_tag(&repo, "v1").await.unwrap();
        assert!(meta.tag(&repo, "v1").await.unwrap().is_none());
        meta.link(&repo, &d).await.unwrap();
        assert!(meta.linked(&repo, &d).await);
        assert!(!meta.linked(&other, &d).await);
        meta.put_media_type(&d, "application/vnd.oci.image.index.v1+json")
            .await
            .unwrap();
        assert_eq!(
            meta.media_type(&d).await.unwrap().as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
    }
}
