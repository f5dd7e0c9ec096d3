//! The containerd backend: the moby#49473 repair for real (Docker 26 + containerd 1.7 with
//! the containerd image store), the fast path with no export, Range reads, heals with the
//! client's credentials, and containerd going away and coming back.

use std::path::Path;

use ferry_e2e::*;
use serde_json::Value;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// Uploads a blob to a distribution registry over plain HTTP (POST, then PUT with the digest).
fn upload(registry: &str, repo: &str, file: &Path, auth: Option<(&str, &str)>) -> String {
    upload_to(&http(), &format!("http://{registry}"), repo, file, auth)
}

/// Uploads a blob to the registry at `base` (`http://...` or `https://...`) with `client`.
fn upload_to(
    client: &reqwest::blocking::Client,
    base: &str,
    repo: &str,
    file: &Path,
    auth: Option<(&str, &str)>,
) -> String {
    let data = std::fs::read(file).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let with_auth = |req: reqwest::blocking::RequestBuilder| match auth {
        Some((u, p)) => req.basic_auth(u, Some(p)),
        None => req,
    };
    let r = with_auth(client.post(format!("{base}/v2/{repo}/blobs/uploads/")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("{base}{location}")
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = with_auth(client.put(format!("{location}{sep}digest={digest}")).body(data))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().unwrap());
    digest
}

/// Pushes image A from Docker 20 to the registry, then B: A's config and A's layers
/// recompressed with `gzip -1` — the same diff-ids under different layer digests.
/// Returns (A's name, B's name, B's manifest).
fn push_a_and_b(registry: &str, work: &Path) -> (String, String, Value) {
    let host = docker20();
    let u = unique("");
    let (a, b) = (format!("{registry}/heal/a{u}:1"), format!("{registry}/heal/b{u}:1"));
    build_image(&host, &format!("a{u}:1"), 1);
    sh(&format!(
        "docker -H {host} tag a{u}:1 {a} && docker -H {host} push {a} && docker -H {host} rmi {a} a{u}:1"
    ));
    let m: Value = http()
        .get(format!("http://{registry}/v2/heal/a{u}/manifests/1"))
        .header("Accept", DOCKER_MANIFEST)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut mb = m.clone();
    let config = m["config"]["digest"].as_str().unwrap();
    let cfile = work.join("config");
    sh(&format!(
        "curl -sf http://{registry}/v2/heal/a{u}/blobs/{config} -o {}",
        cfile.display()
    ));
    upload(registry, &format!("heal/b{u}"), &cfile, None);
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        let d = l["digest"].as_str().unwrap();
        let f = work.join(format!("layer{i}.gz"));
        sh(&format!(
            "curl -sf http://{registry}/v2/heal/a{u}/blobs/{d} | gunzip | gzip -1 -n > {}",
            f.display()
        ));
        let nd = upload(registry, &format!("heal/b{u}"), &f, None);
        assert_ne!(nd, d, "recompression must change the digest");
        mb["layers"][i]["digest"] = Value::String(nd);
        mb["layers"][i]["size"] = Value::from(std::fs::metadata(&f).unwrap().len());
    }
    let r = http()
        .put(format!("http://{registry}/v2/heal/b{u}/manifests/1"))
        .header("Content-Type", DOCKER_MANIFEST)
        .body(mb.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    (a, b, mb)
}

#[test]
fn moby_49473_missing_blobs_are_healed_from_the_origin() {
    let registry = env("E2E_REGISTRY");
    let d26 = env("E2E_DOCKER26_HOST");
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    let work = scratch();
    let (a, b, mb) = push_a_and_b(&registry, work.path());
    sh(&format!("docker -H {d26} pull {a} && docker -H {d26} pull {b}"));
    let layer = mb["layers"][0]["digest"].as_str().unwrap().to_string();
    assert!(
        !stored("moby", &layer),
        "B's layer was never fetched (the bug's precondition)"
    );

    // The bug for real: B's export lacks its config and layers.
    let save = work.path().join("b.tar");
    sh(&format!("docker -H {d26} save {b} -o {}", save.display()));
    let listing = sh(&format!("tar -tf {}", save.display()));
    assert!(
        !listing.contains(layer.trim_start_matches("sha256:")),
        "docker save B unexpectedly has the layer"
    );

    let b_ref = b.trim_start_matches(&format!("{registry}/"));
    let (b_name, b_tag) = b_ref.split_once(':').unwrap();

    // Without containerd in the chain: 404, and a log line naming the bug and the fix.
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"docker\"\nsocket = \"{d26}\"\n"),
    );
    let (status, _, _) = get_manifest(&ferry, b_name, b_tag, &format!("?ns={registry}"));
    assert_eq!(status, 404);
    let logs = ferry.logs();
    assert!(
        logs.contains("moby#49473") && logs.contains("containerd backend"),
        "{logs}"
    );
    drop(ferry);

    // docker → containerd: the manifest from the export, the config from the content store,
    // the layer fetched from the origin into the content store.
    let dir = scratch();
    let config = format!(
        "[[backends]]\ntype = \"docker\"\nsocket = \"{d26}\"\n[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"moby\"\n"
    );
    let ferry = Ferry::start(dir.path(), &config);
    let certs = mirror_hosts(dir.path(), &registry, &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &b);
    assert!(out.starts_with("hello from"), "{out}");
    assert!(stored("moby", &layer), "B's layer is now in containerd's content store");
    let logs = ferry.logs();
    assert!(logs.contains("healed: blob verified and committed"), "{logs}");
    assert!(
        count_lines(&logs, &["backend=\"docker\"", &format!("/v2/{b_name}/manifests/")]) >= 1,
        "the manifest comes from the export:\n{logs}"
    );
    sh(&format!("docker -H {d26} rmi {a} {b}"));
}

#[test]
fn fast_path_serves_docker26_images_without_an_export() {
    let d26 = env("E2E_DOCKER26_HOST");
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    let name = unique("fast");
    build_image(&d26, &format!("{name}:v1"), 2);
    let dir = scratch();
    let config = format!(
        "[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"moby\"\n[[backends]]\ntype = \"docker\"\nsocket = \"{d26}\"\n"
    );
    let ferry = Ferry::start(dir.path(), &config);
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    let logs = ferry.logs();
    assert!(
        !logs.contains("exporting image"),
        "the fast path made an export:\n{logs}"
    );
    assert!(logs.contains("backend=\"containerd\""));

    // The digests equal those of `docker save`.
    let save = dir.path().join("save");
    std::fs::create_dir_all(&save).unwrap();
    sh(&format!(
        "docker -H {d26} save {name}:v1 | tar -x -C {}",
        save.display()
    ));
    let index: Value = serde_json::from_str(&std::fs::read_to_string(save.join("index.json")).unwrap()).unwrap();
    let saved = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let (status, served, body) = get_manifest(&ferry, &name, "v1", "?ns=docker.io");
    assert_eq!(status, 200);
    assert_eq!(served, saved);
    let m: Value = serde_json::from_slice(&body).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(
            save.join("blobs/sha256").join(d.trim_start_matches("sha256:")).exists(),
            "{d}"
        );
    }

    // Range reads come from containerd too.
    let d = m["layers"][0]["digest"].as_str().unwrap();
    let whole = http()
        .get(ferry.url(&format!("/v2/{name}/blobs/{d}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let r = http()
        .get(ferry.url(&format!("/v2/{name}/blobs/{d}")))
        .header("Range", "bytes=100-199")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["Ferry-Backend"], "containerd");
    assert_eq!(r.bytes().unwrap(), whole.slice(100..200));
    // Absent everywhere: 404 BLOB_UNKNOWN.
    let nowhere = format!("sha256:{}", sha256_hex(b"absent everywhere"));
    let r = http()
        .get(ferry.url(&format!("/v2/{name}/blobs/{nowhere}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().unwrap()["errors"][0]["code"], "BLOB_UNKNOWN");
    sh(&format!("docker -H {d26} rmi {name}:v1"));
}

#[test]
fn heal_uses_the_clients_credentials() {
    let registry = env("E2E_REGISTRY_AUTH");
    let (user, pass) = (env("E2E_REGISTRY_USER"), env("E2E_REGISTRY_PASS"));
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    let work = scratch();
    let blob = work.path().join("blob");
    std::fs::write(&blob, format!("private layer {}", unique("")).repeat(1000)).unwrap();
    let repo = unique("private/heal");
    let digest = upload(&registry, &repo, &blob, Some((&user, &pass)));
    name_in_containerd("moby", &digest, Some((&registry, &repo)));

    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"moby\"\n"),
    );
    let line = doctor_heal_line(dir.path(), &registry);
    assert!(
        line.starts_with("ok ") && line.contains("heals send each client's own"),
        "{line}"
    );
    let url = ferry.url(&format!("/v2/{registry}/{repo}/blobs/{digest}"));
    let r = http().get(&url).send().unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["WWW-Authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
    let r = http().get(&url).basic_auth(&user, Some("wrong")).send().unwrap();
    assert_eq!(r.status(), 401);
    assert!(!stored("moby", &digest), "nothing written on refused credentials");

    let r = http().get(&url).basic_auth(&user, Some(&pass)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().to_vec(), std::fs::read(&blob).unwrap());
    assert!(
        stored_eventually("moby", &digest),
        "the healed blob is in the content store"
    );
    // Now served from the store, without credentials.
    let r = http().get(&url).send().unwrap();
    assert_eq!(r.status(), 200);
    let labels = sh(&format!("ctr -a {ctd17} -n moby content ls | awk '$1 == \"{digest}\"'"));
    assert!(
        labels.contains(&format!("containerd.io/distribution.source.{registry}={repo}")),
        "{labels}"
    );
}

/// Heals repair images containerd has: a blob no content in the namespace names is not
/// fetched — the origin is never asked, however often the client asks, and containerd's
/// content is listed at most once a second for it — until an image's manifest there names
/// it (seen within that second).
#[test]
fn only_blobs_an_image_of_containerd_names_are_healed() {
    let origin = Origin::start("127.0.0.11", None);
    let work = scratch();
    let repo = unique("unnamed/heal");
    let digest = origin.upload_random(&repo, &work.path().join("blob"), "300K", None);
    let dir = scratch();
    let debug = "[server]\nlog_level = \"info,ferry_backends::containerd=debug\"\n";
    let ferry = Ferry::start(
        dir.path(),
        &format!("{debug}{}", named(&origin.addr, &containerd_backend("unnamed-e2e", ""))),
    );
    let url = ferry.url(&format!("/v2/{repo}/blobs/{digest}?ns={}", origin.addr));
    let started = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(http().head(&url).send().unwrap().status(), 404);
        assert_eq!(http().get(&url).send().unwrap().status(), 404);
    }
    let seconds = started.elapsed().as_secs() as usize;
    let listings = count_lines(&ferry.logs(), &["listed what containerd's content names"]);
    assert!(
        listings >= 1 && listings <= seconds + 1,
        "{listings} listings in {seconds} s"
    );
    assert!(!stored("unnamed-e2e", &digest), "nothing written");
    let asked = |origin: &Origin| origin.requests().iter().filter(|l| l.contains(&digest)).count();
    assert_eq!(asked(&origin), 0, "{:?}", origin.requests());

    name_in_containerd("unnamed-e2e", &digest, Some((&origin.addr, &repo)));
    let healed = (0..30).find_map(|_| {
        let r = http().get(&url).send().unwrap();
        if r.status() == 200 {
            return Some(r.bytes().unwrap());
        }
        assert_eq!(r.status(), 404);
        std::thread::sleep(std::time::Duration::from_millis(100));
        None
    });
    let healed = healed.unwrap_or_else(|| panic!("not healed within 3 s:\n{}", ferry.logs()));
    assert_eq!(format!("sha256:{}", sha256_hex(&healed)), digest, "the origin's bytes");
    assert!(stored_eventually("unnamed-e2e", &digest), "healed into the store");
    assert!(asked(&origin) >= 1);
}

/// Starts distribution on a test host (a network namespace of the test's own, so ferry does
/// not take it for a loopback registry), with TLS when `tls` (a CA and a certificate for the
/// host's address, made in `work`). Returns the host (dropping it stops the registry and
/// deletes the namespace) and the registry's host:port.
fn registry_on_test_host(work: &Path, tls: bool) -> (TestHost, String) {
    let mut host = TestHost::new();
    if tls {
        make_server_cert(work, &host.ip);
    }
    let origin = host.start_registry(tls.then_some(work), None);
    (host, origin)
}

/// Writes a blob in `work` and uploads it to a new repository `<repo>N` of the TLS registry
/// `origin`, trusting the CA `ca`; returns the blob's file, the repository and its digest.
fn blob_over_tls(work: &Path, ca: &Path, origin: &str, repo: &str) -> (std::path::PathBuf, String, String) {
    let ca = std::fs::read(ca).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let blob = work.join("blob");
    std::fs::write(&blob, format!("layer behind tls {}", unique("")).repeat(1000)).unwrap();
    let repo = unique(repo);
    let digest = upload_to(&client, &format!("https://{origin}"), &repo, &blob, None);
    (blob, repo, digest)
}

/// Whether containerd 1.7's namespace `ns` holds `digest`.
fn stored(ns: &str, digest: &str) -> bool {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    sh(&format!("ctr -a {ctd17} -n {ns} content ls -q")).contains(digest)
}

/// [`stored`], waiting up to 5 s for it (a heal commits just after the last byte went out).
fn stored_eventually(ns: &str, digest: &str) -> bool {
    for _ in 0..50 {
        if stored(ns, digest) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// `backends` with `origin` (a test host's private address) named in `[origins] allow`.
fn named(origin: &str, backends: &str) -> String {
    format!("[origins]\nallow = [\"{origin}\"]\n{backends}")
}

/// A containerd backend on containerd 1.7, namespace `ns`, with `extra` settings.
fn containerd_backend(ns: &str, extra: &str) -> String {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    format!("[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"{ns}\"\n{extra}")
}

/// `ferry doctor`'s verdict and fix for `origin` with the config a [`Ferry::start`] in `dir`
/// wrote: what a user reads before the first heal fails.
fn doctor_heal_line(dir: &Path, origin: &str) -> String {
    let config = dir.join("ferry.toml").display().to_string();
    let (_, text) = run_ferry(&["doctor", "--config", &config, "--addr", "127.0.0.1:0"], &[]);
    doctor_line(&text, &format!("heal origin {origin}: "))
}

/// An origin behind TLS with a private CA: without `ca_file` the certificate is refused — 404,
/// a log line saying why, nothing written; with it the blob is healed and served.
#[test]
fn heal_from_a_tls_origin_trusts_the_configured_ca() {
    let work = scratch();
    let (_host, origin) = registry_on_test_host(work.path(), true);
    let w = work.path().display().to_string();
    let (blob, repo, digest) = blob_over_tls(work.path(), &work.path().join("ca.pem"), &origin, "tls/heal");
    name_in_containerd("tls-e2e", &digest, Some((&origin, &repo)));
    let url = |ferry: &Ferry| ferry.url(&format!("/v2/{repo}/blobs/{digest}?ns={origin}"));

    let dir = scratch();
    let untrusting = Ferry::start(dir.path(), &named(&origin, &containerd_backend("tls-e2e", "")));
    let r = http().get(url(&untrusting)).send().unwrap();
    assert_eq!(r.status(), 404, "{}", untrusting.logs());
    let logs = untrusting.logs();
    assert!(
        count_lines(&logs, &["origin fetch failed", &origin]) >= 1 && logs.to_lowercase().contains("certificate"),
        "{logs}"
    );
    assert!(
        !stored_eventually("tls-e2e", &digest),
        "nothing written when the origin is not trusted"
    );
    let line = doctor_heal_line(dir.path(), &origin);
    assert!(
        line.starts_with("FAIL") && line.contains("certificate") && line.contains("set ca_file of this backend"),
        "{line}"
    );

    let dir = scratch();
    let trusting = Ferry::start(
        dir.path(),
        &named(
            &origin,
            &containerd_backend("tls-e2e", &format!("ca_file = \"{w}/ca.pem\"\n")),
        ),
    );
    let r = http().get(url(&trusting)).send().unwrap();
    assert_eq!(r.status(), 200, "{}", trusting.logs());
    let line = doctor_heal_line(dir.path(), &origin);
    assert!(
        line.starts_with(&format!(
            "ok    backend containerd (containerd) heal origin {origin}: https://{origin} answers"
        )),
        "{line}"
    );
    assert_eq!(r.bytes().unwrap().to_vec(), std::fs::read(&blob).unwrap());
    assert!(
        stored_eventually("tls-e2e", &digest),
        "the healed blob is in the content store"
    );
}

/// A TLS registry on a loopback address: heals ask loopback hosts over plain HTTP unless told
/// otherwise, so without settings the registry refuses the request (the log and the doctor
/// say it speaks TLS) and nothing is written; `[backends.hosts."<host>"]` with its `ca_file`
/// (which names the host, no `[origins]` entry needed) has heals use TLS and trust it.
#[test]
fn heal_from_a_tls_origin_on_loopback_with_its_host_settings() {
    let work = scratch();
    let tls = work.path().join("tls");
    let origin = Origin::start_tls("127.0.0.9", &tls);
    let o = origin.addr.clone();
    let (blob, repo, digest) = blob_over_tls(work.path(), &tls.join("ca.pem"), &o, "lotls/heal");
    name_in_containerd("lotls-e2e", &digest, Some((&o, &repo)));
    let url = |ferry: &Ferry| ferry.url(&format!("/v2/{repo}/blobs/{digest}?ns={o}"));

    let dir = scratch();
    let plain = Ferry::start(dir.path(), &named(&o, &containerd_backend("lotls-e2e", "")));
    let r = http().get(url(&plain)).send().unwrap();
    assert_eq!(r.status(), 404, "{}", plain.logs());
    let logs = plain.logs();
    assert!(
        count_lines(
            &logs,
            &[
                "origin fetch failed",
                &format!("http://{o}"),
                "HTTP request to an HTTPS server"
            ]
        ) >= 1,
        "{logs}"
    );
    assert!(!stored("lotls-e2e", &digest), "nothing written");
    let line = doctor_heal_line(dir.path(), &o);
    assert!(
        line.starts_with("FAIL")
            && line.contains(&format!(
                "it speaks TLS: set plain_http = false under [backends.hosts.\"{o}\"]"
            )),
        "{line}"
    );

    let dir = scratch();
    let settings = format!(
        "[backends.hosts.\"{o}\"]\nca_file = \"{}\"\n",
        tls.join("ca.pem").display()
    );
    let trusting = Ferry::start(dir.path(), &containerd_backend("lotls-e2e", &settings));
    let r = http().get(url(&trusting)).send().unwrap();
    assert_eq!(r.status(), 200, "{}", trusting.logs());
    assert_eq!(r.bytes().unwrap().to_vec(), std::fs::read(&blob).unwrap());
    assert!(
        stored_eventually("lotls-e2e", &digest),
        "the healed blob is in the content store"
    );
    let line = doctor_heal_line(dir.path(), &o);
    assert!(
        line.starts_with("ok ") && line.contains(&format!("https://{o} answers")),
        "{line}"
    );
}

/// An origin on a private (non-loopback) address that speaks plain HTTP: ferry uses HTTPS for it (and fails,
/// saying why) until `plain_http` names it; then the blob is healed.
#[test]
fn heal_from_a_plain_http_origin_named_in_plain_http() {
    let work = scratch();
    let (_host, origin) = registry_on_test_host(work.path(), false);
    let blob = work.path().join("blob");
    std::fs::write(&blob, format!("layer over plain http {}", unique("")).repeat(1000)).unwrap();
    let repo = unique("plain/heal");
    let digest = upload_to(&http(), &format!("http://{origin}"), &repo, &blob, None);
    name_in_containerd("plain-e2e", &digest, Some((&origin, &repo)));
    let url = |ferry: &Ferry| ferry.url(&format!("/v2/{repo}/blobs/{digest}?ns={origin}"));

    let dir = scratch();
    let https_only = Ferry::start(dir.path(), &named(&origin, &containerd_backend("plain-e2e", "")));
    let r = http().get(url(&https_only)).send().unwrap();
    assert_eq!(r.status(), 404, "{}", https_only.logs());
    let logs = https_only.logs();
    assert!(
        count_lines(&logs, &["origin fetch failed", &format!("https://{origin}")]) >= 1,
        "{logs}"
    );
    assert!(!stored("plain-e2e", &digest), "nothing written");
    let line = doctor_heal_line(dir.path(), &origin);
    assert!(
        line.starts_with("FAIL") && line.contains(&format!("add \"{origin}\" to plain_http of this backend")),
        "{line}"
    );

    let dir = scratch();
    let plain = Ferry::start(
        dir.path(),
        &named(
            &origin,
            &containerd_backend("plain-e2e", &format!("plain_http = [\"{origin}\"]\n")),
        ),
    );
    let r = http().get(url(&plain)).send().unwrap();
    assert_eq!(r.status(), 200, "{}", plain.logs());
    let line = doctor_heal_line(dir.path(), &origin);
    assert!(
        line.starts_with("ok ") && line.contains(&format!("http://{origin} answers")),
        "{line}"
    );
    assert_eq!(r.bytes().unwrap().to_vec(), std::fs::read(&blob).unwrap());
    assert!(
        stored_eventually("plain-e2e", &digest),
        "the healed blob is in the content store"
    );
}

#[test]
fn containerd_down_then_back() {
    let lib = lib();
    let name = unique("ctd-");
    sh(&format!("source {lib} && set +u && e2e_start_containerd {name}"));
    let sock = format!("{}/{name}/containerd.sock", env("E2E_DIR"));
    // containerd collects garbage 100 ms after it starts (its gc scheduler's startup_delay):
    // content ingested before that, and not yet labelled as a root, would be collected.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let work = scratch();
    let file = work.path().join("blob");
    std::fs::write(&file, b"content held by containerd").unwrap();
    let digest = format!("sha256:{}", sha256_hex(&std::fs::read(&file).unwrap()));
    let ingest = |sock: &str| {
        sh(&format!(
            "ctr -a {sock} -n moby content ingest --expected-digest {digest} --expected-size 26 ref{name} < {}",
            file.display()
        ))
    };
    ingest(&sock);
    // A GC root, so containerd's collection at its restart keeps it.
    sh(&format!(
        "ctr -a {sock} -n moby content label {digest} containerd.io/gc.root=e2e"
    ));

    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        // Through the Read API, as in a container that has only containerd's socket.
        &format!("[[backends]]\ntype = \"containerd\"\nsocket = \"{sock}\"\nnamespace = \"moby\"\nfetch_missing = false\ndirect_reads = false\n[[backends]]\ntype = \"push\"\n"),
    );
    let pushed = b"in the push store";
    let pushed_digest = format!("sha256:{}", sha256_hex(pushed));
    let r = http()
        .post(ferry.url(&format!("/v2/x/blobs/uploads/?digest={pushed_digest}")))
        .body(pushed.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let get = |d: &str| http().get(ferry.url(&format!("/v2/x/blobs/{d}"))).send().unwrap();
    assert_eq!(get(&digest).status(), 200);
    let r = http()
        .get(ferry.url(&format!("/v2/x/blobs/{digest}")))
        .header("Range", "bytes=8-15")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().to_vec(), b"held by ".to_vec());
    assert!(ferry.logs().contains("not readable here"), "the Read API is in use");

    sh(&format!("source {lib} && set +u && e2e_stop {name}"));
    let started = std::time::Instant::now();
    let r = get(&pushed_digest);
    assert_eq!(r.status(), 200, "the chain goes on to the push store");
    assert_eq!(r.headers()["Ferry-Backend"], "push");
    assert_eq!(get(&digest).status(), 404);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(ferry.logs().contains("unavailable"), "{}", ferry.logs());

    sh(&format!("source {lib} && set +u && e2e_start_containerd {name}"));
    let r = get(&digest);
    assert_eq!(r.status(), 200, "recovered without a restart:\n{}", ferry.logs());
    assert_eq!(r.bytes().unwrap().to_vec(), std::fs::read(&file).unwrap());
    sh(&format!("source {lib} && set +u && e2e_stop {name}"));
}

/// Whether the containerd at `sock` holds `digest` in namespace `ns`.
fn stored_in(sock: &str, ns: &str, digest: &str) -> bool {
    sh(&format!("ctr -a {sock} -n {ns} content ls -q")).contains(digest)
}

/// ferry with nothing configured but its data directory and the engine (`DOCKER_HOST`): the
/// default chain, as a new user runs it.
fn default_ferry(dir: &Path, docker_host: &str) -> Ferry {
    let registry = env("E2E_REGISTRY");
    let config = dir.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[origins]\nallow = [\"{registry}\"]\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    Ferry::start_with(dir, &config, &[("DOCKER_HOST", docker_host)])
}

/// Fetches every blob `manifest` names through ferry and checks each hashes to its digest.
fn every_blob_hashes_to_its_digest(ferry: &Ferry, name: &str, query: &str, manifest: &Value) {
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_string()];
    digests.extend(
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string()),
    );
    for d in digests {
        let r = http()
            .get(ferry.url(&format!("/v2/{name}/blobs/{d}{query}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{d}");
        let body = r.bytes().unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), d);
    }
}

/// Docker 28 on its containerd image store (the default of Docker 29 and Docker Desktop),
/// through the default chain: images built there and images pulled there, the moby#49473
/// case among them, come from containerd's content store with no `docker save`.
#[test]
fn docker28_containerd_store_is_served_by_the_default_chain_with_no_export() {
    let d28 = env("E2E_DOCKER28_HOST");
    let ctd21 = env("E2E_CONTAINERD21_SOCK");
    let registry = env("E2E_REGISTRY");
    let name = unique("today");
    build_image(&d28, &format!("{name}:v1"), 3);
    let work = scratch();
    let (a, b, mb) = push_a_and_b(&registry, work.path());
    sh(&format!("docker -H {d28} pull -q {a} && docker -H {d28} pull -q {b}"));
    let layer = mb["layers"][0]["digest"].as_str().unwrap().to_string();
    assert!(
        !stored_in(&ctd21, "moby", &layer),
        "B's layer was never fetched (moby#49473's precondition)"
    );

    let dir = scratch();
    let ferry = default_ferry(dir.path(), &d28);
    // Built there: pulled by containerd through a hosts.toml mirror, and run.
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    // The digest the engine reports for the image is the one served.
    let id = sh(&format!("docker -H {d28} inspect -f '{{{{.Id}}}}' {name}:v1"));
    let (status, served, body) = get_manifest(&ferry, &name, "v1", "?ns=docker.io");
    assert_eq!(status, 200);
    assert_eq!(served, id.trim());
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), id.trim());
    every_blob_hashes_to_its_digest(&ferry, &name, "?ns=docker.io", &serde_json::from_slice(&body).unwrap());

    // Pulled there, with B's layer missing from the store: healed from its origin.
    let certs = mirror_hosts(dir.path(), &registry, &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &b);
    assert!(out.starts_with("hello from"), "{out}");
    assert!(
        stored_in(&ctd21, "moby", &layer),
        "B's layer is in the engine's content store now"
    );
    let b_ref = b.trim_start_matches(&format!("{registry}/"));
    let (b_name, b_tag) = b_ref.split_once(':').unwrap();
    let (status, served, body) = get_manifest(&ferry, b_name, b_tag, &format!("?ns={registry}"));
    assert_eq!(status, 200);
    let b_id = sh(&format!("docker -H {d28} inspect -f '{{{{.Id}}}}' {b}"));
    assert_eq!(served, b_id.trim());
    every_blob_hashes_to_its_digest(
        &ferry,
        b_name,
        &format!("?ns={registry}"),
        &serde_json::from_slice(&body).unwrap(),
    );

    let logs = ferry.logs();
    assert!(!logs.contains("exporting image"), "an export ran:\n{logs}");
    assert!(logs.contains("healed: blob verified and committed"), "{logs}");
    // The status API says which path the engine's images take.
    let status: Value = http().get(ferry.url("/api/v1/status")).send().unwrap().json().unwrap();
    let docker = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "docker")
        .unwrap()
        .clone();
    assert!(
        docker["serves_from"]
            .as_str()
            .unwrap()
            .starts_with("containerd content store"),
        "{docker}"
    );
    sh(&format!("docker -H {d28} rmi {name}:v1 {a} {b}"));
}

/// Tilt's loop on Docker 28's containerd store: build, then `docker push` into ferry's default
/// chain. The engine holds every blob under the digest the push names, so the client uploads
/// none; the push store takes them in as hard links, and the pushed image stays whole when
/// the engine's image and content are gone.
#[test]
fn docker28_push_of_an_image_the_engine_holds_uploads_no_layer() {
    let d28 = env("E2E_DOCKER28_HOST");
    let ctd21 = env("E2E_CONTAINERD21_SOCK");
    let name = unique("tilt");
    build_image(&d28, &format!("{name}:v1"), 3);
    let dir = scratch();
    let ferry = default_ferry(dir.path(), &d28);
    let pushed = format!("{}/{name}-app:v1", ferry.addr());
    sh(&format!(
        "docker -H {d28} tag {name}:v1 {pushed} && docker -H {d28} push -q {pushed}"
    ));
    let logs = ferry.logs();
    assert_eq!(
        count_lines(&logs, &["/blobs/uploads/"]),
        0,
        "the client uploaded blobs the engine holds:\n{logs}"
    );
    let (status, digest, body) = get_manifest(&ferry, &format!("{name}-app"), "v1", "");
    assert_eq!(status, 200);
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let blobs: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(
        count_lines(&logs, &["took a blob", "how=\"linked\""]) >= blobs.len(),
        "the push store linked the engine's blobs rather than copying them:\n{logs}"
    );
    // The engine's image and its content gone: the pushed image is still whole.
    sh(&format!("docker -H {d28} rmi {name}:v1 {pushed}"));
    let _ = sh_result(&format!(
        "ctr -a {ctd21} -n moby content rm {} {}",
        blobs.join(" "),
        digest
    ));
    for b in &blobs {
        assert!(!stored_in(&ctd21, "moby", b), "{b} is still in the engine's store");
    }
    every_blob_hashes_to_its_digest(&ferry, &format!("{name}-app"), "", &manifest);
    let certs = dir.path().join("certs-plain");
    std::fs::create_dir_all(certs.join(ferry.addr())).unwrap();
    std::fs::write(
        certs.join(ferry.addr()).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            ferry.addr(),
            ferry.addr()
        ),
    )
    .unwrap();
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &pushed);
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
}

/// containerd 2.1 as a kind or k3s node runs it: an image pulled into namespace `k8s.io`
/// is served by a containerd backend, and a layer the node lost is healed from its origin
/// into the node's content store.
#[test]
fn containerd21_node_images_are_served_and_healed() {
    let ctd21 = env("E2E_CONTAINERD21_SOCK");
    let registry = env("E2E_REGISTRY");
    let ctr = format!("{}/usr/bin/ctr", env("E2E_SID_ROOT"));
    let host = docker20();
    let name = unique("node");
    build_image(&host, &format!("{name}:1"), 2);
    let image = format!("{registry}/kind/{name}:1");
    sh(&format!(
        "docker -H {host} tag {name}:1 {image} && docker -H {host} push -q {image} && docker -H {host} rmi {image} {name}:1"
    ));
    sh(&format!("{ctr} -a {ctd21} -n k8s.io image pull --plain-http {image}"));
    let m: Value = http()
        .get(format!("http://{registry}/v2/kind/{name}/manifests/1"))
        .header("Accept", DOCKER_MANIFEST)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    sh(&format!("{ctr} -a {ctd21} -n k8s.io content rm {layer}"));
    assert!(!stored_in(&ctd21, "k8s.io", &layer));

    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!("[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd21}\"\nnamespace = \"k8s.io\"\n"),
    );
    let certs = mirror_hosts(dir.path(), &registry, &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &image);
    assert_eq!(out.trim(), format!("hello from {name}:1"));
    assert!(
        stored_in(&ctd21, "k8s.io", &layer),
        "the lost layer is back in the node's store"
    );
    let logs = ferry.logs();
    assert!(logs.contains("healed: blob verified and committed"), "{logs}");
    sh(&format!("{ctr} -a {ctd21} -n k8s.io image rm {image}"));
}
