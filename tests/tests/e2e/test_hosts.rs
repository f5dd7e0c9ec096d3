//! The suite's test hosts (network namespaces joined by a veth pair): reachable from here,
//! not loopback, and gone after the test that made them — also when that test fails, and
//! also when the whole run was killed (the next run sweeps them).

use std::sync::Mutex;

use ferry_e2e::*;

fn namespaces() -> String {
    sh("ip netns list")
}

fn link_exists(ip: &str) -> bool {
    sh("ip -4 -o addr show").contains(&format!(" {ip}/30 "))
}

#[test]
fn a_test_host_is_removed_even_when_its_test_fails() {
    let seen = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let mut host = TestHost::new();
        let origin = host.start_registry(None, None);
        assert!(!host.ip.starts_with("127."));
        *seen.lock().unwrap() = Some((host.namespace(), host.host_side_ip.clone(), host.pids()));
        let r = reqwest::blocking::get(format!("http://{origin}/v2/")).unwrap();
        assert_eq!(r.status(), 200, "the registry in the namespace answers");
        panic!("the test fails mid-way");
    });
    assert!(result.is_err());
    let (ns, host_side_ip, pids) = seen.lock().unwrap().clone().unwrap();
    assert!(!namespaces().contains(&ns), "namespace {ns} left behind");
    assert!(!link_exists(&host_side_ip), "veth with {host_side_ip} left behind");
    // (No request goes to the old address: without the veth it would leave the machine.)
    assert_eq!(pids.len(), 1);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "registry {pid} still running"
        );
    }
}

#[test]
fn hosts_of_a_killed_run_are_swept_by_the_next() {
    // A run directory whose PID is gone, holding a test host it never removed.
    let dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let run = format!("/tmp/fe2e-{pid}");
    let name = unique("k");
    let out = sh(&format!("E2E_DIR={run} && source {} && e2e_netns_create {name}", lib()));
    let host_side_ip = out.split_whitespace().next().unwrap().to_string();
    assert!(namespaces().contains(&format!("fe2e-{name}")));
    sh(&format!("source {} && e2e_sweep_stale_netns", lib()));
    assert!(
        !namespaces().contains(&format!("fe2e-{name}")),
        "stale namespace not swept"
    );
    assert!(!link_exists(&host_side_ip));
    let _ = std::fs::remove_dir_all(&run);
}
