//! `ferry doctor`: checks what ferry needs before it serves — the data directory, each
//! backend's socket and what answers on it, the listen addresses — and says for each
//! problem the command that fixes it. Exits 1 when something is broken.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_backends::containerd::ContainerdConfig;
use ferry_backends::registry::RegistryClient;
use ferry_backends::upstream::UpstreamConfig;
use ferry_backends::BackendConfig;
use ferry_core::Error;

use ferry_server::config::{Config, OriginsConfig};

/// Free space below which the data directory is a warning: one large image's export.
const LOW_SPACE: u64 = 2 << 30;

#[derive(Default)]
struct Report {
    broken: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        println!("ok    {what}: {}", detail.as_ref());
    }

    fn warn(&mut self, what: &str, problem: impl AsRef<str>, fix: impl AsRef<str>) {
        println!("warn  {what}: {}\n      fix: {}", problem.as_ref(), fix.as_ref());
    }

    fn fail(&mut self, what: &str, problem: impl AsRef<str>, fix: impl AsRef<str>) {
        self.broken += 1;
        println!("FAIL  {what}: {}\n      fix: {}", problem.as_ref(), fix.as_ref());
    }
}

/// Runs every check; `Err` (exit 1) when one failed.
pub async fn run(
    config: Result<Config, String>,
    file: Option<&Path>,
    containerd_config: Option<&Path>,
) -> Result<(), String> {
    let mut r = Report::default();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            r.fail(
                "config",
                e,
                "correct the key or value named above (`ferry config` shows every value and its source)",
            );
            return Err("1 problem found".into());
        }
    };
    let names: Vec<&str> = config.backends.iter().map(BackendConfig::name).collect();
    r.ok(
        "config",
        format!(
            "{} ({} backends: {})",
            file.map_or("defaults and environment".to_string(), |f| f.display().to_string()),
            names.len(),
            names.join(", ")
        ),
    );
    let dir_ok = check_data_dir(&mut r, &config.cache.dir).await;
    // A ferry serving this configuration holds its stores: opening them here would sweep the
    // temp files of its uploads and fetches under way. Its own view (/readyz) is reported
    // on the listen line instead.
    let tls = config.server.tls_files().is_some();
    let serving = check_listen(&mut r, "listen", config.server.addr, tls).await;
    if let Some(a) = config.admin.addr {
        check_listen(&mut r, "admin listen", a, false).await;
    }
    let origins = Arc::new(config.origins.policy());
    for (i, b) in config.backends.iter().enumerate() {
        let what = format!("backend {} ({})", b.name(), b.kind());
        if let Some(socket) = b.unix_socket() {
            if !check_socket(&mut r, &what, &socket, b) {
                continue;
            }
        }
        if !dir_ok {
            continue; // building it would fail on the directory, already reported
        }
        if serving {
            r.ok(
                &what,
                "not opened here: the ferry serving this configuration holds its stores (what it sees is on the listen line)",
            );
        } else {
            match b.build(&config.cache.dir, &origins).await {
                Ok(handle) => report_status(&mut r, &what, b, handle.backend.status().await),
                Err(e) => {
                    r.fail(
                        &what,
                        format!("cannot start: {e}"),
                        format!("see backends[{i}] in the config"),
                    );
                    continue;
                }
            }
        }
        match b {
            BackendConfig::Upstream(c) => check_upstream_origins(&mut r, &what, c).await,
            BackendConfig::Containerd(c) => check_heal_origins(&mut r, &what, c, &config.origins).await,
            _ => {}
        }
    }
    if let Some(path) = containerd_config {
        check_node_config(&mut r, path);
    }
    match config.admin.token() {
        Ok(_) => {}
        Err(e) => r.fail("admin", e, "make the file readable, or set admin.token"),
    }
    match r.broken {
        0 => {
            println!("everything ferry needs is in place");
            Ok(())
        }
        n => {
            let summary = format!("{n} problem{} found", if n == 1 { "" } else { "s" });
            println!("{summary}");
            Err(summary)
        }
    }
}

/// A node's containerd config: whether its CRI pulls reach a mirror.
fn check_node_config(r: &mut Report, path: &Path) {
    let what = format!("containerd config {}", path.display());
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                &what,
                format!("cannot read it: {e}"),
                "give the path of the node's config.toml",
            );
            return;
        }
    };
    for finding in crate::node_config::check(&text) {
        match finding {
            crate::node_config::Finding::Ok(detail) => r.ok(&what, detail),
            crate::node_config::Finding::Warn(problem, fix) => r.warn(&what, problem, fix),
            crate::node_config::Finding::Fail(problem, fix) => r.fail(&what, problem, fix),
        }
    }
}

/// The command that starts whatever should be listening on `socket`.
fn start_command(socket: &Path, b: &BackendConfig) -> String {
    let s = socket.display().to_string();
    if matches!(b, BackendConfig::Containerd(_)) {
        return format!("start containerd (systemctl start containerd), or point socket at the one that runs (k3s: /run/k3s/containerd/containerd.sock); now: {s}");
    }
    if s.contains("/run/user/") && s.contains("podman") {
        format!("as the user who owns it: systemctl --user enable --now podman.socket (without systemd: podman system service --time=0 unix://{s} &)")
    } else if s.contains("podman") {
        format!("systemctl enable --now podman.socket (without systemd: podman system service --time=0 unix://{s} &)")
    } else {
        "systemctl start docker, or point socket (or DOCKER_HOST) at the engine's socket (rootful Podman: unix:///run/podman/podman.sock)".to_string()
    }
}

/// The socket exists, is a socket, and this user may connect to it.
fn check_socket(r: &mut Report, what: &str, socket: &Path, b: &BackendConfig) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.fail(
                what,
                format!("{} does not exist", socket.display()),
                start_command(socket, b),
            );
            return false;
        }
        Err(e) => {
            r.fail(
                what,
                format!("{}: {e}", socket.display()),
                "run ferry as a user that can reach the socket's directory",
            );
            return false;
        }
    };
    if !meta.file_type().is_socket() {
        r.fail(
            what,
            format!("{} is not a socket", socket.display()),
            start_command(socket, b),
        );
        return false;
    }
    let access = nix::unistd::access(socket, nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK);
    if access.is_err() {
        let gid = meta.gid();
        let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .ok()
            .flatten()
            .map_or_else(|| gid.to_string(), |g| g.name);
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
            .ok()
            .flatten()
            .map_or_else(|| nix::unistd::Uid::effective().to_string(), |u| u.name);
        r.fail(
            what,
            format!(
                "permission denied on {} (owned by group {group}, mode {:o})",
                socket.display(),
                meta.mode() & 0o777
            ),
            format!("usermod -aG {group} {user} and log in again; in a container: docker run --group-add {gid} …"),
        );
        return false;
    }
    true
}

fn report_status(r: &mut Report, what: &str, b: &BackendConfig, s: ferry_core::status::BackendStatus) {
    if !s.reachable {
        let fix = match b.unix_socket() {
            Some(p) => start_command(&p, b),
            None => "check the socket or directory named above".to_string(),
        };
        r.fail(
            what,
            format!("{} does not answer: {}", s.location, s.error.unwrap_or_default()),
            fix,
        );
        return;
    }
    let mut detail = s.location.clone();
    if let Some(p) = &s.product {
        detail = format!("{p} {}", s.version.as_deref().unwrap_or("?"));
        if let Some(api) = &s.api_version {
            detail.push_str(&format!(" (API {api})"));
        }
        detail.push_str(&format!(" at {}", s.location));
    }
    if let Some(storage) = &s.storage {
        detail.push_str(&format!(", {storage}"));
    }
    let containerd_store = s
        .storage
        .as_deref()
        .is_some_and(|d| d.contains("containerd image store"));
    match b {
        BackendConfig::Containerd(c) if c.direct_reads && !s.direct_reads => {
            detail.push_str(", blobs read through the API");
            r.ok(what, &detail);
            r.warn(
                what,
                "containerd's content directory is not readable by this user (or holds no blobs yet): every blob goes through the Read API",
                "run ferry as root, or as a user that may read containerd's root (content.v1.content/blobs)",
            );
        }
        BackendConfig::Containerd(_) if s.direct_reads => {
            r.ok(what, format!("{detail}, blobs read from its content directory"))
        }
        BackendConfig::Docker(_) if s.serves_from.as_deref().is_some_and(|f| f.starts_with("containerd")) => r.ok(
            what,
            format!(
                "{detail}, images served from its {} (no export)",
                s.serves_from.as_deref().unwrap_or_default()
            ),
        ),
        BackendConfig::Docker(_) if s.direct_reads => {
            r.ok(what, format!("{detail}, layers read from its storage (no export)"))
        }
        BackendConfig::Docker(c) if c.direct_reads && !containerd_store => {
            r.ok(what, format!("{detail}, images exported"));
            r.warn(
                what,
                "the engine's storage cannot be read here, so every image is exported before it is served (the log says why)",
                "run ferry as root on the engine's host, or mount the data root read-only into ferry's container (-v /var/lib/docker:/var/lib/docker:ro)",
            );
        }
        BackendConfig::Docker(_) if containerd_store => {
            r.ok(what, format!("{detail}, images exported"));
            r.warn(
                what,
                "the engine keeps its images in containerd's image store, but its containerd cannot be reached from here: every image is exported (and `docker save` drops layers shared between images, moby#49473)",
                "mount the engine's containerd socket into ferry's container at the same path (-v /run/containerd/containerd.sock:/run/containerd/containerd.sock; the log names the path `docker info` gives) and run ferry as root",
            );
        }
        _ => r.ok(what, detail),
    }
}

/// How long an origin may take to answer `GET /v2/`.
const ORIGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which backend asks an origin: where its settings are, for the fix a line suggests.
#[derive(Clone, Copy)]
enum Asker {
    /// The upstream backend: `[backends.hosts."host"]`, its own credentials.
    Upstream,
    /// A containerd backend's heals: its `plain_http`, `ca_file` and `hosts`, each client's
    /// credentials.
    Heal,
}

/// The upstream backend's origins named one by one (`allow` without patterns, `hosts`),
/// asked with ferry's own credentials and CAs.
async fn check_upstream_origins(r: &mut Report, what: &str, c: &UpstreamConfig) {
    let named = c.named_origins();
    if named.is_empty() {
        r.ok(what, "no origin named one by one (allow patterns only): none asked");
        return;
    }
    match c.client() {
        Ok(client) => check_origins(r, what, &client, &named, Asker::Upstream).await,
        Err(e) => r.fail(what, e.to_string(), "correct the CA or password file named above"),
    }
}

/// The origins a containerd backend heals from that the config names one by one
/// (`[origins] allow` without patterns, the backend's `plain_http` and `hosts`), asked as a
/// heal would.
async fn check_heal_origins(r: &mut Report, what: &str, c: &ContainerdConfig, origins: &OriginsConfig) {
    if !c.fetch_missing {
        return;
    }
    let mut named: Vec<String> = origins.allow.iter().filter(|h| !h.contains('*')).cloned().collect();
    for h in &c.named_origins() {
        if !named.contains(h) {
            named.push(h.clone());
        }
    }
    if named.is_empty() {
        r.ok(
            &format!("{what} heals"),
            "from the public registries and [origins] allow patterns; none named one by one: none asked",
        );
        return;
    }
    match c.heal_client(&origins.policy()) {
        Ok(client) => check_origins(r, &format!("{what} heal"), &client, &named, Asker::Heal).await,
        Err(e) => r.fail(what, e.to_string(), "correct ca_file of this backend"),
    }
}

/// Asks each named origin for `GET /v2/`, all at once: a wrong password, a missing CA or an
/// endpoint that is not a registry shows here rather than in the first pull.
async fn check_origins(r: &mut Report, what: &str, client: &RegistryClient, named: &[String], asker: Asker) {
    let answers = futures::future::join_all(named.iter().map(|host| async move {
        let answer = tokio::time::timeout(ORIGIN_TIMEOUT, client.ping(host)).await;
        (host, client.api_url(host), answer)
    }))
    .await;
    for (host, url, answer) in answers {
        let what = format!("{what} origin {host}");
        let settings = format!("under [backends.hosts.\"{host}\"]");
        let unreachable =
            format!("check that {url} is reachable from here (DNS, firewall, proxy); cached images are still served");
        match answer {
            Err(_) => r.warn(
                &what,
                format!("{url}/v2/ did not answer within {}s", ORIGIN_TIMEOUT.as_secs()),
                unreachable,
            ),
            Ok(Ok(Some(true))) => r.ok(&what, format!("{url} answers, ferry's credentials accepted")),
            Ok(Ok(Some(false))) => r.ok(&what, format!("{url} answers")),
            Ok(Ok(None)) => r.fail(
                &what,
                format!("{url}/v2/ answered 404: not a registry's API"),
                match asker {
                    Asker::Upstream => format!("set endpoint {settings} to the registry's API address"),
                    Asker::Heal => "heals ask the host an image is named after: name the registry's own host".into(),
                },
            ),
            Ok(Err(Error::Unauthorized { message, .. })) if message.contains("refused") => r.fail(
                &what,
                message,
                format!(
                    "correct username and password (or password_file) {settings}, or the host's entry in docker_config"
                ),
            ),
            Ok(Err(Error::Unauthorized { .. })) => match asker {
                Asker::Upstream => r.warn(
                    &what,
                    format!(
                        "{url} needs credentials and ferry has none for it: only clients that send their own can pull"
                    ),
                    format!(
                        "set username and password_file {settings} (or docker_config) for clients that do not log in"
                    ),
                ),
                Asker::Heal => r.ok(
                    &what,
                    format!("{url} answers, with credentials: heals send each client's own"),
                ),
            },
            Ok(Err(e)) => {
                let text = match e {
                    Error::Unavailable { reason, .. } => reason,
                    e => e.to_string(),
                };
                let speaks_tls = text.contains("HTTP request to an HTTPS server");
                let fix = if text.contains("certificate") {
                    match asker {
                        Asker::Upstream => format!("set ca_file {settings} to the CA that signed its certificate"),
                        Asker::Heal => {
                            format!("set ca_file of this backend (or {settings}) to the CA that signed its certificate")
                        }
                    }
                } else if speaks_tls {
                    match asker {
                        Asker::Upstream => format!("it speaks TLS: set plain_http = false {settings}"),
                        Asker::Heal => format!("it speaks TLS: set plain_http = false {settings} of this backend"),
                    }
                } else if text.contains("corrupt message") || text.contains("InvalidContentType") {
                    match asker {
                        Asker::Upstream => format!("it speaks plain HTTP: set plain_http = true {settings}"),
                        Asker::Heal => format!("it speaks plain HTTP: add \"{host}\" to plain_http of this backend"),
                    }
                } else if text.contains("not contacted") {
                    match asker {
                        Asker::Upstream => "name the host in allow, or under [backends.hosts]".into(),
                        Asker::Heal => "name the host in [origins] allow".into(),
                    }
                } else {
                    unreachable
                };
                if text.contains("certificate") || text.contains("corrupt message") || speaks_tls {
                    r.fail(&what, text, fix);
                } else {
                    r.warn(&what, text, fix);
                }
            }
        }
    }
}

/// The data directory can be created and written, and has room.
async fn check_data_dir(r: &mut Report, dir: &Path) -> bool {
    let what = format!("data dir {}", dir.display());
    if let Err(e) = tokio::fs::create_dir_all(dir).await {
        r.fail(
            &what,
            format!("cannot create it: {e}"),
            format!("mkdir -p {0} && chown $(id -un) {0}, or set cache.dir", dir.display()),
        );
        return false;
    }
    if let Err(e) = ferry_backends::probe_writable(dir).await {
        r.fail(
            &what,
            e,
            format!(
                "chown -R $(id -un) {}, or set cache.dir to a directory this user owns",
                dir.display()
            ),
        );
        return false;
    }
    match nix::sys::statvfs::statvfs(dir) {
        Ok(v) => {
            let free = v.blocks_available() * v.fragment_size();
            let gib = free as f64 / (1u64 << 30) as f64;
            if free < LOW_SPACE {
                r.warn(
                    &what,
                    format!("only {gib:.1} GiB free"),
                    "free space there, or set cache.dir (and max_cache_size) elsewhere",
                );
            } else {
                r.ok(&what, format!("writable, {gib:.1} GiB free"));
            }
        }
        Err(e) => r.ok(&what, format!("writable (free space unknown: {e})")),
    }
    true
}

/// Nothing else listens on `addr`, and this user may bind it.
/// The listen address: free, or held by a running ferry (`true`), or a problem.
async fn check_listen(r: &mut Report, what: &str, addr: std::net::SocketAddr, tls: bool) -> bool {
    let what = format!("{what} {addr}");
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => r.ok(&what, "free"),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return check_running(r, &what, addr, tls).await,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.fail(
            &what,
            format!("permission denied: {e}"),
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port above 1024 (--addr :5000)",
        ),
        Err(e) => r.fail(&what, e.to_string(), "choose another address with --addr"),
    }
    false
}

/// Who holds the listen address: a running ferry (its `/healthz` says so; then what its
/// `/readyz` sees is reported), or another program (a failure: this ferry could not start).
async fn check_running(r: &mut Report, what: &str, addr: std::net::SocketAddr, tls: bool) -> bool {
    let in_use = format!(
        "ss -ltnp 'sport = :{}' shows who; stop it, or choose another address with --addr",
        addr.port()
    );
    if tls {
        r.warn(
            what,
            "something listens here, behind TLS the doctor cannot ask whether it is this ferry",
            format!("curl -k https://{addr}/healthz answers ok with a Ferry-Version header if it is; else {in_use}"),
        );
        return true; // perhaps this ferry: its stores are not opened here
    }
    let probe_addr = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => format!("127.0.0.1:{}", addr.port()),
        ip if ip.is_unspecified() => format!("[::1]:{}", addr.port()),
        _ => addr.to_string(),
    };
    let asked = probe_addr.clone();
    let health = tokio::task::spawn_blocking(move || crate::probe::get(&asked, "/healthz")).await;
    let health = match health {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            r.fail(
                what,
                format!("address already in use, by a program that does not answer HTTP ({e})"),
                in_use,
            );
            return false;
        }
        Err(e) => {
            r.fail(what, format!("address already in use: {e}"), in_use);
            return false;
        }
    };
    let Some(version) = health.header("ferry-version").filter(|_| health.status == 200) else {
        let who = health.header("server").map_or(String::new(), |s| format!(" ({s})"));
        r.fail(
            what,
            format!(
                "address already in use by another program{who}: /healthz answered {}",
                health.status
            ),
            in_use,
        );
        return false;
    };
    let uptime = health.header("ferry-uptime").unwrap_or("?");
    let ready = tokio::task::spawn_blocking(move || crate::probe::get(&probe_addr, "/readyz")).await;
    match ready {
        Ok(Ok(a)) if a.status == 200 => r.ok(
            what,
            format!("ferry {version} is serving here (up {uptime} s), {}", a.body.trim()),
        ),
        Ok(Ok(a)) => {
            r.ok(what, format!("ferry {version} is serving here (up {uptime} s)"));
            r.warn(
                what,
                format!("the running ferry is not ready: {}", a.body.trim()),
                "its log says why each backend cannot be reached",
            );
        }
        _ => r.ok(what, format!("ferry {version} is serving here (up {uptime} s)")),
    }
    true
}
