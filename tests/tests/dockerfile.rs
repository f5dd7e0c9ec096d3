//! The Dockerfile cannot be built here (no base image can be pulled), so this checks that
//! what it declares agrees with the binary: the CMD's flags are accepted, the config it
//! copies is the one CMD names, the port it exposes is where ferry listens by default, and
//! REGISTRY_HTTP_ADDR (what k3d sets) moves the listener.

mod common;

use std::path::Path;

use common::*;

fn instruction<'a>(dockerfile: &'a str, name: &str) -> Vec<&'a str> {
    dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix(name).map(str::trim))
        .collect()
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s} is not an exec-form JSON array: {e}"))
}

#[test]
fn dockerfile_agrees_with_the_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let entrypoint = json_array(instruction(&dockerfile, "ENTRYPOINT ").last().unwrap());
    let cmd = json_array(instruction(&dockerfile, "CMD ").last().unwrap());
    assert_eq!(instruction(&dockerfile, "EXPOSE "), vec!["5000"]);
    assert_eq!(entrypoint, vec!["/usr/local/bin/ferry"]);
    assert!(
        dockerfile.contains("COPY --from=build /src/target/release/ferry /usr/local/bin/ferry"),
        "the entrypoint is the binary the build stage makes"
    );
    // CMD names the config file that COPY puts into the image.
    let config_in_image = cmd
        .iter()
        .position(|a| a == "--config")
        .map(|i| cmd[i + 1].clone())
        .expect("CMD passes --config");
    let copy = format!("COPY container.toml {config_in_image}");
    assert!(dockerfile.contains(&copy), "missing `{copy}`");

    // The image's config listens where EXPOSE says, and pulls missing images (as
    // k3d-registry-dockerd does), unlike the daemon's default.
    let example = std::fs::read_to_string(root.join("container.toml")).unwrap();
    assert!(example.contains("addr = \"0.0.0.0:5000\""));
    assert!(example.contains("pull_missing = true"));
    let daemon = std::fs::read_to_string(root.join("config.example.toml")).unwrap();
    assert!(daemon.contains("pull_missing = false"));

    // Run the binary exactly as CMD does (the image's config path mapped to the repo's file),
    // with the data dir moved to a scratch dir and the address from REGISTRY_HTTP_ADDR.
    let dir = scratch();
    let config = dir.path().join("config.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        example.replace("dir = \"/var/lib/ferry\"", &format!("dir = \"{}\"", data.display())),
    )
    .unwrap();
    let bin = ferry_bin();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args: Vec<String> = cmd
        .iter()
        .map(|a| {
            if *a == config_in_image {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new(&bin)
        .args(&args)
        .env("REGISTRY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env_remove("FERRY_CONFIG")
        .stderr(log)
        .spawn()
        .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v2/")) {
            ok = r.status() == 200;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ok,
        "ferry {args:?} did not answer on REGISTRY_HTTP_ADDR:\n{}",
        std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
    );
}
