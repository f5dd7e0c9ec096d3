//! Names the commit ferry is built from, for `ferry --version` and the start-up log:
//! `SOURCE_COMMIT` when the build sets it (a context without `.git`; Docker Hub's name), else
//! `git rev-parse`, else "unknown". Passed on as `BUILT_COMMIT`: cargo sets it for test runs
//! too, and a `FERRY_` name would be read as configuration.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_COMMIT");
    let git = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git");
    // Rerun when HEAD moves: HEAD itself, the branch it names, and packed refs.
    for file in ["HEAD", "packed-refs"] {
        watch(&git.join(file));
    }
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            watch(&git.join(branch));
        }
    }
    let commit = std::env::var("SOURCE_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=BUILT_COMMIT={commit}");
}

/// A file that does not exist would make cargo rerun this script on every build.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
