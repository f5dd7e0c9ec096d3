//! `ferry`: an OCI registry serving the images the machine's own engines already hold.

mod admin;
mod api;
mod config;
mod goflags;
mod listen;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ferry_core::Chain;

use config::{Config, Flags, LogFormat};

#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve {
        /// TOML config file.
        #[arg(long, env = "FERRY_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address (host:port or :port); overrides the config and environment.
        #[arg(long)]
        addr: Option<String>,
        /// Log line format.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Log filter, e.g. `info` or `ferry=debug`; `RUST_LOG` wins when set.
        #[arg(long)]
        log_level: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(goflags::rewrite(std::env::args_os().collect()));
    let Command::Serve {
        config,
        addr,
        log_format,
        log_level,
    } = cli.command;
    let flags = Flags {
        addr,
        log_format,
        log_level,
    };
    let config = match Config::load(config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.server.log_format, &config.server.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    raise_open_file_limit();
    let mut handles = Vec::new();
    let mut failures = Vec::new();
    let origins = Arc::new(config.origins.policy());
    for (i, b) in config.backends.iter().enumerate() {
        match b.build(&config.cache.dir, &origins).await {
            Ok(h) => handles.push(h),
            Err(e) => failures.push(format!("backends[{i}]: {e}")),
        }
    }
    if !failures.is_empty() {
        return Err(format!("cannot start backends: {}", failures.join("; ")));
    }
    let chain = Chain::new(handles);
    let listener = tokio::net::TcpListener::bind(config.server.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.addr))?;
    let addr = listener.local_addr().unwrap_or(config.server.addr);
    tracing::info!(%addr, backends = ?chain.names(), dir = %config.cache.dir.display(),
        version = env!("CARGO_PKG_VERSION"), "ferry listening");
    let server = &config.server;
    let limits = listen::Limits {
        header_timeout: Duration::from_secs(server.header_timeout_secs.max(1)),
        max_connections: server.max_connections,
        grace: Duration::from_secs(server.shutdown_grace_secs),
    };
    let admin = Arc::new(admin::AdminState::new(chain.clone(), config.admin.token()?));
    let beside = match config.admin.addr {
        None => Some(admin),
        Some(admin_addr) => {
            let admin_listener = tokio::net::TcpListener::bind(admin_addr)
                .await
                .map_err(|e| format!("cannot listen on {admin_addr} (admin.addr): {e}"))?;
            let bound = admin_listener.local_addr().unwrap_or(admin_addr);
            tracing::info!(addr = %bound, "admin API listening");
            tokio::spawn(async move {
                if let Err(e) = listen::serve(admin_listener, api::admin_app(admin), shutdown_signal(), limits).await {
                    tracing::error!(addr = %bound, error = %e, "admin API stopped");
                }
            });
            None
        }
    };
    let app = api::app(
        Arc::new(api::AppState::new(
            chain,
            Duration::from_secs(server.body_idle_timeout_secs.max(1)),
        )),
        beside,
    );
    listen::serve(listener, app, shutdown_signal(), limits)
        .await
        .map_err(|e| format!("cannot serve on {addr}: {e}"))
}

/// Raises the soft limit of open files to the hard one (as distribution does): every
/// connection and every blob served holds a descriptor, and the usual soft limit of 1024
/// would let a thousand idle sockets shut ferry off.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down");
            return;
        }
    }
    let _ = ctrl_c.await;
}
