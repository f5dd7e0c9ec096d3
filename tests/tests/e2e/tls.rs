//! ferry's TLS listener against a CA the test makes: containerd (hosts.toml `ca`), skopeo
//! (`--src-cert-dir`), Podman (`--cert-dir`) and Docker 20 (`certs.d`) pull through it;
//! curl sees HTTP/2 over ALPN; the certificate files replaced on disk are served within
//! seconds without a restart; the variables of other registries set the files too.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::*;

/// `curl` over TLS with `ca`; (success, what it printed).
fn curl(ca: &Path, url: &str, extra: &str) -> (bool, String) {
    sh_result(&format!(
        "curl -sS --max-time 10 --cacert {} {extra} {url}",
        ca.display()
    ))
}

fn tls_ferry(dir: &Path, envs: &[(&str, &str)], in_file: bool) -> Ferry {
    let certs = dir.join("tls");
    let toml = if in_file {
        format!(
            "[server]\ntls_cert = \"{0}/server-cert.pem\"\ntls_key = \"{0}/server-key.pem\"\n",
            certs.display()
        )
    } else {
        String::new()
    };
    let config = dir.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n{toml}{}",
            dir.join("data").display(),
            docker_chain(&docker20(), "")
        ),
    )
    .unwrap();
    let f = Ferry::start_with(dir, &config, envs);
    assert!(f.logs().contains("TLS certificate loaded"), "{}", f.logs());
    f
}

#[test]
fn real_clients_pull_over_tls_and_a_renewed_certificate_is_served() {
    let engine = docker20();
    let dir = scratch();
    let certs = dir.path().join("tls");
    std::fs::create_dir_all(&certs).unwrap();
    make_server_cert(&certs, "127.0.0.1");
    let ferry = tls_ferry(dir.path(), &[], true);
    let addr = ferry.addr();
    let ca = certs.join("ca.pem");
    let name = unique("tls");
    build_image(&engine, &format!("{name}:v1"), 1);

    // HTTP/2 over ALPN, and plain HTTP is no longer spoken.
    let (ok, version) = curl(
        &ca,
        &format!("https://{addr}/v2/"),
        "--http2 -o /dev/null -w '%{http_version}'",
    );
    assert!(ok && version == "2", "{version}");
    let (ok, version) = curl(
        &ca,
        &format!("https://{addr}/v2/"),
        "--http1.1 -o /dev/null -w '%{http_version}'",
    );
    assert!(ok && version == "1.1", "{version}");
    assert!(!sh_result(&format!("curl -sf --max-time 5 http://{addr}/v2/")).0);
    assert!(!curl(&dir.path().join("nothing.pem"), &format!("https://{addr}/v2/"), "").0);

    // containerd with the CA in hosts.toml.
    let hosts = dir.path().join("certs.d/docker.io");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://127.0.0.1:9\"\n[host.\"https://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            ca.display()
        ),
    )
    .unwrap();
    let out = ctr_pull_and_run(
        &containerd16(),
        "e2e",
        &dir.path().join("certs.d"),
        &format!("docker.io/library/{name}:v1"),
    );
    assert_eq!(out.trim(), format!("hello from {name}:v1"));

    // skopeo and Podman with a certificate directory holding the CA.
    let cert_dir = dir.path().join("cert-dir");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(&ca, cert_dir.join("ca.crt")).unwrap();
    sh(&format!(
        "skopeo copy --src-cert-dir {} docker://{addr}/{name}:v1 oci:{}/oci:v1",
        cert_dir.display(),
        dir.path().display()
    ));
    let store = dir.path().join("podman");
    sh(&format!(
        "podman --root {0}/root --runroot {0}/run --storage-driver vfs pull --cert-dir {1} {addr}/{name}:v1",
        store.display(),
        cert_dir.display()
    ));
    // Docker 20 with the CA under certs.d for this address (its own directory, removed after).
    let docker_certs = format!("/etc/docker/certs.d/{addr}");
    std::fs::create_dir_all(&docker_certs).unwrap();
    std::fs::copy(&ca, format!("{docker_certs}/ca.crt")).unwrap();
    let pulled = sh_result(&format!("docker -H {engine} pull {addr}/{name}:v1"));
    let _ = std::fs::remove_dir_all(&docker_certs);
    assert!(pulled.0, "{}", pulled.1);
    sh(&format!("docker -H {engine} rmi {addr}/{name}:v1"));

    // A renewal: new files (another CA) replace the old ones; served without a restart.
    let renewed = dir.path().join("renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    make_server_cert(&renewed, "127.0.0.1");
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(renewed.join(f), certs.join(format!("{f}.new"))).unwrap();
        std::fs::rename(certs.join(format!("{f}.new")), certs.join(f)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !curl(&renewed.join("ca.pem"), &format!("https://{addr}/v2/"), "-o /dev/null").0 {
        assert!(
            Instant::now() < deadline,
            "renewed certificate not served: {}",
            ferry.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        !curl(&ca, &format!("https://{addr}/v2/"), "").0,
        "the old certificate is gone"
    );
    assert!(ferry.logs().contains("reloaded"), "{}", ferry.logs());
    // A broken file keeps the certificate in use.
    std::fs::write(certs.join("server-cert.pem"), "not a certificate").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(curl(&renewed.join("ca.pem"), &format!("https://{addr}/v2/"), "").0);
    assert!(
        ferry.logs().contains("cannot be used; keeping the one in use"),
        "{}",
        ferry.logs()
    );
    sh(&format!("docker -H {engine} rmi {name}:v1"));
}

#[test]
fn other_registries_variables_set_the_certificate() {
    for (cert_var, key_var) in [
        ("REGISTRY_CERT_PATH", "REGISTRY_KEY_PATH"),
        ("REGISTRY_HTTP_TLS_CERTIFICATE", "REGISTRY_HTTP_TLS_KEY"),
    ] {
        let dir = scratch();
        let certs = dir.path().join("tls");
        std::fs::create_dir_all(&certs).unwrap();
        make_server_cert(&certs, "127.0.0.1");
        let (cert, key) = (certs.join("server-cert.pem"), certs.join("server-key.pem"));
        let ferry = tls_ferry(
            dir.path(),
            &[(cert_var, cert.to_str().unwrap()), (key_var, key.to_str().unwrap())],
            false,
        );
        let (ok, out) = curl(&certs.join("ca.pem"), &ferry.url("/v2/").replace("http:", "https:"), "");
        assert!(ok, "{cert_var}: {out}");
    }
}
