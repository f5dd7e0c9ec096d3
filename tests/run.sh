#!/usr/bin/env bash
# The whole test suite: installs the Debian packages it needs, starts real engines (containerd,
# Docker, a reference registry) on private sockets under $E2E_DIR, runs every test, and stops
# what it started by PID. It never touches the host's own daemons or /var/run/docker.sock.
set -euo pipefail
cd "$(dirname "$0")/.."
# Always a directory of its own: the daemons in it are stopped at the end.
export E2E_DIR=/tmp/fe2e-$$
source tests/env/lib.sh

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
e2e_install_packages
# The static arm64 build (README, "A single static binary") that the image test runs.
rustup target add aarch64-unknown-linux-musl >/dev/null 2>&1 ||
    { echo "rustup could not add the aarch64-unknown-linux-musl target" >&2; exit 1; }
# At the end: stop what was started, and keep only the logs.
trap 'bash tests/env/stop.sh
      find "$E2E_DIR" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf --one-file-system {} + 2>/dev/null
      echo "[env] engines stopped; logs in $E2E_DIR/logs" >&2' EXIT
bash tests/env/start.sh
source "$E2E_DIR/env"

cargo build --locked -p ferry-server
# Every public item documented, and the docs build clean.
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace
cargo test --locked --workspace --no-fail-fast -- "$@"
# A short pass of every fuzz target (fuzz/run.sh 600 is the long one; RELIABILITY.md).
FUZZ_QUICK=1 fuzz/run.sh 10
