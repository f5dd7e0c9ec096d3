//! The push store with real clients: Docker 20.10 push and pull, skopeo, and containerd
//! pulling through a hosts.toml mirror the way k3s does.

use ferry_e2e::*;

#[test]
fn docker_push_rmi_pull_run_and_restart() {
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let host = docker20();
    let local = unique("pushsrc");
    build_image(&host, &format!("{local}:v1"), 3);
    let remote = format!("{}/e2e/{local}:v1", ferry.addr());
    sh(&format!(
        "docker -H {host} tag {local}:v1 {remote} && docker -H {host} push {remote}"
    ));
    let digest_pushed = sh(&format!(
        "docker -H {host} inspect -f '{{{{index .RepoDigests 0}}}}' {remote}"
    ));
    sh(&format!("docker -H {host} rmi {remote} {local}:v1"));
    sh(&format!("docker -H {host} pull {remote}"));
    let out = sh(&format!("docker -H {host} run --rm {remote}"));
    assert_eq!(out.trim(), format!("hello from {local}:v1"));

    // Everything pushed survives a restart byte for byte.
    let manifest_before = reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/e2e/{local}/manifests/v1")))
        .header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .unwrap();
    assert_eq!(manifest_before.status(), 200);
    let manifest_before = manifest_before.bytes().unwrap();
    let m: serde_json::Value = serde_json::from_slice(&manifest_before).unwrap();
    let mut blobs_before = Vec::new();
    let digests: Vec<String> = std::iter::once(m["config"]["digest"].as_str().unwrap().to_string())
        .chain(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string()),
        )
        .collect();
    assert_eq!(digests.len(), 5, "config + busybox + 3 file layers");
    for d in &digests {
        blobs_before.push(
            reqwest::blocking::get(ferry.url(&format!("/v2/e2e/{local}/blobs/{d}")))
                .unwrap()
                .bytes()
                .unwrap(),
        );
    }
    ferry.restart();
    let manifest_after = reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/e2e/{local}/manifests/v1")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(manifest_before, manifest_after);
    for (d, before) in digests.iter().zip(&blobs_before) {
        let after = reqwest::blocking::get(ferry.url(&format!("/v2/e2e/{local}/blobs/{d}")))
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(before, &after, "blob {d} changed across restart");
        assert_eq!(format!("sha256:{}", sha256_hex(&after)), *d);
    }
    sh(&format!("docker -H {host} rmi {remote}"));
    sh(&format!("docker -H {host} pull {remote}"));
    let digest_pulled = sh(&format!(
        "docker -H {host} inspect -f '{{{{index .RepoDigests 0}}}}' {remote}"
    ));
    assert_eq!(digest_pushed, digest_pulled);
    sh(&format!("docker -H {host} rmi {remote}"));
}

#[test]
fn skopeo_copy_in_and_out_keeps_digests() {
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), PUSH_ONLY);
    let host = docker20();
    let local = unique("skopeo");
    build_image(&host, &format!("{local}:v1"), 2);
    let src = dir.path().join("src");
    let back = dir.path().join("back");
    sh(&format!(
        "skopeo copy --src-daemon-host {host} docker-daemon:{local}:v1 oci:{}:v1",
        src.display()
    ));
    sh(&format!(
        "skopeo copy --dest-tls-verify=false oci:{}:v1 docker://{}/tools/{local}:v1",
        src.display(),
        ferry.addr()
    ));
    sh(&format!(
        "skopeo copy --src-tls-verify=false docker://{}/tools/{local}:v1 oci:{}:v1",
        ferry.addr(),
        back.display()
    ));
    let index_digest = |p: &std::path::Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("index.json")).unwrap()).unwrap();
        v["manifests"][0]["digest"].as_str().unwrap().to_string()
    };
    assert_eq!(index_digest(&src), index_digest(&back));
    // And skopeo inspect agrees with what ferry serves.
    let inspect = sh(&format!(
        "skopeo inspect --tls-verify=false docker://{}/tools/{local}:v1 | jq -r .Digest",
        ferry.addr()
    ));
    assert_eq!(inspect.trim(), index_digest(&src));
    sh(&format!("docker -H {host} rmi {local}:v1"));
}

#[test]
fn containerd_pulls_through_a_docker_io_mirror_when_pushes_may_shadow_origins() {
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), "[[backends]]\ntype = \"push\"\nshadow_origins = true\n");
    let host = docker20();
    let name = unique("mirror");
    build_image(&host, &format!("{name}:v1"), 2);
    let remote = format!("{}/library/{name}:v1", ferry.addr());
    sh(&format!(
        "docker -H {host} tag {name}:v1 {remote} && docker -H {host} push {remote}"
    ));
    sh(&format!("docker -H {host} rmi {remote} {name}:v1"));

    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let ctd = containerd16();
    let image = format!("docker.io/library/{name}:v1");
    sh(&format!(
        "ctr -a {ctd} -n e2e image pull --hosts-dir {} {image}",
        certs.display()
    ));
    let out = sh(&format!("ctr -a {ctd} -n e2e run --rm {image} {name}"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    let logs = ferry.logs();
    assert!(
        logs.contains(&format!("/v2/library/{name}/manifests/v1?ns=docker.io")),
        "containerd did not go through the mirror with ns=docker.io:\n{logs}"
    );
    sh(&format!("ctr -a {ctd} -n e2e image rm {image}"));
}

/// By default a push cannot stand in for an origin's image (mirror poisoning): a name with a
/// registry host is refused, and a Docker Hub name pushed to ferry is served to clients that
/// use ferry as a registry but not to a cluster that uses it as its docker.io mirror.
#[test]
fn pushes_do_not_shadow_origin_images_by_default() {
    let dir = scratch();
    let host = docker20();
    let ferry = Ferry::start(dir.path(), &docker_chain(&host, ""));
    let name = unique("shadow");
    build_image(&host, &format!("{name}:pushed"), 1);
    // An origin's name: refused.
    let foreign = format!("{}/registry.k8s.io/{name}:3.9", ferry.addr());
    sh(&format!("docker -H {host} tag {name}:pushed {foreign}"));
    let (ok, out) = sh_result(&format!("docker -H {host} push {foreign}"));
    assert!(!ok && out.contains("denied"), "{out}");
    sh(&format!("docker -H {host} rmi {foreign}"));
    let (status, _, _) = get_manifest(&ferry, &format!("registry.k8s.io/{name}"), "3.9", "");
    assert_eq!(status, 404);

    // A Docker Hub name: the push client sees it, the mirror does not.
    let hub = format!("{}/library/{name}:1.27", ferry.addr());
    sh(&format!(
        "docker -H {host} tag {name}:pushed {hub} && docker -H {host} push {hub}"
    ));
    sh(&format!("docker -H {host} rmi {hub} {name}:pushed"));
    let (status, _, _) = get_manifest(&ferry, &format!("library/{name}"), "1.27", "");
    assert_eq!(status, 200, "the push client's view");
    let (status, _, _) = get_manifest(&ferry, &format!("library/{name}"), "1.27", "?ns=docker.io");
    assert_eq!(status, 404, "the mirror's view");
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let (ok, out) = sh_result(&format!(
        "ctr -a {} -n e2e image pull --hosts-dir {} docker.io/library/{name}:1.27",
        containerd16(),
        certs.display()
    ));
    assert!(!ok, "a mirror client got the pushed image: {out}");
    assert!(
        count_lines(
            &ferry.logs(),
            &[&format!("/v2/library/{name}/manifests/1.27?ns=docker.io"), "status=404"]
        ) >= 1,
        "{}",
        ferry.logs()
    );
}
