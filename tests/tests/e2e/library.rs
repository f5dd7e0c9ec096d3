//! ferry as a library: `examples/embedded.rs` (a chain built from code: Docker 20, then a
//! push store) started as a program, an engine image pulled through it by containerd and
//! run, and an image pushed to it by Docker and pulled back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::*;

#[test]
fn the_embedded_example_serves_a_chain_built_in_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    sh(&format!(
        "cd {} && cargo build -q -p ferry-server --example embedded",
        root.display()
    ));
    let example = ferry_bin().parent().unwrap().join("examples/embedded");
    let engine = docker20();
    let dir = scratch();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("example.log")).unwrap();
    let mut child = Command::new(&example)
        .args([&addr, &engine, &dir.path().join("data").display().to_string()])
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the example did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = std::panic::catch_unwind(|| {
        let printed = std::fs::read_to_string(dir.path().join("example.log")).unwrap();
        assert!(printed.contains("[\"engine\", \"push\"]"), "{printed}");
        let name = unique("lib");
        build_image(&engine, &format!("{name}:v1"), 2);
        let certs = mirror_hosts(dir.path(), "docker.io", &addr);
        let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
        assert_eq!(out.trim(), format!("hello from {name}:v1"));

        let remote = format!("{addr}/apps/{name}:v2");
        sh(&format!(
            "docker -H {engine} tag {name}:v1 {remote} && docker -H {engine} push {remote}"
        ));
        sh(&format!(
            "docker -H {engine} rmi {remote} {name}:v1 && docker -H {engine} pull {remote}"
        ));
        let out = sh(&format!("docker -H {engine} run --rm {remote}"));
        assert_eq!(out.trim(), format!("hello from {name}:v1"));
        sh(&format!("docker -H {engine} rmi {remote}"));
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
