//! The docker backend against Docker 20.10 (legacy docker-archive exports): containerd via a
//! hosts.toml mirror, a second Docker and skopeo pull images that live only in the engine.
//!
//! These are the export path's tests: direct reads (direct.rs) are switched off.

use ferry_e2e::*;

#[test]
fn docker20_images_reach_containerd_docker_and_skopeo() {
    let dir = scratch();
    let host = docker20();
    let mut ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let name = unique("legacy");
    build_image(&host, &format!("{name}:v1"), 3);

    // containerd, the k3s way: docker.io/library/NAME:v1 through a mirror.
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    assert!(ferry
        .logs()
        .contains(&format!("/v2/library/{name}/manifests/v1?ns=docker.io")));

    // A second Docker.
    let other = env("E2E_DOCKER20B_HOST");
    let remote = format!("{}/{name}:v1", ferry.addr());
    sh(&format!("docker -H {other} pull {remote}"));
    let out = sh(&format!("docker -H {other} run --rm {remote}"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    sh(&format!("docker -H {other} rmi {remote}"));

    // skopeo, with digests that match what ferry serves.
    let (status, digest, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 200);
    // (`dir:` keeps the manifest as served; `oci:` would convert it to an OCI manifest.)
    let copy = dir.path().join("copy");
    sh(&format!(
        "skopeo copy --src-tls-verify=false docker://{remote} dir:{}",
        copy.display()
    ));
    let manifest = std::fs::read(copy.join("manifest.json")).unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest)), digest);
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let blob = std::fs::read(copy.join(d.trim_start_matches("sha256:"))).unwrap();
        assert_eq!(format!("sha256:{}", sha256_hex(&blob)), d);
    }

    // The digest is stable across a second export of the same image (empty cache, restart).
    ferry.stop();
    std::fs::remove_dir_all(ferry.dir.join("docker")).unwrap();
    ferry.restart();
    let (_, again, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(digest, again, "re-export gave another manifest digest");
    assert_eq!(
        count_lines(&ferry.logs(), &["exporting image", &format!("image={name}:v1")]),
        2
    );
    // And the digest reference works (containerd resolves tags, then fetches by digest).
    let (status, _, _) = get_manifest(&ferry, &name, &digest, "?ns=docker.io");
    assert_eq!(status, 200);
    sh(&format!("docker -H {host} rmi {name}:v1"));
}

#[test]
fn rebuild_under_the_same_tag_is_served_fresh() {
    let dir = scratch();
    let host = docker20();
    let ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let name = unique("rebuild");
    build_image(&host, &format!("{name}:v1"), 1);
    let (_, first, _) = get_manifest(&ferry, &name, "v1", "");
    build_image(&host, &format!("{name}:v1"), 2);
    let (status, second, body) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 200);
    assert_ne!(first, second, "the rebuilt image must be served, not the cached one");
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), 3, "busybox + 2 file layers");
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    sh(&format!("docker -H {host} rmi {name}:v1"));
}

#[test]
fn engine_images_are_listed_in_tags_and_catalog() {
    let dir = scratch();
    let host = docker20();
    let ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let name = unique("listed");
    build_image(&host, &format!("{name}:v1"), 0);
    sh(&format!("docker -H {host} tag {name}:v1 {name}:v2"));
    let tags: serde_json::Value = reqwest::blocking::get(ferry.url(&format!("/v2/{name}/tags/list")))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1", "v2"]));
    let catalog: serde_json::Value = reqwest::blocking::get(ferry.url("/v2/_catalog"))
        .unwrap()
        .json()
        .unwrap();
    assert!(
        catalog["repositories"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(format!("library/{name}"))),
        "{catalog}"
    );
    // skopeo sees the same list.
    let listed = sh(&format!(
        "skopeo list-tags --tls-verify=false docker://{}/{name} | jq -c .Tags",
        ferry.addr()
    ));
    assert_eq!(listed.trim(), r#"["v1","v2"]"#);
    sh(&format!("docker -H {host} rmi {name}:v1 {name}:v2"));
}

#[test]
fn shared_base_layer_is_stored_once() {
    let dir = scratch();
    let host = docker20();
    let ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let (base, a, b) = (unique("shareb"), unique("sharea"), unique("shareb"));
    build_image(&host, &format!("{base}:v1"), 0);
    build_image_from(&host, &format!("{a}:v1"), 1, &format!("{base}:v1"));
    build_image_from(&host, &format!("{b}:v1"), 1, &format!("{base}:v1"));
    let mut digests = std::collections::BTreeSet::new();
    let mut busybox = Vec::new();
    for n in [&a, &b] {
        let (status, digest, body) = get_manifest(&ferry, n, "v1", "");
        assert_eq!(status, 200);
        digests.insert(digest);
        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        digests.insert(m["config"]["digest"].as_str().unwrap().to_string());
        for l in m["layers"].as_array().unwrap() {
            digests.insert(l["digest"].as_str().unwrap().to_string());
        }
        busybox.push(m["layers"][0]["digest"].as_str().unwrap().to_string());
    }
    assert_eq!(busybox[0], busybox[1], "both images start with the same busybox layer");
    // On disk: exactly one file per distinct digest, so the shared layer exists once.
    let on_disk: std::collections::BTreeSet<String> = snapshot(&ferry.dir.join("docker/blobs"))
        .into_iter()
        .map(|(path, _)| format!("sha256:{}", path.rsplit('/').next().unwrap()))
        .collect();
    assert_eq!(on_disk, digests);
    assert_eq!(digests.len(), 2 * 2 + 3, "2 manifests, 2 configs, 3 distinct layers");
    sh(&format!("docker -H {host} rmi {a}:v1 {b}:v1 {base}:v1"));
}

#[test]
fn concurrent_cold_pulls_export_each_image_once() {
    let dir = scratch();
    let host = docker20();
    let ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let names: Vec<String> = (0..4).map(|i| unique(&format!("conc{i}x"))).collect();
    for n in &names {
        build_image(&host, &format!("{n}:v1"), 2);
    }
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let ctd = containerd16();
    let pulls: Vec<_> = (0..8)
        .map(|i| {
            let image = format!("docker.io/library/{}:v1", names[i % 4]);
            let (ctd, certs) = (ctd.clone(), certs.clone());
            // Each pull into its own namespace, so containerd does not share the work.
            std::thread::spawn(move || {
                sh_result(&format!(
                    "ctr -a {ctd} -n conc{i} image pull --hosts-dir {} {image}",
                    certs.display()
                ))
            })
        })
        .collect();
    for p in pulls {
        let (ok, out) = p.join().unwrap();
        assert!(ok, "pull failed: {out}");
    }
    let logs = ferry.logs();
    for n in &names {
        assert_eq!(
            count_lines(&logs, &["exporting image from the engine", &format!("image={n}:v1")]),
            1,
            "{n} exported more than once:\n{logs}"
        );
    }
    for i in 0..8 {
        let image = format!("docker.io/library/{}:v1", names[i % 4]);
        sh(&format!("ctr -a {ctd} -n conc{i} image rm {image}"));
    }
    sh(&format!(
        "docker -H {host} rmi {}",
        names.iter().map(|n| format!("{n}:v1")).collect::<Vec<_>>().join(" ")
    ));
}

#[test]
fn blobs_before_any_manifest_are_found_through_the_engine_index() {
    let dir = scratch();
    let host = docker20();
    let mut ferry = Ferry::start(dir.path(), &docker_chain(&host, "direct_reads = false"));
    let name = unique("index");
    build_image(&host, &format!("{name}:v1"), 1);
    let (_, _, body) = get_manifest(&ferry, &name, "v1", "");
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // Empty cache and a restart: the blob request comes first.
    ferry.stop();
    std::fs::remove_dir_all(ferry.dir.join("docker")).unwrap();
    ferry.restart();
    for d in [
        m["config"]["digest"].as_str().unwrap(),
        m["layers"][1]["digest"].as_str().unwrap(),
    ] {
        let r = reqwest::blocking::get(ferry.url(&format!("/v2/{name}/blobs/{d}"))).unwrap();
        assert_eq!(r.status(), 200, "{d}");
        assert_eq!(format!("sha256:{}", sha256_hex(&r.bytes().unwrap())), d);
    }
    let unknown = format!("sha256:{}", sha256_hex(b"nowhere"));
    let r = reqwest::blocking::get(ferry.url(&format!("/v2/{name}/blobs/{unknown}"))).unwrap();
    assert_eq!(r.status(), 404);
    // An image built while ferry runs: the engine's events bring it into the index.
    let later = unique("later");
    build_image(&host, &format!("{later}:v1"), 1);
    let id = sh(&format!("docker -H {host} inspect -f '{{{{.Id}}}}' {later}:v1"));
    let mut status = 0;
    for _ in 0..30 {
        status = reqwest::blocking::get(ferry.url(&format!("/v2/{later}/blobs/{}", id.trim())))
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(status, 200, "the config of an image built after start is found");
    assert_eq!(
        count_lines(&ferry.logs(), &["exporting image", &format!("id={}", id.trim())]),
        1
    );
    sh(&format!("docker -H {host} rmi {name}:v1 {later}:v1"));
}

/// Builds busybox plus 1.5 MiB of random data: an image whose last layer is its own.
fn build_random_image(host: &str, tag: &str) {
    let ctx = scratch();
    let c = ctx.path().display();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY random /data/random\n",
    )
    .unwrap();
    sh(&format!(
        "cp /bin/busybox {c}/ && head -c 1572864 /dev/urandom > {c}/random && \
         DOCKER_BUILDKIT=0 docker -H {host} build --no-cache -q -t {tag} {c} >/dev/null 2>&1"
    ));
}

#[test]
fn cache_size_limit_evicts_least_recently_used_images() {
    let dir = scratch();
    let host = docker20();
    // Each image is busybox (1.9 MiB, maybe shared) plus 1.5 MiB of its own: two do not fit
    // in 4 MiB, one does.
    let ferry = Ferry::start(
        dir.path(),
        &docker_chain(&host, "max_cache_size = \"4MiB\"\ndirect_reads = false"),
    );
    let (a, b) = (unique("evicta"), unique("evictb"));
    build_random_image(&host, &format!("{a}:v1"));
    build_random_image(&host, &format!("{b}:v1"));
    let layers_of = |body: &[u8]| -> Vec<String> {
        let m: serde_json::Value = serde_json::from_slice(body).unwrap();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let blob_path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        ferry.dir.join("docker/blobs/sha256").join(&hex[..2]).join(hex)
    };
    let (_, _, body_a) = get_manifest(&ferry, &a, "v1", "");
    let own_a = layers_of(&body_a)[1].clone();
    assert!(blob_path(&own_a).exists());
    let (_, _, body_b) = get_manifest(&ferry, &b, "v1", "");
    // A was used least recently: its own layer went; B's layers stayed.
    assert!(!blob_path(&own_a).exists(), "A's own layer is evicted");
    assert!(
        layers_of(&body_b).iter().all(|d| blob_path(d).exists()),
        "B's layers stay"
    );
    assert!(ferry.logs().contains("evicted least recently used"));
    // A is exported again when asked for, and its blobs are served.
    let (status, _, _) = get_manifest(&ferry, &a, "v1", "");
    assert_eq!(status, 200);
    let r = reqwest::blocking::get(ferry.url(&format!("/v2/{a}/blobs/{own_a}"))).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&r.bytes().unwrap())), own_a);
    assert_eq!(
        count_lines(&ferry.logs(), &["exporting image", &format!("image={a}:v1")]),
        2
    );
    sh(&format!("docker -H {host} rmi {a}:v1 {b}:v1"));
}

/// A cluster that mirrors every registry to ferry (`"*"` in k3s's registries.yaml, which is a
/// `_default` hosts.toml for containerd): an engine image named after another registry
/// (`registry.k8s.io/...`, asked for with `ns=registry.k8s.io`) and a locally built one asked
/// for as `docker.io/library/...` both come from the engine and run.
#[test]
fn a_mirror_for_every_registry_serves_engine_images_under_any_registry() {
    let engine = docker20();
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, "direct_reads = false"));
    let name = unique("star");
    build_image(&engine, &format!("{name}:v1"), 1);
    let k8s = format!("registry.k8s.io/{name}:3.9");
    sh(&format!("docker -H {engine} tag {name}:v1 {k8s}"));
    let certs = mirror_hosts(dir.path(), "_default", &ferry.addr());
    let ctd = containerd16();
    for image in [k8s.clone(), format!("docker.io/library/{name}:v1")] {
        let out = ctr_pull_and_run(&ctd, "e2e", &certs, &image);
        assert_eq!(out.trim(), format!("hello from {name}:v1"), "{image}");
    }
    let logs = ferry.logs();
    assert!(
        count_lines(
            &logs,
            &[
                &format!("/v2/{name}/manifests/3.9?ns=registry.k8s.io"),
                "status=200",
                "docker"
            ]
        ) >= 1,
        "{logs}"
    );
    sh(&format!("docker -H {engine} rmi {k8s} {name}:v1"));
}
