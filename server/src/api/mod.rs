//! The OCI Distribution API (v1.1) over HTTP. One `/v2/*` route; [`route::parse`] turns the
//! path into a [`route::Resource`], [`dispatch`] picks the handler by target and method.

mod blobs;
mod body;
pub mod error;
mod lists;
mod log;
mod manifests;
pub mod route;
mod uploads;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use poem::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use poem::{handler, web::Data, Body, EndpointExt, IntoEndpoint, Request, Response, Route};
use serde::Deserialize;

use ferry_core::{Chain, Error, Registry, Repository, RequestCtx};

use error::{ApiError, ApiResult};
use route::Resource;

/// Header naming the backend that answered, for logs and for users debugging a pull.
pub const BACKEND_HEADER: &str = "Ferry-Backend";

/// What every handler shares.
pub struct AppState {
    pub chain: Chain,
    /// Who may do what.
    pub access: Arc<crate::access::Access>,
    next_request: AtomicU64,
    /// A request body that sends nothing for this long fails (and frees its upload).
    body_idle: std::time::Duration,
}

impl AppState {
    pub fn new(chain: Chain, access: Arc<crate::access::Access>, body_idle: std::time::Duration) -> Self {
        AppState {
            chain,
            access,
            next_request: AtomicU64::new(1),
            body_idle,
        }
    }

    /// The writable backend, or [`Error::Unsupported`] when the chain has none.
    fn registry(&self) -> ApiResult<(String, Arc<dyn Registry>)> {
        self.chain
            .registry()
            .ok_or_else(|| ApiError(Error::Unsupported("no push backend is configured".into())))
    }
}

/// The query parameters any API request may carry.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Query {
    ns: Option<String>,
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
}

/// One request as the handlers see it.
struct Call<'a> {
    req: &'a Request,
    query: Query,
    ctx: RequestCtx,
}

impl Call<'_> {
    fn repo(&self, name: &str) -> ApiResult<Repository> {
        Ok(Repository::from_request(name, self.query.ns.as_deref())?)
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.req.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn is_head(&self) -> bool {
        self.req.method() == Method::HEAD
    }
}

/// Builds the HTTP application: the API under `/v2` (and the admin API under `/api` when
/// it is served here), with one log line per request.
pub fn app(state: Arc<AppState>, admin: Option<Arc<crate::admin::AdminState>>) -> impl poem::Endpoint {
    std::sync::LazyLock::force(&STARTED);
    let mut route = Route::new();
    if let Some(admin) = admin {
        route = route.nest("/api", crate::admin::routes(admin));
    }
    route
        .at("/v2", v2)
        .at("/v2/*", v2)
        .at("/healthz", healthz)
        .at("/readyz", readyz)
        .at("/metrics", metrics)
        .data(state)
        .around(log::log_request)
        .into_endpoint()
}

/// The admin API alone (with `/healthz` and `/metrics`), for its own listener.
pub fn admin_app(admin: Arc<crate::admin::AdminState>) -> impl poem::Endpoint {
    Route::new()
        .nest("/api", crate::admin::routes(admin))
        .at("/healthz", healthz)
        .at("/metrics", metrics)
        .around(log::log_request)
        .into_endpoint()
}

/// When the application was built: the uptime `/healthz` reports.
static STARTED: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(std::time::Instant::now);

/// `ok`, with `Ferry-Version` and `Ferry-Uptime` (seconds): `ferry doctor` tells a running
/// ferry from another program on its port by them.
#[handler]
fn healthz() -> Response {
    Response::builder()
        .header("Ferry-Version", env!("CARGO_PKG_VERSION"))
        .header("Ferry-Uptime", STARTED.elapsed().as_secs().to_string())
        .body("ok\n")
}

/// Ready when at least one backend can be reached (an engine answers, containerd answers,
/// the push store is there); 503 with the names of the unreachable ones otherwise.
#[handler]
async fn readyz(Data(state): Data<&Arc<AppState>>) -> Response {
    let (ready, down) = state.chain.readiness().await;
    if ready.is_empty() {
        Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(format!("no backend is reachable: {}\n", down.join(", ")))
    } else {
        Response::builder().body(format!("ready: {}\n", ready.join(", ")))
    }
}

/// Prometheus text format.
#[handler]
fn metrics() -> Response {
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(ferry_core::metrics::render())
}

#[handler]
async fn v2(req: &Request, body: Body, Data(state): Data<&Arc<AppState>>) -> Response {
    let query: Query = req.params().unwrap_or_default();
    let ctx = RequestCtx {
        request_id: format!("{:x}", state.next_request.fetch_add(1, Ordering::Relaxed)),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        mirror_for: query.ns.clone(),
        client: crate::access::client_of(req),
    };
    let mut call = Call { req, query, ctx };
    let allowed = match check_access(&call, state).await {
        Ok(own_credentials) => {
            if own_credentials {
                // ferry's own credentials are not the client's credentials for an origin.
                call.ctx.authorization = None;
            }
            Ok(())
        }
        Err(e) => Err(e),
    };
    let outcome = match allowed {
        Ok(()) => dispatch(&call, body, state).await,
        Err(e) => Err(e),
    };
    let mut resp = match outcome {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = poem::IntoResponse::into_response(e);
            if may_leave_body_unread(req) {
                // The body may not have been read to its end (an upload refused half-way):
                // the connection cannot carry another request, and the client must know
                // before it reuses it.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    if call.query.ns.is_some() {
        // The spec asks a proxy to echo the namespace it served.
        if let Some(v) = call.query.ns.as_deref().and_then(|n| HeaderValue::from_str(n).ok()) {
            resp.headers_mut().insert("OCI-Namespace", v);
        }
    }
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// Whether `req` is an HTTP/1 request with a body, which an error answer may leave unread.
fn may_leave_body_unread(req: &Request) -> bool {
    let headers = req.headers();
    req.version() <= poem::http::Version::HTTP_11
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim() != "0"))
}

/// Applies the access rules to a request; `true` when it carried ferry's own credentials.
async fn check_access(call: &Call<'_>, state: &AppState) -> ApiResult<bool> {
    let path = call.req.uri().path();
    let name = match route::parse(path) {
        Some(Resource::Tags { name })
        | Some(Resource::Manifest { name, .. })
        | Some(Resource::Blob { name, .. })
        | Some(Resource::Uploads { name })
        | Some(Resource::Upload { name, .. })
        | Some(Resource::Referrers { name, .. }) => Some(name),
        _ => None,
    };
    // A name that does not parse is the handler's to refuse (NAME_INVALID).
    let repo = name.and_then(|n| call.repo(n).ok());
    let action = match *call.req.method() {
        _ if matches!(route::parse(path), Some(Resource::Base)) => crate::access::Action::Ping,
        Method::GET | Method::HEAD => crate::access::Action::Read,
        _ => crate::access::Action::Write,
    };
    let authorization = call.header(header::AUTHORIZATION);
    Ok(state
        .access
        .check(action, repo.as_ref(), authorization, call.ctx.client)
        .await?)
}

async fn dispatch(call: &Call<'_>, body: Body, state: &AppState) -> ApiResult {
    let path = call.req.uri().path();
    let Some(target) = route::parse(path) else {
        return Err(Error::NameInvalid(format!("no registry API at {path}")).into());
    };
    let method = call.req.method();
    let get = method == Method::GET || method == Method::HEAD;
    match target {
        Resource::Base if get => Ok(Response::builder().content_type("application/json").body("{}")),
        Resource::Catalog if get => lists::catalog(call, state).await,
        Resource::Tags { name } if get => lists::tags(call, state, name).await,
        Resource::Referrers { name, digest } if get => lists::referrers(call, state, name, &digest).await,
        Resource::Manifest { name, reference } => match *method {
            Method::GET | Method::HEAD => manifests::get(call, state, name, &reference).await,
            Method::PUT => manifests::put(call, state, name, &reference, body).await,
            Method::DELETE => manifests::delete(call, state, name, &reference).await,
            _ => Err(not_allowed(method)),
        },
        Resource::Blob { name, digest } => match *method {
            Method::GET | Method::HEAD => blobs::get(call, state, name, &digest).await,
            Method::DELETE => blobs::delete(call, state, name, &digest).await,
            _ => Err(not_allowed(method)),
        },
        Resource::Uploads { name } if method == Method::POST => uploads::start(call, state, name, body).await,
        Resource::Upload { name, id } => match *method {
            Method::GET => uploads::status(call, state, name, id).await,
            Method::PATCH => uploads::patch(call, state, name, id, body).await,
            Method::PUT => uploads::finish(call, state, name, id, body).await,
            Method::DELETE => uploads::cancel(call, state, name, id).await,
            _ => Err(not_allowed(method)),
        },
        _ => Err(not_allowed(method)),
    }
}

fn not_allowed(method: &Method) -> ApiError {
    ApiError(Error::Unsupported(format!("{method} is not supported on this path")))
}

/// Sets a header from a string that came from our own data (digests, names, numbers).
fn set(headers: &mut HeaderMap, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        headers.insert(name, v);
    }
}

/// A response with an empty body and a status.
fn empty(status: StatusCode) -> Response {
    Response::builder().status(status).body(Body::empty())
}
