//! How to reach one registry host: plain HTTP or TLS with its own CA, another endpoint in
//! front of it (Docker Hub's API host, a company mirror), and the credentials ferry itself
//! holds for it — from the config or from a Docker `config.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use ferry_core::{Error, Result, DOCKER_HUB};

/// `[backends.hosts."<host>"]`: settings for one origin registry.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Reach the host over plain HTTP (`true`) or TLS (`false`). Unset: plain HTTP for
    /// loopback hosts without a `ca_file`, TLS for every other.
    #[serde(default)]
    pub plain_http: Option<bool>,
    /// A PEM CA certificate to trust for this host (and its endpoint).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Ask this endpoint (`https://mirror.example.com`, another ferry, a shared distribution)
    /// instead of the host itself; it gets `?ns=<host>` so it knows the origin.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Put in front of repository paths at the endpoint: Harbor's proxy-cache project
    /// (`dockerhub` → `/v2/dockerhub/library/alpine/...`).
    #[serde(default)]
    pub repository_prefix: Option<String>,
    /// User for this host's Basic or token flow (ferry's own credentials, used instead of
    /// the client's).
    #[serde(default)]
    pub username: Option<String>,
    /// Password or access token for `username`.
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (a mounted secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// What the client side of every registry fetch is set up with.
#[derive(Clone, Debug, Default)]
pub struct ClientSettings {
    /// Per-host settings, by `host[:port]`.
    pub hosts: BTreeMap<String, HostConfig>,
    /// Hosts reached over plain HTTP besides those `hosts` says.
    pub plain_http: Vec<String>,
    /// A CA certificate trusted for every host.
    pub ca_file: Option<PathBuf>,
    /// A Docker `config.json` whose `auths` give credentials per host.
    pub docker_config: Option<PathBuf>,
    /// More hosts named in metrics' `host` label (an allow list's exact entries).
    pub metric_hosts: Vec<String>,
}

impl ClientSettings {
    /// The hosts these settings name (and their endpoints' hosts): they count as named in
    /// the origin policy, so a loopback or private registry configured here can be reached.
    pub fn named_hosts(&self) -> Vec<String> {
        let mut named: Vec<String> = self.plain_http.clone();
        for (host, c) in &self.hosts {
            named.push(host.clone());
            if let Some(url) = c.endpoint.as_deref().and_then(|e| reqwest::Url::parse(e).ok()) {
                named.push(crate::outbound::authority(&url));
            }
        }
        named
    }

    /// The settings for `registry`, if any.
    pub fn host(&self, registry: &str) -> Option<&HostConfig> {
        self.hosts.get(registry).or_else(|| {
            let (host, _) = ferry_core::origin::split_host(registry);
            self.hosts.get(host)
        })
    }

    /// ferry's own `Authorization` for each host it has credentials for: the config's
    /// users first, then the Docker `config.json`'s.
    pub fn credentials(&self) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        if let Some(path) = &self.docker_config {
            out.extend(docker_config_auths(path)?);
        }
        for (host, c) in &self.hosts {
            let Some(user) = &c.username else { continue };
            let password = match (&c.password, &c.password_file) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| Error::io(format!("reading password_file {}", f.display()), e))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                (None, None) => String::new(),
            };
            out.insert(host.clone(), basic(user, &password));
        }
        Ok(out)
    }
}

/// A Basic `Authorization` value.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The `auths` of a Docker `config.json` as `Authorization` values by host. Docker Hub's key
/// (`https://index.docker.io/v1/`) counts for `docker.io`. Credential helpers are not run.
fn docker_config_auths(path: &Path) -> Result<HashMap<String, String>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let text = std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let file: File = serde_json::from_slice(&text)
        .map_err(|e| Error::Internal(format!("{}: not a Docker config.json: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (key, entry) in file.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let host = match host.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => host,
        };
        let value = match (entry.auth.filter(|a| !a.is_empty()), entry.username, entry.password) {
            (Some(auth), _, _) => format!("Basic {auth}"),
            (None, Some(u), Some(p)) => basic(&u, &p),
            _ => continue,
        };
        out.insert(host, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_and_config_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"reg.lan:5000":{"username":"a","password":"b"}},"credsStore":"x"}"#,
        )
        .unwrap();
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "reg.lan:5000".to_string(),
            HostConfig {
                username: Some("cfg".into()),
                password: Some("pw".into()),
                ..HostConfig::default()
            },
        );
        let s = ClientSettings {
            hosts,
            docker_config: Some(path),
            ..ClientSettings::default()
        };
        let creds = s.credentials().unwrap();
        assert_eq!(creds["docker.io"], "Basic dTpw");
        assert_eq!(creds["reg.lan:5000"], basic("cfg", "pw"), "the config's user wins");
    }
}
