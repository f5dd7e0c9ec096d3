//! The end-to-end suite's harness, shared by its two test binaries (`tests/e2e`, every area,
//! and `tests/limits.rs`, which runs alone): the engines `tests/env/start.sh` started, a ferry
//! process per test on its own port and data directory, origins and test hosts, and shell
//! commands. Compiled once, as this crate's library.

#[path = "../../server/tests/support/http.rs"]
mod http;
pub use http::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An environment variable `tests/env/start.sh` sets; the suite is run by `tests/run.sh`.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the suite with tests/run.sh, which starts the engines"))
}

pub fn docker20() -> String {
    env("E2E_DOCKER20_HOST")
}

pub fn containerd16() -> String {
    env("E2E_CONTAINERD16_SOCK")
}

/// A scratch directory under the suite's directory, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env("E2E_DIR")).join("scratch");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A name unique to this test run, for tags and repositories.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{:x}{}", nanos % 0xffff_ffff, std::process::id())
}

/// Runs a command line in bash; panics with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a command line in bash; returns (success, stdout + stderr).
pub fn sh_result(cmd: &str) -> (bool, String) {
    let out = Command::new("bash").arg("-c").arg(cmd).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Builds a runnable image (busybox + `layers` generated files) in the engine at `host`.
pub fn build_image(host: &str, tag: &str, layers: usize) {
    build_image_from(host, tag, layers, "");
}

/// Builds an image of `layers` generated files on top of `base` (`""`: scratch + busybox).
pub fn build_image_from(host: &str, tag: &str, layers: usize, base: &str) {
    sh(&format!(
        "source {} && set +u && e2e_build_image {host} {tag} {layers} {base}",
        lib()
    ));
}

/// The test environment's shell library (tests/env/lib.sh), to `source` in `sh` commands.
pub fn lib() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("env/lib.sh")
        .display()
        .to_string()
}

/// Makes, in `dir`, a CA (`ca.pem`, `ca-key.pem`) and a server certificate for the address
/// `ip` signed by it (`server-cert.pem`, `server-key.pem`).
pub fn make_server_cert(dir: &Path, ip: &str) {
    sh(&format!(
        "source {} && e2e_make_server_cert {} {ip}",
        lib(),
        dir.display()
    ));
}

/// Pushes `data` as a blob of `repo` in one monolithic upload (no manifest); its digest.
pub fn push_blob(ferry: &Ferry, repo: &str, data: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(data));
    let r = reqwest::blocking::Client::new()
        .post(ferry.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", ferry.logs());
    digest
}

/// `len` bytes that do not compress and do not repeat within a blob.
pub fn incompressible(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
}

/// The files process `pid` holds open.
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running ferry process.
pub struct Ferry {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    config: PathBuf,
}

impl Ferry {
    /// Starts ferry with `[cache] dir = <dir>` and the given extra TOML (e.g. backends).
    /// Unless `extra_toml` has an `[origins]` table of its own, the suite's two registries
    /// (on loopback) are named in `[origins] allow`, as a user names a private registry.
    pub fn start(dir: &Path, extra_toml: &str) -> Ferry {
        let config = dir.join("ferry.toml");
        let origins = if extra_toml.contains("[origins]") {
            String::new()
        } else {
            let named: Vec<String> = ["E2E_REGISTRY", "E2E_REGISTRY_AUTH"]
                .iter()
                .filter_map(|v| std::env::var(v).ok())
                .map(|r| format!("\"{r}\""))
                .collect();
            format!("[origins]\nallow = [{}]\n", named.join(", "))
        };
        std::fs::write(
            &config,
            format!(
                "[cache]\ndir = \"{}\"\n{origins}{extra_toml}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        Ferry::start_with(dir, &config, &[])
    }

    /// Starts ferry with a config file and extra environment variables.
    pub fn start_with(dir: &Path, config: &Path, envs: &[(&str, &str)]) -> Ferry {
        let port = free_port();
        let log = dir.join(format!("ferry-{port}.log"));
        let mut f = Ferry {
            child: None,
            port,
            dir: dir.join("data"),
            log,
            config: config.to_path_buf(),
        };
        f.spawn(envs);
        f
    }

    fn spawn(&mut self, envs: &[(&str, &str)]) {
        let bin = std::env::var("FERRY_BIN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|_| ferry_bin());
        // Where this start's lines begin (a restart appends to the same log).
        let log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("FERRY_") || k.starts_with("REGISTRY_") || k.starts_with("DOCKER_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .args(["--addr", &format!("127.0.0.1:{}", self.port)])
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (build it with cargo build -p ferry-server)",
                bin.display()
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            // The free port was released before ferry bound it, so another process may hold it
            // now: only ferry's own "listening" line says the port is this ferry's.
            let listening = self
                .logs()
                .get(log_start..)
                .is_some_and(|l| l.contains("ferry listening"));
            if listening && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("ferry exited with {status}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ferry did not listen on {} in time:\n{}", self.port, self.logs());
    }

    /// The process id, for counting what it holds in /proc.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the process (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process with SIGKILL (a crash: nothing is cleaned up) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again after [`Ferry::kill9`] or [`Ferry::stop`], same port, config and data.
    pub fn start_again(&mut self) {
        self.spawn(&[]);
    }

    /// Stops and starts again on the same port, config and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(&[]);
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small tmpfs mounted at a directory (a disk that fills up), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`2m`, `4m`) at `dir`, made if needed.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        sh(&format!("mount -t tmpfs -o size={size} tmpfs {}", dir.display()));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sh_result(&format!("umount {}", self.0.display()));
    }
}

/// Writes a containerd `hosts.toml` that mirrors `registry` (or, as `_default`, every
/// registry) to ferry, as k3s does from registries.yaml; returns the hosts directory to pass
/// as `--hosts-dir`.
pub fn mirror_hosts(dir: &Path, registry: &str, ferry_addr: &str) -> PathBuf {
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(certs.join(registry)).unwrap();
    // `_default` stands for every registry without a directory of its own: no server there.
    // Elsewhere the fallback server (what containerd asks when the mirror fails) is a
    // loopback port nothing listens on: a test never reaches the real registry.
    let server = match registry {
        "_default" => String::new(),
        _ => "server = \"http://127.0.0.1:9\"\n".to_string(),
    };
    std::fs::write(
        certs.join(registry).join("hosts.toml"),
        format!("{server}[host.\"http://{ferry_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    certs
}

/// `ctr image pull` through the mirror, then `ctr run`; returns what the container printed.
pub fn ctr_pull_and_run(ctd: &str, ns: &str, certs: &Path, image: &str) -> String {
    sh(&format!(
        "ctr -a {ctd} -n {ns} image pull --hosts-dir {} {image}",
        certs.display()
    ));
    // `ctr run` now and then loses the output of a task that exits at once (the shim is gone
    // before the FIFO is drained); the image's bytes were digest-checked by the pull, so a
    // second run is asked for before the output is judged.
    let mut out = String::new();
    for _ in 0..3 {
        let id = unique("run");
        out = sh(&format!("ctr -a {ctd} -n {ns} run --rm {image} {id}"));
        if !out.trim().is_empty() {
            break;
        }
        eprintln!("ctr run of {image} printed nothing; running it again");
    }
    sh(&format!("ctr -a {ctd} -n {ns} image rm {image}"));
    out
}

/// The `ferry` binary of this build: next to the directory of the test executable
/// (`target/debug/deps/..` → `target/debug/ferry`), whatever the target directory.
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().join("ferry")
}

/// Runs the ferry binary with `args` (no FERRY_/REGISTRY_/DOCKER_ variables of the suite's
/// own); returns (exit code, stdout + stderr).
pub fn run_ferry(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(ferry_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") || k.starts_with("REGISTRY_") || k.starts_with("DOCKER_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).envs(envs.iter().copied()).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The line of `ferry doctor`'s report holding `mark`, with the fix line under it.
pub fn doctor_line(text: &str, mark: &str) -> String {
    let at = text
        .find(mark)
        .unwrap_or_else(|| panic!("no line with {mark:?}:\n{text}"));
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    text[start..].lines().take(2).collect::<Vec<_>>().join("\n")
}

/// Number of log lines of ferry that contain every one of `parts`.
pub fn count_lines(logs: &str, parts: &[&str]) -> usize {
    logs.lines().filter(|l| parts.iter().all(|p| l.contains(p))).count()
}

/// GETs a manifest with every manifest type accepted; returns (status, digest header, body).
pub fn get_manifest(ferry: &Ferry, name: &str, reference: &str, query: &str) -> (u16, String, Vec<u8>) {
    get_manifest_as(ferry, name, reference, query, None)
}

/// [`get_manifest`] with Basic credentials (`user`, `password`) when given.
pub fn get_manifest_as(
    ferry: &Ferry,
    name: &str,
    reference: &str,
    query: &str,
    auth: Option<(&str, &str)>,
) -> (u16, String, Vec<u8>) {
    let mut req = reqwest::blocking::Client::new().get(ferry.url(&format!("/v2/{name}/manifests/{reference}{query}")));
    if let Some((user, password)) = auth {
        req = req.basic_auth(user, Some(password));
    }
    let r = req
        .header(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
             application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let digest = r
        .headers()
        .get("Docker-Content-Digest")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, digest, r.bytes().unwrap().to_vec())
}

/// Config for the push store alone.
pub const PUSH_ONLY: &str = "[[backends]]\ntype = \"push\"\n";

/// Config for a chain of one docker backend on `socket` followed by the push store.
pub fn docker_chain(socket: &str, extra: &str) -> String {
    format!("[[backends]]\ntype = \"docker\"\nsocket = \"{socket}\"\n{extra}\n[[backends]]\ntype = \"push\"\n")
}

/// Makes content in containerd 1.7's namespace `ns` name `digest` as a pulled image's
/// manifest does (a `gc.ref.content` label; with `source`, `(host, repo)`, a
/// distribution-source label): a blob an image of containerd's lacks, what heals repair.
/// Kept by a `gc.root` label; ingested again should containerd's GC take it before it is
/// labelled.
pub fn name_in_containerd(ns: &str, digest: &str, source: Option<(&str, &str)>) {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    let work = scratch();
    let file = work.path().join("manifest.json");
    let body = format!("{{\"names\":\"{digest}\",\"nonce\":\"{}\"}}", unique(""));
    std::fs::write(&file, &body).unwrap();
    let named = format!("sha256:{}", sha256_hex(body.as_bytes()));
    let source = source
        .map(|(host, repo)| format!("containerd.io/distribution.source.{host}={repo}"))
        .unwrap_or_default();
    for _ in 0..3 {
        sh(&format!(
            "ctr -a {ctd17} -n {ns} content ingest --expected-size {} --expected-digest {named} {} < {}",
            body.len(),
            unique("e2e-ingest"),
            file.display()
        ));
        let (labelled, _) = sh_result(&format!(
            "ctr -a {ctd17} -n {ns} content label {named} containerd.io/gc.root=e2e \
             containerd.io/gc.ref.content.l.0={digest} {source}"
        ));
        if labelled {
            return;
        }
    }
    panic!("could not label {named} in {ns}");
}

/// A distribution registry on a loopback address standing in for an origin host, stopped
/// when dropped.
pub struct Origin {
    pub name: String,
    /// `ip:port`.
    pub addr: String,
    token_server: Option<String>,
}

/// A free port on `ip`.
pub fn port_on(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

impl Origin {
    pub fn start(ip: &str, htpasswd: Option<&Path>) -> Origin {
        let name = unique("origin");
        let port = port_on(ip);
        sh(&format!(
            "source {} && e2e_start_registry {name} {port} '{}' {ip}",
            lib(),
            htpasswd.map(|p| p.display().to_string()).unwrap_or_default()
        ));
        Origin {
            name,
            addr: format!("{ip}:{port}"),
            token_server: None,
        }
    }

    /// A registry whose clients need a token from a token server of its own, which grants
    /// pulls (and pushes) to `user:password`.
    pub fn start_with_token_auth(ip: &str, user: &str, password: &str) -> Origin {
        let name = unique("origin");
        let token = format!("{name}-token");
        let (port, token_port) = (port_on(ip), port_on(ip));
        sh(&format!(
            "source {lib} && auth=$(e2e_start_token_server {token} {ip} {token_port} {user} {password}) \
             && e2e_start_registry {name} {port} '' {ip} '' '' \"$auth\"",
            lib = lib()
        ));
        Origin {
            name,
            addr: format!("{ip}:{port}"),
            token_server: Some(token),
        }
    }

    /// A registry serving HTTPS on `ip` with a certificate of a CA of its own, both made in
    /// `tls` (the CA is `tls/ca.pem`).
    pub fn start_tls(ip: &str, tls: &Path) -> Origin {
        std::fs::create_dir_all(tls).unwrap();
        make_server_cert(tls, ip);
        let name = unique("origin-tls");
        let port = port_on(ip);
        sh(&format!(
            "source {} && e2e_start_registry {name} {port} '' {ip} {}",
            lib(),
            tls.display()
        ));
        Origin {
            name,
            addr: format!("{ip}:{port}"),
            token_server: None,
        }
    }

    /// Writes `size` (`head -c`: `512K`, `4M`) random bytes to `file` and uploads them as a
    /// blob of `repo` (with `creds`, `user:password`, when given); returns its digest.
    pub fn upload_random(&self, repo: &str, file: &Path, size: &str, creds: Option<&str>) -> String {
        sh(&format!("head -c {size} /dev/urandom > {}", file.display()));
        sh(&format!(
            "source {} && e2e_upload_blob {} {repo} {} {}",
            lib(),
            self.addr,
            file.display(),
            creds.unwrap_or_default()
        ))
        .trim()
        .to_string()
    }

    /// The requests the registry logged (its access log), except the start-up probes.
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(format!("{}/logs/{}.log", env("E2E_DIR"), self.name)).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("HTTP/1.1\"") && !l.contains("\"curl/"))
            .map(str::to_string)
            .collect()
    }

    pub fn stop(&self) {
        sh(&format!("source {} && e2e_stop {}", lib(), self.name));
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let mut cmd = format!("source {} && set +e && e2e_stop {}", lib(), self.name);
        if let Some(t) = &self.token_server {
            cmd.push_str(&format!(" && e2e_stop {t}"));
        }
        let _ = sh_result(&cmd);
    }
}

/// A test host: a network namespace of its own, joined to this one by a veth pair on a
/// private /30 (tests/env/lib.sh `e2e_netns_create`), for origins that must not look like
/// loopback. Daemons started in it are stopped by their PIDs and the namespace is deleted
/// when it is dropped, also when the test fails.
pub struct TestHost {
    name: String,
    /// This machine's end of the veth pair.
    pub host_side_ip: String,
    /// The namespace's address: where its servers listen.
    pub ip: String,
    daemons: Vec<String>,
}

impl TestHost {
    /// Makes the namespace and its veth pair (no `Default`: each call makes a host).
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestHost {
        let name = unique("h");
        let out = sh(&format!("source {} && e2e_netns_create {name}", lib()));
        let mut ips = out.split_whitespace().map(str::to_string);
        let (Some(host_side_ip), Some(ip)) = (ips.next(), ips.next()) else {
            panic!("e2e_netns_create printed {out:?}");
        };
        TestHost {
            name,
            host_side_ip,
            ip,
            daemons: Vec::new(),
        }
    }

    /// PIDs of the daemons started in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .filter_map(|d| std::fs::read_to_string(format!("{}/pids/{d}.pid", env("E2E_DIR"))).ok())
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }

    /// The network namespace's name (`ip netns list`).
    pub fn namespace(&self) -> String {
        format!("fe2e-{}", self.name)
    }

    /// Starts distribution in the namespace on a free port, with TLS when `tls_dir` holds a
    /// `server-cert.pem` / `server-key.pem` for [`TestHost::ip`]; returns `ip:port`.
    pub fn start_registry(&mut self, tls_dir: Option<&Path>, htpasswd: Option<&Path>) -> String {
        let port = 5000 + self.daemons.len();
        let daemon = unique("nsreg");
        sh(&format!(
            "source {} && e2e_start_registry {daemon} {port} '{}' {} '{}' {}",
            lib(),
            htpasswd.map(|p| p.display().to_string()).unwrap_or_default(),
            self.ip,
            tls_dir.map(|p| p.display().to_string()).unwrap_or_default(),
            self.name
        ));
        self.daemons.push(daemon);
        format!("{}:{port}", self.ip)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let mut cmd = format!("source {} && set +e", lib());
        for d in &self.daemons {
            cmd.push_str(&format!(" && e2e_stop {d}"));
        }
        cmd.push_str(&format!(" ; e2e_netns_delete {}", self.name));
        let _ = sh_result(&cmd);
    }
}

/// A small fake HTTP server on a loopback address, for hostile origins no real registry
/// imitates (wrong bytes under a digest, redirects into the local network, foreign token
/// realms). Every request head is recorded; `respond` turns it into a whole raw response.
pub struct FakeHttp {
    pub addr: String,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeHttp {
    pub fn start(ip: &str, respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> FakeHttp {
        let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (log, respond) = (requests.clone(), std::sync::Arc::new(respond));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (log, respond) = (log.clone(), respond.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    log.lock().unwrap().push(head.clone());
                    let _ = stream.write_all(&respond(&head));
                });
            }
        });
        FakeHttp { addr, requests }
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// A raw HTTP/1.1 response with a body and extra header lines (each ending in `\r\n`).
pub fn http_response(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}
