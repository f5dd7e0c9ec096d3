//! A hostile client on the network, and hostile origins: ferry fetches only from the
//! registries its policy allows, never from loopback, private or link-local addresses it does
//! not name (not through `?ns=`, a path, DNS, a redirect or the engine), verifies every healed
//! byte before the last one goes out, sends credentials only where they belong, and keeps the
//! engine's words to itself. The forged origins are fake HTTP servers on loopback (no real
//! registry sends wrong bytes or redirects into the local network).

mod common;

use common::*;

fn containerd(extra_toml: &str) -> String {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    format!("{extra_toml}[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"trust\"\n")
}

fn in_content_store(digest: &str) -> bool {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    sh(&format!("ctr -a {ctd17} -n trust content ls -q")).contains(digest)
}

#[test]
fn a_healed_blob_that_does_not_hash_to_its_digest_never_reaches_a_client_whole() {
    let good = format!("the real layer {}", unique("")).repeat(50_000).into_bytes();
    let digest = format!("sha256:{}", sha256_hex(&good));
    let mut evil = good.clone();
    evil[7] ^= 1; // same length, different bytes
    let origin = FakeHttp::start("127.0.0.1", move |_| {
        http_response("200 OK", "Content-Type: application/octet-stream\r\n", &evil)
    });
    name_in_containerd("trust", &digest, None);
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &containerd(&format!("[origins]\nallow = [\"{}\"]\n", origin.addr)),
    );
    let url = ferry.url(&format!("/v2/x/blobs/{digest}?ns={}", origin.addr));
    for _ in 0..3 {
        let r = reqwest::blocking::get(&url).unwrap();
        if r.status() == 200 {
            let body = r.bytes();
            assert!(body.is_err(), "a complete response with wrong bytes reached the client");
        } else {
            assert_eq!(r.status(), 404);
        }
    }
    assert!(origin.count() >= 1, "the origin was asked");
    assert!(!in_content_store(&digest), "wrong bytes committed");
    let logs = ferry.logs();
    assert!(
        logs.contains("hashing to") && logs.contains("nothing was committed"),
        "{logs}"
    );
}

#[test]
fn origins_not_named_are_never_contacted() {
    let registry = env("E2E_REGISTRY");
    let internal = FakeHttp::start("127.0.0.1", |_| http_response("200 OK", "", b"internal secret"));
    // A listed origin that redirects blob fetches into the local network.
    let target = internal.addr.clone();
    let redirecting = FakeHttp::start("127.0.0.2", move |_| {
        http_response(
            "307 Temporary Redirect",
            &format!("Location: http://{target}/latest/meta-data/\r\n"),
            b"",
        )
    });
    let dir = scratch();
    // Only the redirecting origin is named; the suite's registry and `internal` are not.
    let ferry = Ferry::start(
        dir.path(),
        &containerd(&format!("[origins]\nallow = [\"{}\"]\n", redirecting.addr)),
    );
    let zero = format!("sha256:{}", "0".repeat(64));
    // An image of containerd's names the blob: heals go on to the origins, and the policy.
    name_in_containerd("trust", &zero, None);
    let http = reqwest::blocking::Client::new();
    for (path, query) in [
        (format!("/v2/x/blobs/{zero}"), format!("?ns={}", internal.addr)),
        (format!("/v2/{}/x/blobs/{zero}", internal.addr), String::new()),
        (format!("/v2/x/blobs/{zero}"), format!("?ns={registry}")),
        (format!("/v2/x/blobs/{zero}"), "?ns=169.254.169.254".to_string()),
        (format!("/v2/x/blobs/{zero}"), "?ns=localhost:1".to_string()),
        (format!("/v2/x/blobs/{zero}"), format!("?ns={}", redirecting.addr)),
    ] {
        let r = http.get(ferry.url(&format!("{path}{query}"))).send().unwrap();
        assert_eq!(r.status(), 404, "{path}{query}");
        let body = r.text().unwrap();
        assert!(!body.contains("internal secret"), "{body}");
        let r = http.head(ferry.url(&format!("{path}{query}"))).send().unwrap();
        assert_eq!(r.status(), 404, "HEAD {path}{query}");
    }
    assert_eq!(internal.count(), 0, "the internal service was reached");
    assert!(redirecting.count() >= 1, "the named origin was asked");
    let logs = ferry.logs();
    assert!(
        logs.contains("not in [origins] allow") || logs.contains("only when [origins] allow names them"),
        "{logs}"
    );
}

#[test]
fn client_credentials_go_only_to_the_registry_they_were_sent_for() {
    let blob = b"token-protected".to_vec();
    let digest = format!("sha256:{}", sha256_hex(&blob));
    name_in_containerd("trust", &digest, None);
    // A token endpoint on another host: it hands out a token, and records what it was sent.
    let realm = FakeHttp::start("127.0.0.3", |_| {
        http_response("200 OK", "Content-Type: application/json\r\n", br#"{"token":"t"}"#)
    });
    let realm_addr = realm.addr.clone();
    let origin = FakeHttp::start("127.0.0.1", move |head| {
        if head.to_ascii_lowercase().contains("authorization: bearer t") {
            http_response("200 OK", "", &blob)
        } else {
            http_response(
                "401 Unauthorized",
                &format!("WWW-Authenticate: Bearer realm=\"http://{realm_addr}/token\",service=\"x\"\r\n"),
                b"",
            )
        }
    });
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &containerd(&format!(
            "[origins]\nallow = [\"{}\", \"{}\"]\n",
            origin.addr, realm.addr
        )),
    );
    let r = reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/x/blobs/{digest}?ns={}", origin.addr)))
        .basic_auth("alice", Some("secret-password"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    assert!(realm.count() >= 1, "the token endpoint was asked");
    for head in realm.requests.lock().unwrap().iter() {
        assert!(
            !head.to_ascii_lowercase().contains("authorization:"),
            "credentials sent to a foreign token endpoint: {head}"
        );
    }
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    sh(&format!("ctr -a {ctd17} -n trust content rm {digest}"));
}

#[test]
fn the_engine_pulls_only_from_allowed_registries_and_its_errors_stay_in_the_log() {
    let listener = FakeHttp::start("127.0.0.1", |_| http_response("200 OK", "", b"{}"));
    let registry = env("E2E_REGISTRY");
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[origins]\nallow = [\"{registry}\"]\n{}",
            docker_chain(&docker20(), "pull_missing = true")
        ),
    );
    let http = reqwest::blocking::Client::new();
    // A port scan through the engine: refused before the engine is asked.
    let r = http
        .get(ferry.url(&format!("/v2/{}/x/manifests/latest", listener.addr)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(listener.count(), 0, "the engine connected to an unlisted host");
    assert!(
        ferry.logs().contains("not pulling through the engine"),
        "{}",
        ferry.logs()
    );
    // An allowed registry without the image: the client learns nothing of the engine's answer.
    let missing = unique("nothere/img");
    let r = http
        .get(ferry.url(&format!("/v2/{registry}/{missing}/manifests/v1")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().unwrap();
    assert!(
        !body.contains("manifest unknown") && !body.contains("not found"),
        "{body}"
    );
    assert!(ferry.logs().contains("pull failed"), "the detail is in the log");
}
