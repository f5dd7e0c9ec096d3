//! Who may read what the cache holds of a private repository. Content fetched with a
//! client's own credentials (ferry has none for the host) marks its repository private; the
//! cache then serves that repository only to clients the origin lets read it, asked with a
//! `HEAD` and the client's credentials, and remembered per repository and credentials for
//! the tag TTL. When the origin cannot be asked, only credentials it accepted before are
//! served: a cluster keeps pulling offline, a stranger does not.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ferry_core::{Digest, Error, Repository, Result};

/// Grants remembered at most.
pub const MAX_GRANTS: usize = 10_000;

/// The private repositories (one marker file each, all of them read at start: the check
/// runs on every cached read) and the access the origin granted.
pub struct PrivateRepos {
    dir: PathBuf,
    /// The markers' names.
    private: RwLock<HashSet<String>>,
    /// When the origin last let (repository, credentials) read, by that pair.
    granted: Mutex<HashMap<(String, String), Instant>>,
    /// When the origin last served a repository without credentials.
    public: Mutex<HashMap<String, Instant>>,
    ttl: Duration,
}

impl PrivateRepos {
    /// The private repositories recorded under `root` (`private/`), granted access remembered
    /// for `ttl`.
    pub async fn open(root: &Path, ttl: Duration) -> Result<Self> {
        let dir = root.join("private");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut private = HashSet::new();
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        {
            if let Some(name) = entry.file_name().to_str() {
                private.insert(name.to_string());
            }
        }
        Ok(PrivateRepos {
            dir,
            private: RwLock::new(private),
            granted: Mutex::new(HashMap::new()),
            public: Mutex::new(HashMap::new()),
            ttl,
        })
    }

    /// The marker's name for `repo`.
    fn marker(repo: &Repository) -> String {
        Self::marker_name(&repo.to_string())
    }

    fn marker_name(repo: &str) -> String {
        Digest::of(repo.as_bytes()).hex().to_string()
    }

    /// Whether content of `repo` was fetched with a client's credentials.
    pub fn is_private(&self, repo: &Repository) -> bool {
        self.is_private_name(&repo.to_string())
    }

    /// [`PrivateRepos::is_private`] by the repository's `registry/path`.
    pub fn is_private_name(&self, repo: &str) -> bool {
        self.private
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&Self::marker_name(repo))
    }

    /// Records that `repo` is private, and that `credentials` may read it. The marker is on
    /// disk (synced) before this returns, so content stored after it stays private across a
    /// crash.
    pub async fn mark_private(&self, repo: &Repository, credentials: &str) -> Result<()> {
        let name = Self::marker(repo);
        if !self.is_private(repo) {
            let (dir, path, text) = (self.dir.clone(), self.dir.join(&name), repo.to_string());
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut f = std::fs::File::create(&path)?;
                f.write_all(text.as_bytes())?;
                f.sync_all()?;
                std::fs::File::open(&dir)?.sync_all()
            })
            .await
            .map_err(|e| Error::Internal(format!("marker writer task: {e}")))?
            .map_err(|e| Error::io(format!("writing {}", self.dir.join(&name).display()), e))?;
            self.private
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name);
        }
        self.grant(repo, credentials);
        Ok(())
    }

    /// Records that the origin served `repo` to a client without credentials: it went
    /// public there (or was marked by an older ferry that marked every repository a client
    /// sent credentials for), so its cached content is everybody's, offline too.
    pub async fn unmark_private(&self, repo: &Repository) -> Result<()> {
        let name = Self::marker(repo);
        let (dir, path) = (self.dir.clone(), self.dir.join(&name));
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::Internal(format!("marker remover task: {e}")))?
        .map_err(|e| Error::io(format!("removing {}", self.dir.join(&name).display()), e))?;
        self.private
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        self.note_public(repo);
        Ok(())
    }

    /// Records that the origin let `credentials` read `repo` now. Bounded: past
    /// [`MAX_GRANTS`] entries, those older than the TTL go, and if that is not enough, all
    /// (clients then are asked about again), so no stream of credentials grows it for ever.
    pub fn grant(&self, repo: &Repository, credentials: &str) {
        let mut granted = self.granted.lock().unwrap_or_else(PoisonError::into_inner);
        remember(&mut granted, (repo.to_string(), credentials.to_string()), self.ttl);
    }

    /// Records that the origin served `repo` without credentials now.
    pub fn note_public(&self, repo: &Repository) {
        let mut public = self.public.lock().unwrap_or_else(PoisonError::into_inner);
        remember(&mut public, repo.to_string(), self.ttl);
    }

    /// Whether the origin served `repo` without credentials within the TTL.
    pub fn known_public(&self, repo: &Repository) -> bool {
        self.public
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&repo.to_string())
            .is_some_and(|at| at.elapsed() < self.ttl)
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

/// Puts `key` in `map` as of now, keeping it within [`MAX_GRANTS`] entries (the expired go
/// first, then all).
fn remember<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Instant>, key: K, ttl: Duration) {
    if map.len() >= MAX_GRANTS {
        map.retain(|_, at| at.elapsed() < ttl);
        if map.len() >= MAX_GRANTS {
            map.clear();
        }
    }
    map.insert(key, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_expire_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        // A TTL far above any stall of a loaded machine between a grant and its check.
        let access = PrivateRepos::open(dir.path(), Duration::from_millis(800))
            .await
            .unwrap();
        let repo = Repository::new("reg.example", "team/app").unwrap();
        assert!(!access.is_private(&repo));
        access.mark_private(&repo, "key-a").await.unwrap();
        assert!(access.is_private(&repo));
        let reopened = PrivateRepos::open(dir.path(), Duration::from_millis(800))
            .await
            .unwrap();
        assert!(reopened.is_private(&repo), "a marker outlives a restart");
        assert!(!reopened.granted(&repo, "key-a", false), "grants do not");
        assert!(access.granted(&repo, "key-a", true));
        assert!(!access.granted(&repo, "key-b", false));
        std::thread::sleep(Duration::from_millis(900));
        assert!(!access.granted(&repo, "key-a", true), "past the TTL");
        assert!(
            access.granted(&repo, "key-a", false),
            "still known for when the origin is down"
        );
        for i in 0..MAX_GRANTS + 10 {
            access.grant(&repo, &format!("stream-{i}"));
        }
        let held = access.granted.lock().unwrap().len();
        assert!(held <= MAX_GRANTS, "{held}");
    }

    #[tokio::test]
    async fn an_unmarked_repository_stays_public_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let access = PrivateRepos::open(dir.path(), Duration::from_secs(60)).await.unwrap();
        let (repo, other) = (
            Repository::new("reg.example", "team/app").unwrap(),
            Repository::new("reg.example", "team/secret").unwrap(),
        );
        access.mark_private(&repo, "key-a").await.unwrap();
        access.mark_private(&other, "key-a").await.unwrap();
        access.unmark_private(&repo).await.unwrap();
        assert!(!access.is_private(&repo) && access.known_public(&repo));
        let reopened = PrivateRepos::open(dir.path(), Duration::from_secs(60)).await.unwrap();
        assert!(!reopened.is_private(&repo), "the marker is gone from disk");
        assert!(reopened.is_private(&other), "only its own marker went");
        reopened.unmark_private(&repo).await.unwrap();
    }
}
