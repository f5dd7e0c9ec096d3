//! Who may do what on the registry API: a read-only switch, Basic auth from an htpasswd
//! file (bcrypt, as distribution's `htpasswd` auth) for writes and optionally reads, and a
//! repository prefix allow-list. Decided before a request reaches any backend.
//!
//! A name outside the prefixes answers exactly as a repository that does not exist
//! (`NAME_UNKNOWN`), so nobody learns what else the engines hold. Verified credentials are
//! remembered for a few minutes by the SHA-256 of the header (bcrypt costs tens of
//! milliseconds, and a push is many requests); checks run a few at a time so that a flood of
//! guesses cannot take every core, requests that carry the same header share one check, and
//! each client address has only so many checks (`crate::guesses`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use ferry_core::flight::Flights;
use ferry_core::{Error, Repository};

use crate::guesses::Guesses;

/// How long a verified `Authorization` header is taken without bcrypt again.
const REMEMBER: Duration = Duration::from_secs(300);
/// Remembered headers at most (the oldest are forgotten past it).
const REMEMBER_MAX: usize = 1024;
/// bcrypt checks at once.
const CHECKS_AT_ONCE: usize = 2;
/// bcrypt checks waiting for one of those at most: past it, a check is refused (429) rather
/// than queued, so clients from many addresses (each within its own allowance) cannot queue
/// unbounded work. At cost 12 (a quarter of a second) the queue is gone in about 4 s.
const CHECKS_WAITING: usize = 32;

/// The realm in `WWW-Authenticate`.
pub const REALM: &str = "ferry";

/// What a request does, as access control sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// GET and HEAD.
    Read,
    /// Uploads, manifest PUTs, deletes.
    Write,
    /// `GET /v2/`: where Docker, Podman and skopeo learn whether to send credentials (and
    /// `docker login` checks them), so with users configured it challenges a client without
    /// credentials even when reads are open; the reads that follow go without.
    Ping,
}

/// The access rules, from `[access]`.
pub struct Access {
    read_only: bool,
    users: Option<Arc<HashMap<String, String>>>,
    auth_reads: bool,
    prefixes: Vec<String>,
    checker: Arc<Checker>,
    /// Checks under way, by the SHA-256 of their header (a task each, so that a client that
    /// leaves does not cut short the check others wait for).
    checking: Flights<Verdict>,
}

/// What checks of credentials share.
struct Checker {
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    checks: Semaphore,
    /// Checks waiting for `checks`.
    waiting: std::sync::atomic::AtomicUsize,
    /// The second a full queue was last logged in.
    queue_full_told: std::sync::atomic::AtomicU64,
    guesses: Guesses,
    /// A hash of the users' cost that no password matches, checked for names that are not
    /// users (made at the first such check).
    stand_in: std::sync::OnceLock<String>,
}

/// What a check of credentials found.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    Right,
    Wrong,
    /// The client has had too many checks lately: not checked.
    TooMany(Duration),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("read_only", &self.read_only)
            .field("users", &self.users.as_ref().map(|u| u.len()))
            .field("auth_reads", &self.auth_reads)
            .field("prefixes", &self.prefixes)
            .finish()
    }
}

impl Access {
    /// Rules with everything open.
    pub fn open() -> Self {
        Self::new(false, None, false, Vec::new())
    }

    /// `users` maps user names to bcrypt hashes (`None`: no authentication).
    pub fn new(
        read_only: bool,
        users: Option<HashMap<String, String>>,
        auth_reads: bool,
        prefixes: Vec<String>,
    ) -> Self {
        Access {
            read_only,
            users: users.map(Arc::new),
            auth_reads,
            prefixes,
            checker: Arc::new(Checker::new(Guesses::default())),
            checking: Flights::default(),
        }
    }

    /// The same rules, with each client's checks limited by `guesses`.
    #[cfg(test)]
    fn with_guesses(mut self, guesses: Guesses) -> Self {
        self.checker = Arc::new(Checker::new(guesses));
        self
    }

    /// Reads an htpasswd file (`user:$2y$…` lines; only bcrypt is accepted, as distribution).
    pub fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("htpasswd {}: {e}", path.display()))?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!(
                    "htpasswd {} line {}: expected user:hash",
                    path.display(),
                    i + 1
                ));
            };
            if !hash.starts_with("$2") {
                return Err(format!(
                    "htpasswd {} line {}: {user}'s password is not a bcrypt hash (make it with htpasswd -B)",
                    path.display(),
                    i + 1
                ));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(users)
    }

    /// Whether `repo` is inside the prefix allow-list (always, without one). A prefix matches
    /// the name as clients write it (`team/app`, `registry.k8s.io/pause`) or in full
    /// (`docker.io/team/app`).
    pub fn allows_name(&self, repo: &Repository) -> bool {
        if self.prefixes.is_empty() {
            return true;
        }
        let (familiar, canonical) = (repo.familiar(), repo.canonical());
        let path = repo.path();
        self.prefixes.iter().any(|p| {
            familiar.starts_with(p.as_str()) || canonical.starts_with(p.as_str()) || path.starts_with(p.as_str())
        })
    }

    /// Decides a request from `client`. `Ok(true)` when it carried ferry's own credentials
    /// (they must not be passed on to an engine or an origin).
    pub async fn check(
        &self,
        action: Action,
        repo: Option<&Repository>,
        authorization: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<bool, Error> {
        if let Some(r) = repo {
            if !self.allows_name(r) {
                return Err(Error::NameUnknown(r.to_string()));
            }
        }
        if action == Action::Write && self.read_only {
            return Err(Error::Unsupported("this registry is read-only".into()));
        }
        let Some(users) = &self.users else {
            return Ok(false);
        };
        let needed = action != Action::Read || self.auth_reads;
        // Some clients (containers/image: skopeo, Podman) answer a challenge with an empty
        // user and password when they have none: that is no credentials.
        let given = authorization.filter(|h| h.starts_with("Basic ") && basic(h).is_some_and(|(u, _)| !u.is_empty()));
        match given {
            Some(header) => match self.verify(users, header, client).await {
                Verdict::Right => Ok(true),
                Verdict::Wrong => Err(unauthorized("wrong user name or password")),
                Verdict::TooMany(wait) => Err(Error::TooManyRequests(format!(
                    "too many passwords checked for this address lately; try again in {} s",
                    wait.as_secs().max(1)
                ))),
            },
            _ if needed => Err(unauthorized("authentication required")),
            _ => Ok(false),
        }
    }

    async fn verify(&self, users: &Arc<HashMap<String, String>>, header: &str, client: Option<IpAddr>) -> Verdict {
        let key: [u8; 32] = Sha256::digest(header.as_bytes()).into();
        if self.checker.remembered(&key) {
            return Verdict::Right;
        }
        // A client's parallel first requests (a push's layers) share one check, and one of
        // its allowance.
        let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let (checker, users, header) = (self.checker.clone(), users.clone(), header.to_string());
        self.checking
            .run(
                &name,
                async move { Ok(checker.check(&users, &header, key, client).await) },
            )
            .await
            .unwrap_or(Verdict::Wrong)
    }
}

impl Checker {
    fn new(guesses: Guesses) -> Self {
        Checker {
            verified: Mutex::new(HashMap::new()),
            checks: Semaphore::new(CHECKS_AT_ONCE),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            queue_full_told: std::sync::atomic::AtomicU64::new(0),
            guesses,
            stand_in: std::sync::OnceLock::new(),
        }
    }

    /// Whether the header of SHA-256 `key` was found right lately.
    fn remembered(&self, key: &[u8; 32]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        verified.get(key).is_some_and(|at| at.elapsed() < REMEMBER)
    }

    /// A turn at bcrypt, waiting behind at most [`CHECKS_WAITING`] others; `None` when as
    /// many wait already (logged once per second at most).
    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.checks.try_acquire() {
            return Some(p);
        }
        /// Counts a check among the waiting while it waits, however its wait ends (a
        /// client that leaves drops it).
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= CHECKS_WAITING {
            drop(waiting);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if self.queue_full_told.swap(now, Ordering::SeqCst) != now {
                tracing::warn!(
                    waiting = CHECKS_WAITING,
                    "too many password checks queued: refusing more (429) until the queue drains"
                );
            }
            return None;
        }
        let permit = self.checks.acquire().await.ok();
        drop(waiting);
        permit
    }

    /// Checks `header` with bcrypt, if its client may have one more check.
    async fn check(
        self: Arc<Self>,
        users: &HashMap<String, String>,
        header: &str,
        key: [u8; 32],
        client: Option<IpAddr>,
    ) -> Verdict {
        let Some((user, password)) = basic(header) else {
            return Verdict::Wrong;
        };
        if let Err(refused) = self.guesses.take(client) {
            if refused.first {
                let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
                tracing::warn!(client = %client, user = %user, wait_s = refused.wait.as_secs(),
                    "too many passwords checked for this address lately: its requests are refused (429) until it may try again");
            }
            return Verdict::TooMany(refused.wait);
        }
        let hash = users.get(&user).cloned();
        let Some(_permit) = self.permit().await else {
            self.guesses.give_back(client);
            return Verdict::TooMany(Duration::from_secs(1));
        };
        // A user who does not exist takes as long as a wrong password: the answer's timing
        // must not tell which names do.
        let like = users.values().next().cloned();
        let checker = self.clone();
        let ok = tokio::task::spawn_blocking(move || match (hash, like) {
            (Some(hash), _) => bcrypt::verify(password, &hash).unwrap_or(false),
            (None, Some(like)) => {
                let _ = bcrypt::verify(password, checker.stand_in.get_or_init(|| stand_in_hash(&like)));
                false
            }
            (None, None) => false,
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Verdict::Wrong;
        }
        self.guesses.give_back(client);
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= REMEMBER_MAX {
            verified.retain(|_, at| at.elapsed() < REMEMBER);
            if verified.len() >= REMEMBER_MAX {
                verified.clear();
            }
        }
        verified.insert(key, Instant::now());
        Verdict::Right
    }
}

/// The address a request came from, whose allowance of checks it uses.
pub fn client_of(req: &poem::Request) -> Option<IpAddr> {
    match req.remote_addr().0 {
        poem::Addr::SocketAddr(a) => Some(a.ip()),
        _ => None,
    }
}

/// A bcrypt hash with the cost of `like` (a user's hash, `$2y$COST$…`). Whatever it matches,
/// a name that is not a user is refused.
fn stand_in_hash(like: &str) -> String {
    let cost = like
        .split('$')
        .nth(2)
        .and_then(|c| c.parse().ok())
        .unwrap_or(bcrypt::DEFAULT_COST);
    bcrypt::hash("not a user", cost).unwrap_or_default()
}

fn unauthorized(message: &str) -> Error {
    Error::Unauthorized {
        realm: REALM.into(),
        message: message.into(),
        challenge: None,
    }
}

/// User and password of a `Basic` header.
fn basic(header: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(header.strip_prefix("Basic ")?.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn repo(name: &str) -> Repository {
        Repository::from_request(name, None).unwrap()
    }

    #[tokio::test]
    async fn writes_need_credentials_reads_only_when_asked() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users: HashMap<String, String> = [("ann".to_string(), hash)].into();
        let a = Access::new(false, Some(users.clone()), false, Vec::new());
        let r = repo("team/app");
        assert!(!a.check(Action::Read, Some(&r), None, LOCAL).await.unwrap());
        assert!(matches!(
            a.check(Action::Write, Some(&r), None, LOCAL).await,
            Err(Error::Unauthorized { .. })
        ));
        assert!(matches!(
            a.check(Action::Write, Some(&r), Some(&header("ann", "nope")), LOCAL)
                .await,
            Err(Error::Unauthorized { .. })
        ));
        assert!(a
            .check(Action::Write, Some(&r), Some(&header("ann", "pw")), LOCAL)
            .await
            .unwrap());
        assert!(
            a.check(Action::Write, Some(&r), Some(&header("ann", "pw")), LOCAL)
                .await
                .unwrap(),
            "remembered"
        );
        assert!(matches!(
            a.check(Action::Write, Some(&r), Some(&header("bob", "pw")), LOCAL)
                .await,
            Err(Error::Unauthorized { .. })
        ));
        let reads = Access::new(false, Some(users), true, Vec::new());
        assert!(matches!(
            reads.check(Action::Read, Some(&r), None, LOCAL).await,
            Err(Error::Unauthorized { .. })
        ));
        // A Bearer token (for an origin) is not ferry's: reads stay anonymous; so is an empty
        // user and password.
        assert!(!a.check(Action::Read, Some(&r), Some("Bearer x"), LOCAL).await.unwrap());
        assert!(!a
            .check(Action::Read, Some(&r), Some(&header("", "")), LOCAL)
            .await
            .unwrap());
        assert!(matches!(
            a.check(Action::Write, Some(&r), Some(&header("", "")), LOCAL).await,
            Err(Error::Unauthorized { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_from_many_addresses_queue_no_further_than_the_bound() {
        // Each check takes a while (cost 10), and each address is within its own allowance:
        // only the queue's bound keeps the work from piling up.
        let users: HashMap<String, String> = [("ann".to_string(), bcrypt::hash("pw", 10).unwrap())].into();
        let a = Arc::new(Access::new(false, Some(users), false, Vec::new()));
        let r = repo("team/app");
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let (a, r) = (a.clone(), r.clone());
            let client = Some(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            tasks.push(tokio::spawn(async move {
                a.check(
                    Action::Write,
                    Some(&r),
                    Some(&header("ann", &format!("guess{i}"))),
                    client,
                )
                .await
            }));
        }
        let (mut refused, mut checked) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Err(Error::TooManyRequests(_)) => refused += 1,
                Err(Error::Unauthorized { .. }) => checked += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(
            checked <= CHECKS_AT_ONCE + CHECKS_WAITING + 8,
            "{checked} checked, {refused} refused"
        );
        assert_eq!(checked + refused, 100);
        // Drained: the next client is checked, and gets in.
        assert!(a
            .check(Action::Write, Some(&r), Some(&header("ann", "pw")), LOCAL)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_client_with_too_many_checks_waits_and_others_do_not() {
        let users: HashMap<String, String> = [("ann".to_string(), bcrypt::hash("pw", 4).unwrap())].into();
        let a =
            Access::new(false, Some(users), false, Vec::new()).with_guesses(Guesses::new(3, Duration::from_secs(60)));
        let r = repo("team/app");
        let guesser = Some("192.0.2.1".parse().unwrap());
        for _ in 0..3 {
            assert!(matches!(
                a.check(Action::Write, Some(&r), Some(&header("ann", "guess")), guesser)
                    .await,
                Err(Error::Unauthorized { .. })
            ));
        }
        // Not checked any more, not even the right password.
        for h in [header("ann", "guess"), header("ann", "pw")] {
            assert!(matches!(
                a.check(Action::Write, Some(&r), Some(&h), guesser).await,
                Err(Error::TooManyRequests(_))
            ));
        }
        // Another client logs in; once remembered, its header is right from anywhere.
        assert!(a
            .check(Action::Write, Some(&r), Some(&header("ann", "pw")), LOCAL)
            .await
            .unwrap());
        assert!(a
            .check(Action::Write, Some(&r), Some(&header("ann", "pw")), guesser)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn parallel_requests_with_one_header_share_its_check() {
        let users: HashMap<String, String> = [("ann".to_string(), bcrypt::hash("pw", 4).unwrap())].into();
        let a =
            Access::new(false, Some(users), false, Vec::new()).with_guesses(Guesses::new(1, Duration::from_secs(60)));
        let r = repo("team/app");
        let h = header("ann", "pw");
        let checks = (0..20).map(|_| a.check(Action::Write, Some(&r), Some(&h), LOCAL));
        for outcome in futures::future::join_all(checks).await {
            assert!(outcome.unwrap(), "a request that shared the check was refused");
        }
        // Wrong ones in parallel share theirs too: one check of the allowance of one.
        let wrong = header("ann", "nope");
        let a = Access::new(false, a.users.as_deref().cloned(), false, Vec::new())
            .with_guesses(Guesses::new(1, Duration::from_secs(60)));
        let checks = (0..20).map(|_| a.check(Action::Write, Some(&r), Some(&wrong), LOCAL));
        for outcome in futures::future::join_all(checks).await {
            assert!(matches!(outcome, Err(Error::Unauthorized { .. })), "{outcome:?}");
        }
        assert_eq!(a.checking.in_flight(), 0, "finished checks are forgotten");
    }

    #[test]
    fn names_that_are_not_users_are_checked_at_the_users_cost() {
        let like = bcrypt::hash("pw", 6).unwrap();
        let stand_in = stand_in_hash(&like);
        assert!(stand_in.starts_with("$2b$06$"), "{stand_in}");
        assert!(!bcrypt::verify("pw", &stand_in).unwrap());
    }

    #[tokio::test]
    async fn a_name_that_is_not_a_user_goes_through_a_check() {
        let users: HashMap<String, String> = [("ann".to_string(), bcrypt::hash("pw", 4).unwrap())].into();
        let a = Access::new(false, Some(users), false, Vec::new());
        let r = repo("team/app");
        assert!(matches!(
            a.check(Action::Write, Some(&r), Some(&header("bob", "pw")), LOCAL)
                .await,
            Err(Error::Unauthorized { .. })
        ));
        assert!(
            a.checker.stand_in.get().is_some_and(|h| h.starts_with("$2b$04$")),
            "no check was made"
        );
    }

    #[tokio::test]
    async fn read_only_and_prefixes() {
        let a = Access::new(true, None, false, vec!["team/".into(), "registry.k8s.io/".into()]);
        assert!(matches!(
            a.check(Action::Write, Some(&repo("team/app")), None, LOCAL).await,
            Err(Error::Unsupported(_))
        ));
        assert!(!a
            .check(Action::Read, Some(&repo("team/app")), None, LOCAL)
            .await
            .unwrap());
        assert!(a.allows_name(&repo("registry.k8s.io/pause")));
        assert!(a.allows_name(&Repository::from_request("team/x", Some("docker.io")).unwrap()));
        assert!(matches!(
            a.check(Action::Read, Some(&repo("other/app")), None, LOCAL).await,
            Err(Error::NameUnknown(_))
        ));
        assert!(matches!(
            a.check(Action::Read, Some(&repo("teams/app")), None, LOCAL).await,
            Err(Error::NameUnknown(_))
        ));
    }
}
