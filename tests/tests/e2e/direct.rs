//! Direct reads on Docker 20 (overlay2): an engine image pulled cold by containerd through a
//! mirror and run with no export at all; its manifest digest equal to the one the export
//! path gives; its layers byte for byte `docker save`'s, for an image with a whiteout, a hard
//! link and a symlink; `Range` reads; a layer changed on disk cut short and
//! then exported; a data root ferry cannot read falls back to exports.

use std::collections::HashMap;
use std::path::Path;

use ferry_e2e::*;
use reqwest::blocking::Client;

const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// An image whose layers hold nothing at all (an imported empty archive), a whiteout, a hard
/// link, a symlink (and a RUN that changes nothing, of which Docker keeps no layer).
fn build_tricky_image(engine: &str, tag: &str) {
    let ctx = scratch();
    // A base of one empty layer: an empty archive imported.
    let base = format!("{}-empty:v1", tag.split(':').next().unwrap_or(tag));
    sh(&format!(
        "cd {} && tar -cf empty.tar -T /dev/null && docker -H {engine} import empty.tar {base} >/dev/null",
        ctx.path().display()
    ));
    let from = format!("FROM {base}");
    let dockerfile = [
        from.as_str(),
        "COPY busybox /bin/busybox",
        "COPY one two big /data/",
        r#"RUN ["/bin/busybox", "rm", "/data/one"]"#,
        r#"RUN ["/bin/busybox", "ln", "/data/two", "/data/two-hard"]"#,
        r#"RUN ["/bin/busybox", "ln", "-s", "/data/two", "/data/two-sym"]"#,
        r#"RUN ["/bin/busybox", "true"]"#,
        r#"CMD ["/bin/busybox", "cat", "/data/two-hard"]"#,
    ];
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile.join("\n") + "\n").unwrap();
    sh(&format!(
        "cd {} && cp /bin/busybox . && echo one > one && echo two > two && head -c 300000 /dev/urandom > big \
         && DOCKER_BUILDKIT=0 docker -H {engine} build --no-cache -q -t {tag} . >/dev/null",
        ctx.path().display()
    ));
}

fn manifest(ferry: &Ferry, name: &str) -> (String, serde_json::Value) {
    manifest_as(ferry, name, ACCEPT)
}

fn manifest_as(ferry: &Ferry, name: &str, accept: &str) -> (String, serde_json::Value) {
    let r = Client::new()
        .get(ferry.url(&format!("/v2/{name}/manifests/v1")))
        .header("Accept", accept)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    let digest = r.headers()["Docker-Content-Digest"].to_str().unwrap().to_string();
    (digest, serde_json::from_slice(&r.bytes().unwrap()).unwrap())
}

fn blob(ferry: &Ferry, name: &str, digest: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    let mut req = Client::new().get(ferry.url(&format!("/v2/{name}/blobs/{digest}")));
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    // A response cut short can fail before its headers are read: status 0, no bytes.
    let Ok(r) = req.send() else { return (0, Vec::new()) };
    let status = r.status().as_u16();
    (status, r.bytes().map(|b| b.to_vec()).unwrap_or_default())
}

/// Every file of `docker save`'s archive of `tag` (the layer tars among them: `<id>/layer.tar`
/// in the legacy format, `blobs/sha256/*` in the OCI layout), by its sha256.
fn saved_layers(engine: &str, tag: &str, dir: &Path) -> HashMap<String, Vec<u8>> {
    let out = dir.join("saved");
    std::fs::create_dir_all(&out).unwrap();
    sh(&format!("docker -H {engine} save {tag} | tar -x -C {}", out.display()));
    let mut files = HashMap::new();
    let mut stack = vec![out];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let t = entry.file_type().unwrap();
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                let bytes = std::fs::read(entry.path()).unwrap();
                files.insert(format!("sha256:{}", sha256_hex(&bytes)), bytes);
            }
        }
    }
    files
}

#[test]
fn docker20_images_are_served_from_the_engines_storage_with_no_export() {
    served_directly(&docker20(), ACCEPT);
}

/// Docker 26 on its graph driver exports the OCI layout, with a manifest of its own making:
/// the one served directly is the same.
#[test]
fn docker26_graph_driver_images_are_served_from_the_engines_storage_with_no_export() {
    served_directly(&env("E2E_DOCKER26G_HOST"), "application/vnd.oci.image.manifest.v1+json");
}

/// Docker 28 on overlay2, on containerd 2.1.
#[test]
fn docker28_graph_driver_images_are_served_from_the_engines_storage_with_no_export() {
    served_directly(&env("E2E_DOCKER28G_HOST"), "application/vnd.oci.image.manifest.v1+json");
}

fn served_directly(engine: &str, accept: &str) {
    let engine = engine.to_string();
    let name = unique("direct");
    build_tricky_image(&engine, &format!("{name}:v1"));
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));

    // Cold, through a mirror, and run.
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), "two");
    let logs = ferry.logs();
    assert!(logs.contains("read from the engine's storage (no export)"), "{logs}");
    assert!(!logs.contains("exporting image from the engine"), "{logs}");

    // The same manifest as the export path gives.
    let (digest, m) = manifest_as(&ferry, &name, accept);
    let other = scratch();
    let exporting = Ferry::start(other.path(), &docker_chain(&engine, "direct_reads = false"));
    let (exported_digest, _) = manifest_as(&exporting, &name, accept);
    assert_eq!(digest, exported_digest);
    assert!(exporting.logs().contains("exporting image from the engine"));

    // Every layer byte for byte docker save's.
    let saved = saved_layers(&engine, &format!("{name}:v1"), dir.path());
    let layers: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    // The empty one, busybox, the files, the whiteout, the hard link, the symlink (no layer
    // for the RUN that changes nothing).
    assert_eq!(layers.len(), 6, "{m}");
    for d in &layers {
        let (status, bytes) = blob(&ferry, &name, d, None);
        assert_eq!(status, 200);
        assert_eq!(Some(&bytes), saved.get(d), "layer {d}");
    }
    // Range reads of the busybox layer.
    let (_, whole) = blob(&ferry, &name, &layers[1], None);
    for (range, from, to) in [("bytes=0-99", 0, 100), ("bytes=1000-200999", 1000, 201_000)] {
        let (status, part) = blob(&ferry, &name, &layers[1], Some(range));
        assert_eq!(status, 206, "{range}");
        assert_eq!(part, whole[from..to], "{range}");
    }
    let (status, tail) = blob(&ferry, &name, &layers[1], Some("bytes=-512"));
    assert_eq!((status, tail.as_slice()), (206, &whole[whole.len() - 512..]));
    assert!(!ferry.logs().contains("exporting image from the engine"));

    // A blob before any manifest, on a fresh ferry with an empty cache (a client resuming
    // a pull): found through the engine's image index and read directly too.
    let again = scratch();
    let fresh = Ferry::start(again.path(), &docker_chain(&engine, ""));
    let (status, bytes) = blob(&fresh, &name, &layers[2], None);
    assert_eq!(status, 200, "{}", fresh.logs());
    assert_eq!(Some(&bytes), saved.get(&layers[2]));
    assert!(
        !fresh.logs().contains("exporting image from the engine"),
        "{}",
        fresh.logs()
    );
    sh(&format!("docker -H {engine} rmi {name}:v1 {name}-empty:v1"));
}

#[test]
fn a_layer_that_changed_on_disk_is_cut_short_then_exported() {
    let engine = docker20();
    let name = unique("directchg");
    build_image(&engine, &format!("{name}:v1"), 1);
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));
    let (_, m) = manifest(&ferry, &name);
    let top = m["layers"][1]["digest"].as_str().unwrap().to_string();
    // The file of the top layer, changed behind the engine's back (same length).
    let root = sh(&format!("docker -H {engine} info -f '{{{{.DockerRootDir}}}}'"));
    let upper = sh(&format!(
        "docker -H {engine} image inspect -f '{{{{.GraphDriver.Data.UpperDir}}}}' {name}:v1"
    ));
    let file = Path::new(upper.trim()).join("data/file1");
    assert!(file.starts_with(root.trim()), "{}", file.display());
    let original = std::fs::read(&file).unwrap();
    let mut changed = original.clone();
    changed[0] ^= 1;
    std::fs::write(&file, &changed).unwrap();
    let (_, bytes) = blob(&ferry, &name, &top, None);
    assert_ne!(
        format!("sha256:{}", sha256_hex(&bytes)),
        top,
        "no wrong layer reaches the client whole"
    );
    assert!(
        ferry.logs().contains("no longer hash to the diff id"),
        "{}",
        ferry.logs()
    );
    // Put back: the next request exports the image instead.
    std::fs::write(&file, &original).unwrap();
    let (status, bytes) = blob(&ferry, &name, &top, None);
    assert_eq!(status, 200, "{}", ferry.logs());
    assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), top);
    assert!(
        ferry.logs().contains("exporting image from the engine"),
        "{}",
        ferry.logs()
    );
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn an_unreadable_data_root_falls_back_to_exports() {
    // The suite's unprivileged user, with the socket's group: it may use the engine but not
    // read its data root.
    let engine = docker20();
    let name = unique("directno");
    build_image(&engine, &format!("{name}:v1"), 1);
    let dir = scratch();
    std::fs::write(
        dir.path().join("ferry.toml"),
        format!(
            "[cache]\ndir = \"{}\"\n{}",
            dir.path().join("data").display(),
            docker_chain(&engine, "")
        ),
    )
    .unwrap();
    sh(&format!(
        "chown -R ferry-e2e {0} && chmod 755 {0}",
        dir.path().display()
    ));
    let socket = engine.trim_start_matches("unix://");
    let gid = sh(&format!("stat -c %g {socket}")).trim().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = dir.path().join("ferry.log");
    let mut child = std::process::Command::new("setpriv")
        .args(["--reuid=ferry-e2e", "--regid=ferry-e2e", &format!("--groups={gid}")])
        .arg(ferry_bin())
        .args([
            "serve",
            "--config",
            dir.path().join("ferry.toml").to_str().unwrap(),
            "--addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v2/{name}/manifests/v1");
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = Client::new().get(&url).header("Accept", ACCEPT).send() {
            status = r.status().as_u16();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{logs}");
    assert!(
        logs.contains("direct reads off") && logs.contains("cannot read"),
        "{logs}"
    );
    assert_eq!(logs.matches("direct reads off").count(), 1, "said once: {logs}");
    assert!(logs.contains("exporting image from the engine"), "{logs}");
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

/// Podman (containers/storage, vfs here), 4.3 rootful and rootless and 5.4 rootful: served with no export, the
/// export path's manifest digest, every layer hashing to its digest, pulled by containerd and
/// run.
#[test]
fn podman_images_are_served_from_containers_storage_with_no_export() {
    for var in ["E2E_PODMAN_HOST", "E2E_PODMAN_ROOTLESS_HOST", "E2E_PODMAN5_HOST"] {
        let engine = env(var);
        let name = unique("directpod");
        let ctx = scratch();
        sh(&format!(
            "cd {0} && cp /bin/busybox . && echo pod > f && head -c 200000 /dev/urandom > big && chmod -R a+rX {0} \
             && printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCOPY f big /data/\\nCMD [\"/bin/busybox\", \"cat\", \"/data/f\"]\\n' > Dockerfile \
             && podman --url {engine} build -q -t {name}:v1 . >/dev/null",
            ctx.path().display()
        ));
        let dir = scratch();
        let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));
        let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
        let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
        assert_eq!(out.trim(), "pod", "{var}");
        let logs = ferry.logs();
        assert!(
            logs.contains("read from the engine's storage (no export)"),
            "{var}: {logs}"
        );
        assert!(!logs.contains("exporting image from the engine"), "{var}: {logs}");
        let (digest, m) = manifest(&ferry, &name);
        for l in m["layers"].as_array().unwrap() {
            let d = l["digest"].as_str().unwrap();
            let (status, bytes) = blob(&ferry, &name, d, None);
            assert_eq!(
                (status, format!("sha256:{}", sha256_hex(&bytes))),
                (200, d.to_string()),
                "{var}"
            );
        }
        let other = scratch();
        let exporting = Ferry::start(other.path(), &docker_chain(&engine, "direct_reads = false"));
        assert_eq!(manifest(&exporting, &name).0, digest, "{var}");
        sh(&format!("podman --url {engine} rmi {name}:v1"));
    }
}

/// An image rebuilt under its tag while ferry serves it directly: the next manifest is the
/// new image's, its layers are the new ones, and the old image's blobs still read right (or
/// fail cleanly) — nothing stale is served under the tag.
#[test]
fn a_rebuilt_image_is_served_as_rebuilt() {
    let engine = docker20();
    let name = unique("directre");
    build_image(&engine, &format!("{name}:v1"), 1);
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));
    let (before, m1) = manifest(&ferry, &name);
    let old_top = m1["layers"][1]["digest"].as_str().unwrap().to_string();
    build_image(&engine, &format!("{name}:v1"), 1);
    let (after, m2) = manifest(&ferry, &name);
    assert_ne!(before, after, "the tag follows the rebuild");
    let new_top = m2["layers"][1]["digest"].as_str().unwrap().to_string();
    assert_ne!(old_top, new_top);
    let (status, bytes) = blob(&ferry, &name, &new_top, None);
    assert_eq!((status, format!("sha256:{}", sha256_hex(&bytes))), (200, new_top));
    // The old layer is still in the engine (the old image is only untagged): served right.
    let (status, bytes) = blob(&ferry, &name, &old_top, None);
    assert!(
        status == 0 || status == 404 || format!("sha256:{}", sha256_hex(&bytes)) == old_top,
        "{status}"
    );
    assert!(
        !ferry.logs().contains("exporting image from the engine"),
        "{}",
        ferry.logs()
    );
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

/// The first requests for an image, all at once (a node's pods starting together), share
/// one read of its metadata from the engine's storage.
#[test]
fn concurrent_first_requests_for_an_image_read_it_once() {
    let engine = docker20();
    let name = unique("direct-once");
    build_image(&engine, &format!("{name}:v1"), 2);
    let dir = scratch();
    let ferry = std::sync::Arc::new(Ferry::start(dir.path(), &docker_chain(&engine, "")));
    let clients = 8;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let digests: Vec<String> = (0..clients)
        .map(|_| {
            let (ferry, barrier, name) = (ferry.clone(), barrier.clone(), name.clone());
            std::thread::spawn(move || {
                barrier.wait();
                manifest(&ferry, &name).0
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    let logs = ferry.logs();
    assert_eq!(
        count_lines(&logs, &["read from the engine's storage (no export)"]),
        1,
        "{logs}"
    );
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}
