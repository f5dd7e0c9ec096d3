//! `/metrics` read with Prometheus' own text parser (prometheus_client, from PyPI), its
//! counters moving as a pull happens, and `/readyz`.

use std::path::Path;

use ferry_e2e::*;
use serde_json::Value;

/// The samples of `/metrics`, parsed by prometheus_client.
fn samples(ferry: &Ferry) -> Value {
    let text = reqwest::blocking::get(ferry.url("/metrics")).unwrap().text().unwrap();
    let file = ferry.dir.parent().unwrap().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let parser = Path::new(env!("CARGO_MANIFEST_DIR")).join("env/parse_metrics.py");
    let out = sh(&format!("python3 {} < {}", parser.display(), file.display()));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn value(s: &Value, key: &str) -> f64 {
    s.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

#[test]
fn metrics_move_as_a_pull_happens() {
    let engine = docker20();
    let dir = scratch();
    // Exports are what these metrics count: direct reads off.
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, "direct_reads = false"));
    let name = unique("met");
    build_image(&engine, &format!("{name}:v1"), 2);
    let before = samples(&ferry);

    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    // By tag again: served from the export cache.
    assert_eq!(get_manifest(&ferry, &name, "v1", "").0, 200);
    let r = reqwest::blocking::Client::new()
        .post(ferry.url("/v2/met/up/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let after = samples(&ferry);

    let grew = |key: &str| value(&after, key) - value(&before, key);
    assert!(
        grew("ferry_requests_total{operation=manifest_get,status=200}") >= 1.0,
        "{after}"
    );
    assert!(
        grew("ferry_requests_total{operation=blob_get,status=200}") >= 3.0,
        "{after}"
    );
    assert_eq!(grew("ferry_exports_total{backend=docker,outcome=ok}"), 1.0, "{after}");
    assert_eq!(grew("ferry_export_duration_seconds_count{}"), 1.0, "{after}");
    assert!(
        grew("ferry_export_cache_total{backend=docker,outcome=miss}") >= 1.0,
        "{after}"
    );
    assert!(
        grew("ferry_export_cache_total{backend=docker,outcome=hit}") >= 1.0,
        "{after}"
    );
    assert!(
        grew("ferry_served_bytes_total{backend=docker}") > 1_000_000.0,
        "{after}"
    );
    assert_eq!(value(&after, "ferry_exports_in_flight{}"), 0.0);
    assert_eq!(grew("ferry_upload_sessions_open{}"), 1.0, "{after}");
    // Made-up methods and paths do not make new series.
    for i in 0..50 {
        let _ = raw_request(&ferry.addr(), &format!("X{i}"), &format!("/nowhere/{i}"), &[], b"");
    }
    let series = samples(&ferry).as_object().unwrap().len();
    assert!(series <= after.as_object().unwrap().len() + 2, "{series} series");
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn readyz_says_whether_a_backend_can_answer() {
    let dir = scratch();
    let dead = format!("unix://{}/nothing.sock", dir.path().display());
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"docker\"\nsocket = \"{dead}\"\n"),
    );
    let r = reqwest::blocking::get(ferry.url("/readyz")).unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().unwrap().contains("docker"));
    assert_eq!(reqwest::blocking::get(ferry.url("/healthz")).unwrap().status(), 200);

    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), ""));
    let r = reqwest::blocking::get(ferry.url("/readyz")).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "ready: docker, push\n");
}
