//! Configuration: defaults < TOML file < environment < command-line flags, layered by figment.
//!
//! Unknown keys and bad values stop the start; figment's error names the key and the source
//! it came from (file path, environment variable or flag).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use ferry_backends::BackendConfig;

/// The whole configuration file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the listener and logs.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[cache]`: where ferry keeps its data.
    #[serde(default)]
    pub cache: CacheConfig,
    /// `[origins]`: where fetches on a client's behalf may go.
    #[serde(default)]
    pub origins: OriginsConfig,
    /// `[admin]`: the admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[access]`: who may do what on the registry API.
    #[serde(default)]
    pub access: AccessConfig,
    /// `[docker]`: what every docker backend shares (Docker's own variables set it).
    #[serde(default)]
    pub docker: ferry_backends::docker::DockerShared,
    /// Backends in query order.
    #[serde(default = "default_backends")]
    pub backends: Vec<BackendConfig>,
}

/// `[server]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address; `:5000` means all interfaces, as in distribution's config.
    #[serde(deserialize_with = "socket_addr")]
    pub addr: SocketAddr,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `ferry=debug,poem=info`); `RUST_LOG` wins when set.
    pub log_level: String,
    /// Seconds a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without a byte before the request fails.
    pub body_idle_timeout_secs: u64,
    /// Seconds a response may wait on a client that takes none of it before its connection
    /// is closed (a client that never reads would otherwise hold it for ever).
    pub send_timeout_secs: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Bytes of blob chunks read ahead of their clients, for all streams together: a ceiling
    /// on that memory however many clients pull (each stream also holds at most one chunk
    /// outside it, 8 KiB when many are served).
    pub read_ahead: ferry_backends::size::Size,
    /// Blobs fetched from their origins at once (upstream cache misses, heals), each holding
    /// up to some 1.75 MiB; more wait for one to end, their clients as for a slow origin.
    pub max_fetches: usize,
    /// The kernel's send buffer of each connection (it doubles the figure): what a client
    /// that stops reading keeps queued in the kernel. Unset, Linux lets it grow to 4 MiB a
    /// connection; `0` leaves it to the kernel.
    pub send_buffer: ferry_backends::size::Size,
    /// Seconds requests under way may take to finish at shutdown.
    pub shutdown_grace_secs: u64,
    /// `UID:GID` to become when started as root (the container image sets 65532:65532 through
    /// `FERRY_DROP_TO`), keeping only the groups of the engine sockets configured; empty or
    /// unset: stay as started.
    pub drop_to: Option<String>,
    /// Milliseconds between the progress lines of long work (exports, engine pulls).
    pub progress_interval_ms: u64,
    /// PEM certificate chain: with `tls_key`, ferry serves HTTPS (HTTP/2 over ALPN), and
    /// reads both again when they change.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl ServerConfig {
    /// The certificate files, when both are set.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: default_addr(),
            log_format: LogFormat::default(),
            log_level: "info".into(),
            header_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            send_timeout_secs: 60,
            max_connections: 4096,
            read_ahead: ferry_backends::size::Size::mib(ferry_core::chunks::DEFAULT_READ_AHEAD as u64 >> 20),
            send_buffer: ferry_backends::size::Size::kib(256),
            max_fetches: ferry_backends::fill::DEFAULT_MAX_FETCHES,
            drop_to: None,
            progress_interval_ms: 5000,
            shutdown_grace_secs: 30,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// `[origins]`: the registries ferry, or the engine, may fetch from on a client's behalf
/// (heals, `pull_missing`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginsConfig {
    /// Hosts added to the public registries: `host`, `host:port`, `*.domain`, or `*` for any
    /// public host. Loopback, private and link-local addresses must be named exactly.
    pub allow: Vec<String>,
    /// Whether the public registries (Docker Hub, ghcr.io, quay.io, registry.k8s.io, …) are
    /// allowed without being listed.
    pub public_registries: bool,
}

impl Default for OriginsConfig {
    fn default() -> Self {
        OriginsConfig {
            allow: Vec::new(),
            public_registries: true,
        }
    }
}

impl OriginsConfig {
    /// The origin policy these settings make.
    pub fn policy(&self) -> ferry_core::origin::OriginPolicy {
        ferry_core::origin::OriginPolicy::new(&self.allow, self.public_registries)
    }
}

/// `[access]`: read-only mode, Basic auth, the repository prefix allow-list.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Refuse uploads, manifest pushes and deletes (405 UNSUPPORTED).
    #[serde(default)]
    pub read_only: bool,
    /// An htpasswd file of bcrypt hashes (`htpasswd -B`): writes need one of its users.
    #[serde(default)]
    pub htpasswd: Option<PathBuf>,
    /// With `htpasswd`: reads need a user too.
    #[serde(default)]
    pub auth_reads: bool,
    /// Repository name prefixes served (`team/`, `registry.k8s.io/`); other names are
    /// unknown. Empty: every name. `REGISTRY_PREFIXES` (space-separated) sets it too.
    #[serde(default, deserialize_with = "words")]
    pub prefixes: Vec<String>,
}

impl AccessConfig {
    /// The rules, reading the htpasswd file.
    pub fn build(&self) -> Result<crate::access::Access, String> {
        let users = self
            .htpasswd
            .as_deref()
            .map(crate::access::Access::read_htpasswd)
            .transpose()?;
        if self.auth_reads && users.is_none() {
            return Err("access.auth_reads needs access.htpasswd".into());
        }
        Ok(crate::access::Access::new(
            self.read_only,
            users,
            self.auth_reads,
            self.prefixes.clone(),
        ))
    }
}

/// `[admin]`: the admin API under `/api/v1`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token the changing endpoints (evictions) require; unset: they answer 403.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (a mounted secret); read at start, surrounding whitespace
    /// dropped.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve the admin API on this address only (e.g. `127.0.0.1:5001`) instead of beside
    /// the registry API.
    #[serde(default, deserialize_with = "optional_socket_addr")]
    pub addr: Option<SocketAddr>,
}

impl AdminConfig {
    /// The token, from `token` or `token_file`.
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("admin.token_file {}: {e}", path.display()))
    }
}

/// `[cache]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory for everything ferry stores: pushed content and export caches.
    pub dir: PathBuf,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: PathBuf::from("/var/lib/ferry"),
        }
    }
}

fn default_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
/// The default chain: the local engine, then the push store.
fn default_backends() -> Vec<BackendConfig> {
    vec![
        BackendConfig::Docker(ferry_backends::docker::DockerConfig::default()),
        BackendConfig::Push(ferry_backends::push::PushConfig::default()),
    ]
}

/// A list, or a string of words separated by spaces (as oci-reg-docker's `REGISTRY_PREFIXES`).
fn words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Words {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Words::deserialize(d)? {
        Words::List(list) => list,
        Words::Text(text) => text.split_whitespace().map(str::to_string).collect(),
    })
}

/// Accepts `host:port` and distribution's `:port`.
fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_addr(String::deserialize(d)?)
}

fn optional_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    Option::<String>::deserialize(d)?.map(parse_addr).transpose()
}

fn parse_addr<E: serde::de::Error>(s: String) -> Result<SocketAddr, E> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.clone()
    };
    full.parse()
        .map_err(|e| E::custom(format!("{s:?} is not an address like 0.0.0.0:5000: {e}")))
}

/// Variables that set a key under a name of their own, and the key; a later one wins:
/// distribution's and k3d's listen address, oci-reg-docker's and distribution's certificate,
/// oci-reg-docker's prefixes, ferry's short names, and Docker's own (as the docker CLI reads
/// them).
const FOREIGN_ENV: [(&str, &str); 13] = [
    ("REGISTRY_LISTEN_ADDR", "server.addr"),
    ("REGISTRY_HTTP_ADDR", "server.addr"),
    ("REGISTRY_CERT_PATH", "server.tls_cert"),
    ("REGISTRY_KEY_PATH", "server.tls_key"),
    ("REGISTRY_HTTP_TLS_CERTIFICATE", "server.tls_cert"),
    ("REGISTRY_HTTP_TLS_KEY", "server.tls_key"),
    ("FERRY_DROP_TO", "server.drop_to"),
    ("FERRY_PROGRESS_INTERVAL_MS", "server.progress_interval_ms"),
    ("FERRY_PULL_MISSING", "docker.pull_missing"),
    ("REGISTRY_PREFIXES", "access.prefixes"),
    ("DOCKER_HOST", "docker.host"),
    ("DOCKER_TLS_VERIFY", "docker.tls_verify"),
    ("DOCKER_CERT_PATH", "docker.cert_path"),
];

/// How an [`Alias`] names itself in errors and sources.
const ALIAS: &str = "environment variable ";

/// One variable of [`FOREIGN_ENV`], named as itself in errors ("in environment variable
/// FERRY_PULL_MISSING") and in `ferry config`.
struct Alias {
    var: &'static str,
    key: &'static str,
}

impl figment::Provider for Alias {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("{ALIAS}{}", self.var)).interpolater(|_, keys| keys.join("."))
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let key = self.key;
        Env::raw()
            .only(&[&self.var.to_ascii_lowercase()])
            .map(move |_| key.into())
            .data()
    }
}

/// Values given on the command line; each overrides every other source.
#[derive(Debug, Default)]
pub struct Flags {
    /// `--addr`.
    pub addr: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--log-level`.
    pub log_level: Option<String>,
}

impl Config {
    /// Layers defaults, the file (when given), the environment and the flags.
    /// `[docker]` is applied to the docker backends.
    pub fn load(file: Option<&Path>, flags: &Flags) -> Result<Config, Box<figment::Error>> {
        let mut config = Self::read(file, flags)?;
        for b in &mut config.backends {
            if let BackendConfig::Docker(d) = b {
                config.docker.apply(d);
            }
        }
        Ok(config)
    }

    /// The configuration as its sources give it, checked, each key where it was set.
    fn read(file: Option<&Path>, flags: &Flags) -> Result<Config, Box<figment::Error>> {
        let config: Config = Self::figment(file, flags)?.extract().map_err(Box::new)?;
        if config.server.tls_cert.is_some() != config.server.tls_key.is_some() {
            return Err(Box::new(figment::Error::from(
                "server.tls_cert and server.tls_key go together: set both for HTTPS, or neither".to_string(),
            )));
        }
        Ok(config)
    }

    /// The effective configuration as `(key, value, source)` lines, every value with where
    /// it came from: `default`, the file, the environment variable or the flag. Secrets
    /// (`admin.token`) are shown as `(set)`.
    pub fn with_sources(
        file: Option<&Path>,
        flags: &Flags,
    ) -> Result<Vec<(String, String, String)>, Box<figment::Error>> {
        let fig = Self::figment(file, flags)?;
        let config = Self::read(file, flags)?;
        let value = serde_json::to_value(&config).map_err(|e| Box::new(figment::Error::from(e.to_string())))?;
        let mut leaves = Vec::new();
        flatten("", &value, &mut leaves);
        Ok(leaves
            .into_iter()
            .map(|(key, value)| {
                // Secrets are said to be set, never shown.
                let secret = key == "admin.token" || key.ends_with(".password");
                let value = if secret && value != "null" {
                    "(set)".to_string()
                } else {
                    value
                };
                let source = source_of(&fig, &key);
                (key, value, source)
            })
            .collect())
    }

    fn figment(file: Option<&Path>, flags: &Flags) -> Result<Figment, Box<figment::Error>> {
        let mut fig = Figment::new();
        let foreign = |fig: Figment| {
            FOREIGN_ENV
                .iter()
                .fold(fig, |fig, &(var, key)| fig.merge(Alias { var, key }))
        };
        if let Some(file) = file {
            if !file.exists() {
                return Err(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    file.display()
                ))));
            }
            fig = fig.merge(Toml::file(file));
        }
        // FERRY_CONFIG names the file; ferry's short names of FOREIGN_ENV are no nested keys.
        let short: Vec<String> = FOREIGN_ENV
            .iter()
            .filter_map(|(var, _)| var.strip_prefix("FERRY_"))
            .chain(["CONFIG"])
            .map(str::to_ascii_lowercase)
            .collect();
        let short: Vec<&str> = short.iter().map(String::as_str).collect();
        fig = foreign(fig).merge(Env::prefixed("FERRY_").ignore(&short).split("__"));
        if let Some(a) = &flags.addr {
            fig = fig.merge(Serialized::default("server.addr", a));
        }
        if let Some(f) = &flags.log_format {
            fig = fig.merge(Serialized::default("server.log_format", f));
        }
        if let Some(l) = &flags.log_level {
            fig = fig.merge(Serialized::default("server.log_level", l));
        }
        Ok(fig)
    }
}

/// `(dotted key, value)` of every leaf of `v`; array items are keyed by index.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| flatten(&key(k), v, out)),
        serde_json::Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten(&key(&i.to_string()), v, out)),
        serde_json::Value::String(s) => out.push((prefix.to_string(), format!("{s:?}"))),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Where the value at `key` came from. A backend's keys come from wherever its table did
/// (`backends` is one value to figment).
fn source_of(fig: &Figment, key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    // Array indexes are no figment keys: `backends.0.socket` is looked up inside the value
    // of `backends`, and comes from wherever `backends` did when it is set there.
    let found = match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        Some(i) => {
            let head = parts[..i].join(".");
            let mut v = fig.find_value(&head).ok();
            let rest = &parts[i..];
            let mut j = 0;
            while j < rest.len() {
                let step = match (v.take(), rest[j].parse::<usize>()) {
                    (Some(figment::value::Value::Array(_, items)), Ok(n)) => items.get(n).cloned().map(|x| (x, 1)),
                    // A map key may hold dots itself (`hosts."reg.lan"`): the longest that is one.
                    (Some(figment::value::Value::Dict(_, map)), _) => (1..=rest.len() - j)
                        .rev()
                        .find_map(|n| map.get(&rest[j..j + n].join(".")).cloned().map(|x| (x, n))),
                    // Text that reads as the list it stands for (`REGISTRY_PREFIXES`).
                    (Some(text @ figment::value::Value::String(..)), _) => Some((text, rest.len() - j)),
                    _ => None,
                };
                let Some((value, used)) = step else { break };
                v = Some(value);
                j += used;
            }
            v.and_then(|_| fig.find_metadata(&head).map(|m| (m, head)))
        }
        None => fig
            .find_value(key)
            .ok()
            .and_then(|_| fig.find_metadata(key).map(|m| (m, key.to_string()))),
    };
    let Some((meta, found_key)) = found else {
        return "default".to_string();
    };
    match &meta.source {
        Some(figment::Source::File(path)) => format!("file {}", path.display()),
        _ if meta.name.starts_with("`FERRY_`") => {
            format!(
                "environment FERRY_{}",
                found_key.to_ascii_uppercase().replace('.', "__")
            )
        }
        // A variable of FOREIGN_ENV: the last one set for this key won.
        _ => match meta.name.strip_prefix(ALIAS) {
            Some(var) => format!("environment {var}"),
            None => "flag".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(toml: &str, flags: &Flags) -> Result<Config, Box<figment::Error>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(Some(&path), flags)
    }

    #[test]
    fn defaults() {
        let c = load_toml("", &Flags::default()).unwrap();
        assert_eq!(c.server.addr, default_addr());
        assert!(matches!(
            c.backends.as_slice(),
            [BackendConfig::Docker(_), BackendConfig::Push(_)]
        ));
    }

    #[test]
    fn the_example_config_loads() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.toml");
        let c = Config::load(Some(Path::new(example)), &Flags::default()).unwrap();
        assert_eq!(c.backends.len(), 2);
        // Its commented-out containerd and upstream tables are valid too.
        let text = std::fs::read_to_string(example).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '#']) && !rest.is_empty() => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load_toml(&uncommented, &Flags::default()).unwrap();
        assert_eq!(c.backends.len(), 4, "{uncommented}");
    }

    #[test]
    fn every_value_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(
            &path,
            "[server]\naddr = \"127.0.0.1:7000\"\nlog_level = \"debug\"\n[admin]\ntoken = \"hush\"\n\
             [[backends]]\ntype = \"push\"\nallow_delete = true\n\
             [[backends]]\ntype = \"upstream\"\n[backends.hosts.\"reg.lan\"]\nusername = \"u\"\npassword = \"hush\"\n",
        )
        .unwrap();
        let flags = Flags {
            addr: Some("127.0.0.1:6000".into()),
            ..Flags::default()
        };
        let lines = Config::with_sources(Some(&path), &flags).unwrap();
        let get = |key: &str| {
            lines
                .iter()
                .find(|(k, _, _)| k == key)
                .map(|(_, v, s)| (v.as_str(), s.as_str()))
                .unwrap_or_else(|| panic!("{key} missing: {lines:?}"))
        };
        let file = format!("file {}", path.display());
        assert_eq!(get("server.addr"), ("\"127.0.0.1:6000\"", "flag"));
        assert_eq!(get("server.log_level"), ("\"debug\"", file.as_str()));
        assert_eq!(get("server.max_connections"), ("4096", "default"));
        assert_eq!(get("admin.token"), ("(set)", file.as_str()), "never printed");
        assert_eq!(get("backends.0.allow_delete"), ("true", file.as_str()));
        assert_eq!(get("backends.0.upload_ttl_secs"), ("3600", "default"));
        assert_eq!(get("backends.1.hosts.reg.lan.password"), ("(set)", file.as_str()));
        assert!(lines.iter().all(|(_, v, _)| !v.contains("hush")));
    }

    #[test]
    fn flags_override_file() {
        let flags = Flags {
            addr: Some("127.0.0.1:6000".into()),
            ..Flags::default()
        };
        let c = load_toml("[server]\naddr = \"127.0.0.1:7000\"\n", &flags).unwrap();
        assert_eq!(c.server.addr.to_string(), "127.0.0.1:6000");
        let c = load_toml("[server]\naddr = \":7000\"\n", &Flags::default()).unwrap();
        assert_eq!(c.server.addr.to_string(), "0.0.0.0:7000");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_key_and_source() {
        let e = load_toml("[server]\nadr = \"x\"\n", &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("adr") && e.contains("ferry.toml"), "{e}");
        let e = load_toml("[[backends]]\ntype = \"push\"\nallow_delet = true\n", &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_delet") && e.contains("ferry.toml"), "{e}");
        // Heals pass each client's credentials on; ferry's own have no place there.
        let e = load_toml(
            "[[backends]]\ntype = \"containerd\"\n[backends.hosts.\"reg.lan\"]\nusername = \"u\"\n",
            &Flags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("username") && e.contains("ferry.toml"), "{e}");
        let e = load_toml("[[backends]]\ntype = \"nope\"\n", &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = load_toml("[server]\naddr = \"nowhere\"\n", &Flags::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.addr") && e.contains("nowhere"), "{e}");
    }
}
