//! The admin API under `/api/v1` against real engines: what it reports of Docker 20,
//! containerd and the push store, what the export cache holds after a pull, eviction (token
//! required, blobs gone, the next pull exports again), its own listen address, and the
//! OpenAPI document and Swagger UI.

use ferry_e2e::*;
use serde_json::Value;

fn get_json(url: &str) -> Value {
    let r = reqwest::blocking::get(url).unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().unwrap()
}

fn delete(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::blocking::Client::new().delete(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Files under the docker backend's blob store.
fn cached_blobs(ferry: &Ferry) -> usize {
    snapshot(&ferry.dir.join("docker"))
        .iter()
        .filter(|(p, _)| p.contains("sha256/") && !p.contains(".tmp"))
        .count()
}

#[test]
fn reports_backends_lists_caches_and_evicts_with_the_token() {
    let engine = docker20();
    let dir = scratch();
    let token = "s3cret-admin-token";
    let chain = format!(
        "[admin]\ntoken = \"{token}\"\n[[backends]]\ntype = \"docker\"\nsocket = \"{engine}\"\ndirect_reads = false\n\
         [[backends]]\ntype = \"containerd\"\nsocket = \"{}\"\nnamespace = \"e2e\"\n\
         [[backends]]\ntype = \"push\"\n",
        containerd16()
    );
    let ferry = Ferry::start(dir.path(), &chain);

    let status = get_json(&ferry.url("/api/v1/status"));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["ready"], true);
    let b = status["backends"].as_array().unwrap();
    assert_eq!(b.len(), 3, "{status}");
    assert_eq!(b[0]["kind"], "docker");
    assert_eq!(b[0]["reachable"], true, "{status}");
    assert_eq!(b[0]["product"], "Docker Engine");
    assert!(b[0]["version"].as_str().unwrap().starts_with("20.10"), "{status}");
    assert_eq!(b[0]["api_version"], "1.41");
    assert_eq!(b[0]["storage"], "overlay2");
    assert_eq!(
        b[0]["direct_reads"], false,
        "switched off: this test is about the export cache"
    );
    assert_eq!(b[0]["serves_from"], "export", "{status}");
    assert_eq!(b[1]["kind"], "containerd");
    assert_eq!(b[1]["reachable"], true, "{status}");
    assert!(b[1]["version"].as_str().unwrap().starts_with("1.6"), "{status}");
    assert_eq!(b[2]["kind"], "push");
    assert_eq!(b[2]["reachable"], true, "{status}");

    // An engine image pulled through ferry shows in the cache, under its name.
    let name = unique("adm");
    build_image(&engine, &format!("{name}:v1"), 2);
    let (code, digest, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(code, 200);
    let images = get_json(&ferry.url("/api/v1/cache/images"));
    let mine: Vec<&Value> = images
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            i["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == &format!("{name}:v1"))
        })
        .collect();
    assert_eq!(mine.len(), 1, "{images}");
    assert_eq!(mine[0]["digest"], digest.as_str());
    assert_eq!(mine[0]["backend"], "docker");
    assert!(
        mine[0]["size"].as_u64().unwrap() > 1_000_000,
        "busybox is in it: {images}"
    );
    let image_id = mine[0]["image_id"].as_str().unwrap().to_string();

    // A push shows in the push store's repositories.
    let remote = format!("{}/team/{name}:v2", ferry.addr());
    sh(&format!(
        "docker -H {engine} tag {name}:v1 {remote} && docker -H {engine} push {remote}"
    ));
    let repos = get_json(&ferry.url("/api/v1/push/repositories"));
    let repo = repos
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == format!("docker.io/team/{name}"))
        .unwrap_or_else(|| panic!("{repos}"));
    assert_eq!(repo["tags"], serde_json::json!(["v2"]));
    assert_eq!(repo["manifests"], 1);
    assert!(repo["size"].as_u64().unwrap() > 1_000_000, "{repos}");

    // Evicting: no token or a wrong one is refused and changes nothing.
    let one = ferry.url(&format!("/api/v1/cache/images/{image_id}"));
    let blobs = cached_blobs(&ferry);
    assert!(blobs >= 4, "{blobs}");
    assert_eq!(delete(&one, None).0, 401);
    assert_eq!(delete(&one, Some("s3cret-admin-tokeN")).0, 401);
    assert_eq!(delete(&ferry.url("/api/v1/cache"), Some("")).0, 401);
    assert_eq!(cached_blobs(&ferry), blobs);
    let (code, body) = delete(&ferry.url("/api/v1/cache/images/sha256:0000"), Some(token));
    assert_eq!(code, 404, "{body}");

    let (code, body) = delete(&one, Some(token));
    assert_eq!(code, 200, "{body}");
    let evicted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(evicted["images"], 1);
    assert!(evicted["bytes"].as_u64().unwrap() > 1_000_000, "{body}");
    assert_eq!(cached_blobs(&ferry), 0, "every blob of the only cached image is gone");
    assert!(get_json(&ferry.url("/api/v1/cache/images"))
        .as_array()
        .unwrap()
        .is_empty());
    // The pushed copy is untouched, and the engine image is exported again when asked for.
    assert_eq!(get_manifest(&ferry, &format!("team/{name}"), "v2", "").0, 200);
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    assert_eq!(
        count_lines(&ferry.logs(), &["export finished", &name]),
        2,
        "{}",
        ferry.logs()
    );

    let (code, body) = delete(&ferry.url("/api/v1/cache"), Some(token));
    assert_eq!(code, 200, "{body}");
    assert_eq!(cached_blobs(&ferry), 0);
    sh(&format!("docker -H {engine} rmi {name}:v1 {remote}"));
}

#[test]
fn changes_are_refused_without_a_configured_token() {
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&docker20(), ""));
    for token in [None, Some("anything")] {
        let (code, body) = delete(&ferry.url("/api/v1/cache"), token);
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("admin.token"), "{body}");
    }
    // Reading stays open; ferry runs as root beside the engine, so it reads its storage.
    let status = get_json(&ferry.url("/api/v1/status"));
    assert_eq!(status["ready"], true);
    assert_eq!(status["backends"][0]["direct_reads"], true, "{status}");
}

#[test]
fn the_api_moves_to_its_own_address_with_its_document_and_ui() {
    let dir = scratch();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[admin]\naddr = \"127.0.0.1:{admin_port}\"\n{}",
            docker_chain(&docker20(), "")
        ),
    );
    let admin = format!("http://127.0.0.1:{admin_port}");
    assert_eq!(
        reqwest::blocking::get(ferry.url("/api/v1/status")).unwrap().status(),
        404,
        "not beside the registry API any more"
    );
    assert_eq!(
        get_json(&format!("{admin}/api/v1/status"))["backends"][0]["kind"],
        "docker"
    );
    assert_eq!(reqwest::blocking::get(format!("{admin}/v2/")).unwrap().status(), 404);

    let spec = get_json(&format!("{admin}/api/v1/openapi.json"));
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."), "{spec}");
    for path in [
        "/status",
        "/cache/images",
        "/cache/images/{image}",
        "/cache",
        "/push/repositories",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} missing: {spec}");
    }
    assert!(spec["paths"]["/cache"]["delete"]["security"].is_array(), "{spec}");
    let ui = reqwest::blocking::get(format!("{admin}/api/docs")).unwrap();
    assert_eq!(ui.status(), 200);
    assert!(ui.text().unwrap().contains("swagger"), "Swagger UI");
}

/// schemathesis (from PyPI) throws requests generated from the API's own document at it —
/// with the token, without it, and methods the API lacks: every answer must be one the
/// document declares, with the declared shape.
#[test]
fn generated_requests_get_only_documented_answers() {
    let engine = docker20();
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[admin]\ntoken = \"tok\"\n{}", docker_chain(&engine, "")),
    );
    let name = unique("schema");
    build_image(&engine, &format!("{name}:v1"), 1);
    assert_eq!(get_manifest(&ferry, &name, "v1", "").0, 200);
    for auth in ["-H 'Authorization: Bearer tok'", ""] {
        let (ok, out) = sh_result(&format!(
            "schemathesis run {0}/api/v1/openapi.json --url {0}/api/v1 {auth} --checks all -n 100 --seed 1 2>&1",
            ferry.url("")
        ));
        assert!(ok, "{out}");
    }
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}
