//! The one client ferry uses to fetch from other registries — the containerd backend's heal
//! and the upstream backend: the anonymous, Basic and Bearer-token flows of the distribution
//! spec, per-host settings (plain HTTP, CA, endpoint, ferry's own credentials), and the
//! origin policy on every connection.

pub mod auth;
pub mod hosts;

use std::collections::HashMap;
use std::sync::Arc;

use reqwest::header::{HeaderName, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use ferry_core::error::with_causes;
use ferry_core::origin::{OriginPolicy, PUBLIC_REGISTRIES};
use ferry_core::{media, Digest, Error, Repository, Result, DOCKER_HUB};

use crate::outbound;
use auth::{parse_challenge, Challenge, TokenAnswer, Tokens};
pub use hosts::{ClientSettings, HostConfig};

/// The length an origin declares in `Content-Length`, read from the header itself: for a
/// `HEAD` answer `reqwest::Response::content_length` is the (empty) body's, always 0
/// (reqwest#1814).
pub fn declared_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// What to fetch from a repository.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A blob by digest.
    Blob(&'a Digest),
    /// A manifest by tag or digest.
    Manifest(&'a str),
    /// A page of the repository's tag list: `n` tags after `last`.
    Tags {
        /// The last tag of the page before.
        last: Option<&'a str>,
        /// Tags per page.
        n: usize,
    },
}

/// One request to a registry, before its auth flow.
struct Request<'a> {
    method: Method,
    registry: &'a str,
    url: &'a str,
    /// Query parameters besides `ns`.
    query: Vec<(&'static str, String)>,
    /// Asked at an endpoint in front of the registry: `?ns=<registry>` goes with it.
    via_endpoint: bool,
    /// The token scope (`repository:<path>:pull`); none for `/v2/`.
    scope: Option<String>,
    /// A manifest: the media types ferry reads go in `Accept`.
    manifest: bool,
    headers: &'a [(HeaderName, String)],
}

/// A client for origin registries; one per backend, shared by its requests.
pub struct RegistryClient {
    http: reqwest::Client,
    /// Clients for hosts with a CA of their own.
    http_by_host: HashMap<String, reqwest::Client>,
    settings: ClientSettings,
    /// ferry's own `Authorization` per host.
    credentials: HashMap<String, String>,
    policy: Arc<OriginPolicy>,
    tokens: Tokens,
}

fn read_ca(path: &std::path::Path) -> Result<reqwest::Certificate> {
    let pem = std::fs::read(path).map_err(|e| Error::io(format!("reading CA file {}", path.display()), e))?;
    reqwest::Certificate::from_pem(&pem).map_err(|e| Error::Internal(format!("CA file {}: {e}", path.display())))
}

fn unavailable(registry: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: "origin".into(),
        reason: format!("registry {registry}: {e}"),
    }
}

/// How much of an unexpected answer's body goes into the error.
const SAID_BYTES: usize = 200;

/// The start of an unexpected answer's body (`": ..."`, printable, on one line), for the
/// log: what the origin said about it — a registry's error JSON, or Go's "Client sent an
/// HTTP request to an HTTPS server." from a TLS registry asked over plain HTTP. Read for at
/// most two seconds.
async fn said(mut resp: Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while body.len() < SAID_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(SAID_BYTES - body.len())]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    let text = String::from_utf8_lossy(&body);
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        String::new()
    } else {
        format!(": {}", words.join(" "))
    }
}

/// The registry's refusal, with its own challenge so the client can answer it.
fn refused(registry: &str, challenge: Option<String>, had_credentials: bool) -> Error {
    Error::Unauthorized {
        realm: registry.to_string(),
        message: if had_credentials {
            format!("registry {registry} refused the credentials")
        } else {
            format!("registry {registry} needs credentials")
        },
        challenge,
    }
}

fn is_basic(authorization: &str) -> bool {
    authorization.len() > 6 && authorization[..6].eq_ignore_ascii_case("basic ")
}

fn is_bearer(authorization: &str) -> bool {
    authorization.len() > 7 && authorization[..7].eq_ignore_ascii_case("bearer ")
}

impl RegistryClient {
    /// A client with `settings`, connecting only where `policy` allows. Fails on a CA file
    /// or a password file that cannot be read, or a Docker config.json that is not one.
    pub fn new(settings: ClientSettings, policy: Arc<OriginPolicy>) -> Result<Self> {
        let global_ca = settings.ca_file.as_deref().map(read_ca).transpose()?;
        let build = |extra: Option<reqwest::Certificate>| -> Result<reqwest::Client> {
            let mut b = outbound::client_builder(policy.clone());
            for cert in global_ca.iter().cloned().chain(extra) {
                b = b.add_root_certificate(cert);
            }
            b.build().map_err(|e| Error::Internal(format!("HTTP client: {e}")))
        };
        let mut http_by_host = HashMap::new();
        for (host, c) in &settings.hosts {
            if let Some(ca) = &c.ca_file {
                http_by_host.insert(host.clone(), build(Some(read_ca(ca)?))?);
            }
        }
        Ok(RegistryClient {
            http: build(None)?,
            http_by_host,
            credentials: settings.credentials()?,
            settings,
            policy,
            tokens: Tokens::default(),
        })
    }

    /// The policy every fetch obeys.
    pub fn policy(&self) -> &OriginPolicy {
        &self.policy
    }

    /// Where a registry's API lives, and whether that is an endpoint in front of it (which
    /// then gets `?ns=`).
    fn base_url(&self, registry: &str) -> (String, bool) {
        let host_config = self.settings.host(registry);
        if let Some(endpoint) = host_config.and_then(|c| c.endpoint.as_deref()) {
            return (endpoint.trim_end_matches('/').to_string(), true);
        }
        if registry == DOCKER_HUB {
            return ("https://registry-1.docker.io".into(), false);
        }
        let (host, _) = ferry_core::origin::split_host(registry);
        let loopback = host == "localhost" || host.starts_with("127.") || host == "::1";
        let plain = match host_config {
            Some(HostConfig {
                plain_http: Some(plain),
                ..
            }) => *plain,
            Some(HostConfig { ca_file: Some(_), .. }) => false,
            _ => loopback || self.settings.plain_http.iter().any(|h| h == registry || h == host),
        };
        (format!("{}://{registry}", if plain { "http" } else { "https" }), false)
    }

    fn http(&self, registry: &str) -> &reqwest::Client {
        self.http_by_host
            .get(registry)
            .or_else(|| self.http_by_host.get(ferry_core::origin::split_host(registry).0))
            .unwrap_or(&self.http)
    }

    /// The `host` label of metrics: a host the config or the public list names, else
    /// "other" (a client choosing origins must not grow the label set without bound).
    pub fn metric_host(&self, registry: &str) -> String {
        if self.settings.host(registry).is_some()
            || PUBLIC_REGISTRIES.contains(&registry)
            || self.settings.metric_hosts.iter().any(|h| h == registry)
        {
            registry.to_string()
        } else {
            "other".to_string()
        }
    }

    /// `GET` or `HEAD` of a blob or manifest of `repo` at its registry. `None` when the
    /// registry does not have it (or the policy does not allow the registry: logged).
    /// Credentials: ferry's own for the host when it has them, else the client's
    /// `authorization`, used for Basic challenges and token requests, or sent as is when it
    /// is a Bearer token (one the client got after a challenge ferry passed on). A refusal is
    /// [`Error::Unauthorized`] carrying the registry's challenge.
    pub async fn fetch(
        &self,
        method: Method,
        repo: &Repository,
        target: Target<'_>,
        headers: &[(HeaderName, String)],
        authorization: Option<&str>,
    ) -> Result<Option<Response>> {
        let registry = repo.registry();
        if let Err(reason) = self.policy.check_registry(registry) {
            tracing::warn!(origin = %repo, ?target, %reason, "not fetching from this origin");
            return Ok(None);
        }
        let (base, via_endpoint) = self.base_url(registry);
        let path = match self
            .settings
            .host(registry)
            .and_then(|c| c.repository_prefix.as_deref())
        {
            Some(prefix) if via_endpoint => format!("{}/{}", prefix.trim_matches('/'), repo.path()),
            _ => repo.path().to_string(),
        };
        let mut query = Vec::new();
        let url = match target {
            Target::Blob(d) => format!("{base}/v2/{path}/blobs/{d}"),
            Target::Manifest(r) => format!("{base}/v2/{path}/manifests/{r}"),
            Target::Tags { last, n } => {
                query.push(("n", n.to_string()));
                query.extend(last.map(|l| ("last", l.to_string())));
                format!("{base}/v2/{path}/tags/list")
            }
        };
        let request = Request {
            method,
            registry,
            url: &url,
            query,
            via_endpoint,
            scope: Some(format!("repository:{path}:pull")),
            manifest: matches!(target, Target::Manifest(_)),
            headers,
        };
        self.send(request, authorization).await
    }

    /// `GET /v2/` of a registry with ferry's own credentials, as a client would check it
    /// before a pull: `Ok(true)` when it answered with those credentials, `Ok(false)` when it
    /// answered without any (anonymous, or a token the token endpoint gives anyone); `None`
    /// when `/v2/` is not there. A refusal is [`Error::Unauthorized`], anything else
    /// [`Error::Unavailable`] saying why (connection, TLS, status).
    pub async fn ping(&self, registry: &str) -> Result<Option<bool>> {
        self.policy
            .check_registry(registry)
            .map_err(|reason| unavailable(registry, format!("not contacted: {reason}")))?;
        let (base, via_endpoint) = self.base_url(registry);
        let url = format!("{base}/v2/");
        let request = Request {
            method: Method::GET,
            registry,
            url: &url,
            query: Vec::new(),
            via_endpoint,
            scope: None,
            manifest: false,
            headers: &[],
        };
        let answered = self.send(request, None).await?;
        Ok(answered.map(|_| self.credentials.contains_key(registry)))
    }

    /// Whether ferry has credentials of its own for `registry` (a client's are then not
    /// sent there).
    pub fn has_credentials(&self, registry: &str) -> bool {
        self.credentials.contains_key(registry)
    }

    /// Where the registry's API is asked (an endpoint in front of it, or the registry).
    pub fn api_url(&self, registry: &str) -> String {
        self.base_url(registry).0
    }

    /// Sends `r` through the registry's auth flow (see [`RegistryClient::fetch`]).
    async fn send(&self, r: Request<'_>, authorization: Option<&str>) -> Result<Option<Response>> {
        let registry = r.registry;
        let creds = self.credentials.get(registry).map(String::as_str).or(authorization);
        let scope = r.scope.clone().unwrap_or_default();
        let key = (registry.to_string(), scope.clone(), creds.map(str::to_string));
        let mut auth = match creds {
            Some(c) if is_bearer(c) => Some(c.to_string()),
            _ => self.tokens.get(&key).await.map(|t| format!("Bearer {t}")),
        };
        let mut tried_basic = false;
        let mut fetched_token = false;
        let host_label = self.metric_host(registry);
        loop {
            let mut req = self.http(registry).request(r.method.clone(), r.url);
            if r.via_endpoint {
                req = req.query(&[("ns", registry)]);
            }
            if !r.query.is_empty() {
                req = req.query(&r.query);
            }
            if r.manifest {
                req = req.header(ACCEPT, media::MANIFEST_TYPES.join(", "));
            }
            for (name, value) in r.headers {
                req = req.header(name, value);
            }
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    ferry_core::metrics::upstream_request(&host_label, "error");
                    return Err(unavailable(registry, with_causes(&e)));
                }
            };
            ferry_core::metrics::upstream_request(&host_label, resp.status().as_str());
            match resp.status() {
                s if s.is_success() => return Ok(Some(resp)),
                StatusCode::NOT_FOUND => return Ok(None),
                StatusCode::UNAUTHORIZED => {
                    let raw = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let basic_creds = creds.filter(|c| is_basic(c));
                    match raw.as_deref().and_then(parse_challenge) {
                        Some(Challenge::Basic { .. }) if !tried_basic && basic_creds.is_some() => {
                            tried_basic = true;
                            auth = basic_creds.map(str::to_string);
                        }
                        Some(Challenge::Bearer {
                            realm,
                            service,
                            scope: s,
                        }) if !fetched_token && !creds.is_some_and(is_bearer) => {
                            self.tokens.forget(&key).await;
                            fetched_token = true;
                            let wanted = s.or_else(|| r.scope.clone());
                            let token = self
                                .token(
                                    registry,
                                    &realm,
                                    service.as_deref(),
                                    wanted.as_deref(),
                                    basic_creds,
                                    raw.clone(),
                                )
                                .await?;
                            self.tokens.put(key.clone(), token.0.clone(), token.1).await;
                            auth = Some(format!("Bearer {}", token.0));
                        }
                        _ => {
                            self.tokens.forget(&key).await;
                            return Err(refused(registry, raw, creds.is_some()));
                        }
                    }
                }
                StatusCode::FORBIDDEN => {
                    return Err(Error::Denied(format!(
                        "registry {registry} refused access to {}",
                        r.url
                    )));
                }
                s => {
                    let said = said(resp).await;
                    return Err(unavailable(
                        registry,
                        format!("{} {} answered {s}{said}", r.method, r.url),
                    ));
                }
            }
        }
    }

    /// Fetches a Bearer token from the realm, with Basic credentials when there are any;
    /// a refusal is the registry's own `challenge`.
    async fn token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
        basic_creds: Option<&str>,
        challenge: Option<String>,
    ) -> Result<(String, std::time::Duration)> {
        let url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| unavailable(registry, format!("token realm {realm:?} is not an http(s) URL")))?;
        let realm_host = outbound::authority(&url);
        // A token endpoint on the registry's own host (another port) is the registry's.
        let same_host = ferry_core::origin::split_host(&realm_host).0 == ferry_core::origin::split_host(registry).0;
        if let Some(ip) = outbound::literal_ip(&url).filter(|_| !same_host) {
            self.policy
                .check_address(&realm_host, ip)
                .map_err(|reason| unavailable(registry, format!("token realm {realm}: {reason}")))?;
        }
        let mut req = self.http(registry).get(url);
        if let Some(s) = scope {
            req = req.query(&[("scope", s)]);
        }
        if let Some(s) = service {
            req = req.query(&[("service", s)]);
        }
        // Credentials sent for this registry go to its token endpoint only when that is in
        // the registry's own domain.
        match basic_creds {
            Some(a) if self.policy.credentials_may_go(registry, &realm_host) => req = req.header(AUTHORIZATION, a),
            Some(_) => tracing::warn!(%registry, %realm,
                "the registry's token endpoint is outside its domain: asking it without credentials"),
            None => {}
        }
        let resp = req.send().await.map_err(|e| unavailable(registry, with_causes(&e)))?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(refused(registry, challenge, basic_creds.is_some()));
        }
        if !resp.status().is_success() {
            return Err(unavailable(
                registry,
                format!("token endpoint {realm} answered {}", resp.status()),
            ));
        }
        let answer: TokenAnswer = resp
            .json()
            .await
            .map_err(|e| unavailable(registry, format!("token answer: {e}")))?;
        answer
            .into_token()
            .ok_or_else(|| unavailable(registry, "token answer without a token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_each_registry_is_asked() {
        let mut hosts = std::collections::BTreeMap::new();
        hosts.insert(
            "ghcr.io".to_string(),
            HostConfig {
                endpoint: Some("https://mirror.example.com/".into()),
                ..HostConfig::default()
            },
        );
        hosts.insert(
            "reg.lan".to_string(),
            HostConfig {
                plain_http: Some(true),
                ..HostConfig::default()
            },
        );
        let settings = ClientSettings {
            hosts,
            plain_http: vec!["old.lan:5000".into()],
            ..ClientSettings::default()
        };
        let mut settings = settings;
        settings.hosts.insert(
            "127.0.0.6:5000".to_string(),
            HostConfig {
                plain_http: Some(false),
                ..HostConfig::default()
            },
        );
        let c = RegistryClient::new(settings.clone(), Arc::new(OriginPolicy::default())).unwrap();
        let base = |r: &str| c.base_url(r);
        assert_eq!(base("127.0.0.1:5000"), ("http://127.0.0.1:5000".into(), false));
        assert_eq!(base("localhost:5000"), ("http://localhost:5000".into(), false));
        assert_eq!(base("127.0.0.6:5000"), ("https://127.0.0.6:5000".into(), false));
        assert_eq!(base("old.lan:5000"), ("http://old.lan:5000".into(), false));
        assert_eq!(base("reg.lan:5000"), ("http://reg.lan:5000".into(), false));
        assert_eq!(base("quay.io"), ("https://quay.io".into(), false));
        assert_eq!(base("docker.io"), ("https://registry-1.docker.io".into(), false));
        assert_eq!(base("ghcr.io"), ("https://mirror.example.com".into(), true));
        let mut named = settings.named_hosts();
        named.sort();
        assert_eq!(
            named,
            [
                "127.0.0.6:5000",
                "ghcr.io",
                "mirror.example.com",
                "old.lan:5000",
                "reg.lan"
            ]
        );
        assert_eq!(c.metric_host("ghcr.io"), "ghcr.io");
        assert_eq!(c.metric_host("random.example:1234"), "other");
    }
}
