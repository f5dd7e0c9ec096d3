//! The `Backend` and `Registry` contracts (`ferry_core::contract`) kept by the backends that
//! need no engine, built from configuration as `ferry serve` builds them: the push store, and
//! the upstream cache with a ferry on loopback as its origin (a push store served by
//! `ferry_server::serve` in this process). The engine-backed backends pass the same checks
//! in the end-to-end suite (tests/tests/contract.rs).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use ferry_core::contract::{body, check_reads, check_writes, Known};
use ferry_core::{BackendHandle, Chain, Digest, Reference, Repository};
use ferry_server::config::{Config, Flags};

/// The configuration `ferry serve --config` would read from `toml`, its cache under `dir`.
fn config(dir: &Path, toml: &str) -> Config {
    let file = dir.join("ferry.toml");
    let text = format!("[cache]\ndir = \"{}\"\n{toml}", dir.join("data").display());
    std::fs::write(&file, text).expect("writing the config");
    Config::load(Some(&file), &Flags::default()).expect("a valid config")
}

/// The first backend of `toml`, built.
async fn backend(dir: &Path, toml: &str) -> BackendHandle {
    let config = config(dir, toml);
    let origins = Arc::new(config.origins.policy());
    config.backends[0]
        .build(&config.cache.dir, &origins)
        .await
        .expect("the backend builds")
}

#[tokio::test]
async fn the_push_store_keeps_the_read_and_write_contracts() {
    let dir = tempfile::tempdir().unwrap();
    let push = backend(dir.path(), "[[backends]]\ntype = \"push\"\n").await;
    let registry = push.registry.expect("the push store is writable");
    check_writes(&*registry, &Repository::new("docker.io", "contract/push").unwrap()).await;
    // And with deletes taken.
    let dir = tempfile::tempdir().unwrap();
    let push = backend(dir.path(), "[[backends]]\ntype = \"push\"\nallow_delete = true\n").await;
    let registry = push.registry.expect("the push store is writable");
    check_writes(&*registry, &Repository::new("docker.io", "contract/deletes").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_cache_keeps_the_read_contract_cold_and_warm() {
    // The origin: a push store served on loopback, holding one image.
    let origin_dir = tempfile::tempdir().unwrap();
    let origin = backend(origin_dir.path(), "[[backends]]\ntype = \"push\"\n").await;
    let registry = origin.registry.clone().expect("writable");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(ferry_server::serve(
        Chain::new(vec![origin]),
        listener,
        std::future::pending(),
        ferry_server::Options::default(),
    ));
    let repo = Repository::new("docker.io", "contract/up").unwrap();
    let config = Bytes::from_static(br#"{"architecture":"arm64","os":"linux"}"#);
    let layer = Bytes::from((0..300_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>());
    let mut blobs = Vec::new();
    for b in [&config, &layer] {
        let d = Digest::of(b);
        registry.put_blob(&repo, &d, body(&[b])).await.unwrap();
        blobs.push((d, b.clone()));
    }
    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        blobs[0].0,
        config.len(),
        blobs[1].0,
        layer.len()
    ));
    registry
        .put_manifest(&repo, &Reference::Tag("v1".into()), None, manifest.clone())
        .await
        .unwrap();

    // The cache, with that loopback origin named (as a user names a private registry).
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend(
        dir.path(),
        &format!("[[backends]]\ntype = \"upstream\"\nallow = [\"{host}\"]\n"),
    )
    .await;
    let known = Known {
        repo: Repository::new(&host, "contract/up").unwrap(),
        tag: Some("v1".into()),
        manifest,
        blobs,
    };
    // Cold: every answer fetched from the origin; warm: from the cache.
    check_reads(&*upstream.backend, &known).await;
    check_reads(&*upstream.backend, &known).await;
    server.abort();
}
