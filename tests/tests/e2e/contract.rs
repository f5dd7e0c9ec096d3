//! The `Backend` contract (`ferry_core::contract`, the checks the push store and the upstream
//! cache pass in server/tests/contract.rs) kept by the engine-backed backends, each built from
//! configuration as `ferry serve` builds it, on real engines: the docker backend by direct
//! reads of a graph driver (Docker 20, overlay2) and of Podman's storage, by export, and from
//! Docker 28's containerd image store; the containerd backend on Docker 26's `moby` namespace.
//! An engine's manifest is made by the backend, so `held` reads it and verifies every blob;
//! `check_reads` then asks the rest (by digest, sizes, ranges, what it lacks).

use std::sync::Arc;

use ferry_core::contract::{check_reads, held};
use ferry_core::Repository;
use ferry_e2e::*;
use ferry_server::config::{Config, Flags};

/// Builds an image of `layers` files in `engine`, then checks the contract of the first
/// backend of `toml` (a `[[backends]]` table) on it.
fn check(engine: &str, toml: &str) {
    let name = unique("contract");
    build_image(engine, &format!("{name}:v1"), 2);
    let dir = scratch();
    let file = dir.path().join("ferry.toml");
    std::fs::write(
        &file,
        format!("[cache]\ndir = \"{}\"\n{toml}", dir.path().join("data").display()),
    )
    .unwrap();
    let config = Config::load(Some(&file), &Flags::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let origins = Arc::new(config.origins.policy());
        let handle = config.backends[0].build(&config.cache.dir, &origins).await.unwrap();
        let repo = Repository::new("docker.io", &format!("library/{name}")).unwrap();
        let known = held(&*handle.backend, &repo, "v1").await;
        assert!(known.blobs.len() >= 3, "a config and two layers: {}", known.blobs.len());
        check_reads(&*handle.backend, &known).await;
    });
    let _ = sh_result(&format!("docker -H {engine} rmi {name}:v1"));
}

fn docker(engine: &str, extra: &str) -> String {
    format!("[[backends]]\ntype = \"docker\"\nsocket = \"{engine}\"\n{extra}\n")
}

#[test]
fn docker_backend_reading_a_graph_driver() {
    let engine = docker20();
    check(&engine, &docker(&engine, ""));
}

#[test]
fn docker_backend_serving_exports() {
    let engine = docker20();
    check(&engine, &docker(&engine, "direct_reads = false"));
}

#[test]
fn docker_backend_on_the_containerd_image_store() {
    let engine = env("E2E_DOCKER28_HOST");
    check(&engine, &docker(&engine, ""));
}

#[test]
fn docker_backend_reading_podman_storage() {
    let engine = env("E2E_PODMAN_HOST");
    check(&engine, &docker(&engine, ""));
}

#[test]
fn containerd_backend_on_a_docker_namespace() {
    let engine = env("E2E_DOCKER26_HOST");
    let socket = env("E2E_CONTAINERD17_SOCK");
    check(
        &engine,
        &format!("[[backends]]\ntype = \"containerd\"\nsocket = \"{socket}\"\nnamespace = \"moby\"\n"),
    );
}
