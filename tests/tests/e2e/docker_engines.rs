//! The docker backend against Docker 26.1 and 28.5, each with the containerd image store and
//! with its graph driver, and against Podman 4.3 (rootful and rootless) and 5.4 (their
//! Docker-compatible API): the same pulls as for Docker 20, by tag and by digest.

use ferry_e2e::*;

/// Builds an image in `engine`, serves it through ferry and pulls it with containerd (by tag
/// and by digest), a second Docker and skopeo. Returns the manifest digest.
fn serves_images_of(engine: &str, label: &str) {
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), &docker_chain(engine, ""));
    let name = unique(label);
    build_image(engine, &format!("{name}:v1"), 2);
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let ctd = containerd16();
    let out = ctr_pull_and_run(&ctd, "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    let (status, digest, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!(status, 200);

    let other = env("E2E_DOCKER20B_HOST");
    let remote = format!("{}/{name}:v1", ferry.addr());
    sh(&format!("docker -H {other} pull {remote}"));
    assert_eq!(
        sh(&format!("docker -H {other} run --rm {remote}")).trim(),
        format!("hello from {name}:v1")
    );
    sh(&format!("docker -H {other} rmi {remote}"));

    let copy = dir.path().join("copy");
    sh(&format!(
        "skopeo copy --src-tls-verify=false docker://{remote} dir:{}",
        copy.display()
    ));
    assert_eq!(
        format!(
            "sha256:{}",
            sha256_hex(&std::fs::read(copy.join("manifest.json")).unwrap())
        ),
        digest
    );

    // A second export gives the same digest.
    ferry.stop();
    std::fs::remove_dir_all(ferry.dir.join("docker")).unwrap();
    ferry.restart();
    let (status, again, _) = get_manifest(&ferry, &name, "v1", "");
    assert_eq!((status, again), (200, digest.clone()), "{}", ferry.logs());
    // By digest, through containerd (it resolves the digest itself).
    let by_digest = format!("docker.io/library/{name}@{digest}");
    let out = ctr_pull_and_run(&ctd, "e2e", &certs, &by_digest);
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn docker26_containerd_store() {
    serves_images_of(&env("E2E_DOCKER26_HOST"), "d26");
}

/// Docker 25+ on its graph driver (overlay2), the default until the containerd image store is
/// turned on: `docker save` writes the OCI layout there too, with uncompressed layers.
#[test]
fn docker26_graph_driver() {
    serves_images_of(&env("E2E_DOCKER26G_HOST"), "d26g");
}

#[test]
fn docker26_digest_reference_on_a_cold_cache() {
    let engine = env("E2E_DOCKER26_HOST");
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));
    let name = unique("d26dig");
    build_image(&engine, &format!("{name}:v1"), 1);
    // The image id of the containerd store is its manifest digest.
    let id = sh(&format!("docker -H {engine} inspect -f '{{{{.Id}}}}' {name}:v1"));
    let (status, digest, _) = get_manifest(&ferry, &name, id.trim(), "?ns=docker.io");
    assert_eq!(status, 200, "{}", ferry.logs());
    assert_eq!(digest, id.trim());
    assert!(ferry.logs().contains("Oci export"));
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn docker28_containerd_store() {
    serves_images_of(&env("E2E_DOCKER28_HOST"), "d28");
}

#[test]
fn docker28_graph_driver() {
    serves_images_of(&env("E2E_DOCKER28G_HOST"), "d28g");
}

/// On Docker 28's containerd store the image id is its manifest's digest, served from the
/// content store as is: asked for by that digest on a fresh ferry, with no export.
#[test]
fn docker28_digest_reference_on_a_cold_cache() {
    let engine = env("E2E_DOCKER28_HOST");
    let dir = scratch();
    let ferry = Ferry::start(dir.path(), &docker_chain(&engine, ""));
    let name = unique("d28dig");
    build_image(&engine, &format!("{name}:v1"), 1);
    let id = sh(&format!("docker -H {engine} inspect -f '{{{{.Id}}}}' {name}:v1"));
    let (status, digest, _) = get_manifest(&ferry, &name, id.trim(), "?ns=docker.io");
    assert_eq!(status, 200, "{}", ferry.logs());
    assert_eq!(digest, id.trim());
    assert!(!ferry.logs().contains("exporting image"), "{}", ferry.logs());
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn podman5_compat_api() {
    serves_images_of(&env("E2E_PODMAN5_HOST"), "pod5");
}

#[test]
fn podman_compat_api() {
    serves_images_of(&env("E2E_PODMAN_HOST"), "pod");
}

#[test]
fn rootless_podman() {
    serves_images_of(&env("E2E_PODMAN_ROOTLESS_HOST"), "rootless");
}
