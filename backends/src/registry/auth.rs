//! The distribution spec's authentication as a client meets it: `WWW-Authenticate`
//! challenges (Basic, Bearer), and Bearer tokens kept until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
pub enum Challenge {
    /// `Basic realm="..."`: send a user and password.
    Basic {
        /// The realm, for messages.
        realm: String,
    },
    /// `Bearer realm="...",service="...",scope="..."`: fetch a token from `realm`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` to ask the token for.
        service: Option<String>,
        /// The `scope` the registry asked for.
        scope: Option<String>,
    },
}

/// Parses a challenge; `None` for schemes ferry does not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut map = HashMap::new();
    // key="value" pairs separated by commas; values may contain commas inside quotes.
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        map.insert(key.trim().to_ascii_lowercase(), value.to_string());
        rest = tail.trim_start_matches([',', ' ']);
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic {
            realm: map.remove("realm").unwrap_or_default(),
        }),
        "bearer" => Some(Challenge::Bearer {
            realm: map.remove("realm")?,
            service: map.remove("service"),
            scope: map.remove("scope"),
        }),
        _ => None,
    }
}

/// What a token endpoint answers (the spec's `token`, or OAuth2's `access_token`).
#[derive(serde::Deserialize)]
pub struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    /// Seconds the token lives; the spec's default is 60.
    expires_in: Option<u64>,
}

impl TokenAnswer {
    /// The token and how long it may be reused (a little less than it lives).
    pub fn into_token(self) -> Option<(String, Duration)> {
        let lives = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        let reuse = lives.saturating_sub(Duration::from_secs(10)).max(lives / 2);
        self.token.or(self.access_token).map(|t| (t, reuse))
    }
}

/// (registry, scope, credentials): what a Bearer token was issued for. The credentials are
/// part of the key, so one client's token never answers for another's.
pub type TokenKey = (String, String, Option<String>);

/// Bearer tokens, reused until they expire or are refused.
#[derive(Default)]
pub struct Tokens {
    held: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl Tokens {
    /// A token for `key` that has not expired.
    pub async fn get(&self, key: &TokenKey) -> Option<String> {
        let mut held = self.held.lock().await;
        match held.get(key) {
            Some((t, until)) if Instant::now() < *until => Some(t.clone()),
            Some(_) => {
                held.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps a token for `reuse`.
    pub async fn put(&self, key: TokenKey, token: String, reuse: Duration) {
        let mut held = self.held.lock().await;
        let now = Instant::now();
        held.retain(|_, (_, until)| *until > now);
        held.insert(key, (token, now + reuse));
    }

    /// Forgets a token the registry refused.
    pub async fn forget(&self, key: &TokenKey) {
        self.held.lock().await.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="e2e""#),
            Some(Challenge::Basic { realm: "e2e".into() })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[tokio::test]
    async fn tokens_expire() {
        let t = Tokens::default();
        let key = ("r".to_string(), "s".to_string(), None);
        // A lifetime far above any stall of a loaded machine between the put and the get.
        t.put(key.clone(), "tok".into(), Duration::from_millis(800)).await;
        assert_eq!(t.get(&key).await.as_deref(), Some("tok"));
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(t.get(&key).await, None);
        let answer: TokenAnswer = serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(answer.into_token(), Some(("a".into(), Duration::from_secs(290))));
    }
}
