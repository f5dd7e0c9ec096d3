//! Every client flow through each configuration users run, not one backend alone: the
//! default chain (docker, push), push first, Docker 26 with the containerd image store
//! (containerd first, docker, push), Docker 28 on its containerd image store and on overlay2
//! (the default chain), and Podman 4.3 rootful and rootless and Podman 5.4 (docker on the Podman
//! socket, push). The flows: a pull of an engine image (containerd through a hosts.toml
//! mirror, then run), tags and catalog, a pull by digest, blobs asked for before any
//! manifest after a restart with an empty cache, `docker push` / `podman push` of an image
//! the engine holds then a pull and run of it, and `skopeo copy` in and out.

use ferry_e2e::*;
use serde_json::Value;

/// Who pushes an image of the engine to ferry: the engine's own CLI (Podman 5's from its
/// root: Podman 4.3's client cannot read Podman 5's push progress).
enum Pusher {
    Docker(String),
    Podman(String),
    PodmanIn { root: String, host: String },
}

impl Pusher {
    fn push(&self, image: &str, dest: &str) {
        match self {
            Pusher::Docker(host) => {
                sh(&format!(
                    "docker -H {host} tag {image} {dest} && docker -H {host} push {dest}"
                ));
                sh(&format!("docker -H {host} rmi {dest}"));
            }
            Pusher::Podman(host) => {
                sh(&format!("podman --url {host} push --tls-verify=false {image} {dest}"));
            }
            Pusher::PodmanIn { root, host } => {
                sh(&format!(
                    "chroot {root} podman --url {host} push --tls-verify=false {image} {dest}"
                ));
            }
        }
    }
}

struct Setup {
    label: &'static str,
    /// The engine the images are built in (the docker backend's socket).
    engine: String,
    /// The `[[backends]]` tables.
    backends: String,
    pusher: Pusher,
    /// skopeo copies in from the engine's `docker save` (an OCI archive), not the daemon.
    oci_archive: bool,
}

fn docker(socket: &str) -> String {
    format!("[[backends]]\ntype = \"docker\"\nsocket = \"{socket}\"\n")
}

const PUSH: &str = "[[backends]]\ntype = \"push\"\n";

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

fn get_json(ferry: &Ferry, path: &str) -> (u16, Value) {
    let r = http().get(ferry.url(path)).send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// GET of a blob: status, and whether the bytes hash to the digest.
fn blob_verified(ferry: &Ferry, name: &str, digest: &str, query: &str) -> (u16, bool, String) {
    let r = http()
        .get(ferry.url(&format!("/v2/{name}/blobs/{digest}{query}")))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let backend = r
        .headers()
        .get("Ferry-Backend")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = r.bytes().unwrap();
    (status, format!("sha256:{}", sha256_hex(&body)) == digest, backend)
}

/// The config and layer digests of an image manifest (or of an index's first child).
fn blob_digests(ferry: &Ferry, name: &str, manifest: &[u8]) -> Vec<String> {
    let m: Value = serde_json::from_slice(manifest).unwrap();
    if let Some(children) = m["manifests"].as_array() {
        let child = children[0]["digest"].as_str().unwrap();
        let (status, _, body) = get_manifest(ferry, name, child, "");
        assert_eq!(status, 200);
        return blob_digests(ferry, name, &body);
    }
    let mut out = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

fn run_flows(setup: Setup) {
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), &setup.backends);
    let label = setup.label;
    let name = unique(label);
    let image = format!("{name}:v1");
    build_image(&setup.engine, &image, 2);
    let hello = format!("hello from {image}");
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let ctd = containerd16();

    // A pull of an engine image through a containerd mirror, run.
    let out = ctr_pull_and_run(&ctd, "e2e", &certs, &format!("docker.io/library/{image}"));
    assert_eq!(out.trim(), hello, "[{label}] pull of an engine image\n{}", ferry.logs());

    // Tags and catalog.
    let (status, tags) = get_json(&ferry, &format!("/v2/library/{name}/tags/list?ns=docker.io"));
    assert_eq!(status, 200, "[{label}] tags/list\n{}", ferry.logs());
    assert!(
        tags["tags"].as_array().unwrap().iter().any(|t| t == "v1"),
        "[{label}] {tags}"
    );
    let (status, catalog) = get_json(&ferry, "/v2/_catalog");
    assert_eq!(status, 200);
    assert!(
        catalog["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| *r == format!("library/{name}")),
        "[{label}] catalog lacks library/{name}: {catalog}"
    );

    // A pull by digest.
    let (status, digest, manifest) = get_manifest(&ferry, &format!("library/{name}"), "v1", "?ns=docker.io");
    assert_eq!(status, 200, "[{label}]");
    let by_digest = format!("docker.io/library/{name}@{digest}");
    assert_eq!(
        ctr_pull_and_run(&ctd, "e2e", &certs, &by_digest).trim(),
        hello,
        "[{label}] by digest"
    );

    // Blobs before any manifest, after a restart with an empty cache (a k3d registry
    // container without a volume; or an evicted cache): a client resuming a pull.
    let blobs = blob_digests(&ferry, &format!("library/{name}"), &manifest);
    ferry.stop();
    std::fs::remove_dir_all(&ferry.dir).unwrap();
    ferry.restart();
    for d in &blobs {
        let (status, verified, backend) = blob_verified(&ferry, &format!("library/{name}"), d, "?ns=docker.io");
        assert_eq!(status, 200, "[{label}] blob {d} before its manifest\n{}", ferry.logs());
        assert!(
            verified,
            "[{label}] blob {d} from {backend} does not hash to its digest"
        );
    }

    // Push of an image the engine holds (the client skips the blobs ferry answers 200 for),
    // then a pull of it by containerd, run.
    let pushed = format!("{}/pushed/{name}:dev", ferry.addr());
    setup.pusher.push(&image, &pushed);
    let (status, pushed_digest, _) = get_manifest(&ferry, &format!("pushed/{name}"), "dev", "");
    assert_eq!(status, 200, "[{label}] pushed manifest\n{}", ferry.logs());
    let out = sh(&format!(
        "ctr -a {ctd} -n e2e image pull --plain-http {pushed} >/dev/null && ctr -a {ctd} -n e2e run --rm {pushed} {} ; ctr -a {ctd} -n e2e image rm {pushed} >/dev/null",
        unique("run")
    ));
    assert_eq!(out.trim(), hello, "[{label}] pushed image {pushed_digest}");

    // skopeo copy in (from the engine, as a local build goes) and out.
    let copied = format!("{}/skopeo/{name}:in", ferry.addr());
    let source = if setup.oci_archive {
        // skopeo 1.9 speaks API 1.22 to a daemon, which Docker 26 refuses: its export instead.
        let archive = dir.path().join("image.tar");
        sh(&format!(
            "docker -H {} save {image} -o {}",
            setup.engine,
            archive.display()
        ));
        format!("oci-archive:{}", archive.display())
    } else {
        format!("--src-daemon-host {} docker-daemon:{image}", setup.engine)
    };
    sh(&format!(
        "skopeo copy --dest-tls-verify=false {source} docker://{copied}"
    ));
    let (status, copied_digest, _) = get_manifest(&ferry, &format!("skopeo/{name}"), "in", "");
    assert_eq!(status, 200, "[{label}] skopeo copy in\n{}", ferry.logs());
    let out_dir = dir.path().join("skopeo-out");
    sh(&format!(
        "skopeo copy --src-tls-verify=false docker://{copied} dir:{}",
        out_dir.display()
    ));
    let out_manifest = std::fs::read(out_dir.join("manifest.json")).unwrap();
    assert_eq!(
        format!("sha256:{}", sha256_hex(&out_manifest)),
        copied_digest,
        "[{label}] skopeo copy out"
    );

    // What was pushed is whole in the push store: served with the engine image gone and the
    // export cache empty.
    sh(&format!("docker -H {} rmi {image}", setup.engine));
    ferry.stop();
    let cache = ferry.dir.join("docker");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).unwrap();
    }
    ferry.restart();
    pull_all(&ferry, &format!("pushed/{name}"), "dev", label);
    pull_all(&ferry, &format!("skopeo/{name}"), "in", label);
}

/// Fetches a manifest and every blob it references, checking each hashes to its digest and
/// is a file of the push store (other backends may answer first, but the push store must
/// hold the image on its own).
fn pull_all(ferry: &Ferry, name: &str, tag: &str, label: &str) {
    let (status, _, manifest) = get_manifest(ferry, name, tag, "");
    assert_eq!(status, 200, "[{label}] {name}:{tag}\n{}", ferry.logs());
    for d in blob_digests(ferry, name, &manifest) {
        let (status, verified, backend) = blob_verified(ferry, name, &d, "");
        assert_eq!(status, 200, "[{label}] {name}@{d}\n{}", ferry.logs());
        assert!(verified, "[{label}] {name}@{d} from {backend}");
        assert!(
            in_push_store(ferry, &d),
            "[{label}] {name}@{d} is not in the push store"
        );
    }
}

fn in_push_store(ferry: &Ferry, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    let path = ferry.dir.join("push/blobs/sha256").join(&hex[..2]).join(hex);
    std::fs::read(&path).is_ok_and(|b| sha256_hex(&b) == hex)
}

#[test]
fn default_chain_docker_then_push() {
    let engine = docker20();
    run_flows(Setup {
        label: "def",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::Docker(engine.clone()),
        oci_archive: false,
        engine,
    });
}

#[test]
fn push_first() {
    let engine = docker20();
    run_flows(Setup {
        label: "pf",
        backends: format!("{PUSH}{}", docker(&engine)),
        pusher: Pusher::Docker(engine.clone()),
        oci_archive: false,
        engine,
    });
}

#[test]
fn docker26_containerd_store_containerd_first() {
    let engine = env("E2E_DOCKER26_HOST");
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    run_flows(Setup {
        label: "c26",
        backends: format!(
            "[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"moby\"\n{}{PUSH}",
            docker(&engine)
        ),
        pusher: Pusher::Docker(engine.clone()),
        oci_archive: true,
        engine,
    });
}

/// Docker 28 on its containerd image store (the default of Docker 29 and Docker Desktop)
/// through the default chain alone: no containerd backend configured.
#[test]
fn docker28_containerd_store_default_chain() {
    let engine = env("E2E_DOCKER28_HOST");
    run_flows(Setup {
        label: "d28",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::Docker(engine.clone()),
        oci_archive: true,
        engine,
    });
}

/// Docker 28 on overlay2 (on containerd 2.1) through the default chain.
#[test]
fn docker28_overlay2_default_chain() {
    let engine = env("E2E_DOCKER28G_HOST");
    run_flows(Setup {
        label: "d28g",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::Docker(engine.clone()),
        oci_archive: true,
        engine,
    });
}

#[test]
fn podman_rootful() {
    let engine = env("E2E_PODMAN_HOST");
    run_flows(Setup {
        label: "pr",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::Podman(engine.clone()),
        oci_archive: false,
        engine,
    });
}

/// Podman 5.4 (Debian 13's, in a root of its own) through the default chain.
#[test]
fn podman5() {
    let engine = env("E2E_PODMAN5_HOST");
    run_flows(Setup {
        label: "p5",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::PodmanIn {
            root: format!("{}/podman5-root", env("E2E_DIR")),
            host: engine.clone(),
        },
        oci_archive: false,
        engine,
    });
}

#[test]
fn podman_rootless() {
    let engine = env("E2E_PODMAN_ROOTLESS_HOST");
    run_flows(Setup {
        label: "pl",
        backends: format!("{}{PUSH}", docker(&engine)),
        pusher: Pusher::Podman(engine.clone()),
        oci_archive: false,
        engine,
    });
}

/// The same image pushed twice at once, and pushed while the engine exports it: both
/// complete, and the pushed image is served once the export cache is gone and the engine
/// image removed.
#[test]
fn concurrent_pushes_and_a_push_during_an_export() {
    let engine = docker20();
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), &format!("{}{PUSH}", docker(&engine)));
    let name = unique("cc");
    let image = format!("{name}:v1");
    build_image(&engine, &image, 3);
    let dest = |tag: &str| format!("{}/conc/{name}:{tag}", ferry.addr());

    // Two pushes of one image at once (each through its own tag, so the CLI runs twice).
    let (a, b) = (dest("a"), dest("b"));
    sh(&format!(
        "docker -H {engine} tag {image} {a} && docker -H {engine} tag {image} {b}"
    ));
    let out = sh(&format!(
        "(docker -H {engine} push {a} > {d}/a.log 2>&1; echo a=$?) & (docker -H {engine} push {b} > {d}/b.log 2>&1; echo b=$?) & wait",
        d = dir.path().display()
    ));
    assert!(out.contains("a=0") && out.contains("b=0"), "{out}\n{}", ferry.logs());

    // A push that starts while the engine's export of the same image is under way: a cold
    // manifest request starts the export, the push's HEADs wait for it.
    let second = format!("{name}:v2");
    build_image(&engine, &second, 3);
    let c = dest("c");
    sh(&format!("docker -H {engine} tag {second} {c}"));
    let manifest_url = ferry.url(&format!("/v2/{name}/manifests/v2"));
    let out = sh(&format!(
        "(curl -s -o /dev/null -w 'get=%{{http_code}}' -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' {manifest_url}) & \
         (docker -H {engine} push {c} > {d}/c.log 2>&1; echo ' c='$?) & wait",
        d = dir.path().display()
    ));
    assert!(
        out.contains("get=200") && out.contains("c=0"),
        "{out}\n{}",
        ferry.logs()
    );

    for img in [&image, &second, &a, &b, &c] {
        sh(&format!("docker -H {engine} rmi {img}"));
    }
    ferry.stop();
    std::fs::remove_dir_all(ferry.dir.join("docker")).unwrap();
    ferry.restart();
    for tag in ["a", "b", "c"] {
        pull_all(&ferry, &format!("conc/{name}"), tag, "concurrent");
    }
    let (status, _, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 404, "the engine image is gone");
}
