//! The container image, built by image/build.sh (what the README tells a user to run) in
//! Docker 20 and run the way k3d runs a registry container: the engine socket mounted at
//! /var/run/docker.sock, REGISTRY_HTTP_ADDR set, on a user-defined network. containerd on
//! the host pulls an engine image through it (the published port) and runs it. Checked too:
//! its size, that ferry runs as uid 65532 (dropped from root, or started so with
//! --group-add), its HEALTHCHECK, and that its config is the repository's container.toml.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
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
    let out = sh(&format!(
        "cd {} && DOCKER_HOST={engine} image/build.sh {tag}",
        root.display()
    ));
    assert!(out.contains(&format!("built {tag}")), "{out}");

    let inspect: Value = serde_json::from_str(&sh(&format!("docker -H {engine} image inspect {tag}"))).unwrap();
    let image = &inspect[0];
    let size = image["Size"].as_u64().unwrap();
    assert!(size <= 40 << 20, "image is {size} bytes");
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

    // An engine image to pull through it.
    let name = unique("k3dimg");
    build_image(&engine, &format!("{name}:v1"), 2);
    let socket = engine.trim_start_matches("unix://").to_string();
    let socket_gid = sh(&format!("stat -c %g {socket}")).trim().to_string();
    let net = unique("ferrynet");
    sh(&format!("docker -H {engine} network create {net} >/dev/null"));
    let dir = scratch();
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
