//! The admin API under `/api/v1` (poem-openapi): what ferry is, what its backends are, what
//! its caches hold, and eviction. The OpenAPI document is at `/api/v1/openapi.json`, Swagger
//! UI at `/api/docs`.
//!
//! Reading follows the registry's read rules, as `/v2/_catalog` does: open unless
//! `access.auth_reads` asks for a user's credentials, and names outside `access.prefixes`
//! left out. Images of private upstream repositories (fetched with a client's own
//! credentials) are listed only to the admin token. Changing needs `admin.token` as a Bearer
//! token; with no token configured the changing endpoints answer 403 to everybody, so a ferry
//! started without thinking about it cannot be emptied by a client on the network.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use poem::http::{Method, StatusCode};
use poem::{Endpoint, EndpointExt, IntoEndpoint, Request, Response, Route};
use poem_openapi::auth::Bearer;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, OpenApiService, SecurityScheme};

use ferry_core::status;
use ferry_core::Chain;

use crate::access::{Access, Action};

/// What the admin API works on.
pub struct AdminState {
    chain: Chain,
    token: Option<String>,
    /// The registry's access rules, which reads follow.
    access: Arc<Access>,
    started: Instant,
    started_at: SystemTime,
}

impl AdminState {
    pub fn new(chain: Chain, token: Option<String>, access: Arc<Access>) -> Self {
        AdminState {
            chain,
            token: token.filter(|t| !t.is_empty()),
            access,
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }

    /// Whether `authorization` is `Bearer <admin.token>` (compared in constant time: the
    /// token is a password on the network).
    fn is_admin(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| self.is_admin_token(t.trim()))
    }

    /// Whether `token` is `admin.token`.
    fn is_admin_token(&self, token: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|expected| bool::from(subtle::ConstantTimeEq::ct_eq(token.as_bytes(), expected.as_bytes())))
    }

    /// Whether the reader may see an image or repository of this name (`registry/path`,
    /// with or without `:tag` or `@digest`).
    fn shows(&self, viewer: &Viewer, name: &str) -> bool {
        viewer.admin || name_repository(name).is_some_and(|r| self.access.allows_name(&r))
    }
}

/// Who reads: the admin (the token) sees everything; anybody else what the registry's rules
/// let them see.
#[derive(Clone, Copy)]
struct Viewer {
    admin: bool,
}

/// The repository of an image name as the caches list it: `registry/path:tag`,
/// `registry/path@digest`, or an engine's `name:tag`.
fn name_repository(name: &str) -> Option<ferry_core::Repository> {
    let name = name.split_once('@').map_or(name, |(n, _)| n);
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    ferry_core::Repository::from_request(name, None).ok()
}

/// ferry and every backend.
#[derive(Object)]
struct Status {
    version: String,
    /// Seconds since the process started.
    uptime_secs: u64,
    /// When it started, seconds since the epoch.
    started_at: u64,
    /// At least one backend can be reached (what `/readyz` says).
    ready: bool,
    /// In query order.
    backends: Vec<BackendStatus>,
}

/// One backend: what answers on its socket, how it stores images.
#[derive(Object)]
struct BackendStatus {
    name: String,
    /// `docker`, `containerd` or `push`.
    kind: String,
    reachable: bool,
    /// Why it cannot be reached or fully described.
    #[oai(skip_serializing_if_is_none)]
    error: Option<String>,
    /// Its socket, or its directory.
    location: String,
    /// `Docker Engine`, `Podman`, `containerd`.
    #[oai(skip_serializing_if_is_none)]
    product: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    version: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    api_version: Option<String>,
    /// Graph driver (`overlay2`, `vfs`), `containerd image store (…)`, or containerd's
    /// content store and namespace.
    #[oai(skip_serializing_if_is_none)]
    storage: Option<String>,
    /// Blobs read from the engine's files rather than through its API.
    direct_reads: bool,
    /// For an engine: `engine storage` (direct reads), `containerd content store` or `export`.
    #[oai(skip_serializing_if_is_none)]
    serves_from: Option<String>,
}

impl From<status::BackendStatus> for BackendStatus {
    fn from(s: status::BackendStatus) -> Self {
        BackendStatus {
            name: s.name,
            kind: s.kind,
            reachable: s.reachable,
            error: s.error,
            location: s.location,
            product: s.product,
            version: s.version,
            api_version: s.api_version,
            storage: s.storage,
            direct_reads: s.direct_reads,
            serves_from: s.serves_from,
        }
    }
}

/// An engine image held in an export cache.
#[derive(Object)]
struct CachedImage {
    /// The engine's image id.
    image_id: String,
    /// Its `name:tag`s in the engine.
    names: Vec<String>,
    /// The manifest digest served for it.
    digest: String,
    /// Bytes in the cache.
    size: u64,
    /// Last request it served, milliseconds since the epoch.
    last_used_ms: u64,
    backend: String,
}

impl From<status::CachedImage> for CachedImage {
    fn from(i: status::CachedImage) -> Self {
        CachedImage {
            image_id: i.image_id,
            names: i.names,
            digest: i.digest,
            size: i.size,
            last_used_ms: i.last_used_ms,
            backend: i.backend,
        }
    }
}

/// A repository of the push store.
#[derive(Object)]
struct Repository {
    /// `registry/path`.
    name: String,
    tags: Vec<String>,
    manifests: u64,
    /// Bytes linked in it (shared blobs count in each repository).
    size: u64,
    backend: String,
}

/// What an eviction removed.
#[derive(Object)]
struct Evicted {
    images: u64,
    /// Bytes deleted (blobs still being served, or used by a kept image, stay).
    bytes: u64,
}

/// An error, as `{"message": …}`.
#[derive(Object)]
struct Problem {
    message: String,
}

#[derive(ApiResponse)]
enum EvictResponse {
    #[oai(status = 200)]
    Ok(Json<Evicted>),
    /// No token, or a wrong one.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the security scheme, before the handler
    Unauthorized,
    /// No `admin.token` is configured: changes are off.
    #[oai(status = 403)]
    #[allow(dead_code)] // answered by `routes`' check, before the handler
    Forbidden(Json<Problem>),
    /// No cache holds that image.
    #[oai(status = 404)]
    NotFound(Json<Problem>),
    #[oai(status = 500)]
    Failed(Json<Problem>),
}

#[derive(ApiResponse)]
enum StatusResponse {
    #[oai(status = 200)]
    Ok(Json<Status>),
    /// `access.auth_reads` is on and neither a user's credentials nor the admin token came.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by `routes`' check, before the handler
    Unauthorized(Json<Problem>),
    /// Too many passwords were checked for the client's address lately.
    #[oai(status = 429)]
    #[allow(dead_code)] // answered by `routes`' check, before the handler
    TooManyRequests(Json<Problem>),
}

#[derive(ApiResponse)]
enum ListResponse<T: poem_openapi::types::ToJSON + Send + Sync> {
    #[oai(status = 200)]
    Ok(Json<Vec<T>>),
    /// `access.auth_reads` is on and neither a user's credentials nor the admin token came.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by `routes`' check, before the handler
    Unauthorized(Json<Problem>),
    /// Too many passwords were checked for the client's address lately.
    #[oai(status = 429)]
    #[allow(dead_code)] // answered by `routes`' check, before the handler
    TooManyRequests(Json<Problem>),
    #[oai(status = 500)]
    Failed(Json<Problem>),
}

/// `Authorization: Bearer <admin.token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_token")]
#[allow(dead_code)] // checked by `check_token`; the handlers need only that it passed
struct AdminToken(Bearer);

async fn check_token(req: &Request, bearer: Bearer) -> Option<Bearer> {
    let state = req.data::<Arc<AdminState>>()?;
    state.is_admin_token(&bearer.token).then_some(bearer)
}

struct Api;

fn failed(e: ferry_core::Error) -> Json<Problem> {
    Json(Problem { message: e.to_string() })
}

#[OpenApi]
impl Api {
    /// ferry's version, uptime and every backend's state.
    #[oai(path = "/status", method = "get")]
    async fn status(&self, state: poem::web::Data<&Arc<AdminState>>) -> StatusResponse {
        let mut backends = Vec::new();
        for b in state.chain.backends() {
            backends.push(BackendStatus::from(b.status().await));
        }
        StatusResponse::Ok(Json(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: state.started.elapsed().as_secs(),
            started_at: state
                .started_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ready: backends.iter().any(|b| b.reachable),
            backends,
        }))
    }

    /// The images the caches hold (the docker backend's exports, the upstream cache), most
    /// recently used first within each.
    #[oai(path = "/cache/images", method = "get")]
    async fn cached_images(
        &self,
        state: poem::web::Data<&Arc<AdminState>>,
        viewer: poem::web::Data<&Viewer>,
    ) -> ListResponse<CachedImage> {
        let mut all = Vec::new();
        for b in state.chain.backends() {
            match b.cached_images().await {
                Ok(images) => all.extend(images.into_iter().filter(|i| viewer.admin || !i.private).filter_map(
                    |mut i| {
                        // An engine image without a name is shown as its id alone.
                        let named = !i.names.is_empty();
                        i.names.retain(|n| state.shows(&viewer, n));
                        (!named || !i.names.is_empty() || viewer.admin).then(|| CachedImage::from(i))
                    },
                )),
                Err(e) => return ListResponse::Failed(failed(e)),
            }
        }
        ListResponse::Ok(Json(all))
    }

    /// Evicts one image (by image id or manifest digest; in the upstream cache also by
    /// `registry/path:tag`) from every cache. Its blobs are deleted unless another cached
    /// image uses them or they are being served.
    #[oai(path = "/cache/images/:image", method = "delete")]
    async fn evict_image(
        &self,
        state: poem::web::Data<&Arc<AdminState>>,
        image: Path<String>,
        _auth: AdminToken,
    ) -> EvictResponse {
        evict(&state, Some(&image.0)).await
    }

    /// Empties every cache (images are exported or fetched again on their next request).
    #[oai(path = "/cache", method = "delete")]
    async fn evict_all(&self, state: poem::web::Data<&Arc<AdminState>>, _auth: AdminToken) -> EvictResponse {
        evict(&state, None).await
    }

    /// The push store's repositories, with tags and sizes.
    #[oai(path = "/push/repositories", method = "get")]
    async fn repositories(
        &self,
        state: poem::web::Data<&Arc<AdminState>>,
        viewer: poem::web::Data<&Viewer>,
    ) -> ListResponse<Repository> {
        let mut all = Vec::new();
        for b in state.chain.backends() {
            match b.usage().await {
                Ok(repos) => {
                    all.extend(
                        repos
                            .into_iter()
                            .filter(|r| state.shows(&viewer, &r.name))
                            .map(|r| Repository {
                                name: r.name,
                                tags: r.tags,
                                manifests: r.manifests as u64,
                                size: r.size,
                                backend: b.name().to_string(),
                            }),
                    )
                }
                Err(e) => return ListResponse::Failed(failed(e)),
            }
        }
        ListResponse::Ok(Json(all))
    }
}

async fn evict(state: &AdminState, image: Option<&str>) -> EvictResponse {
    let mut total = Evicted { images: 0, bytes: 0 };
    for b in state.chain.backends() {
        match b.evict(image).await {
            Ok(Some(e)) => {
                total.images += e.images as u64;
                total.bytes += e.bytes;
            }
            Ok(None) => {}
            Err(e) => return EvictResponse::Failed(failed(e)),
        }
    }
    match image {
        Some(i) if total.images == 0 => EvictResponse::NotFound(Json(Problem {
            message: format!(
                "no cache holds an image {i:?} (give an image id, a manifest digest, or for the upstream cache registry/path:tag)"
            ),
        })),
        _ => EvictResponse::Ok(Json(total)),
    }
}

/// `/api/v1/…`, `/api/v1/openapi.json` and `/api/docs`, to nest under `/api`.
pub fn routes(state: Arc<AdminState>) -> impl Endpoint {
    let service = || OpenApiService::new(Api, "ferry admin API", env!("CARGO_PKG_VERSION")).server("/api/v1");
    let (api, described) = (service(), service());
    let allowed = Arc::new(Allowed::from_spec(&api.spec()));
    let spec = api.spec_endpoint();
    // Made for each request: the page carries Swagger UI's script (1.6 MB), which kept would
    // be a twentieth of what ferry holds under load.
    let docs = poem::endpoint::make_sync(move |_| poem::web::Html(described.swagger_ui_html()));
    Route::new()
        .at("/v1/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/v1", api)
        .data(state.clone())
        .around(move |ep, req| {
            let (state, allowed) = (state.clone(), allowed.clone());
            async move {
                let mut req = req;
                let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
                let authorization = req
                    .headers()
                    .get(poem::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let admin = state.is_admin(authorization.as_deref());
                // The API's own document and UI say nothing of what ferry holds.
                let described = req.uri().path().ends_with("/openapi.json") || req.uri().path().contains("/docs");
                if reads && !admin && !described {
                    let client = crate::access::client_of(&req);
                    if let Err(e) = state
                        .access
                        .check(Action::Read, None, authorization.as_deref(), client)
                        .await
                    {
                        return Ok(refused(&e));
                    }
                }
                req.extensions_mut().insert(Viewer { admin });
                if !reads && state.token.is_none() {
                    return Ok(Response::builder()
                        .status(StatusCode::FORBIDDEN)
                        .content_type("application/json")
                        .body(
                            r#"{"message":"changes through the admin API are off: set admin.token to allow them"}"#,
                        ));
                }
                let path = req.uri().path().to_string();
                let mut resp = match ep.call(req).await {
                    Ok(r) => poem::IntoResponse::into_response(r),
                    Err(e) => e.into_response(),
                };
                // RFC 9110: a 405 says which methods the resource has.
                if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
                    if let Some(v) = allowed
                        .at(&path)
                        .and_then(|m| poem::http::HeaderValue::from_str(&m).ok())
                    {
                        resp.headers_mut().insert(poem::http::header::ALLOW, v);
                    }
                }
                Ok::<Response, poem::Error>(resp)
            }
        })
        .into_endpoint()
}

/// A read the registry's rules refuse: 401 with its Basic challenge (or the admin token),
/// or 429 when its client has had too many passwords checked.
fn refused(e: &ferry_core::Error) -> Response {
    let body = serde_json::json!({
        "message": format!("{e} (a registry user's credentials, or Authorization: Bearer <admin.token>)")
    });
    if matches!(e, ferry_core::Error::TooManyRequests(_)) {
        return Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .content_type("application/json")
            .body(body.to_string());
    }
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(
            poem::http::header::WWW_AUTHENTICATE,
            format!("Basic realm=\"{}\"", crate::access::REALM),
        )
        .content_type("application/json")
        .body(body.to_string())
}

/// The methods of each path of the API, read from its own OpenAPI document.
struct Allowed(Vec<(Vec<String>, String)>);

impl Allowed {
    fn from_spec(spec: &str) -> Self {
        let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let mut out = Vec::new();
        if let Some(paths) = doc["paths"].as_object() {
            for (path, ops) in paths {
                let mut methods: Vec<String> = ops
                    .as_object()
                    .map(|o| o.keys().map(|m| m.to_ascii_uppercase()).collect())
                    .unwrap_or_default();
                if methods.iter().any(|m| m == "GET") {
                    methods.push("HEAD".into());
                }
                out.push((path.split('/').map(str::to_string).collect(), methods.join(", ")));
            }
        }
        Allowed(out)
    }

    /// The methods of `path` (`/v1/...` where the API is nested, or `/api/v1/...`);
    /// `{param}` segments match any one segment.
    fn at(&self, path: &str) -> Option<String> {
        let rel: Vec<&str> = path
            .strip_prefix("/api")
            .unwrap_or(path)
            .strip_prefix("/v1")?
            .split('/')
            .collect();
        self.0.iter().find_map(|(pattern, methods)| {
            let same =
                pattern.len() == rel.len() && pattern.iter().zip(&rel).all(|(p, r)| p.starts_with('{') || p == r);
            same.then(|| methods.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_caches_list_them_give_their_repository() {
        let canonical = |n: &str| name_repository(n).map(|r| r.canonical());
        assert_eq!(canonical("alpine:3.19").as_deref(), Some("docker.io/library/alpine"));
        assert_eq!(canonical("team/app").as_deref(), Some("docker.io/team/app"));
        assert_eq!(
            canonical("localhost:5000/team/app:v1").as_deref(),
            Some("localhost:5000/team/app")
        );
        assert_eq!(
            canonical("127.0.0.2:5000/team/app").as_deref(),
            Some("127.0.0.2:5000/team/app")
        );
        let digest = format!("ghcr.io/org/tool@sha256:{}", "a".repeat(64));
        assert_eq!(canonical(&digest).as_deref(), Some("ghcr.io/org/tool"));
        assert_eq!(canonical("Not A Name"), None);
    }
}
