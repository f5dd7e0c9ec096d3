//! HTTP and store helpers shared by the in-process API tests (server/tests) and the
//! end-to-end suite (tests/src/lib.rs, which includes this file by path).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use sha2::{Digest as _, Sha256};

/// An OCI image manifest's media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A raw HTTP/1.1 exchange, for requests an HTTP library would normalise (`..` in paths).
/// Returns (status, body).
pub fn raw_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Every file under `dir` with the sha256 of its content, sorted: a snapshot to compare the
/// store before and after a request that must change nothing.
pub fn snapshot(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, sha256_hex(&std::fs::read(&p).unwrap_or_default())));
            }
        }
    }
    out.sort();
    out
}

/// Asserts an OCI error response: status and the first error's code.
pub fn assert_oci_error(status: u16, body: &str, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"));
    assert_eq!(v["errors"][0]["code"], want_code, "body: {body}");
}

/// Uploads `data` as a blob of `repo` to the registry at `base` (`http://host:port`) in one
/// request; returns its digest.
pub fn upload_blob(http: &Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = format!("sha256:{}", sha256_hex(data));
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    d
}

/// PUTs `body` as an OCI image manifest of `repo` under `reference`.
pub fn upload_manifest(http: &Client, base: &str, repo: &str, reference: &str, body: &[u8]) -> Response {
    http.put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(body.to_vec())
        .send()
        .unwrap()
}

/// Pushes a config, one layer and a manifest referencing them, tagged `tag`; returns the
/// manifest's digest and bytes.
pub fn upload_image(http: &Client, base: &str, repo: &str, tag: &str, seed: &str) -> (String, Vec<u8>) {
    let config = format!("{{\"seed\":\"{seed}\"}}");
    let layer = format!("layer of {seed}");
    let cd = upload_blob(http, base, repo, config.as_bytes());
    let ld = upload_blob(http, base, repo, layer.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let r = upload_manifest(http, base, repo, tag, &manifest);
    assert_eq!(r.status(), 201);
    (format!("sha256:{}", sha256_hex(&manifest)), manifest)
}
