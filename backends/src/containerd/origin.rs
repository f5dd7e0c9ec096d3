//! A minimal registry client for fetching one blob from an image's origin registry, with the
//! anonymous, Basic and Bearer-token flows of the distribution spec, using the credentials the
//! client sent to ferry.

use std::collections::HashMap;
use std::sync::Arc;

use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::Mutex;

use ferry_core::error::with_causes;
use ferry_core::origin::OriginPolicy;
use ferry_core::{Digest, Error, Repository, Result, DOCKER_HUB};

use crate::outbound;

/// Settings for reaching origin registries.
#[derive(Clone, Debug, Default)]
pub struct OriginSettings {
    /// Hosts reached over plain HTTP (loopback hosts always are).
    pub plain_http: Vec<String>,
    /// Extra CA certificate (PEM) to trust.
    pub ca_file: Option<std::path::PathBuf>,
}

/// (registry, scope, client credentials): what a Bearer token was issued for.
type TokenKey = (String, String, Option<String>);

pub struct Origins {
    http: reqwest::Client,
    settings: OriginSettings,
    policy: Arc<OriginPolicy>,
    /// Bearer tokens, reused until they are refused.
    tokens: Mutex<HashMap<TokenKey, String>>,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
enum Challenge {
    Basic {
        realm: String,
    },
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

fn parse_challenge(header: &str) -> Option<Challenge> {
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

impl Origins {
    pub fn new(settings: OriginSettings, policy: Arc<OriginPolicy>) -> Result<Self> {
        let mut builder = outbound::client_builder(policy.clone());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::io(format!("reading CA file {}", ca.display()), e))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Internal(format!("CA file {}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        Ok(Origins {
            http,
            settings,
            policy,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Where a registry's API lives.
    fn base_url(&self, registry: &str) -> String {
        if registry == DOCKER_HUB {
            return "https://registry-1.docker.io".into();
        }
        let host = registry.rsplit_once(':').map(|(h, _)| h).unwrap_or(registry);
        let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
        let plain = loopback || self.settings.plain_http.iter().any(|h| h == registry || h == host);
        format!("{}://{registry}", if plain { "http" } else { "https" })
    }

    fn unavailable(registry: &str, e: impl std::fmt::Display) -> Error {
        Error::Unavailable {
            backend: "origin".into(),
            reason: format!("registry {registry}: {e}"),
        }
    }

    /// `GET` (or `HEAD`) of a blob at its origin. `None` when the registry does not have it.
    /// `authorization` is the client's own header, passed on for Basic challenges and token
    /// requests; a refusal becomes [`Error::Unauthorized`].
    pub async fn blob(
        &self,
        method: Method,
        repo: &Repository,
        digest: &Digest,
        authorization: Option<&str>,
    ) -> Result<Option<Response>> {
        let registry = repo.registry();
        if let Err(reason) = self.policy.check_registry(registry) {
            tracing::warn!(origin = %repo, %digest, %reason, "not fetching from this origin");
            return Ok(None);
        }
        let url = format!("{}/v2/{}/blobs/{digest}", self.base_url(registry), repo.path());
        let scope = format!("repository:{}:pull", repo.path());
        let key = (registry.to_string(), scope.clone(), authorization.map(str::to_string));
        let cached = self.tokens.lock().await.get(&key).cloned();
        let mut auth = cached.map(|t| format!("Bearer {t}"));
        for attempt in 0..3 {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Self::unavailable(registry, with_causes(&e)))?;
            match resp.status() {
                s if s.is_success() => return Ok(Some(resp)),
                StatusCode::NOT_FOUND => return Ok(None),
                StatusCode::UNAUTHORIZED if attempt < 2 => {
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_challenge);
                    auth = match challenge {
                        Some(Challenge::Basic { realm }) => match authorization {
                            Some(a) if auth.as_deref() != Some(a) => Some(a.to_string()),
                            _ => return Err(refused(registry, &realm, authorization.is_some())),
                        },
                        Some(Challenge::Bearer {
                            realm,
                            service,
                            scope: s,
                        }) => {
                            let token = self
                                .token(
                                    registry,
                                    &realm,
                                    service.as_deref(),
                                    s.as_deref().unwrap_or(&scope),
                                    authorization,
                                )
                                .await?;
                            self.tokens.lock().await.insert(key.clone(), token.clone());
                            Some(format!("Bearer {token}"))
                        }
                        None => return Err(refused(registry, registry, authorization.is_some())),
                    };
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    self.tokens.lock().await.remove(&key);
                    return Err(refused(registry, registry, authorization.is_some()));
                }
                s => return Err(Self::unavailable(registry, format!("{method} {url} answered {s}"))),
            }
        }
        Err(refused(registry, registry, authorization.is_some()))
    }

    /// Fetches a Bearer token from the realm, with the client's credentials when it sent any.
    async fn token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        authorization: Option<&str>,
    ) -> Result<String> {
        let url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Self::unavailable(registry, format!("token realm {realm:?} is not an http(s) URL")))?;
        let realm_host = outbound::authority(&url);
        if let Some(ip) = outbound::literal_ip(&url) {
            self.policy
                .check_address(&realm_host, ip)
                .map_err(|reason| Self::unavailable(registry, format!("token realm {realm}: {reason}")))?;
        }
        let mut req = self.http.get(url).query(&[("scope", scope)]);
        if let Some(s) = service {
            req = req.query(&[("service", s)]);
        }
        // The client's credentials were sent for this registry: they go to its token
        // endpoint only when that is in the registry's own domain.
        match authorization {
            Some(a) if self.policy.credentials_may_go(registry, &realm_host) => req = req.header(AUTHORIZATION, a),
            Some(_) => tracing::warn!(%registry, %realm,
                "the registry's token endpoint is outside its domain: asking it without the client's credentials"),
            None => {}
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Self::unavailable(registry, with_causes(&e)))?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(refused(registry, realm, authorization.is_some()));
        }
        if !resp.status().is_success() {
            return Err(Self::unavailable(
                registry,
                format!("token endpoint {realm} answered {}", resp.status()),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = resp
            .json()
            .await
            .map_err(|e| Self::unavailable(registry, format!("token answer: {e}")))?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| Self::unavailable(registry, "token answer without a token"))
    }
}

fn refused(registry: &str, realm: &str, had_credentials: bool) -> Error {
    Error::Unauthorized {
        realm: realm.to_string(),
        message: if had_credentials {
            format!("registry {registry} refused the credentials")
        } else {
            format!("registry {registry} needs credentials")
        },
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

    #[test]
    fn loopback_is_plain_http() {
        let o = Origins::new(
            OriginSettings {
                plain_http: vec!["reg.lan:5000".into()],
                ca_file: None,
            },
            Arc::new(OriginPolicy::default()),
        )
        .unwrap();
        assert_eq!(o.base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(o.base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(o.base_url("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(o.base_url("ghcr.io"), "https://ghcr.io");
        assert_eq!(o.base_url("docker.io"), "https://registry-1.docker.io");
    }
}
