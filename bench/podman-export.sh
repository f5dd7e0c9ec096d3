#!/usr/bin/env bash
# Podman's export endpoints compared, to pick the one the docker backend uses: the compat
# `GET /images/NAME/get` (docker-archive) against libpod's `/libpod/images/NAME/get` as
# docker-archive and as oci-archive, uncompressed. Prints a markdown table (best of 3).
# Usage: bench/podman-export.sh [SIZE_MIB]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fpodman-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
size_mib=${1:-256}
e2e_install_packages
trap 'e2e_cleanup "$own_dir"' EXIT
e2e_start_podman podman
sock="$E2E_DIR/podman/podman.sock"
ctx="$E2E_DIR/ctx"; mkdir -p "$ctx"; cp /bin/busybox "$ctx/"
{ echo "FROM scratch"; echo "COPY busybox /bin/busybox"
  for i in 1 2 3 4; do head -c $((size_mib * 1024 * 1024 / 4)) /dev/urandom >"$ctx/l$i"; echo "COPY l$i /data/l$i"; done
} >"$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker -H "unix://$sock" build -q -t pbench:1 "$ctx" >/dev/null 2>&1
rm -rf "$ctx"
version=$(curl -sf --unix-socket "$sock" http://d/v1.41/version | sed -n 's/.*"APIVersion":"\([0-9.]*\)".*/\1/p' | head -1)
best() { # url
    local b="" t
    for _ in 1 2 3; do
        t=$(curl -sf --unix-socket "$sock" -o /dev/null -w '%{time_total}' "$1")
        if [ -z "$b" ] || [ "$(echo "$t < $b" | bc -l)" = 1 ]; then b=$t; fi
    done
    echo "$b"
}
echo
echo "| Podman $version export of ${size_mib} MiB | seconds (best of 3) |"
echo "|---|---|"
echo "| compat /images/NAME/get (docker-archive) | $(best "http://d/v1.41/images/pbench:1/get") |"
echo "| libpod get?format=docker-archive | $(best "http://d/v$version/libpod/images/pbench:1/get?format=docker-archive&compress=false") |"
echo "| libpod get?format=oci-archive | $(best "http://d/v$version/libpod/images/pbench:1/get?format=oci-archive&compress=false") |"
