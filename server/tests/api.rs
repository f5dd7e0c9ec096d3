//! The Distribution API over raw HTTP against ferry served in this process
//! (`ferry_server::serve`, a push store built from configuration as `ferry serve` builds it;
//! no binary, no engine): uploads, mounts, ranges, listings, deletes, referrers, bad input and
//! limits — each with its status and OCI error code, and with the store on disk unchanged
//! where the request must change nothing. What needs the process or an engine is in the
//! end-to-end suite (tests/tests/api.rs).

mod support;

use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};
use support::*;

/// Fields drop in order: the client's idle connections close before ferry stops.
struct Api {
    http: Client,
    ferry: InProcess,
    _dir: tempfile::TempDir,
}

impl Api {
    fn start(extra: &str) -> Api {
        let dir = scratch();
        let ferry = InProcess::start(dir.path(), extra);
        Api {
            http: Client::new(),
            ferry,
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

    fn put_manifest(&self, repo: &str, reference: &str, body: &[u8]) -> Response {
        upload_manifest(&self.http, &self.url(""), repo, reference, body)
    }

    fn store(&self) -> Vec<(String, String)> {
        snapshot(&self.ferry.dir)
    }
}

fn header(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn error_of(r: Response) -> (u16, String) {
    let s = r.status().as_u16();
    (s, r.text().unwrap())
}

#[test]
fn base_endpoint() {
    let api = Api::start(PUSH_ONLY);
    let r = api.http.get(api.url("/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "Docker-Distribution-API-Version"), "registry/2.0");
}

#[test]
fn chunked_upload_status_out_of_order_and_cancel() {
    let api = Api::start(PUSH_ONLY);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let r = api.http.post(api.url("/v2/up/load/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = header(&r, "Location");
    assert!(!header(&r, "Docker-Upload-UUID").is_empty());
    let (a, b) = data.split_at(100_000);
    let r = api
        .http
        .patch(api.url(&location))
        .header("Content-Range", "0-99999")
        .header("Content-Type", "application/octet-stream")
        .body(a.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "Range"), "0-99999");
    let location = header(&r, "Location");
    let r = api.http.get(api.url(&location)).send().unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "Range"), "0-99999");

    // A chunk that does not continue where the upload stands: 416, upload unchanged.
    let before = api.store();
    let r = api
        .http
        .patch(api.url(&location))
        .header("Content-Range", "200000-200009")
        .body(vec![0u8; 10])
        .send()
        .unwrap();
    let (s, body) = error_of(r);
    assert_oci_error(s, &body, 416, "BLOB_UPLOAD_INVALID");
    assert_eq!(api.store(), before);

    // Streamed PATCH without Content-Range continues, then PUT completes with the digest.
    let (b1, b2) = b.split_at(150_000);
    let r = api.http.patch(api.url(&location)).body(b1.to_vec()).send().unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "Range"), "0-249999");
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={digest}")))
        .body(b2.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "Docker-Content-Digest"), digest);
    let got = api
        .http
        .get(api.url(&format!("/v2/up/load/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(got.bytes().unwrap().to_vec(), data);
    // The finished session is gone.
    let (s, body) = error_of(api.http.get(api.url(&location)).send().unwrap());
    assert_oci_error(s, &body, 404, "BLOB_UPLOAD_UNKNOWN");

    // Cancel.
    let r = api.http.post(api.url("/v2/up/load/blobs/uploads/")).send().unwrap();
    let location = header(&r, "Location");
    assert_eq!(api.http.delete(api.url(&location)).send().unwrap().status(), 204);
    let (s, body) = error_of(api.http.get(api.url(&location)).send().unwrap());
    assert_oci_error(s, &body, 404, "BLOB_UPLOAD_UNKNOWN");
    assert!(std::fs::read_dir(api.ferry.dir.join("push/uploads"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn wrong_digest_on_put_stores_nothing() {
    let api = Api::start(PUSH_ONLY);
    let before = api.store();
    let wrong = format!("sha256:{}", sha256_hex(b"something else"));
    let r = api
        .http
        .post(api.url(&format!("/v2/x/blobs/uploads/?digest={wrong}")))
        .body(b"actual".to_vec())
        .send()
        .unwrap();
    let (s, body) = error_of(r);
    assert_oci_error(s, &body, 400, "DIGEST_INVALID");
    assert_eq!(api.store(), before);

    let r = api.http.post(api.url("/v2/x/blobs/uploads/")).send().unwrap();
    let location = header(&r, "Location");
    let r = api
        .http
        .put(api.url(&format!("{location}?digest={wrong}")))
        .body(b"actual".to_vec())
        .send()
        .unwrap();
    let (s, body) = error_of(r);
    assert_oci_error(s, &body, 400, "DIGEST_INVALID");
    assert_eq!(api.store(), before, "a failed upload leaves neither blob nor session");
}

#[test]
fn unknown_upload_ids() {
    let api = Api::start(PUSH_ONLY);
    for id in ["00000000-0000-0000-0000-000000000000", "not-a-uuid"] {
        let path = format!("/v2/x/blobs/uploads/{id}");
        let (s, b) = error_of(api.http.get(api.url(&path)).send().unwrap());
        assert_oci_error(s, &b, 404, "BLOB_UPLOAD_UNKNOWN");
        let (s, b) = error_of(api.http.patch(api.url(&path)).body("x").send().unwrap());
        assert_oci_error(s, &b, 404, "BLOB_UPLOAD_UNKNOWN");
        let put = format!("{path}?digest=sha256:{}", sha256_hex(b"x"));
        let (s, b) = error_of(api.http.put(api.url(&put)).body("x").send().unwrap());
        assert_oci_error(s, &b, 404, "BLOB_UPLOAD_UNKNOWN");
    }
    // A session belongs to the repository it was opened for.
    let r = api.http.post(api.url("/v2/x/blobs/uploads/")).send().unwrap();
    let id = header(&r, "Docker-Upload-UUID");
    let (s, b) = error_of(
        api.http
            .get(api.url(&format!("/v2/y/blobs/uploads/{id}")))
            .send()
            .unwrap(),
    );
    assert_oci_error(s, &b, 404, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn cross_repository_mount() {
    let api = Api::start(PUSH_ONLY);
    let d = api.put_blob("src/repo", b"shared layer");
    let r = api
        .http
        .post(api.url(&format!("/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "Location"), format!("/v2/dst/repo/blobs/{d}"));
    let unknown = format!("sha256:{}", sha256_hex(b"never pushed"));
    let r = api
        .http
        .post(api.url(&format!("/v2/dst/repo/blobs/uploads/?mount={unknown}&from=src/repo")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "unknown blob: an upload session instead");
    assert!(header(&r, "Location").starts_with("/v2/dst/repo/blobs/uploads/"));
    // A blob is known only in the repositories it is linked in: knowing its digest neither
    // reads it through another name nor mounts it from a repository that lacks it.
    let r = api
        .http
        .get(api.url(&format!("/v2/third/repo/blobs/{d}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .http
        .post(api.url(&format!("/v2/third/repo/blobs/uploads/?mount={d}&from=nowhere/repo")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "not linked in `from`: an upload session instead");
    let r = api
        .http
        .post(api.url(&format!("/v2/third/repo/blobs/uploads/?mount={d}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "no `from`: an upload session instead");
    let r = api
        .http
        .get(api.url(&format!("/v2/dst/repo/blobs/{d}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "mounted into dst");
}

#[test]
fn range_reads() {
    let api = Api::start(PUSH_ONLY);
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
    let d = api.put_blob("r", &data);
    let url = api.url(&format!("/v2/r/blobs/{d}"));
    let r = api.http.get(&url).header("Range", "bytes=10-19").send().unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "Content-Range"), "bytes 10-19/1000");
    assert_eq!(header(&r, "Content-Length"), "10");
    assert_eq!(r.bytes().unwrap().to_vec(), data[10..20].to_vec());
    let r = api.http.get(&url).header("Range", "bytes=-5").send().unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), data[995..].to_vec());
    let r = api.http.get(&url).header("Range", "bytes=1000-").send().unwrap();
    assert_eq!(header(&r, "Content-Range"), "bytes */1000");
    let (s, b) = error_of(r);
    assert_oci_error(s, &b, 416, "SIZE_INVALID");
    let r = api.http.head(&url).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "Content-Length"), "1000");
    assert_eq!(header(&r, "Docker-Content-Digest"), d);
}

#[test]
fn manifest_get_head_and_accept() {
    let api = Api::start(PUSH_ONLY);
    let (digest, bytes) = api.put_image("m/img", "v1", "m");
    for reference in ["v1", digest.as_str()] {
        let url = api.url(&format!("/v2/m/img/manifests/{reference}"));
        let r = api.http.head(&url).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "Docker-Content-Digest"), digest);
        assert_eq!(header(&r, "Content-Length"), bytes.len().to_string());
        assert_eq!(header(&r, "Content-Type"), OCI_MANIFEST);
        let r = api.http.get(&url).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(header(&r, "ETag"), format!("\"{digest}\""));
        assert_eq!(r.bytes().unwrap().to_vec(), bytes);
    }
    // A proxy echoes the namespace it was asked for (containerd mirrors send ?ns=); pushed
    // images are not served to mirror clients by default, so this one is not found there.
    let r = api
        .http
        .head(api.url("/v2/m/img/manifests/v1?ns=docker.io"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "OCI-Namespace"), "docker.io");
    // A client that lists only other manifest types does not get this one.
    let r = api
        .http
        .get(api.url("/v2/m/img/manifests/v1"))
        .header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .unwrap();
    let (s, b) = error_of(r);
    assert_oci_error(s, &b, 404, "MANIFEST_UNKNOWN");
}

#[test]
fn tags_pagination_and_catalog() {
    let api = Api::start(PUSH_ONLY);
    let (_, m) = api.put_image("pag/one", "a", "p");
    for t in ["d", "b", "c"] {
        assert_eq!(api.put_manifest("pag/one", t, &m).status(), 201);
    }
    api.put_image("pag/two", "x", "q");
    let r = api.http.get(api.url("/v2/pag/one/tags/list?n=2")).send().unwrap();
    assert_eq!(header(&r, "Link"), "</v2/pag/one/tags/list?n=2&last=b>; rel=\"next\"");
    let v: Value = r.json().unwrap();
    assert_eq!(v, json!({"name": "pag/one", "tags": ["a", "b"]}));
    let r = api
        .http
        .get(api.url("/v2/pag/one/tags/list?n=2&last=b"))
        .send()
        .unwrap();
    assert_eq!(header(&r, "Link"), "");
    assert_eq!(r.json::<Value>().unwrap()["tags"], json!(["c", "d"]));
    let r = api.http.get(api.url("/v2/pag/one/tags/list")).send().unwrap();
    assert_eq!(r.json::<Value>().unwrap()["tags"], json!(["a", "b", "c", "d"]));
    let (s, b) = error_of(api.http.get(api.url("/v2/pag/none/tags/list")).send().unwrap());
    assert_oci_error(s, &b, 404, "NAME_UNKNOWN");
    let (s, b) = error_of(api.http.get(api.url("/v2/pag/one/tags/list?n=x")).send().unwrap());
    assert_eq!(s, 400, "{b}");

    let v: Value = api.http.get(api.url("/v2/_catalog")).send().unwrap().json().unwrap();
    assert_eq!(v, json!({"repositories": ["pag/one", "pag/two"]}));
    let r = api.http.get(api.url("/v2/_catalog?n=1")).send().unwrap();
    assert_eq!(header(&r, "Link"), "</v2/_catalog?n=1&last=pag/one>; rel=\"next\"");
    assert_eq!(r.json::<Value>().unwrap(), json!({"repositories": ["pag/one"]}));
}

const PUSH_WITH_DELETES: &str = "[[backends]]\ntype = \"push\"\nallow_delete = true\n";

#[test]
fn deletes() {
    let api = Api::start(PUSH_WITH_DELETES);
    let (digest, m) = api.put_image("del/img", "v1", "del");
    assert_eq!(api.put_manifest("del/img", "v2", &m).status(), 201);
    // Deleting a tag leaves the manifest and the other tag.
    assert_eq!(
        api.http
            .delete(api.url("/v2/del/img/manifests/v1"))
            .send()
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        api.http
            .get(api.url("/v2/del/img/manifests/v1"))
            .send()
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        api.http
            .get(api.url("/v2/del/img/manifests/v2"))
            .send()
            .unwrap()
            .status(),
        200
    );
    // Deleting by digest removes every tag of it.
    let url = api.url(&format!("/v2/del/img/manifests/{digest}"));
    assert_eq!(api.http.delete(&url).send().unwrap().status(), 202);
    let (s, b) = error_of(api.http.get(&url).send().unwrap());
    assert_oci_error(s, &b, 404, "MANIFEST_UNKNOWN");
    assert_eq!(
        api.http
            .get(api.url("/v2/del/img/manifests/v2"))
            .send()
            .unwrap()
            .status(),
        404
    );
    let (s, b) = error_of(api.http.delete(&url).send().unwrap());
    assert_oci_error(s, &b, 404, "MANIFEST_UNKNOWN");
    // Blobs: a delete unlinks the blob from one repository only.
    let d = api.put_blob("del/img", b"to delete");
    api.put_blob("other/img", b"to delete");
    let url = api.url(&format!("/v2/del/img/blobs/{d}"));
    assert_eq!(api.http.delete(&url).send().unwrap().status(), 202);
    let (s, b) = error_of(api.http.get(&url).send().unwrap());
    assert_oci_error(s, &b, 404, "BLOB_UNKNOWN");
    let r = api
        .http
        .get(api.url(&format!("/v2/other/img/blobs/{d}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "another repository's copy stays");
    assert_eq!(r.bytes().unwrap().to_vec(), b"to delete".to_vec());
    // A blob a manifest references is not unlinked, and a manifest's digest is no blob to
    // delete: the image stays whole.
    let (victim, m) = api.put_image("victim/img", "v1", "victim");
    let config = serde_json::from_slice::<Value>(&m).unwrap()["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, b) = error_of(
        api.http
            .delete(api.url(&format!("/v2/victim/img/blobs/{config}")))
            .send()
            .unwrap(),
    );
    assert_oci_error(s, &b, 403, "DENIED");
    let r = api
        .http
        .delete(api.url(&format!("/v2/victim/img/blobs/{victim}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .http
        .delete(api.url(&format!("/v2/elsewhere/blobs/{victim}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api.http.get(api.url("/v2/victim/img/manifests/v1")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().to_vec(), m);

    // Deletes are off by default: 405 UNSUPPORTED and nothing changes.
    let api = Api::start(PUSH_ONLY);
    let (digest, _) = api.put_image("del/img", "v1", "keep");
    let before = api.store();
    let (s, b) = error_of(
        api.http
            .delete(api.url(&format!("/v2/del/img/manifests/{digest}")))
            .send()
            .unwrap(),
    );
    assert_oci_error(s, &b, 405, "UNSUPPORTED");
    assert_eq!(api.store(), before);
}

#[test]
fn referrers() {
    let api = Api::start(PUSH_WITH_DELETES);
    let (subject, subject_bytes) = api.put_image("ref/img", "v1", "subject");
    let empty = api.put_blob("ref/img", b"{}");
    let sig = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_bytes.len()},
        "annotations": {"org.example": "yes"},
    })
    .to_string();
    let sig_digest = format!("sha256:{}", sha256_hex(sig.as_bytes()));
    let r = api.put_manifest("ref/img", &sig_digest, sig.as_bytes());
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "OCI-Subject"), subject);

    let r = api
        .http
        .get(api.url(&format!("/v2/ref/img/referrers/{subject}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "Content-Type"), "application/vnd.oci.image.index.v1+json");
    let v: Value = r.json().unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], sig_digest);
    assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.example.sig");
    assert_eq!(v["manifests"][0]["annotations"]["org.example"], "yes");

    let r = api
        .http
        .get(api.url(&format!(
            "/v2/ref/img/referrers/{subject}?artifactType=application/other"
        )))
        .send()
        .unwrap();
    assert_eq!(header(&r, "OCI-Filters-Applied"), "artifactType");
    assert_eq!(r.json::<Value>().unwrap()["manifests"], json!([]));
    let (s, b) = error_of(
        api.http
            .get(api.url("/v2/ref/img/referrers/sha256:nope"))
            .send()
            .unwrap(),
    );
    assert_oci_error(s, &b, 400, "DIGEST_INVALID");
    // Deleting the referrer removes it from the list.
    assert_eq!(
        api.http
            .delete(api.url(&format!("/v2/ref/img/manifests/{sig_digest}")))
            .send()
            .unwrap()
            .status(),
        202
    );
    let v: Value = api
        .http
        .get(api.url(&format!("/v2/ref/img/referrers/{subject}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["manifests"], json!([]));
}

#[test]
fn bad_input_gets_spec_errors_and_changes_nothing() {
    let api = Api::start(PUSH_ONLY);
    let (_, good_manifest) = api.put_image("good/img", "v1", "good");
    let before = api.store();
    let addr = api.ferry.addr();
    let long = "a".repeat(300);
    let blob_digest = format!("sha256:{}", sha256_hex(b"x"));

    // Names: uppercase, dot-dot (raw and encoded), too long.
    for name in ["Upper/img", "a/../b", "a/%2e%2e/b", "..", long.as_str()] {
        for (method, path) in [
            ("GET", format!("/v2/{name}/manifests/latest")),
            ("PUT", format!("/v2/{name}/manifests/latest")),
            ("POST", format!("/v2/{name}/blobs/uploads/")),
            ("POST", format!("/v2/{name}/blobs/uploads/?digest={blob_digest}")),
            ("GET", format!("/v2/{name}/tags/list")),
        ] {
            let (s, b) = raw_request(&addr, method, &path, &[("Content-Type", OCI_MANIFEST)], &good_manifest);
            assert_oci_error(s, &b, 400, "NAME_INVALID");
        }
    }
    // Digests: malformed and unsupported algorithms.
    for d in [
        "sha256:abc",
        "sha256:XYZ",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256",
    ] {
        let (s, b) = raw_request(&addr, "GET", &format!("/v2/good/img/blobs/{d}"), &[], b"");
        if d == "sha256" {
            // No colon: not a digest at all, so no such blob.
            assert_eq!(s, 400, "{b}");
        } else {
            assert_oci_error(s, &b, 400, "DIGEST_INVALID");
        }
        let (s, b) = raw_request(
            &addr,
            "POST",
            &format!("/v2/good/img/blobs/uploads/?digest={d}"),
            &[],
            b"x",
        );
        assert_oci_error(s, &b, 400, "DIGEST_INVALID");
    }
    // Manifest by a digest it does not hash to.
    let wrong = format!("sha256:{}", sha256_hex(b"other"));
    let (s, b) = error_of(api.put_manifest("good/img", &wrong, &good_manifest));
    assert_oci_error(s, &b, 400, "DIGEST_INVALID");
    // Garbage and invalid JSON.
    for body in [
        &b"not json at all"[..],
        b"{}",
        br#"{"schemaVersion":2,"mediaType":"text/plain"}"#,
    ] {
        let (s, b) = error_of(api.put_manifest("good/img", "bad", body));
        assert_oci_error(s, &b, 400, "MANIFEST_INVALID");
    }
    // A manifest naming blobs the store does not have.
    let ghost = json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": wrong, "size": 5},
        "layers": [],
    })
    .to_string();
    let (s, b) = error_of(api.put_manifest("good/img", "ghost", ghost.as_bytes()));
    assert_oci_error(s, &b, 400, "MANIFEST_BLOB_UNKNOWN");
    // Oversize manifest, with and without a Content-Length up front.
    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let (s, b) = error_of(api.put_manifest("good/img", "huge", &huge));
    assert_oci_error(s, &b, 413, "SIZE_INVALID");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge.chunks(65536).map(|c| Ok(c.to_vec())).collect();
    let r = api
        .http
        .put(api.url("/v2/good/img/manifests/huge"))
        .header("Content-Type", OCI_MANIFEST)
        .body(reqwest::blocking::Body::new(ChunkReader::new(chunks)))
        .send()
        .unwrap();
    let (s, b) = error_of(r);
    assert_oci_error(s, &b, 413, "SIZE_INVALID");
    // Bad tags: a push under one is refused (a read of one is a 404, tested below).
    let (s, b) = raw_request(&addr, "PUT", "/v2/good/img/manifests/-bad", &[], &good_manifest);
    assert_oci_error(s, &b, 400, "MANIFEST_INVALID");

    assert_eq!(api.store(), before, "bad requests changed the store");
    let logs = api.ferry.logs();
    assert!(
        logs.contains("NAME_INVALID") && logs.contains("status=400"),
        "errors are logged with their body"
    );
}

/// A body without a length, so the server cannot refuse it before reading.
struct ChunkReader {
    chunks: std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl ChunkReader {
    fn new(chunks: Vec<Result<Vec<u8>, std::io::Error>>) -> Self {
        ChunkReader {
            chunks: chunks.into_iter(),
            current: std::io::Cursor::new(Vec::new()),
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            match self.chunks.next() {
                Some(c) => self.current = std::io::Cursor::new(c?),
                None => return Ok(0),
            }
        }
    }
}

/// A reference that is not a valid tag (nor a digest) cannot name a manifest: a read answers
/// A chunk sent while the upload's PUT is finishing it can never reach the stored blob, and a
/// stored blob is never replaced: the race is tried many times, for a new blob and for one
/// already stored, and every read of the digest hashes to it.
#[test]
fn a_chunk_racing_the_final_put_never_changes_a_blob() {
    let api = Api::start(PUSH_ONLY);
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = format!("sha256:{}", sha256_hex(&data));
    for round in 0..24 {
        let r = api.http.post(api.url("/v2/race/x/blobs/uploads/")).send().unwrap();
        let location = header(&r, "Location");
        let r = api.http.patch(api.url(&location)).body(data.clone()).send().unwrap();
        assert_eq!(r.status(), 202);
        let location = header(&r, "Location");
        let sep = if location.contains('?') { '&' } else { '?' };
        let put_url = api.url(&format!("{location}{sep}digest={digest}"));
        let patch_url = api.url(&location);
        let (put, patch) = std::thread::scope(|s| {
            let put = s.spawn(|| api.http.put(&put_url).send().unwrap().status().as_u16());
            let patch = s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_micros(500 * (round % 8)));
                api.http
                    .patch(&patch_url)
                    .body("EVIL")
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            });
            (put.join().unwrap(), patch.join().unwrap())
        });
        // Either order is fine as long as the blob is right: a PATCH first makes the PUT's
        // digest check fail (400); a PATCH after finds no session (404).
        assert!(
            matches!((put, patch), (201, 404) | (400, 202)),
            "round {round}: PUT {put}, PATCH {patch}"
        );
        let r = api.http.get(api.url(&format!("/v2/race/x/blobs/{digest}"))).send();
        if let Ok(r) = r {
            if r.status() == 200 {
                let body = r.bytes().unwrap();
                assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest, "round {round}");
            }
        }
    }
    let r = api
        .http
        .get(api.url(&format!("/v2/race/x/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "at least one round stored the blob");
    assert_eq!(format!("sha256:{}", sha256_hex(&r.bytes().unwrap())), digest);
}

/// Limits a client meets, each with the spec's error, changing nothing: a blob over
/// max_blob_size (monolithic and chunked), the store's quota, upload sessions per client, and
/// a chunk shorter than its Content-Range.
#[test]
fn upload_limits() {
    let api = Api::start(
        "[[backends]]\ntype = \"push\"\nmax_blob_size = \"1KiB\"\nquota = \"64KiB\"\nmax_upload_sessions_per_client = 3\n",
    );
    let addr = api.ferry.addr();
    let big = vec![b'x'; 2048];
    let d = format!("sha256:{}", sha256_hex(&big));
    let before = api.store();
    let (s, b) = raw_request(&addr, "POST", &format!("/v2/lim/blobs/uploads/?digest={d}"), &[], &big);
    assert_oci_error(s, &b, 413, "SIZE_INVALID");
    assert_eq!(api.store(), before, "nothing stored");

    // Chunked: the chunk that passes the limit is refused, the session keeps what it had.
    let r = api.http.post(api.url("/v2/lim/blobs/uploads/")).send().unwrap();
    let location = header(&r, "Location");
    let r = api.http.patch(api.url(&location)).body(vec![b'a'; 600]).send().unwrap();
    assert_eq!(r.status(), 202);
    let (s, b) = error_of(api.http.patch(api.url(&location)).body(vec![b'a'; 600]).send().unwrap());
    assert_oci_error(s, &b, 413, "SIZE_INVALID");
    let r = api.http.get(api.url(&location)).send().unwrap();
    assert_eq!(header(&r, "Range"), "0-599");

    // A chunk shorter than its Content-Range says: refused, nothing of it kept.
    let (s, b) = error_of(
        api.http
            .patch(api.url(&location))
            .header("Content-Range", "600-699")
            .body(vec![b'b'; 50])
            .send()
            .unwrap(),
    );
    assert_oci_error(s, &b, 400, "BLOB_UPLOAD_INVALID");
    let r = api.http.get(api.url(&location)).send().unwrap();
    assert_eq!(header(&r, "Range"), "0-599");

    // Sessions per client: this client has one open; two more, then 429.
    for _ in 0..2 {
        assert_eq!(
            api.http
                .post(api.url("/v2/lim/blobs/uploads/"))
                .send()
                .unwrap()
                .status(),
            202
        );
    }
    let (s, b) = error_of(api.http.post(api.url("/v2/lim/blobs/uploads/")).send().unwrap());
    assert_oci_error(s, &b, 429, "TOOMANYREQUESTS");
    assert_eq!(api.http.delete(api.url(&location)).send().unwrap().status(), 204);
    assert_eq!(
        api.http
            .post(api.url("/v2/lim/blobs/uploads/"))
            .send()
            .unwrap()
            .status(),
        202
    );

    // The quota: blobs fill the store until the next one would pass 64 KiB.
    let mut stored = 0;
    let mut refused = None;
    for i in 0..100u32 {
        let blob: Vec<u8> = (0..1000u32).map(|j| (i * 7 + j) as u8).collect();
        let d = format!("sha256:{}", sha256_hex(&blob));
        let (s, b) = raw_request(&addr, "POST", &format!("/v2/lim/blobs/uploads/?digest={d}"), &[], &blob);
        if s == 201 {
            stored += 1;
        } else {
            refused = Some((s, b));
            break;
        }
    }
    let (s, b) = refused.expect("the quota was never reached");
    assert_oci_error(s, &b, 413, "SIZE_INVALID");
    assert!(b.contains("quota"), "{b}");
    assert!((50..=66).contains(&stored), "{stored} blobs of 1000 bytes fit 64 KiB");
}
