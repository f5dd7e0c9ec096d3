//! `ferry`: an OCI registry serving the images the machine's own engines already hold.

mod doctor;
mod goflags;
mod heap;
mod logging;
mod mirrors;
mod node_config;
mod privileges;
mod probe;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ferry_server::config::{Config, Flags, LogFormat};

/// The static (musl) build's allocator: musl's own serves blobs at a fifth of the speed
/// (BENCHMARKS.md, "The static binary").
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "ferry", version = ferry_server::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from: every command reads it the same way.
#[derive(clap::Args)]
struct ConfigArgs {
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
}

impl ConfigArgs {
    fn flags(&self) -> Flags {
        Flags {
            addr: self.addr.clone(),
            log_format: self.log_format,
            log_level: self.log_level.clone(),
        }
    }

    fn load(&self) -> Result<Config, ExitCode> {
        Config::load(self.config.as_deref(), &self.flags()).map_err(|e| {
            eprintln!("ferry: configuration error: {e}");
            ExitCode::from(2)
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve(ConfigArgs),
    /// Check the configuration, every backend, the data directory and the listen address;
    /// print what is wrong and how to fix it. Exits 1 when something is broken.
    Doctor {
        /// Also check a node's containerd config (kind, k3s, a host's own): whether its CRI
        /// pulls would reach a mirror through its hosts files.
        #[arg(long)]
        containerd_config: Option<std::path::PathBuf>,
        #[command(flatten)]
        args: ConfigArgs,
    },
    /// Print the effective configuration, each value with its source (default, file,
    /// environment, flag).
    Config(ConfigArgs),
    /// Exit 0 when the ferry of this configuration answers `/healthz` (a container's
    /// HEALTHCHECK: the image has no curl).
    Healthcheck(ConfigArgs),
    /// Remove push-store blobs no manifest references (after deletes, or abandoned pushes).
    /// Safe beside a running ferry: a manifest push and a collection never interleave, and
    /// recent blobs (and those a pusher asked for lately) stay.
    Gc {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Spare blobs younger than this many seconds (default: the backend's gc_min_age_secs).
        #[arg(long)]
        min_age: Option<u64>,
        #[command(flatten)]
        args: ConfigArgs,
    },
    /// Print the snippet that points a client at this ferry as its registry mirror.
    Mirrors {
        /// The client to configure.
        #[arg(long = "for", value_enum)]
        client: mirrors::Client,
        /// The address clients reach ferry on (default: the listen address; 127.0.0.1 when
        /// it listens on every interface).
        #[arg(long)]
        address: Option<String>,
        /// For kind: the host directory its nodes mount as containerd's hosts directory
        /// (default: ./ferry-certs.d, as an absolute path).
        #[arg(long)]
        hosts_dir: Option<String>,
        #[command(flatten)]
        args: ConfigArgs,
    },
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse_from(goflags::rewrite(std::env::args_os().collect()));
    match cli.command {
        Command::Serve(args) => {
            let config = match args.load() {
                Ok(c) => c,
                Err(code) => return code,
            };
            logging::init(config.server.log_format, &config.server.log_level);
            if let Err(e) = privileges::drop_if_asked(&config) {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
            run(serve(config))
        }
        Command::Config(args) => match Config::with_sources(args.config.as_deref(), &args.flags()) {
            Ok(lines) => {
                use std::io::Write;
                let width = lines.iter().map(|(k, v, _)| k.len() + v.len() + 3).max().unwrap_or(0);
                let mut out = std::io::stdout().lock();
                for (key, value, source) in lines {
                    // A closed pipe (`| head`) ends the listing, not with a panic.
                    if writeln!(out, "{:width$}  # {source}", format!("{key} = {value}")).is_err() {
                        break;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: configuration error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Doctor {
            containerd_config,
            args,
        } => {
            let config = Config::load(args.config.as_deref(), &args.flags()).map_err(|e| e.to_string());
            run(async move { doctor::run(config, args.config.as_deref(), containerd_config.as_deref()).await })
        }
        Command::Gc { dry_run, min_age, args } => match args.load() {
            Ok(config) => run(gc(config, dry_run, min_age)),
            Err(code) => code,
        },
        Command::Healthcheck(args) => match args.load() {
            Ok(config) => healthcheck(&mirrors::address(&config, None), config.server.tls_files().is_some()),
            Err(code) => code,
        },
        Command::Mirrors {
            client,
            address,
            hosts_dir,
            args,
        } => match args.load() {
            Ok(config) => {
                let hosts_dir = hosts_dir.unwrap_or_else(mirrors::default_hosts_dir);
                print!(
                    "{}",
                    mirrors::snippet(client, &mirrors::address(&config, address.as_deref()), &hosts_dir)
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

/// `ferry gc`: collects every push store of the configuration, printing what went.
async fn gc(config: Config, dry_run: bool, min_age: Option<u64>) -> Result<(), String> {
    let stores: Vec<_> = config
        .backends
        .iter()
        .filter_map(|b| match b {
            ferry_backends::BackendConfig::Push(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    if stores.is_empty() {
        return Err("the configuration has no push backend: nothing to collect".into());
    }
    for p in stores {
        let dir = p.store_dir(&config.cache.dir);
        if !dir.join("blobs").is_dir() {
            println!("{} ({}): no push store there yet", p.name, dir.display());
            continue;
        }
        let age = Duration::from_secs(min_age.unwrap_or(p.gc_min_age_secs));
        let name = p.name.clone();
        let store = ferry_backends::push::PushBackend::attach(p, dir.clone()).map_err(|e| e.to_string())?;
        let report = store.collect_garbage(age, dry_run).await.map_err(|e| e.to_string())?;
        let verb = if dry_run { "would remove" } else { "removed" };
        println!(
            "{name} ({}): {} blobs, {} kept, {verb} {} ({} bytes)",
            dir.display(),
            report.blobs,
            report.kept,
            report.removed.len(),
            report.bytes()
        );
        for (digest, size) in &report.removed {
            println!("  {digest} {size}");
        }
    }
    Ok(())
}

/// `GET /healthz` on `addr` within 5 s: success when it answers 200. Behind TLS, that the
/// listener accepts a connection (the binary carries no TLS client for this).
fn healthcheck(addr: &str, tls: bool) -> ExitCode {
    let answer = if tls {
        std::net::ToSocketAddrs::to_socket_addrs(addr)
            .and_then(|mut a| a.next().ok_or_else(|| std::io::Error::other("no address")))
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)))
            .map(|_| 200)
    } else {
        probe::get(addr, "/healthz").map(|a| a.status)
    };
    match answer {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("ferry at {addr} answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ferry at {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives threads that allocate their own malloc arena (up to eight per core), and each
/// arena keeps what was freed in it: with blocking threads that come and go, freed buffers
/// pile up in a dozen arenas. Two arenas cut ferry's peak RSS in a cold pull of 8 layers from
/// ~55 to ~45 MiB. `MALLOC_ARENA_MAX` in the environment still decides when it is set.
fn cap_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tuning value of the allocator, passing no memory.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Runs `work` on a new runtime; its error is logged and makes the exit code 1.
fn run<E: std::fmt::Display>(work: impl std::future::Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if tracing::dispatcher::has_been_set() => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    raise_open_file_limit();
    let read_ahead = config.server.read_ahead.bytes();
    ferry_core::chunks::set_read_ahead(usize::try_from(read_ahead).unwrap_or(usize::MAX));
    ferry_core::progress::set_interval(Duration::from_millis(config.server.progress_interval_ms));
    ferry_backends::fill::set_max_fetches(config.server.max_fetches);
    heap::trim_after_loads();
    let tls = config
        .server
        .tls_files()
        .map(ferry_server::tls::server_config)
        .transpose()
        .map_err(|e| format!("TLS: {e}"))?;
    let access = Arc::new(config.access.build()?);
    let chain = ferry_server::build_chain(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.server.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.addr))?;
    let addr = listener.local_addr().unwrap_or(config.server.addr);
    tracing::info!(%addr, tls = config.server.tls_cert.is_some(), backends = ?chain.names(),
        dir = %config.cache.dir.display(), version = ferry_server::VERSION, "ferry listening");
    let options = ferry_server::Options {
        admin_token: config.admin.token()?,
        admin_beside: config.admin.addr.is_none(),
        tls,
        access,
        ..ferry_server::Options::from(&config.server)
    };
    if let Some(admin_addr) = config.admin.addr {
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|e| format!("cannot listen on {admin_addr} (admin.addr): {e}"))?;
        let bound = admin_listener.local_addr().unwrap_or(admin_addr);
        tracing::info!(addr = %bound, "admin API listening");
        let (chain, options) = (chain.clone(), options.clone());
        tokio::spawn(async move {
            if let Err(e) = ferry_server::serve_admin(chain, admin_listener, shutdown_signal(), options).await {
                tracing::error!(addr = %bound, error = %e, "admin API stopped");
            }
        });
    }
    ferry_server::serve(chain, listener, shutdown_signal(), options)
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
