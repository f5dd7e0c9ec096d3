//! The docker backend's dealings with the engine itself: pulling missing images with the
//! client's credentials, an engine that stops and comes back, and engine answers that are not
//! usable archives.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

use ferry_e2e::*;

/// Puts an image into a registry from Docker 20 and removes it from the engine again. Besides
/// busybox (a layer other tests' images share, which the engine may hold while they run) it
/// has 600 KB of its own, so that pulling it back always downloads that much.
fn seed_registry(registry: &str, repo: &str, login: Option<(&str, &str)>) -> String {
    let host = docker20();
    let local = unique("seed");
    let ctx = scratch();
    sh(&format!(
        "cd {} && cp /bin/busybox . && head -c 600000 /dev/urandom > noise \
         && printf 'FROM scratch\nCOPY busybox /bin/busybox\nCOPY noise /noise\nCMD [\"/bin/busybox\", \"echo\", \"hello from {local}\"]\n' > Dockerfile \
         && DOCKER_BUILDKIT=0 docker -H {host} build --no-cache -q -t {local}:v1 . >/dev/null",
        ctx.path().display()
    ));
    let remote = format!("{registry}/{repo}:v1");
    let config = scratch();
    let docker = format!("docker -H {host} --config {}", config.path().display());
    if let Some((u, p)) = login {
        sh(&format!("{docker} login -u {u} -p {p} {registry}"));
    }
    sh(&format!(
        "{docker} tag {local}:v1 {remote} && {docker} push {remote} && {docker} rmi {remote} {local}:v1"
    ));
    remote
}

/// The JSON log lines of `logs` whose message is `message`.
fn json_lines(logs: &str, message: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

#[test]
fn exports_and_pulls_log_their_progress() {
    let registry = env("E2E_REGISTRY");
    let repo = unique("progress/img");
    seed_registry(&registry, &repo, None);
    let dir = scratch();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[origins]\nallow = [\"{registry}\"]\n[server]\nlog_format = \"json\"\n{}",
            dir.path().join("data").display(),
            docker_chain(&docker20(), "pull_missing = true\ndirect_reads = false")
        ),
    )
    .unwrap();
    // A line every millisecond: every chunk of this small image reports.
    let ferry = Ferry::start_with(dir.path(), &config, &[("FERRY_PROGRESS_INTERVAL_MS", "1")]);
    let (status, _, _) = get_manifest(&ferry, &format!("{registry}/{repo}"), "v1", "");
    assert_eq!(status, 200, "{}", ferry.logs());
    let logs = ferry.logs();
    let progress = json_lines(&logs, "progress");
    let export: Vec<_> = progress.iter().filter(|v| v["work"] == "export").collect();
    let pull: Vec<_> = progress.iter().filter(|v| v["work"] == "pull").collect();
    assert!(!export.is_empty() && !pull.is_empty(), "{logs}");
    for line in export.iter().chain(&pull) {
        let f = line;
        assert!(f["bytes_done"].as_u64().unwrap() > 0, "{line}");
        assert!(f["rate_mib_s"].as_str().unwrap().parse::<f64>().is_ok(), "{line}");
        assert!(f["percent"].as_u64().unwrap() <= 99, "{line}");
        assert!(f["image"].as_str().unwrap().contains(&repo), "{line}");
    }
    let finished = json_lines(&logs, "export finished");
    assert!(finished[0]["bytes"].as_u64().unwrap() > 1_000_000, "busybox: {logs}");
    // The image's own 600 KB layer at least, whatever else the engine holds.
    let downloaded = json_lines(&logs, "pull downloaded");
    assert!(downloaded[0]["bytes"].as_u64().unwrap() > 500_000, "{logs}");
    sh(&format!("docker -H {} rmi {registry}/{repo}:v1", docker20()));
}

#[test]
fn missing_images_are_pulled_through_the_engine() {
    let registry = env("E2E_REGISTRY");
    let repo = unique("pulled/img");
    seed_registry(&registry, &repo, None);
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), "pull_missing = true"));
    // Docker and skopeo name the origin registry in the path.
    let name = format!("{registry}/{repo}");
    let (status, _, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 200, "{}", ferry.logs());
    assert_eq!(count_lines(&ferry.logs(), &["pulling missing image", &repo]), 1);
    // containerd with a mirror for that registry sends ns= instead.
    let certs = mirror_hosts(dir.path(), &registry, &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("{name}:v1"));
    assert!(out.starts_with("hello from"), "{out}");
    sh(&format!("docker -H {} rmi {name}:v1", docker20()));

    // A digest reference the legacy store cannot serve: Docker 20 knows the registry's
    // manifest digest (RepoDigests) but its export yields a manifest of ferry's own making.
    let registry_digest = http_digest(&registry, &repo);
    let dir2 = scratch();
    let fresh = Ferry::start(dir2.path(), &docker_chain(&docker20(), ""));
    sh(&format!("docker -H {} pull {name}:v1", docker20()));
    let (status, _, _) = get_manifest(&fresh, &name, &registry_digest, "");
    assert_eq!(status, 404);
    assert!(
        fresh.logs().contains("legacy image store keeps no registry manifests"),
        "{}",
        fresh.logs()
    );
    sh(&format!("docker -H {} rmi {name}:v1", docker20()));

    // Without pull_missing: 404.
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), ""));
    let (status, _, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 404);
}

/// Five requests at once for an image the engine lacks: one pull through the engine, every
/// request served. The container image's config (container.toml) is what turns pulls on,
/// and FERRY_PULL_MISSING=false turns them off again.
#[test]
fn concurrent_requests_for_a_missing_image_share_one_pull() {
    let registry = env("E2E_REGISTRY");
    let repo = unique("once/img");
    seed_registry(&registry, &repo, None);
    let name = format!("{registry}/{repo}");
    let dir = scratch();
    let container_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../container.toml");
    let config = std::fs::read_to_string(container_toml)
        .unwrap()
        .replace("/var/lib/ferry", &dir.path().join("data").display().to_string())
        .replace("unix:///var/run/docker.sock", &docker20())
        + &format!("[origins]\nallow = [\"{registry}\"]\n");
    let file = dir.path().join("container.toml");
    std::fs::write(&file, &config).unwrap();

    let off = Ferry::start_with(dir.path(), &file, &[("FERRY_PULL_MISSING", "false")]);
    let (status, _, _) = get_manifest(&off, &name, "v1", "");
    assert_eq!(status, 404, "FERRY_PULL_MISSING=false: no pull");
    assert_eq!(count_lines(&off.logs(), &["pulling missing image"]), 0);
    drop(off);

    let ferry = Ferry::start_with(dir.path(), &file, &[]);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|_| s.spawn(|| get_manifest(&ferry, &name, "v1", "").0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 5], "{}", ferry.logs());
    assert_eq!(
        count_lines(&ferry.logs(), &["pulling missing image", &repo]),
        1,
        "{}",
        ferry.logs()
    );
    sh(&format!("docker -H {} rmi {name}:v1", docker20()));
}

/// The digest a registry serves for `repo:v1`.
fn http_digest(registry: &str, repo: &str) -> String {
    let r = reqwest::blocking::Client::new()
        .head(format!("http://{registry}/v2/{repo}/manifests/v1"))
        .header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .unwrap();
    r.headers()["Docker-Content-Digest"].to_str().unwrap().to_string()
}

#[test]
fn pulls_pass_the_clients_credentials_on() {
    let registry = env("E2E_REGISTRY_AUTH");
    let (user, pass) = (env("E2E_REGISTRY_USER"), env("E2E_REGISTRY_PASS"));
    let repo = unique("secret/img");
    seed_registry(&registry, &repo, Some((&user, &pass)));
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), "pull_missing = true"));
    let url = ferry.url(&format!("/v2/{registry}/{repo}/manifests/v1"));
    let http = reqwest::blocking::Client::new();

    // No credentials: a Basic challenge, so kubelet retries with its pull secret.
    let r = http.get(&url).send().unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["WWW-Authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");

    // Wrong credentials: not found.
    let r = http.get(&url).basic_auth(&user, Some("wrong")).send().unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // The right ones: pulled and served.
    let r = http.get(&url).basic_auth(&user, Some(&pass)).send().unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    let logs = ferry.logs();
    assert!(logs.contains("with_credentials=true"), "{logs}");
    assert!(!logs.contains(&pass), "the password must never be logged");
    sh(&format!("docker -H {} rmi {registry}/{repo}:v1", docker20()));
}

#[test]
fn engine_down_then_back() {
    // A Docker of this test's own, so stopping it disturbs no other test.
    let tag = unique("down");
    let daemon = format!("dockerd-{tag}");
    let ctd = format!("ctd-{tag}");
    let start = format!("source {} && set +u && e2e_start_dockerd {daemon} {ctd}", lib());
    sh(&format!("source {} && set +u && e2e_start_containerd {ctd}", lib()));
    sh(&start);
    let socket = format!("unix://{}/{daemon}/docker.sock", env("E2E_DIR"));
    build_image(&socket, &format!("{tag}:v1"), 1);

    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&socket, ""));
    // Something only the push store has.
    let http = reqwest::blocking::Client::new();
    let blob = b"pushed while the engine is down";
    let digest = format!("sha256:{}", sha256_hex(blob));
    let r = http
        .post(ferry.url(&format!("/v2/pushed/blobs/uploads/?digest={digest}")))
        .body(blob.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);

    let (status, _, _) = get_manifest(&ferry, &tag, "v1", "");
    assert_eq!(status, 200);
    sh(&format!("source {} && set +u && e2e_stop {daemon}", lib()));

    // Fresh names, so nothing comes from the cache.
    let started = std::time::Instant::now();
    let (status, _, body) = get_manifest(&ferry, &format!("{tag}x"), "v1", "");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let r = http
        .get(ferry.url(&format!("/v2/pushed/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "the push store still answers");
    assert!(ferry.logs().contains("unavailable"), "the outage is logged");

    sh(&start);
    build_image(&socket, &format!("{tag}y:v1"), 1);
    let (status, _, _) = get_manifest(&ferry, &format!("{tag}y"), "v1", "");
    assert_eq!(status, 200, "served again without restarting ferry:\n{}", ferry.logs());
    sh(&format!(
        "source {} && set +u && e2e_stop {daemon} && e2e_stop {ctd}",
        lib()
    ));
}

/// A fake engine: this reproduces broken export answers, which no real engine gives on
/// purpose. It answers the handful of Engine API calls the backend makes and serves `export`
/// as the body of every `/images/.../get`, and `images` (JSON) as its image list.
fn fake_engine(socket: &Path, export: Vec<u8>, images: String) {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
            let (ctype, payload): (&str, Vec<u8>) = if path.ends_with("/version") {
                ("application/json", br#"{"Version":"0.0-fake","ApiVersion":"1.41","Components":[{"Name":"Engine","Version":"0.0-fake"}]}"#.to_vec())
            } else if path.ends_with("/info") {
                ("application/json", br#"{"DriverStatus":[]}"#.to_vec())
            } else if path.contains("/images/json") {
                ("application/json", images.clone().into_bytes())
            } else if path.contains("/json") && path.contains("/images/") {
                ("application/json", br#"{"Id":"sha256:1111111111111111111111111111111111111111111111111111111111111111","RootFS":{"Type":"layers","Layers":[]}}"#.to_vec())
            } else if path.contains("/get") {
                ("application/x-tar", export.clone())
            } else {
                ("application/json", b"{}".to_vec())
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                payload.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&payload);
        }
    });
}

fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn unusable_exports_are_errors_and_leave_nothing() {
    let layer = vec![7u8; 100_000];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not a tar", b"this is not a tar archive, just text".repeat(100)),
        (
            "tar without manifest.json or index.json",
            tar_with(&[("abc/layer.tar", &layer), ("abc.json", b"{}")]),
        ),
        (
            "manifest.json naming a missing layer",
            tar_with(&[
                ("abc.json", b"{}"),
                (
                    "manifest.json",
                    br#"[{"Config":"abc.json","Layers":["gone/layer.tar"]}]"#,
                ),
            ]),
        ),
    ];
    for (what, export) in cases {
        let dir = scratch();
        let socket = dir.path().join("fake.sock");
        fake_engine(&socket, export, "[]".into());
        let ferry = Ferry::start(dir.path(), &docker_chain(&format!("unix://{}", socket.display()), ""));
        let (status, _, body) = get_manifest(&ferry, "broken", "v1", "");
        assert_eq!(status, 500, "{what}: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNKNOWN", "{what}");
        assert!(
            v["errors"][0]["message"].as_str().unwrap().contains("export"),
            "{what}: {v}"
        );
        let left: Vec<_> = snapshot(&ferry.dir.join("docker"))
            .into_iter()
            .filter(|(p, _)| !p.starts_with("entries/."))
            .collect();
        assert!(left.is_empty(), "{what}: the cache keeps {left:?}");
    }
}

/// A blob is content-addressed: when the docker backend fails on it (its export is
/// unusable), the push store's copy is served; the failure is the answer only when no later
/// backend holds the blob.
#[test]
fn a_failing_export_does_not_hide_a_blob_the_push_store_holds() {
    let dir = scratch();
    let socket = dir.path().join("fake.sock");
    let pushed = b"pushed blob ".repeat(1000);
    let digest = format!("sha256:{}", sha256_hex(&pushed));
    let absent = format!("sha256:{}", sha256_hex(b"held by nobody"));
    // The engine lists images whose ids are these digests, so the docker backend exports
    // (and fails) for each of them.
    let image = |id: &str| {
        format!(
            r#"{{"Id":"{id}","ParentId":"","RepoTags":[],"RepoDigests":[],"Created":0,"Size":0,"SharedSize":-1,"Labels":{{}},"Containers":-1}}"#
        )
    };
    let images = format!("[{},{}]", image(&digest), image(&absent));
    fake_engine(&socket, b"this is not a tar archive".repeat(100), images);
    let ferry = Ferry::start(dir.path(), &docker_chain(&format!("unix://{}", socket.display()), ""));
    let (status, body) = raw_request(
        &ferry.addr(),
        "POST",
        &format!("/v2/e2e/pushed/blobs/uploads/?digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        &pushed,
    );
    assert_eq!(status, 201, "{body}");

    let r = reqwest::blocking::get(ferry.url(&format!("/v2/e2e/pushed/blobs/{digest}"))).unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    assert_eq!(r.headers()["ferry-backend"], "push");
    assert_eq!(r.bytes().unwrap(), pushed);
    assert_eq!(
        count_lines(&ferry.logs(), &["backend failed; asking the next one", &digest]),
        1
    );

    let (status, body) = raw_request(
        &ferry.addr(),
        "GET",
        &format!("/v2/e2e/pushed/blobs/{absent}"),
        &[],
        b"",
    );
    assert_oci_error(status, &body, 500, "UNKNOWN");
    assert!(body.contains("export"), "{body}");
}

#[test]
fn remote_engine_over_tcp_with_tls() {
    let tag = unique("tls");
    let (daemon, ctd) = (format!("dockerd-{tag}"), format!("ctd-{tag}"));
    let certs = scratch();
    let c = certs.path().display().to_string();
    // A CA, a server certificate for 127.0.0.1 and a client certificate, as Docker's docs make them.
    make_server_cert(certs.path(), "127.0.0.1");
    sh(&format!(
        "cd {c} && openssl req -newkey rsa:2048 -nodes -keyout key.pem -out client.csr -subj /CN=ferry 2>/dev/null \
         && printf 'extendedKeyUsage=clientAuth\\n' > client.ext \
         && openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out cert.pem -days 1 -extfile client.ext 2>/dev/null"
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tls = format!(
        "-H tcp://127.0.0.1:{port} --tlsverify --tlscacert {c}/ca.pem --tlscert {c}/server-cert.pem --tlskey {c}/server-key.pem"
    );
    sh(&format!("source {} && set +u && e2e_start_containerd {ctd}", lib()));
    sh(&format!(
        "source {} && set +u && DOCKERD_ARGS='{tls}' e2e_start_dockerd {daemon} {ctd}",
        lib()
    ));
    let socket = format!("unix://{}/{daemon}/docker.sock", env("E2E_DIR"));
    build_image(&socket, &format!("{tag}:v1"), 1);

    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"docker\"\nsocket = \"tcp://127.0.0.1:{port}\"\ntls_dir = \"{c}\"\n"),
    );
    let (status, _, _) = get_manifest(&ferry, &tag, "v1", "");
    assert_eq!(status, 200, "{}", ferry.logs());
    assert!(ferry.logs().contains("tls=true"));
    // Without the client certificate the engine refuses: the backend is unavailable, not ferry.
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"docker\"\nsocket = \"tcp://127.0.0.1:{port}\"\n"),
    );
    let (status, _, _) = get_manifest(&ferry, &tag, "v1", "");
    assert_eq!(status, 404);
    sh(&format!(
        "source {} && set +u && e2e_stop {daemon} && e2e_stop {ctd}",
        lib()
    ));
}

/// Builds an image of `mb` MiB of random bytes (plus busybox) in Docker 20: its export takes
/// long enough to be cut.
fn build_big_image(tag: &str, mb: usize) {
    let ctx = scratch();
    let c = ctx.path().display();
    sh(&format!(
        "cp /bin/busybox {c}/busybox && head -c {}M /dev/urandom > {c}/big && \
         printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCOPY big /big\\nCMD [\"/bin/busybox\", \"true\"]\\n' > {c}/Dockerfile && \
         DOCKER_BUILDKIT=0 docker -H {} build --no-cache -q -t {tag} {c} >/dev/null",
        mb,
        docker20()
    ));
}

/// Requests that give up while the export they wait for runs: each image is exported once,
/// within max_parallel_exports, and recorded — the next request is served from the cache.
#[test]
fn cancelled_requests_leave_one_recorded_export_within_the_limit() {
    let names: Vec<String> = (0..3).map(|i| unique(&format!("cut{i}-"))).collect();
    for n in &names {
        build_big_image(&format!("{n}:v1"), 48);
    }
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &docker_chain(&docker20(), "max_parallel_exports = 1\ndirect_reads = false"),
    );
    let impatient = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for n in &names {
            for _ in 0..4 {
                let (impatient, url) = (&impatient, ferry.url(&format!("/v2/{n}/manifests/v1")));
                s.spawn(move || {
                    let _ = impatient.get(url).send();
                });
            }
        }
    });
    // Every export finishes although nobody waits for it any more.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count_lines(&ferry.logs(), &["export finished"]) < names.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let logs = ferry.logs();
    assert_eq!(
        count_lines(&logs, &["exporting image from the engine"]),
        names.len(),
        "{logs}"
    );
    assert_eq!(count_lines(&logs, &["export finished"]), names.len(), "{logs}");
    // Never two at once: with a limit of one, starts and ends alternate.
    let events: Vec<&str> = logs
        .lines()
        .filter_map(|l| {
            if l.contains("exporting image from the engine") {
                Some("start")
            } else if l.contains("export finished") {
                Some("end")
            } else {
                None
            }
        })
        .collect();
    for pair in events.chunks(2) {
        assert_eq!(pair, ["start", "end"], "{logs}");
    }
    for n in &names {
        let (status, _, _) = get_manifest(&ferry, n, "v1", "");
        assert_eq!(status, 200);
        sh(&format!("docker -H {} rmi {n}:v1", docker20()));
    }
    assert_eq!(
        count_lines(&ferry.logs(), &["exporting image from the engine"]),
        names.len()
    );
}

/// A failing export is shared by every request waiting for it and remembered briefly: twenty
/// requests, one export.
#[test]
fn a_failing_export_is_shared_and_remembered() {
    let dir = scratch();
    let socket = dir.path().join("fake.sock");
    fake_engine(&socket, b"this is not a tar archive".repeat(100), "[]".into());
    let ferry = Ferry::start(dir.path(), &docker_chain(&format!("unix://{}", socket.display()), ""));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| s.spawn(|| get_manifest(&ferry, "broken", "v1", "").0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![500; 20]);
    assert_eq!(
        count_lines(&ferry.logs(), &["exporting image from the engine"]),
        1,
        "{}",
        ferry.logs()
    );
}

/// A crash (SIGKILL) in the middle of an export and of a chunked upload: after the restart
/// nothing partial is served or left, the export runs again and is served whole, and the
/// upload session resumes where its data stands.
#[test]
fn a_crash_mid_export_and_mid_upload_loses_nothing_stored() {
    let name = unique("crash");
    build_big_image(&format!("{name}:v1"), 96);
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), "direct_reads = false"));
    // Something stored before the crash.
    let kept = b"stored before the crash".to_vec();
    let kept_digest = format!("sha256:{}", sha256_hex(&kept));
    let http = reqwest::blocking::Client::new();
    let r = http
        .post(ferry.url(&format!("/v2/crash/up/blobs/uploads/?digest={kept_digest}")))
        .body(kept.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // An upload with one chunk in, and an export under way.
    let r = http.post(ferry.url("/v2/crash/up/blobs/uploads/")).send().unwrap();
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    let first = vec![b'1'; 100_000];
    assert_eq!(
        http.patch(ferry.url(&location))
            .body(first.clone())
            .send()
            .unwrap()
            .status(),
        202
    );
    let url = ferry.url(&format!("/v2/{name}/manifests/v1"));
    std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::new().get(url).send();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ferry.logs().contains("exporting image from the engine") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    ferry.kill9();
    assert!(
        !ferry.logs().contains("export finished"),
        "the export ended before the crash"
    );
    ferry.start_again();

    let tmp: Vec<_> = std::fs::read_dir(ferry.dir.join("docker/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "partial export blobs left: {tmp:?}");
    let r = http
        .get(ferry.url(&format!("/v2/crash/up/blobs/{kept_digest}")))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), kept, "what was stored before is served");
    // The session resumes at its offset and finishes.
    let r = http.get(ferry.url(&location)).send().unwrap();
    assert_eq!(r.headers()["Range"], "0-99999");
    let rest = vec![b'2'; 50_000];
    let whole = [first, rest.clone()].concat();
    let d = format!("sha256:{}", sha256_hex(&whole));
    let r = http
        .put(ferry.url(&format!("{location}?digest={d}")))
        .body(rest)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // The export runs again and the image is served whole.
    let (status, _, manifest) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 200, "{}", ferry.logs());
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let digest = l["digest"].as_str().unwrap();
        let body = http
            .get(ferry.url(&format!("/v2/{name}/blobs/{digest}")))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    }
    sh(&format!("docker -H {} rmi {name}:v1", docker20()));
}
