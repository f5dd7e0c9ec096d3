//! Kubelet's own call: CRI `ImageService/PullImage` on the CRI socket of containerd 2.1 (kind
//! since its containerd 2.x node images, k3s 1.33+) and containerd 1.7, each started with
//! exactly the containerd patch and `_default/hosts.toml` that `ferry mirrors --for kind`
//! prints, merged as kind merges them. Images come from Docker 28 on its containerd store
//! through ferry's default chain: a `docker.io/library/` name, a `registry.k8s.io/` name and
//! a by-digest reference. A node whose CRI plugin bypassed the hosts file (containerd 2.1's
//! transfer service has in some setups) would ask the real registries, which cannot be reached
//! here: the pull fails and ferry's log lacks the requests.

use std::path::Path;

use ferry_e2e::*;

/// (containerd patch, `_default/hosts.toml`) from `ferry mirrors --for kind`, with the hosts
/// directory at `hosts_dir`.
fn kind_files(addr: &str, hosts_dir: &Path) -> (String, String) {
    let dir = hosts_dir.display().to_string();
    let (code, out) = run_ferry(
        &["mirrors", "--for", "kind", "--address", addr, "--hosts-dir", &dir],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    lines.by_ref().find(|l| *l == "- |-").expect("a containerd patch");
    let patch: Vec<&str> = lines
        .by_ref()
        .take_while(|l| l.starts_with("  "))
        .map(|l| &l[2..])
        .collect();
    let header = format!("# {dir}/_default/hosts.toml");
    lines
        .find(|l| *l == header)
        .unwrap_or_else(|| panic!("no {header}:\n{out}"));
    let hosts: Vec<&str> = lines.take_while(|l| !l.is_empty()).collect();
    (patch.join("\n") + "\n", hosts.join("\n") + "\n")
}

/// Pulls `image` through containerd's CRI, as kubelet does; the image reference on success.
fn cri_pull(socket: &str, image: &str) -> Result<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let path = socket.to_string();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| e.to_string())?;
        let mut images = k8s_cri::v1::image_service_client::ImageServiceClient::new(channel);
        let request = k8s_cri::v1::PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = images.pull_image(request).await.map_err(|e| e.to_string())?;
        Ok(answer.into_inner().image_ref)
    })
}

/// A containerd of this test's own (`bin` from `root`), with the kind patch pointing at
/// `hosts_dir`: kind mounts that directory at /etc/containerd/certs.d in every node, which a
/// containerd outside a container reads at its own path.
struct Node {
    name: String,
    socket: String,
    config: String,
}

impl Node {
    fn start(root: &str, patch: &str, hosts_dir: &Path) -> Node {
        let name = unique("node");
        let patch = patch.replace("/etc/containerd/certs.d", &hosts_dir.display().to_string());
        sh(&format!(
            "source {} && set +u && PATH={root}/usr/bin:{root}/usr/sbin:$PATH CONTAINERD_PATCH='{patch}' \
             e2e_start_containerd {name} {root}/usr/bin/containerd",
            lib()
        ));
        let socket = format!("{}/{name}/containerd.sock", env("E2E_DIR"));
        let config = format!("{}/{name}/config.toml", env("E2E_DIR"));
        Node { name, socket, config }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = sh_result(&format!("source {} && set +u && e2e_stop {}", lib(), self.name));
    }
}

fn pulls_through_ferry_over_the_cri(root: &str, label: &str) {
    let d28 = env("E2E_DOCKER28_HOST");
    let name = unique(label);
    build_image(&d28, &format!("{name}:v1"), 2);
    sh(&format!("docker -H {d28} tag {name}:v1 registry.k8s.io/{name}:3.9"));
    let id = sh(&format!("docker -H {d28} inspect -f '{{{{.Id}}}}' {name}:v1"))
        .trim()
        .to_string();

    let dir = scratch();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!("[cache]\ndir = \"{}\"\n", dir.path().join("data").display()),
    )
    .unwrap();
    let ferry = Ferry::start_with(dir.path(), &config, &[("DOCKER_HOST", d28.as_str())]);
    let hosts_dir = dir.path().join("ferry-certs.d");
    let (patch, hosts) = kind_files(&ferry.addr(), &hosts_dir);
    std::fs::create_dir_all(hosts_dir.join("_default")).unwrap();
    std::fs::write(hosts_dir.join("_default/hosts.toml"), hosts).unwrap();
    let node = Node::start(root, &patch, &hosts_dir);
    // The doctor reads the node's config as this node has it: its pulls reach ferry.
    let (_, report) = run_ferry(
        &[
            "doctor",
            "--config",
            &config.display().to_string(),
            "--containerd-config",
            &node.config,
        ],
        &[("DOCKER_HOST", d28.as_str())],
    );
    let line = doctor_line(&report, "containerd config");
    assert!(line.starts_with("ok") && line.contains(&ferry.addr()), "{report}");

    for (image, request) in [
        (
            format!("docker.io/library/{name}:v1"),
            format!("/v2/library/{name}/manifests/v1?ns=docker.io"),
        ),
        (
            format!("registry.k8s.io/{name}:3.9"),
            format!("/v2/{name}/manifests/3.9?ns=registry.k8s.io"),
        ),
        (
            format!("docker.io/library/{name}@{id}"),
            format!("/v2/library/{name}/manifests/{id}?ns=docker.io"),
        ),
    ] {
        let pulled = cri_pull(&node.socket, &image);
        assert!(pulled.is_ok(), "[{label}] {image}: {pulled:?}\n{}", ferry.logs());
        let logs = ferry.logs();
        assert!(
            count_lines(&logs, &[&format!("path={request}"), "status=200"]) >= 1,
            "[{label}] {image}: the node did not ask ferry for {request}\n{logs}"
        );
    }
    let listed = sh(&format!("ctr -a {} -n k8s.io image ls -q", node.socket));
    assert!(listed.contains(&format!("registry.k8s.io/{name}:3.9")), "{listed}");
    assert!(!ferry.logs().contains("exporting image"), "an export ran");
    sh(&format!("docker -H {d28} rmi {name}:v1 registry.k8s.io/{name}:3.9"));
}

#[test]
fn containerd21_pulls_through_ferry_over_the_cri_with_the_kind_files() {
    pulls_through_ferry_over_the_cri(&env("E2E_SID_ROOT"), "cri21");
}

#[test]
fn containerd17_pulls_through_ferry_over_the_cri_with_the_kind_files() {
    pulls_through_ferry_over_the_cri(&env("E2E_TRIXIE_ROOT"), "cri17");
}
