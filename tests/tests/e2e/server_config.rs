//! The binary's start-up: configuration sources and their errors, log formats, and upload
//! sessions across restarts.

use std::process::Command;

use ferry_e2e::*;

/// Runs `ferry serve` expecting it to refuse to start; returns its stderr.
fn refused_start(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(ferry_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("FERRY_") || k.starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.arg("serve").args(args).envs(envs.iter().copied()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "ferry should refuse to start: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port another process holds: ferry says which address and why, and exits non-zero.
#[test]
fn a_taken_port_is_a_clear_error() {
    let dir = scratch();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = dir.path().join("ferry.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!("[cache]\ndir = \"{}\"\n[[backends]]\ntype = \"push\"\n", data.display()),
    )
    .unwrap();
    let out = Command::new(ferry_bin())
        .args(["serve", "--config", config.to_str().unwrap(), "--addr", &addr])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains(&format!("cannot listen on {addr}")) && logs.contains("in use"),
        "{logs}"
    );
    assert!(!logs.contains("ferry listening"), "{logs}");
}

#[test]
fn bad_configuration_names_the_key_and_its_source() {
    let dir = scratch();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[server]\nlog_fromat = \"json\"\n").unwrap();
    let err = refused_start(&["--config", file.to_str().unwrap()], &[]);
    assert!(err.contains("log_fromat") && err.contains("bad.toml"), "{err}");

    let err = refused_start(&[], &[("FERRY_SERVER__LOG_FORMAT", "yaml")]);
    assert!(
        err.to_lowercase().contains("server.log_format") && err.contains("FERRY_"),
        "{err}"
    );

    let err = refused_start(&[], &[("REGISTRY_HTTP_ADDR", "not-an-address")]);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("server.addr") && lower.contains("environment") && err.contains("not-an-address"),
        "{err}"
    );

    let err = refused_start(&["--config", "/nonexistent/ferry.toml"], &[]);
    assert!(err.contains("/nonexistent/ferry.toml"), "{err}");
}

#[test]
fn environment_overrides_file_and_flags_override_environment() {
    let dir = scratch();
    // The file says text logs; the environment says JSON: every line is then a JSON object.
    // The environment also names an address, which the --addr flag overrides.
    let mut ferry = Ferry::start_with(
        dir.path(),
        &{
            let f = dir.path().join("ferry.toml");
            std::fs::write(
                &f,
                format!(
                    "[server]\nlog_format = \"text\"\n[cache]\ndir = \"{}\"\n[[backends]]\ntype = \"push\"\n",
                    dir.path().join("data").display()
                ),
            )
            .unwrap();
            f
        },
        // The harness passes --addr with a free port: the flag must win over this.
        &[
            ("FERRY_SERVER__LOG_FORMAT", "json"),
            ("FERRY_SERVER__ADDR", "127.0.0.1:1"),
        ],
    );
    let r = reqwest::blocking::get(ferry.url("/v2/nothing/manifests/latest")).unwrap();
    assert_eq!(r.status(), 404);
    ferry.stop();
    let logs = ferry.logs();
    let request_line = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .find(|v| v["path"] == "/v2/nothing/manifests/latest")
        .expect("a request line");
    assert_eq!(request_line["status"], 404);
    assert_eq!(request_line["method"], "GET");
    assert!(request_line["error"].as_str().unwrap().contains("MANIFEST_UNKNOWN"));
    assert!(request_line["duration_ms"].is_number());
}

#[test]
fn upload_sessions_survive_a_restart_or_expire_cleanly() {
    let dir = scratch();
    let mut ferry = Ferry::start(dir.path(), "[[backends]]\ntype = \"push\"\nupload_ttl_secs = 3\n");
    let http = reqwest::blocking::Client::new();
    let data = b"first half|second half".to_vec();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let r = http.post(ferry.url("/v2/r/blobs/uploads/")).send().unwrap();
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    let r = http
        .patch(ferry.url(&location))
        .body(data[..11].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    ferry.restart();
    // The session is still there, at the same offset.
    let r = http.get(ferry.url(&location)).send().unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["Range"], "0-10");
    let r = http
        .put(ferry.url(&format!("{location}?digest={digest}")))
        .body(data[11..].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        http.get(ferry.url(&format!("/v2/r/blobs/{digest}")))
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .to_vec(),
        data
    );

    // An abandoned session expires, files and all.
    let r = http.post(ferry.url("/v2/r/blobs/uploads/")).send().unwrap();
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    http.patch(ferry.url(&location)).body("abandoned").send().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    ferry.restart();
    assert_eq!(http.get(ferry.url(&location)).send().unwrap().status(), 404);
    let left: Vec<_> = std::fs::read_dir(ferry.dir.join("push/uploads")).unwrap().collect();
    assert!(left.is_empty(), "expired session left {left:?}");
}

/// k3d-registry-dockerd's Go-style flags: `-addr HOST:PORT` (and `-port N`) start ferry
/// listening there, with `serve` implied.
#[test]
fn go_style_addr_flag_is_accepted() {
    let dir = scratch();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n[[backends]]\ntype = \"push\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(ferry_bin())
        .args(["-addr", &format!("127.0.0.1:{port}")])
        .env("FERRY_CONFIG", &config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v2/")) {
            status = r.status().as_u16();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "ferry -addr did not listen on the address");
}
