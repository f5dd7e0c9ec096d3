//! A hostile client on the network, and hostile origins: ferry fetches only from the
//! registries its policy allows, never from loopback, private or link-local addresses it does
//! not name (not through `?ns=`, a path, DNS, a redirect or the engine), verifies every healed
//! byte before the last one goes out, sends credentials only where they belong, and keeps the
//! engine's words to itself. The forged origins are fake HTTP servers on loopback (no real
//! registry sends wrong bytes or redirects into the local network).

use ferry_e2e::*;

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

/// A manifest only a loopback service holds: whoever gets it reached that service.
fn stand_in_manifest() -> Vec<u8> {
    let config = format!("sha256:{}", "1".repeat(64));
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[],"annotations":{{"secret":"loopback stand-in"}}}}"#
    )
    .into_bytes()
}

fn stand_in(ip: &str) -> FakeHttp {
    FakeHttp::start(ip, |_| {
        http_response(
            "200 OK",
            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
            &stand_in_manifest(),
        )
    })
}

fn upstream_only(allow: &str) -> String {
    format!("[origins]\nallow = []\n[[backends]]\ntype = \"upstream\"\nallow = [{allow}]\n")
}

/// Every way found to write a loopback address, for a stand-in on 127.0.0.1:`port` and one on
/// [::1]:`port6`.
fn spellings(port: u16, port6: u16) -> Vec<String> {
    let mut out: Vec<String> = [
        "127.1",
        "0x7f.1",
        "0x7f.0.0.1",
        "0X7F000001",
        "2130706433",
        "017700000001",
        "0177.0.0.1",
        "127.000.000.001",
        "127.0.0.1.",
        "0",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::FFFF:7F00:0001]",
        "localhost",
        "LocalHost",
        "localhost.",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect();
    out.push(format!("127.0.0.1:000{port}"));
    out.push(format!("[::1]:{port6}"));
    out.push(format!("[0:0:0:0:0:0:0:1]:{port6}"));
    out
}

#[test]
fn no_spelling_of_a_loopback_address_reaches_it_through_a_wildcard() {
    let (v4, v6) = (stand_in("127.0.0.1"), stand_in("[::1]"));
    let port = |a: &str| a.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
    let names = spellings(port(&v4.addr), port(&v6.addr));
    let dir = scratch();
    // Named origins on other loopback addresses (any port of them): for each spelling, one
    // redirects blobs to it, the other sends clients to a token endpoint at it.
    let ferry = Ferry::start(dir.path(), &upstream_only("\"*\", \"127.0.0.2\", \"127.0.0.3\""));
    let http = reqwest::blocking::Client::new();
    let blob = format!("sha256:{}", "2".repeat(64));
    let mut named_asked = 0;
    for name in &names {
        let target = name.clone();
        let redirector = FakeHttp::start("127.0.0.2", move |_| {
            http_response(
                "307 Temporary Redirect",
                &format!("Location: http://{target}/v2/x/blobs/y\r\n"),
                b"",
            )
        });
        let realm = name.clone();
        let realm_origin = FakeHttp::start("127.0.0.3", move |_| {
            http_response(
                "401 Unauthorized",
                &format!("WWW-Authenticate: Bearer realm=\"http://{realm}/token\",service=\"s\"\r\n"),
                b"",
            )
        });
        let ns = name.replace('[', "%5B").replace(']', "%5D");
        for path in [
            format!("/v2/local/bb/manifests/1?ns={ns}"),
            format!("/v2/{name}/local/bb/manifests/1"),
            format!("/v2/local/bb/blobs/{blob}?ns={}", redirector.addr),
            format!("/v2/local/bb/manifests/1?ns={}", realm_origin.addr),
        ] {
            let r = http.get(ferry.url(&path)).send().unwrap();
            let status = r.status().as_u16();
            let body = r.text().unwrap();
            assert_ne!(status, 200, "{path}: {body}");
            assert!(!body.contains("loopback stand-in"), "{path}: {body}");
        }
        assert!(
            redirector.count() > 0,
            "{name}: the redirecting origin was not asked: {}",
            ferry.logs()
        );
        assert!(
            realm_origin.count() > 0,
            "{name}: the origin with a token realm was not asked"
        );
        named_asked += 1;
    }
    assert_eq!(
        v4.count(),
        0,
        "the IPv4 stand-in was reached: {:?}",
        v4.requests.lock().unwrap()
    );
    assert_eq!(
        v6.count(),
        0,
        "the IPv6 stand-in was reached: {:?}",
        v6.requests.lock().unwrap()
    );
    assert_eq!(named_asked, names.len());
}

#[test]
fn a_loopback_registry_named_in_allow_is_reached_however_it_is_written() {
    let v4 = stand_in("127.0.0.1");
    let port = v4.addr.rsplit_once(':').unwrap().1.to_string();
    for (listed, asked) in [
        (format!("0x7f.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("127.0.0.1:{port}"), format!("2130706433:{port}")),
        (format!("127.0.0.1:{port}"), format!("127.1:0{port}")),
    ] {
        let dir = scratch();
        let ferry = Ferry::start(dir.path(), &upstream_only(&format!("\"{listed}\"")));
        let before = v4.count();
        let r = reqwest::blocking::get(ferry.url(&format!("/v2/local/bb/manifests/1?ns={asked}"))).unwrap();
        assert_eq!(r.status(), 200, "{listed} listed, {asked} asked: {}", ferry.logs());
        assert_eq!(r.bytes().unwrap().as_ref(), stand_in_manifest().as_slice());
        assert!(v4.count() > before, "the named registry was asked");
        // Another port of the same address is still not named.
        let r = reqwest::blocking::get(ferry.url("/v2/local/bb/manifests/1?ns=127.0.0.1:1")).unwrap();
        assert_eq!(r.status(), 404);
    }
}
