//! The Distribution API against the ferry binary, where the process itself matters: reads of
//! impossible tags through a chain with engines, shutdown under way, a restart after a crash,
//! a full disk. The API's own behaviour (uploads, mounts, ranges, listings, deletes,
//! referrers, bad input, limits) is tested in-process, with no engine: server/tests/api.rs.

use ferry_e2e::*;
use reqwest::blocking::Client;
use serde_json::{json, Value};

struct Api {
    ferry: Ferry,
    http: Client,
    _dir: tempfile::TempDir,
}

impl Api {
    fn start(extra: &str) -> Api {
        let dir = scratch();
        let ferry = Ferry::start(dir.path(), extra);
        Api {
            ferry,
            http: Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, p: &str) -> String {
        self.ferry.url(p)
    }

    fn put_blob(&self, repo: &str, data: &[u8]) -> String {
        upload_blob(&self.http, &self.url(""), repo, data)
    }

    /// Pushes a config and one layer and a manifest referencing them; returns the manifest digest.
    fn put_image(&self, repo: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
        upload_image(&self.http, &self.url(""), repo, tag, seed)
    }
}

/// 404 MANIFEST_UNKNOWN (HEAD without a body), through every backend of a full chain, as
/// distribution does; a push under it is still 400, and a malformed digest stays 400.
#[test]
fn reads_of_impossible_tags_are_unknown_manifests() {
    let docker = docker20();
    let ctd = containerd16();
    let api = Api::start(&format!(
        "[[backends]]\ntype = \"docker\"\nsocket = \"{docker}\"\n\
         [[backends]]\ntype = \"containerd\"\nsocket = \"{ctd}\"\nnamespace = \"e2e\"\n\
         [[backends]]\ntype = \"push\"\n"
    ));
    let addr = api.ferry.addr();
    let long = "a".repeat(129);
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    for tag in [".bad", "-bad", long.as_str(), "bad$tag", "tag!x", "a+b", "caf%C3%A9"] {
        for name in ["img", "library/img?ns=docker.io"] {
            let (path, query) = name.split_once('?').map_or((name, ""), |(p, q)| (p, q));
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            let url = format!("/v2/{path}/manifests/{tag}{q}");
            let (s, b) = raw_request(&addr, "GET", &url, &[], b"");
            assert_oci_error(s, &b, 404, "MANIFEST_UNKNOWN");
            let (s, b) = raw_request(&addr, "HEAD", &url, &[], b"");
            assert_eq!((s, b.as_str()), (404, ""), "HEAD {url}");
            let (s, b) = raw_request(
                &addr,
                "PUT",
                &url,
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                manifest,
            );
            assert_oci_error(s, &b, 400, "MANIFEST_INVALID");
        }
    }
    let (s, b) = raw_request(&addr, "GET", "/v2/img/manifests/sha256:abc", &[], b"");
    assert_oci_error(s, &b, 400, "DIGEST_INVALID");
    // A valid tag nobody has is the same 404.
    let (s, b) = raw_request(&addr, "GET", "/v2/img/manifests/no-such-tag", &[], b"");
    assert_oci_error(s, &b, 404, "MANIFEST_UNKNOWN");
}

/// At shutdown, a blob being downloaded finishes before ferry exits.
#[test]
fn shutdown_finishes_responses_under_way() {
    let mut api = Api::start(PUSH_ONLY);
    let data: Vec<u8> = (0..24_000_000u32).map(|i| (i % 253) as u8).collect();
    let d = api.put_blob("bye", &data);
    let mut stream = std::net::TcpStream::connect(api.ferry.addr()).unwrap();
    std::io::Write::write_all(
        &mut stream,
        format!("GET /v2/bye/blobs/{d} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut first = vec![0u8; 4096];
    let n = std::io::Read::read(&mut stream, &mut first).unwrap();
    assert!(n > 0);
    // The response is under way (the client reads slowly); ferry is asked to stop.
    let pid = sh(&format!(
        "ss -ltnpH 'sport = :{}' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2",
        api.ferry.port
    ));
    sh(&format!("kill -TERM {}", pid.trim()));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut rest).unwrap();
    let mut all = first[..n].to_vec();
    all.extend(rest);
    let text_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        sha256_hex(&all[text_end..]),
        d.trim_start_matches("sha256:"),
        "the body came whole"
    );
    assert!(
        api.ferry.logs().contains("finishing requests under way"),
        "{}",
        api.ferry.logs()
    );
    api.ferry.stop();
}

/// Temp files a crash left among a repository's tags are swept at start.
#[test]
fn temp_files_a_crash_left_are_swept_at_start() {
    let mut api = Api::start(PUSH_ONLY);
    api.put_image("sweep/img", "v1", "sweep");
    let tags = api.ferry.dir.join("push/repos/docker.io/sweep/img/_tags");
    let stale = tags.join(".tmp-0123");
    std::fs::write(&stale, "sha256:half-written").unwrap();
    api.ferry.restart();
    assert!(!stale.exists(), "the crash's temp file is still there");
    let r = api.http.get(api.url("/v2/sweep/img/tags/list")).send().unwrap();
    assert_eq!(r.json::<Value>().unwrap()["tags"], json!(["v1"]));
}

/// A full disk (a small tmpfs as the data dir): the upload fails with an error that says so,
/// leaves nothing partial, and reads keep working.
#[test]
fn a_full_disk_is_said_as_such_and_leaves_nothing_partial() {
    let dir = scratch();
    let data = dir.path().join("data");
    let _unmount = Tmpfs::mount(&data, "2m");
    let ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let http = Client::new();
    let small = b"fits".to_vec();
    let d = format!("sha256:{}", sha256_hex(&small));
    let r = http
        .post(ferry.url(&format!("/v2/full/blobs/uploads/?digest={d}")))
        .body(small.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let bd = format!("sha256:{}", sha256_hex(&big));
    let r = http
        .post(ferry.url(&format!("/v2/full/blobs/uploads/?digest={bd}")))
        .body(big)
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    // The rest of the body may be unread: the client is told not to reuse the connection.
    assert_eq!(r.headers()["connection"], "close");
    let logs = ferry.logs();
    assert!(logs.contains("disk full (ENOSPC)"), "{logs}");
    let tmp = std::fs::read_dir(data.join("push/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "a partial blob was left");
    let r = http.get(ferry.url(&format!("/v2/full/blobs/{d}"))).send().unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), small, "reads keep working");
}
