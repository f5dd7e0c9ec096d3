//! `ferry doctor`, `ferry config` and `ferry mirrors` against real engines: the doctor's
//! verdicts on healthy backends, a missing socket, a socket this user may not use and a
//! taken port; each value's source; and each printed mirror snippet handed to the real
//! client it names (containerd's ctr, Podman, a Docker daemon started with it) for a pull.

use std::path::Path;

use ferry_e2e::*;

use ferry_e2e::run_ferry as ferry;

fn write_config(dir: &Path, body: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("ferry.toml");
    std::fs::write(
        &path,
        format!("[cache]\ndir = \"{}\"\n{body}", dir.join("data").display()),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn doctor_passes_a_healthy_setup_and_names_each_engine() {
    let dir = scratch();
    let config = write_config(
        dir.path(),
        &format!(
            "[[backends]]\ntype = \"docker\"\nsocket = \"{}\"\n[[backends]]\ntype = \"docker\"\nname = \"podman\"\nsocket = \"{}\"\n\
             [[backends]]\ntype = \"containerd\"\nsocket = \"{}\"\n[[backends]]\ntype = \"push\"\n",
            docker20(),
            env("E2E_PODMAN_ROOTLESS_HOST"),
            containerd16()
        ),
    );
    let (code, out) = ferry(&["doctor", "--config", &config, "--addr", "127.0.0.1:0"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Docker Engine 20.10"), "{out}");
    assert!(out.contains("(API 1.41)") && out.contains("overlay2"), "{out}");
    assert!(out.contains("layers read from its storage (no export)"), "{out}");
    assert!(out.contains("Podman 4.3") && out.contains("vfs"), "{out}");
    assert!(out.contains("containerd 1.6"), "{out}");
    assert!(out.contains("writable") && out.contains("GiB free"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn doctor_says_what_is_broken_and_how_to_fix_it() {
    let dir = scratch();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let gone = dir.path().join("run/user/4242/podman/podman.sock");
    let config = write_config(
        dir.path(),
        &format!(
            "[[backends]]\ntype = \"docker\"\nsocket = \"unix://{}\"\n[[backends]]\ntype = \"push\"\n",
            gone.display()
        ),
    );
    let (code, out) = ferry(&["doctor", "--config", &config, "--addr", &taken_addr], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL  backend docker (docker): {} does not exist",
            gone.display()
        )),
        "{out}"
    );
    assert!(out.contains("systemctl --user enable --now podman.socket"), "{out}");
    assert!(
        out.contains(&format!("FAIL  listen {taken_addr}: address already in use")),
        "{out}"
    );
    assert!(out.contains("2 problems found"), "{out}");

    // A bad config is one problem, named.
    let bad = write_config(dir.path(), "[server]\nadr = 1\n");
    let (code, out) = ferry(&["doctor", "--config", &bad], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  config") && out.contains("adr"), "{out}");
}

/// Run beside the ferry it checks (what someone does when a cluster cannot pull), the doctor
/// reports that ferry, and what it sees, rather than a taken port; another HTTP server there
/// is a failure that names it.
#[test]
fn doctor_beside_a_running_ferry_reports_it() {
    let dir = scratch();
    let config = write_config(
        dir.path(),
        &format!(
            "[[backends]]\ntype = \"docker\"\nsocket = \"{}\"\n[[backends]]\ntype = \"push\"\n",
            docker20()
        ),
    );
    let running = Ferry::start_with(dir.path(), Path::new(&config), &[]);
    // An upload under way, half sent: the doctor must not open (and sweep) the stores the
    // running ferry holds.
    let http = reqwest::blocking::Client::new();
    let data = incompressible(256 * 1024);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let r = http.post(running.url("/v2/doc/app/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    let location = if location.starts_with("http") {
        location
    } else {
        running.url(&location)
    };
    let r = http
        .patch(&location)
        .header("Content-Range", format!("0-{}", data.len() / 2 - 1))
        .body(data[..data.len() / 2].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    let location = if location.starts_with("http") {
        location
    } else {
        running.url(&location)
    };
    let (code, out) = ferry(&["doctor", "--config", &config, "--addr", &running.addr()], &[]);
    assert_eq!(code, 0, "{out}");
    let opened_here = !doctor_line(&out, "backend push (push)").contains("not opened here");
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{location}{sep}digest={digest}"))
        .body(data[data.len() / 2..].to_vec())
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "the upload did not survive the doctor: {}",
        running.logs()
    );
    assert!(!opened_here, "{out}");
    let line = doctor_line(&out, &format!("listen {}", running.addr()));
    assert!(line.starts_with("ok"), "{out}");
    assert!(
        line.contains(&format!("ferry {} is serving here", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(line.contains("ready: docker, push"), "{out}");

    let stranger = FakeHttp::start("127.0.0.1", |_| {
        http_response("200 OK", "Server: nginx/1.22\r\n", b"welcome")
    });
    let (code, out) = ferry(&["doctor", "--config", &config, "--addr", &stranger.addr], &[]);
    assert_eq!(code, 1, "{out}");
    let line = doctor_line(&out, &format!("listen {}", stranger.addr));
    assert!(
        line.starts_with("FAIL") && line.contains("another program (nginx/1.22)"),
        "{out}"
    );
}

#[test]
fn doctor_names_the_group_a_user_lacks() {
    // The suite's unprivileged user (it runs rootless Podman) may not use Docker's socket.
    let dir = scratch();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    sh(&format!(
        "chown -R ferry-e2e {} && chmod 755 {}",
        dir.path().display(),
        dir.path().display()
    ));
    let config = write_config(
        dir.path(),
        &format!("[[backends]]\ntype = \"docker\"\nsocket = \"{}\"\n", docker20()),
    );
    let socket = docker20().trim_start_matches("unix://").to_string();
    let group = sh(&format!("stat -c %G {socket}")).trim().to_string();
    let (ok, out) = sh_result(&format!(
        "setpriv --reuid=$(id -u ferry-e2e) --regid=$(id -g ferry-e2e) --init-groups {} doctor --config {config} --addr 127.0.0.1:0",
        ferry_bin().display()
    ));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("permission denied on {socket} (owned by group {group}")),
        "{out}"
    );
    assert!(out.contains(&format!("usermod -aG {group} ferry-e2e")), "{out}");
}

#[test]
fn config_prints_each_value_with_its_source() {
    let dir = scratch();
    let config = write_config(dir.path(), "[server]\nlog_level = \"debug\"\n");
    let (code, out) = ferry(
        &["config", "--config", &config, "--log-format", "json"],
        &[
            ("REGISTRY_HTTP_ADDR", ":6001"),
            ("FERRY_SERVER__MAX_CONNECTIONS", "12"),
            ("FERRY_DROP_TO", "65532:65532"),
            ("FERRY_PROGRESS_INTERVAL_MS", "250"),
            ("FERRY_PULL_MISSING", "yes"),
            ("DOCKER_HOST", "unix:///run/elsewhere.sock"),
            ("REGISTRY_PREFIXES", "team/ registry.k8s.io/"),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{out}"))
            .to_string()
    };
    assert!(
        line("server.addr").contains("\"0.0.0.0:6001\"")
            && line("server.addr").ends_with("# environment REGISTRY_HTTP_ADDR"),
        "{out}"
    );
    assert!(
        line("server.max_connections").ends_with("# environment FERRY_SERVER__MAX_CONNECTIONS"),
        "{out}"
    );
    // ferry's own short names are configuration too, said as such.
    assert!(
        line("server.drop_to").contains("\"65532:65532\"")
            && line("server.drop_to").ends_with("# environment FERRY_DROP_TO"),
        "{out}"
    );
    assert!(
        line("server.progress_interval_ms").contains("250")
            && line("server.progress_interval_ms").ends_with("# environment FERRY_PROGRESS_INTERVAL_MS"),
        "{out}"
    );
    // Docker's variables and FERRY_PULL_MISSING set `[docker]`, which every docker backend
    // shares; oci-reg-docker's prefixes are a list written as words.
    assert!(
        line("docker.pull_missing").contains("true")
            && line("docker.pull_missing").ends_with("# environment FERRY_PULL_MISSING"),
        "{out}"
    );
    assert!(
        line("docker.host").contains("\"unix:///run/elsewhere.sock\"")
            && line("docker.host").ends_with("# environment DOCKER_HOST"),
        "{out}"
    );
    assert!(
        line("docker.tls_verify").contains("= false") && line("docker.tls_verify").ends_with("# default"),
        "{out}"
    );
    assert!(
        line("access.prefixes.1").contains("\"registry.k8s.io/\"")
            && line("access.prefixes.1").ends_with("# environment REGISTRY_PREFIXES"),
        "{out}"
    );
    let (code, refused) = ferry(&["config", "--config", &config], &[("FERRY_PULL_MISSING", "maybe")]);
    assert_ne!(code, 0, "{refused}");
    assert!(
        refused.contains(
            "\"maybe\": expected true or false for key \"docker.pull_missing\" in environment variable FERRY_PULL_MISSING"
        ),
        "{refused}"
    );
    assert!(line("server.read_ahead").contains("\"12MiB\""), "{out}");
    assert!(line("server.log_level").ends_with(&format!("# file {config}")), "{out}");
    assert!(line("server.log_format").ends_with("# flag"), "{out}");
    assert!(line("server.header_timeout_secs").ends_with("# default"), "{out}");
    assert!(
        line("backends.0.type").contains("\"docker\"") && line("backends.0.type").ends_with("# default"),
        "{out}"
    );
}

/// The files `ferry mirrors` printed: (path, content) for each `# /PATH` header.
fn printed_files(out: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    for l in out.lines() {
        match l.strip_prefix("# /") {
            Some(rest) => files.push((format!("/{}", rest.split(' ').next().unwrap()), String::new())),
            None => {
                if let Some((_, content)) = files.last_mut() {
                    content.push_str(l);
                    content.push('\n');
                }
            }
        }
    }
    files
}

fn mirrors(client: &str, ferry: &Ferry, dir: &Path) -> Vec<(String, String)> {
    let config = write_config(dir, &format!("[server]\naddr = \"0.0.0.0:{}\"\n", ferry.port));
    let (code, out) = self::ferry(&["mirrors", "--for", client, "--config", &config], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("127.0.0.1:{}", ferry.port)), "{out}");
    printed_files(&out)
}

#[test]
fn each_printed_mirror_works_with_its_client() {
    let engine = docker20();
    let dir = scratch();
    let served = Ferry::start(dir.path(), &docker_chain(&engine, ""));
    let name = unique("mir");
    build_image(&engine, &format!("{name}:v1"), 1);
    let image = format!("docker.io/library/{name}:v1");

    // containerd: the printed _default hosts.toml, as --hosts-dir.
    let files = mirrors("containerd", &served, &dir.path().join("c"));
    let (path, hosts) = files
        .iter()
        .find(|(p, _)| p.ends_with("_default/hosts.toml"))
        .unwrap_or_else(|| panic!("{files:?}"));
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join("_default")).unwrap();
    std::fs::write(certs.join("_default/hosts.toml"), hosts).unwrap();
    assert_eq!(path, "/etc/containerd/certs.d/_default/hosts.toml");
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &image);
    assert_eq!(out.trim(), format!("hello from {name}:v1"));

    // Podman: the printed registries.conf, with a storage of the test's own.
    let files = mirrors("podman", &served, &dir.path().join("p"));
    let conf = dir.path().join("registries.conf");
    std::fs::write(&conf, &files[0].1).unwrap();
    let store = dir.path().join("podman");
    let podman = format!(
        "CONTAINERS_REGISTRIES_CONF={} podman --root {1}/root --runroot {1}/run --storage-driver vfs",
        conf.display(),
        store.display()
    );
    sh(&format!("{podman} pull {image}"));
    let out = sh(&format!(
        "{podman} run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 {image}"
    ));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    sh(&format!("{podman} rmi -a -f >/dev/null"));

    // Docker: a daemon of the test's own started with the printed daemon.json.
    let files = mirrors("docker", &served, &dir.path().join("d"));
    let daemon_json = dir.path().join("daemon.json");
    std::fs::write(&daemon_json, &files[0].1).unwrap();
    let tag = unique("mirdock");
    sh(&format!(
        "source {} && e2e_start_containerd {tag}-ctd && e2e_start_dockerd {tag} {tag}-ctd {}",
        lib(),
        daemon_json.display()
    ));
    let host = format!("unix://{}/{tag}/docker.sock", env("E2E_DIR"));
    let pulled = sh_result(&format!("docker -H {host} pull {name}:v1"));
    let run = sh_result(&format!("docker -H {host} run --rm {name}:v1"));
    sh(&format!("source {} && e2e_stop {tag} && e2e_stop {tag}-ctd", lib()));
    assert!(pulled.0, "{}", pulled.1);
    assert!(run.0, "{}", run.1);
    assert_eq!(run.1.trim(), format!("hello from {name}:v1"));
    assert!(
        count_lines(&served.logs(), &[&format!("library/{name}/manifests/v1")]) >= 3,
        "ctr, podman and docker each asked ferry: {}",
        served.logs()
    );
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

/// The k3d file `ferry mirrors --for k3d` prints, read as k3d reads a v1alpha5 SimpleConfig:
/// only keys that schema has (each level's `additionalProperties` is false), the registry to
/// use, and the mirror inside `registries.config` — a file `k3d cluster create --config`
/// takes alone.
#[test]
fn the_k3d_file_is_a_simple_config_k3d_takes_alone() {
    let (code, out) = ferry(&["mirrors", "--for", "k3d", "--address", "k3d-ferry:5000"], &[]);
    assert_eq!(code, 0, "{out}");
    let dir = scratch();
    let file = dir.path().join("k3d.yaml");
    std::fs::write(&file, &out).unwrap();
    let check = r#"
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
top = {"apiVersion", "kind", "metadata", "servers", "agents", "kubeAPI", "image", "network",
       "subnet", "token", "volumes", "manifests", "ports", "options", "env", "registries",
       "hostAliases"}
assert set(c) <= top, set(c) - top
assert c["apiVersion"] == "k3d.io/v1alpha5" and c["kind"] == "Simple", c
r = c["registries"]
assert set(r) <= {"create", "use", "config"}, r
assert r["use"] == ["k3d-ferry:5000"], r
assert isinstance(r["config"], str)
m = yaml.safe_load(r["config"])
assert m["mirrors"]["*"]["endpoint"] == ["http://k3d-ferry:5000"], m
print("ok")
"#;
    let (ok, said) = sh_result(&format!("python3 -c '{check}' {}", file.display()));
    assert!(ok && said.trim() == "ok", "{said}\n{out}");
}
