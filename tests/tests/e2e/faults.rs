//! Faults: ferry killed (SIGKILL) in the middle of a manifest PUT, the engine stopped in the
//! middle of an export, a full data directory that frees up again, and a hundred clients
//! that go away in the middle of a blob — counted from /proc.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferry_e2e::*;
use reqwest::blocking::Client;

/// A manifest of one config and one layer, both pushed first.
fn manifest_for(ferry: &Ferry, repo: &str) -> Vec<u8> {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = b"a layer of the killed push";
    let (c, l) = (push_blob(ferry, repo, config), push_blob(ferry, repo, layer));
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len()}],
    }))
    .unwrap()
}

#[test]
fn a_crash_in_the_middle_of_a_manifest_put_leaves_nothing_and_the_retry_works() {
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let manifest = manifest_for(&ferry, "crash/put");
    // Headers and half the body, then SIGKILL.
    let mut s = TcpStream::connect(ferry.addr()).unwrap();
    write!(
        s,
        "PUT /v2/crash/put/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n",
        manifest.len()
    )
    .unwrap();
    s.write_all(&manifest[..manifest.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = snapshot(&ferry.dir);
    ferry.kill9();
    drop(s);
    ferry.start_again();
    let (status, _, _) = get_manifest(&ferry, "crash/put", "v1", "");
    assert_eq!(status, 404, "nothing of the cut PUT is served");
    let after: Vec<_> = snapshot(&ferry.dir)
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".log"))
        .collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| !p.ends_with(".log")).collect();
    assert_eq!(after, before, "the store is as before the PUT began");
    let r = Client::new()
        .put(ferry.url("/v2/crash/put/manifests/v1"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let (status, _, body) = get_manifest(&ferry, "crash/put", "v1", "");
    assert_eq!((status, body), (200, manifest));
}

#[test]
fn the_engine_stopped_mid_export_is_a_clean_error_and_the_retry_works() {
    let tag = unique("engstop");
    let (daemon, ctd) = (format!("dockerd-{tag}"), format!("ctd-{tag}"));
    let start = format!("source {} && set +u && e2e_start_dockerd {daemon} {ctd}", lib());
    sh(&format!("source {} && set +u && e2e_start_containerd {ctd}", lib()));
    sh(&start);
    let socket = format!("unix://{}/{daemon}/docker.sock", env("E2E_DIR"));
    // A layer large enough that the export is still running when the engine goes.
    let ctx = scratch();
    sh(&format!(
        "cd {0} && cp /bin/busybox . && head -c 250000000 /dev/urandom > big \
         && printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCOPY big /big\\nCMD [\"/bin/busybox\", \"echo\", \"big\"]\\n' > Dockerfile \
         && DOCKER_BUILDKIT=0 docker -H {socket} build --no-cache -q -t {tag}:v1 . >/dev/null && rm big",
        ctx.path().display()
    ));
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&socket, "direct_reads = false"));
    let url = ferry.url(&format!("/v2/{tag}/manifests/v1"));
    let request = std::thread::spawn(move || {
        let r = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
            .get(url)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().unwrap())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ferry.logs().contains("exporting image from the engine") {
        assert!(Instant::now() < deadline, "{}", ferry.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    sh(&format!("source {} && set +u && e2e_stop {daemon}", lib()));
    let (status, body) = request.join().unwrap();
    let result = std::panic::catch_unwind(|| {
        assert!(
            !ferry.logs().contains("export finished"),
            "the export ended before the engine stopped"
        );
        assert!(status == 500 || status == 503, "{status} {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(v["errors"][0]["code"].is_string(), "{body}");
        let tmp: Vec<_> = std::fs::read_dir(ferry.dir.join("docker/tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "partial blobs left: {tmp:?}");

        sh(&start);
        // A failed export is remembered for a few seconds; then the retry exports again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _, manifest) = get_manifest(&ferry, &tag, "v1", "");
            if status == 200 {
                let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
                for l in m["layers"].as_array().unwrap() {
                    let d = l["digest"].as_str().unwrap();
                    let bytes = Client::new()
                        .get(ferry.url(&format!("/v2/{tag}/blobs/{d}")))
                        .send()
                        .unwrap()
                        .bytes()
                        .unwrap();
                    assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), d);
                }
                break;
            }
            assert!(Instant::now() < deadline, "no retry worked: {}", ferry.logs());
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let _ = sh_result(&format!(
        "source {} && set +u && e2e_stop {daemon} && e2e_stop {ctd}",
        lib()
    ));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn a_full_data_dir_refuses_writes_until_space_is_freed() {
    let dir = scratch();
    let data = dir.path().join("data");
    let _unmount = Tmpfs::mount(&data, "4m");
    let ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let kept = push_blob(&ferry, "full/a", b"stored while there was room");
    // Something else fills the file system.
    let filler = data.join("filler");
    let _ = sh_result(&format!("dd if=/dev/zero of={} bs=64k 2>/dev/null", filler.display()));
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let digest = format!("sha256:{}", sha256_hex(&blob));
    let r = Client::new()
        .post(ferry.url(&format!("/v2/full/a/blobs/uploads/?digest={digest}")))
        .body(blob.clone())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_oci_error(status, &r.text().unwrap(), 500, "UNKNOWN");
    assert!(ferry.logs().contains("disk full (ENOSPC)"), "{}", ferry.logs());
    assert_eq!(
        std::fs::read_dir(data.join("push/tmp")).unwrap().count(),
        0,
        "nothing partial"
    );
    let r = Client::new()
        .get(ferry.url(&format!("/v2/full/a/blobs/{kept}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "reads keep working");
    // Room again: the same upload works, without a restart.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(push_blob(&ferry, "full/a", &blob), digest);
    let r = Client::new()
        .get(ferry.url(&format!("/v2/full/a/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), blob);
}

fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

#[test]
fn a_hundred_clients_that_leave_mid_blob_leak_nothing() {
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let blob = incompressible(64_000_000);
    let digest = push_blob(&ferry, "leak/big", &blob);
    let pid = ferry.pid();
    // Warm: one whole read, so lazily made threads and files exist before counting.
    let whole = Client::new()
        .get(ferry.url(&format!("/v2/leak/big/blobs/{digest}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(whole.len(), blob.len());
    std::thread::sleep(Duration::from_millis(500));
    let (fds_before, threads_before) = (open_files(pid), threads(pid));
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(ferry.addr()).unwrap();
        write!(s, "GET /v2/leak/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut first = [0u8; 65536];
        let mut got = 0;
        while got < 100_000 {
            got += s.read(&mut first).unwrap();
        }
        clients.push(s);
    }
    assert!(open_files(pid) >= fds_before + 100, "100 streams open at once");
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_files(pid) > fds_before + 2 || threads(pid) > threads_before + 2 {
        assert!(
            Instant::now() < deadline,
            "leaked: {} fds (was {fds_before}), {} threads (was {threads_before})",
            open_files(pid),
            threads(pid)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And it still serves.
    let again = Client::new()
        .get(ferry.url(&format!("/v2/leak/big/blobs/{digest}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&again)), digest);
}
