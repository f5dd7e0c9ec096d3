//! ferry's HTTP side as a library: the OCI Distribution API (`/v2`), the admin API (`/api`),
//! `/metrics`, `/healthz` and `/readyz` over a [`Chain`] — one built from the config file
//! ([`build_chain`]) or from code (`examples/embedded.rs`).

#![warn(missing_docs)]

pub mod access;
mod admin;
mod api;
pub mod config;
mod guesses;
mod listen;
mod send_timeout;
mod stalled_streams;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use ferry_core::Chain;

pub use listen::Limits;

/// What `ferry --version` prints: the package version and the commit it was built from
/// (`build.rs`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BUILT_COMMIT"), ")");

/// How [`serve`] serves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Timeouts, connections at once, shutdown grace.
    pub limits: Limits,
    /// A request body that sends nothing for this long fails.
    pub body_idle: Duration,
    /// Bearer token of the admin API's changing endpoints; `None`: they answer 403.
    pub admin_token: Option<String>,
    /// Whether the admin API is served beside the registry API (else see [`serve_admin`]).
    pub admin_beside: bool,
    /// Read-only mode, Basic auth, the prefix allow-list.
    pub access: Arc<access::Access>,
    /// Serve HTTPS with this (see [`tls::server_config`]: a certificate reloaded when its
    /// files change).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Options {
    fn default() -> Self {
        Options::from(&config::ServerConfig::default())
    }
}

impl From<&config::ServerConfig> for Options {
    fn from(server: &config::ServerConfig) -> Self {
        Options {
            limits: Limits {
                header_timeout: Duration::from_secs(server.header_timeout_secs.max(1)),
                max_connections: server.max_connections,
                grace: Duration::from_secs(server.shutdown_grace_secs),
                send_timeout: Duration::from_secs(server.send_timeout_secs.max(1)),
                send_buffer: usize::try_from(server.send_buffer.bytes()).unwrap_or(usize::MAX),
            },
            body_idle: Duration::from_secs(server.body_idle_timeout_secs.max(1)),
            admin_token: None,
            admin_beside: true,
            tls: None,
            access: Arc::new(access::Access::open()),
        }
    }
}

/// Serves `chain` on `listener` until `shutdown` resolves, then lets requests under way
/// finish for up to `options.limits.grace`.
pub async fn serve(
    chain: Chain,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> std::io::Result<()> {
    let admin = options.admin_beside.then(|| {
        Arc::new(admin::AdminState::new(
            chain.clone(),
            options.admin_token.clone(),
            options.access.clone(),
        ))
    });
    let app = api::app(
        Arc::new(api::AppState::new(chain, options.access.clone(), options.body_idle)),
        admin,
    );
    listen::serve(listener, app, shutdown, options.limits, options.tls).await
}

/// Serves the admin API alone (with `/healthz` and `/metrics`) on `listener`, for an
/// `admin.addr` of its own.
pub async fn serve_admin(
    chain: Chain,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> std::io::Result<()> {
    let admin = Arc::new(admin::AdminState::new(
        chain,
        options.admin_token.clone(),
        options.access.clone(),
    ));
    listen::serve(listener, api::admin_app(admin), shutdown, options.limits, options.tls).await
}

/// Builds every backend of `config`, in order; all failures are reported together, each
/// named by its index.
pub async fn build_chain(config: &config::Config) -> Result<Chain, String> {
    let origins = Arc::new(config.origins.policy());
    let mut handles = Vec::new();
    let mut failures = Vec::new();
    for (i, b) in config.backends.iter().enumerate() {
        match b.build(&config.cache.dir, &origins).await {
            Ok(h) => handles.push(h),
            Err(e) => failures.push(format!("backends[{i}]: {e}")),
        }
    }
    if failures.is_empty() {
        Ok(Chain::new(handles))
    } else {
        Err(format!("cannot start backends: {}", failures.join("; ")))
    }
}
