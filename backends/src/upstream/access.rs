//! Who may read what the cache holds of a private repository. Content fetched with a
//! client's own credentials (ferry has none for the host) marks its repository private; the
//! cache then serves that repository only to clients the origin lets read it, asked with a
//! `HEAD` and the client's credentials, and remembered per repository and credentials for
//! the tag TTL. When the origin cannot be asked, only credentials it accepted before are
//! served: a cluster keeps pulling offline, a stranger does not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_core::{Digest, Error, Repository, Result};

/// The private repositories (one marker file each) and the access the origin granted.
pub struct Access {
    dir: PathBuf,
    /// When the origin last let (repository, credentials) read, by that pair.
    granted: Mutex<HashMap<(String, String), Instant>>,
    ttl: Duration,
}

impl Access {
    /// Access records under `root` (`private/`), granted access remembered for `ttl`.
    pub async fn open(root: &Path, ttl: Duration) -> Result<Self> {
        let dir = root.join("private");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Access {
            dir,
            granted: Mutex::new(HashMap::new()),
            ttl,
        })
    }

    fn marker(&self, repo: &Repository) -> PathBuf {
        self.dir.join(Digest::of(repo.to_string().as_bytes()).hex())
    }

    /// Whether content of `repo` was fetched with a client's credentials.
    pub async fn is_private(&self, repo: &Repository) -> bool {
        tokio::fs::try_exists(self.marker(repo)).await.unwrap_or(false)
    }

    /// Records that `repo` is private, and that `credentials` may read it.
    pub async fn mark_private(&self, repo: &Repository, credentials: &str) -> Result<()> {
        let path = self.marker(repo);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            tokio::fs::write(&path, repo.to_string())
                .await
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        self.grant(repo, credentials);
        Ok(())
    }

    /// Records that the origin let `credentials` read `repo` now.
    pub fn grant(&self, repo: &Repository, credentials: &str) {
        self.granted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((repo.to_string(), credentials.to_string()), Instant::now());
    }

    /// Whether `credentials` were granted `repo` within the TTL (`fresh`), or ever since
    /// ferry started.
    pub fn granted(&self, repo: &Repository, credentials: &str, fresh: bool) -> bool {
        self.granted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(repo.to_string(), credentials.to_string()))
            .is_some_and(|at| !fresh || at.elapsed() < self.ttl)
    }
}
