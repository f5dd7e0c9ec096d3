//! The container image, built from the repository's Dockerfile by BuildKit (`docker buildx
//! build`, what `docker build` is today) in Docker 20 and run the way k3d runs a registry container: the
//! engine socket mounted at /var/run/docker.sock, REGISTRY_HTTP_ADDR set, on a user-defined
//! network. containerd on the host pulls an engine image through it (the published port) and
//! runs it. Checked too: its size, that its binary is static and names its commit, that ferry
//! runs as uid 65532 (dropped from root, or started so with --group-add), its HEALTHCHECK, and
//! that its config is the repository's container.toml. No base image can be pulled here, so
//! the builder's base (RUST_IMAGE) is a Debian 12 root with this machine's Rust, made by
//! tests/env (e2e_rust_builder_image); the build reaches the crate registry on the host network.
//! And the static arm64 binary, built as the README says (unoptimised), runs under qemu-user.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::*;
use serde_json::Value;

/// Waits until the container's health check says healthy.
fn wait_healthy(engine: &str, container: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = sh(&format!(
            "docker -H {engine} inspect -f '{{{{.State.Health.Status}}}}' {container}"
        ));
        if state.trim() == "healthy" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{container} is {state}: {}",
            sh_result(&format!("docker -H {engine} logs {container}")).1
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// uid and supplementary groups of the container's main process, from /proc on this host.
fn process_ids(engine: &str, container: &str) -> (String, String) {
    let pid = sh(&format!(
        "docker -H {engine} inspect -f '{{{{.State.Pid}}}}' {container}"
    ));
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Groups:"))
}

#[test]
fn the_image_serves_engine_images_as_a_k3d_registry() {
    let engine = docker20();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tag = format!("{}:e2e", unique("ferryimg"));
    let base = format!("{}:e2e", unique("rustbase"));
    sh(&format!(
        "source {} && DOCKER_HOST={engine} e2e_rust_builder_image {base}",
        lib()
    ));
    let (built, out) = sh_result(&format!(
        "cd {} && DOCKER_CONFIG={} docker -H {engine} buildx build --progress plain --network host \
         --build-arg RUST_IMAGE={base} -t {tag} . 2>&1",
        root.display(),
        env("E2E_DOCKER_CONFIG")
    ));
    let _ = sh_result(&format!(
        "docker -H {engine} rmi {base}; docker -H {engine} image prune -f"
    ));
    let tail: Vec<&str> = out.lines().rev().take(60).collect();
    assert!(
        built,
        "docker build failed:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );

    let inspect: Value = serde_json::from_str(&sh(&format!("docker -H {engine} image inspect {tag}"))).unwrap();
    let image = &inspect[0];
    let size = image["Size"].as_u64().unwrap();
    assert!(size <= 20 << 20, "image is {size} bytes");
    let config = &image["Config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/local/bin/ferry"]));
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["serve", "--config", "/etc/ferry/config.toml"])
    );
    assert!(config["ExposedPorts"].get("5000/tcp").is_some(), "{config}");
    assert!(
        config["Healthcheck"]["Test"].to_string().contains("healthcheck"),
        "{config}"
    );
    let cat = sh(&format!(
        "docker -H {engine} create {tag} >/tmp/ferry-img-$$ && id=$(cat /tmp/ferry-img-$$) && rm /tmp/ferry-img-$$ \
         && docker -H {engine} cp $id:/etc/ferry/config.toml - | tar -xO && docker -H {engine} rm $id >/dev/null"
    ));
    let documented = std::fs::read_to_string(root.join("container.toml")).unwrap();
    assert_eq!(cat, documented, "the image's config is container.toml");
    let dir = scratch();
    let bin = dir.path().join("ferry");
    sh(&format!(
        "docker -H {engine} create {tag} >{d}/id && docker -H {engine} cp $(cat {d}/id):/usr/local/bin/ferry - \
         | tar -xO >{bin} && chmod +x {bin} && docker -H {engine} rm $(cat {d}/id) >/dev/null",
        d = dir.path().display(),
        bin = bin.display()
    ));
    assert_static(&bin, "x86-64");
    let version = sh(&format!("docker -H {engine} run --rm {tag} --version"));
    assert_eq!(version.trim(), expected_version(&root));

    // An engine image to pull through it.
    let name = unique("k3dimg");
    build_image(&engine, &format!("{name}:v1"), 2);
    let socket = engine.trim_start_matches("unix://").to_string();
    let socket_gid = sh(&format!("stat -c %g {socket}")).trim().to_string();
    let net = unique("ferrynet");
    sh(&format!("docker -H {engine} network create {net} >/dev/null"));
    let mut containers = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // k3d's way: the image's own user (root), the socket mounted, REGISTRY_HTTP_ADDR.
        // Then started non-root from the start, with the socket's group added.
        for (i, user) in ["".to_string(), format!("--user 65532:65532 --group-add {socket_gid}")]
            .iter()
            .enumerate()
        {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let container = format!("{}-{i}", unique("ferryctr"));
            sh(&format!(
                "docker -H {engine} run -d --name {container} --network {net} {user} --health-interval 1s \
                 -p 127.0.0.1:{port}:5001 -e REGISTRY_HTTP_ADDR=0.0.0.0:5001 \
                 -v {socket}:/var/run/docker.sock {tag} >/dev/null"
            ));
            containers.push(container.clone());
            wait_healthy(&engine, &container);
            let (uid, groups) = process_ids(&engine, &container);
            assert_eq!(uid, "65532 65532 65532 65532", "ferry runs as uid 65532");
            assert!(
                groups.split(' ').any(|g| g == socket_gid),
                "keeps the socket's group {socket_gid}: {groups}"
            );

            let certs = mirror_hosts(
                &dir.path().join(i.to_string()),
                "docker.io",
                &format!("127.0.0.1:{port}"),
            );
            let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
            assert_eq!(out.trim(), format!("hello from {name}:v1"));
            let logs = sh_result(&format!("docker -H {engine} logs {container}")).1;
            assert!(logs.contains("export finished") && logs.contains(&name), "{logs}");
        }
    }));
    for c in &containers {
        let _ = sh_result(&format!("docker -H {engine} rm -f {c}"));
    }
    let _ = sh_result(&format!("docker -H {engine} network rm {net}"));
    let _ = sh_result(&format!("docker -H {engine} rmi {tag} {name}:v1"));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// What `ferry --version` prints when built from this checkout.
fn expected_version(root: &Path) -> String {
    let commit = sh(&format!("git -C {} rev-parse --short=12 HEAD", root.display()));
    format!("ferry {} (commit {})", env!("CARGO_PKG_VERSION"), commit.trim())
}

/// `file` says the binary is for `arch` and links nothing at run time.
fn assert_static(bin: &Path, arch: &str) {
    let kind = sh(&format!("file -b {}", bin.display()));
    assert!(kind.contains(arch), "{kind}");
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "not static: {kind}"
    );
}

#[test]
fn the_static_arm64_binary_serves_under_qemu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The README's single-file build, without the host profile's line tables, and without
    // optimisation: what is checked here is the target's toolchain (linker, C parts, static
    // linking, jemalloc's page size), which the optimiser does not change; optimised, the
    // build took some five minutes of the suite beside the image's.
    sh(&format!(
        "cd {} && CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_OPT_LEVEL=0 \
         cargo build --release --locked --target aarch64-unknown-linux-musl -p ferry-server 2>&1",
        root.display()
    ));
    let bin = root.join("target/aarch64-unknown-linux-musl/release/ferry");
    assert_static(&bin, "ARM aarch64");
    let version = sh(&format!("qemu-aarch64-static {} --version", bin.display()));
    assert_eq!(version.trim(), expected_version(&root));

    let dir = scratch();
    let port = port_on("127.0.0.1");
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[[backends]]\ntype = \"push\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("qemu-aarch64-static")
        .arg(&bin)
        .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("ferry.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let (ok, out) = sh_result(&format!("curl -s -D - -o /dev/null http://127.0.0.1:{port}/v2/"));
        if ok || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    // A blob pushed and read back: the static build's allocator and file streaming at work.
    let data = incompressible(3 << 20);
    let blob = dir.path().join("blob");
    std::fs::write(&blob, &data).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let (_, pushed) = sh_result(&format!(
        "curl -s -X POST -H 'Content-Type: application/octet-stream' --data-binary @{} \
         'http://127.0.0.1:{port}/v2/arm/blobs/uploads/?digest={digest}' -o /dev/null -w '%{{http_code}}'",
        blob.display()
    ));
    let (_, pulled) = sh_result(&format!(
        "curl -sf http://127.0.0.1:{port}/v2/arm/blobs/{digest} | sha256sum | cut -d' ' -f1"
    ));
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("ferry.log")).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{log}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("docker-distribution-api-version: registry/2.0"),
        "{answer}"
    );
    assert_eq!(pushed.trim(), "201", "the push\n{log}");
    assert_eq!(format!("sha256:{}", pulled.trim()), digest, "the blob read back\n{log}");
}
