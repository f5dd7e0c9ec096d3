//! `ferry mirrors --for CLIENT`: the configuration that makes a client pull through this
//! ferry, as the files that client reads. Each file is printed after a `# PATH` line.
//!
//! Clients that send containerd's `?ns=` (containerd, k3s, k3d, kind) get one mirror for
//! every registry. Docker mirrors only Docker Hub. Podman sends no `ns`, so each registry's
//! mirror names the registry as the first path component (`ADDR/quay.io`), which ferry reads
//! as the origin.

use ferry_server::config::Config;

/// The clients `--for` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Client {
    K3s,
    K3d,
    Kind,
    Containerd,
    Podman,
    Docker,
}

/// Registries Podman is given a mirror for (it has no catch-all).
const PODMAN_REGISTRIES: [&str; 5] = ["docker.io", "registry.k8s.io", "ghcr.io", "quay.io", "gcr.io"];

/// The address clients use: `explicit`, else the listen address with an unspecified IP
/// (`0.0.0.0`, `::`) read as loopback.
pub fn address(config: &Config, explicit: Option<&str>) -> String {
    if let Some(a) = explicit {
        return a.to_string();
    }
    let addr = config.server.addr;
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => format!("[::1]:{}", addr.port()),
        _ => addr.to_string(),
    }
}

/// Where `ferry mirrors --for kind` puts the hosts directory its kind config mounts into
/// every node, unless told: `ferry-certs.d` beside the config, as an absolute path.
pub fn default_hosts_dir() -> String {
    std::env::current_dir()
        .unwrap_or_else(|_| std::path::PathBuf::from("."))
        .join("ferry-certs.d")
        .display()
        .to_string()
}

/// The files for `client`, each after a `# PATH` line. `hosts_dir` is the host directory
/// kind's nodes mount as containerd's hosts directory.
pub fn snippet(client: Client, addr: &str, hosts_dir: &str) -> String {
    let loopback = addr.starts_with("127.") || addr.starts_with("[::1]") || addr.starts_with("localhost");
    let mut out = String::new();
    if loopback && matches!(client, Client::K3d | Client::Kind) {
        out.push_str(&format!(
            "# {addr} is loopback: cluster nodes run in containers and cannot reach it there.\n\
             # Give the address they reach ferry on with --address (e.g. k3d-ferry:5000 for a\n\
             # k3d registry container, or this machine's address on the cluster's network).\n\n"
        ));
    }
    match client {
        Client::K3s => out.push_str(&format!(
            "# /etc/rancher/k3s/registries.yaml\n{}\n# then: systemctl restart k3s\n",
            registries_yaml(addr)
        )),
        Client::K3d => out.push_str(&k3d_config(addr)),
        Client::Kind => out.push_str(&kind_files(addr, hosts_dir)),
        Client::Containerd => out.push_str(&format!(
            "# /etc/containerd/certs.d/_default/hosts.toml\n{}\n\
             # /etc/containerd/config.toml needs (then: systemctl restart containerd):\n\
             #   [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
             #     config_path = \"/etc/containerd/certs.d\"\n\
             # ctr reads it with: ctr image pull --hosts-dir /etc/containerd/certs.d IMAGE\n",
            hosts_toml(addr)
        )),
        Client::Podman => {
            out.push_str(
                "# /etc/containers/registries.conf.d/ferry.conf (rootless: ~/.config/containers/registries.conf)\n",
            );
            for r in PODMAN_REGISTRIES {
                out.push_str(&format!(
                    "[[registry]]\nlocation = \"{r}\"\n[[registry.mirror]]\nlocation = \"{addr}/{r}\"\ninsecure = true\n\n"
                ));
            }
        }
        Client::Docker => out.push_str(&format!(
            "# /etc/docker/daemon.json (then: systemctl restart docker; Docker mirrors Docker Hub only)\n\
             {{\n  \"registry-mirrors\": [\"http://{addr}\"],\n  \"insecure-registries\": [\"{addr}\"]\n}}\n"
        )),
    }
    out
}

/// k3s's registries.yaml: `"*"` mirrors every registry.
fn registries_yaml(addr: &str) -> String {
    format!("mirrors:\n  \"*\":\n    endpoint:\n      - \"http://{addr}\"\n")
}

/// containerd's hosts.toml for `_default`: every registry without a directory of its own.
fn hosts_toml(addr: &str) -> String {
    format!("[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
}

/// k3d's SimpleConfig, whole: the registry the cluster uses (ferry at `addr`, a k3d registry
/// container or any host the nodes reach) and the mirror for every registry through it;
/// `k3d cluster create --config` takes it alone.
fn k3d_config(addr: &str) -> String {
    format!(
        "# k3d-config.yaml (k3d cluster create --config k3d-config.yaml)\n\
         apiVersion: k3d.io/v1alpha5\n\
         kind: Simple\n\
         registries:\n  use:\n    - {addr}\n  config: |\n{}\
         # {addr} must be a k3d registry container (k3d registry create ferry -i ferry:latest -p 5000\n\
         # -v /var/run/docker.sock:/var/run/docker.sock names it k3d-ferry:5000). To have k3d make it\n\
         # with the cluster instead, replace `use` with:\n\
         #   create:\n\
         #     name: ferry\n\
         #     hostPort: \"{port}\"\n\
         #     image: ferry:latest\n\
         #     volumes:\n\
         #       - /var/run/docker.sock:/var/run/docker.sock\n\
         # and the mirror's endpoint with http://k3d-ferry:{port}.\n",
        indent(&registries_yaml(addr), 4),
        port = port_of(addr),
    )
}

/// kind's files: a cluster config whose nodes read containerd's hosts directory (the form
/// containerd 2.x keeps; kind 0.27+ sets `config_path` itself, and the patch does it for older
/// ones) with ferry's hosts directory mounted there, that directory's `_default/hosts.toml`,
/// and the KEP-1755 ConfigMap through which Tilt and skaffold find the registry.
fn kind_files(addr: &str, hosts_dir: &str) -> String {
    format!(
        "# kind-config.yaml (kind create cluster --config kind-config.yaml)\n\
         kind: Cluster\n\
         apiVersion: kind.x-k8s.io/v1alpha4\n\
         containerdConfigPatches:\n\
         - |-\n{patch}\
         nodes:\n\
         - role: control-plane\n  \
           extraMounts:\n  \
           - hostPath: {hosts_dir}\n    \
             containerPath: /etc/containerd/certs.d\n    \
             readOnly: true\n\
         # (give every node of the cluster the same extraMounts)\n\n\
         # {hosts_dir}/_default/hosts.toml\n{hosts}\n\
         # local-registry-hosting.yaml (kubectl apply -f local-registry-hosting.yaml; KEP-1755)\n\
         apiVersion: v1\n\
         kind: ConfigMap\n\
         metadata:\n  \
           name: local-registry-hosting\n  \
           namespace: kube-public\n\
         data:\n  \
           localRegistryHosting.v1: |\n    \
             host: \"localhost:{port}\"\n    \
             hostFromContainerRuntime: \"{addr}\"\n",
        patch = indent(&kind_patch(), 2),
        hosts = hosts_toml(addr),
        port = port_of(addr),
    )
}

/// kind's containerd patch: read registries' hosts files from `/etc/containerd/certs.d`.
fn kind_patch() -> String {
    "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n".to_string()
}

/// The port of `host:port` (5000, the registry port, when there is none).
fn port_of(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => "5000",
    }
}

fn indent(text: &str, by: usize) -> String {
    text.lines().map(|l| format!("{:by$}{l}\n", "")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_snippet_names_the_address() {
        for c in [
            Client::K3s,
            Client::K3d,
            Client::Kind,
            Client::Containerd,
            Client::Podman,
            Client::Docker,
        ] {
            let s = snippet(c, "10.1.2.3:5000", "/h");
            assert!(s.contains("10.1.2.3:5000"), "{c:?}: {s}");
            assert!(!s.contains("loopback"), "{c:?}: {s}");
        }
        assert!(snippet(Client::K3d, "127.0.0.1:5000", "/h").contains("--address"));
    }

    #[test]
    fn k3d_embeds_registries_yaml_as_a_block() {
        let s = snippet(Client::K3d, "k3d-ferry:5000", "/h");
        assert!(s.contains("  config: |\n    mirrors:\n      \"*\":\n"), "{s}");
        assert!(s.contains("  use:\n    - k3d-ferry:5000\n"), "{s}");
    }

    #[test]
    fn kind_mounts_the_hosts_directory_it_prints() {
        let s = snippet(Client::Kind, "ferry.lan:5001", "/srv/ferry-certs.d");
        assert!(s.contains("config_path = \"/etc/containerd/certs.d\""), "{s}");
        assert!(!s.contains("registry.mirrors"), "the deprecated table: {s}");
        assert!(s.contains("- hostPath: /srv/ferry-certs.d\n"), "{s}");
        assert!(
            s.contains("# /srv/ferry-certs.d/_default/hosts.toml\n[host.\"http://ferry.lan:5001\"]"),
            "{s}"
        );
        assert!(s.contains("host: \"localhost:5001\""), "{s}");
    }
}
