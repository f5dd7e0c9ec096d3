//! `ferry gc` on the push store beside a running ferry: what deletes and abandoned pushes
//! left is removed (a dry run only lists it), what a manifest references stays and still
//! pulls, recent blobs and blobs a pusher just asked for stay, and collections running in a
//! loop while clients push and pull lose nothing.

use std::path::Path;

use ferry_e2e::*;

fn gc(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["gc", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, text) = run_ferry(&all, &[]);
    assert_eq!(code, 0, "{text}");
    text
}

/// A GET's status (a HEAD is what a pusher asks, and keeps the blob: see below).
fn blob_status(ferry: &Ferry, repo: &str, digest: &str) -> u16 {
    reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Makes a blob and its links look `ago` old.
fn age(ferry: &Ferry, digest: &str, ago: &str) {
    let hex = digest.trim_start_matches("sha256:");
    sh(&format!(
        "find {} -name {hex} -exec touch -d '{ago}' {{}} +",
        ferry.dir.join("push").display()
    ));
}

#[test]
fn unreferenced_blobs_go_and_everything_referenced_stays() {
    let engine = docker20();
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), "[[backends]]\ntype = \"push\"\nallow_delete = true\n");
    let config = dir.path().join("ferry.toml");
    let (a, b) = (unique("gca"), unique("gcb"));
    // A and B share the base's layers; each has one of its own.
    let base = unique("gcbase");
    build_image(&engine, &format!("{base}:v1"), 1);
    build_image_from(&engine, &format!("{a}:v1"), 1, &format!("{base}:v1"));
    build_image_from(&engine, &format!("{b}:v1"), 1, &format!("{base}:v1"));
    for n in [&a, &b] {
        sh(&format!(
            "docker -H {engine} tag {n}:v1 {0}/gc/{n}:v1 && docker -H {engine} push {0}/gc/{n}:v1",
            ferry.addr()
        ));
    }
    let (_, digest_a, body_a) = get_manifest(&ferry, &format!("gc/{a}"), "v1", "");
    let manifest_a: serde_json::Value = serde_json::from_slice(&body_a).unwrap();
    let own_layer = manifest_a["layers"][2]["digest"].as_str().unwrap().to_string();
    let shared_layer = manifest_a["layers"][0]["digest"].as_str().unwrap().to_string();
    let r = reqwest::blocking::Client::new()
        .delete(ferry.url(&format!("/v2/gc/{a}/manifests/{digest_a}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let abandoned = push_blob(&ferry, "gc/abandoned", b"pushed, but no manifest ever came");
    let recent = push_blob(&ferry, "gc/abandoned", b"pushed a moment ago");
    for d in [&own_layer, &shared_layer, &abandoned, &digest_a] {
        age(&ferry, d, "2 hours ago");
    }

    let dry = gc(&config, &["--dry-run"]);
    assert!(dry.contains("would remove"), "{dry}");
    for d in [&own_layer, &abandoned, &digest_a] {
        assert!(dry.contains(d.as_str()), "{d} listed: {dry}");
    }
    for d in [&shared_layer, &recent] {
        assert!(!dry.contains(d.as_str()), "{d} kept: {dry}");
    }
    assert_eq!(
        blob_status(&ferry, "gc/abandoned", &abandoned),
        200,
        "a dry run removes nothing"
    );

    let out = gc(&config, &[]);
    assert!(out.contains("removed 3"), "{out}");
    assert_eq!(blob_status(&ferry, "gc/abandoned", &abandoned), 404);
    assert_eq!(
        blob_status(&ferry, "gc/abandoned", &recent),
        200,
        "younger than min_age"
    );
    // B is whole: pulled by Docker after the engine forgot it, and run.
    let remote = format!("{}/gc/{b}:v1", ferry.addr());
    sh(&format!(
        "docker -H {engine} rmi {remote} {b}:v1 && docker -H {engine} pull {remote}"
    ));
    assert_eq!(
        sh(&format!("docker -H {engine} run --rm {remote}")).trim(),
        format!("hello from {b}:v1")
    );
    assert_eq!(blob_status(&ferry, &format!("gc/{b}"), &shared_layer), 200);
    // A's own layer is gone from disk; the shared one is not.
    let files = snapshot(&ferry.dir.join("push"));
    assert!(!files
        .iter()
        .any(|(p, _)| p.ends_with(own_layer.trim_start_matches("sha256:"))));

    // A pusher that asks for an old blob before naming it in a manifest keeps it.
    let old = push_blob(&ferry, "gc/late", b"uploaded long ago, named only now");
    age(&ferry, &old, "2 hours ago");
    let head = reqwest::blocking::Client::new()
        .head(ferry.url(&format!("/v2/gc/late/blobs/{old}")))
        .send()
        .unwrap();
    assert_eq!(head.status(), 200);
    let out = gc(&config, &["--min-age", "600"]);
    assert!(out.contains("removed 0"), "{out}");
    assert_eq!(blob_status(&ferry, "gc/late", &old), 200);
    sh(&format!(
        "docker -H {engine} rmi {remote} {a}:v1 {}/gc/{a}:v1 {base}:v1",
        ferry.addr()
    ));
}

#[test]
fn collections_in_a_loop_lose_nothing_pushed_or_pulled_meanwhile() {
    let engine = docker20();
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), "[[backends]]\ntype = \"push\"\n");
    let config = dir.path().join("ferry.toml");
    let names: Vec<String> = (0..6).map(|i| unique(&format!("gcload{i}x"))).collect();
    for n in &names {
        build_image(&engine, &format!("{n}:v1"), 3);
    }
    // Old garbage for the collections to find while the pushes run.
    let garbage: Vec<String> = (0..20)
        .map(|i| push_blob(&ferry, "gc/junk", format!("junk {i} {}", unique("j")).as_bytes()))
        .collect();
    for g in &garbage {
        age(&ferry, g, "2 hours ago");
    }
    let collector = {
        let config = config.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                gc(&config, &["--min-age", "30"]);
                runs += 1;
            }
            runs
        })
    };
    let pushers: Vec<_> = names
        .iter()
        .map(|n| {
            let (engine, addr, n) = (engine.clone(), ferry.addr(), n.clone());
            std::thread::spawn(move || {
                sh(&format!(
                    "docker -H {engine} tag {n}:v1 {addr}/gc/{n}:v1 && docker -H {engine} push {addr}/gc/{n}:v1"
                ));
                sh(&format!(
                    "skopeo copy --src-tls-verify=false --dest-tls-verify=false docker://{addr}/gc/{n}:v1 docker://{addr}/gc/{n}:copy"
                ));
            })
        })
        .collect();
    for p in pushers {
        p.join().unwrap();
    }
    let runs = collector.join().unwrap();
    assert!(runs >= 3, "{runs} collections");
    for g in &garbage {
        assert_eq!(blob_status(&ferry, "gc/junk", g), 404, "old garbage collected");
    }
    // Every image pushed meanwhile is whole: each blob read back hashes to its digest.
    for n in &names {
        for tag in ["v1", "copy"] {
            let (status, _, body) = get_manifest(&ferry, &format!("gc/{n}"), tag, "");
            assert_eq!(status, 200, "{n}:{tag}");
            let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_string()];
            digests.extend(
                m["layers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l["digest"].as_str().unwrap().to_string()),
            );
            for d in digests {
                let bytes = reqwest::blocking::get(ferry.url(&format!("/v2/gc/{n}/blobs/{d}")))
                    .unwrap()
                    .bytes()
                    .unwrap();
                assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), d, "{n}:{tag}");
            }
        }
        sh(&format!("docker -H {engine} rmi {n}:v1 {}/gc/{n}:v1", ferry.addr()));
    }
}
