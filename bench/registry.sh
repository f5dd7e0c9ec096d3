#!/usr/bin/env bash
# ferry's push store vs distribution (Debian's docker-registry 2.8), side by side in one run,
# on the same content: blob GET throughput (1 GiB blob; 1 and 8 clients, and 1 over h2c), manifest HEAD
# requests/s (ab, from apache2-utils), and ferry's peak RSS. Prints a markdown table.
# Usage: bench/registry.sh [BLOB_MIB]   (run as root; installs wrk and the engines' packages)
# BENCH_FERRY=path runs that ferry binary (e.g. the image's static one) instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fbench-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
size_mib=${1:-1024}
e2e_install_packages
command -v bc >/dev/null || apt-get install -y -q bc >/dev/null
trap 'e2e_cleanup "$own_dir"' EXIT

bin=${BENCH_FERRY:-target/release/ferry}
[ -n "${BENCH_FERRY:-}" ] || cargo build --release -q -p ferry-server
ferry_port=5201 registry_port=5202
mkdir -p "$E2E_DIR/ferry"
printf '[cache]\ndir = "%s/ferry/data"\n' "$E2E_DIR" >"$E2E_DIR/ferry/config.toml"
e2e_spawn ferry "$bin" serve --config "$E2E_DIR/ferry/config.toml" --addr "127.0.0.1:$ferry_port" --log-level warn
e2e_start_registry registry "$registry_port"
e2e_wait ferry 30 curl -sf "http://127.0.0.1:$ferry_port/v2/"
ferry_pid=$(cat "$E2E_DIR/pids/ferry.pid")

blob="$E2E_DIR/blob"
head -c "$((size_mib * 1024 * 1024))" /dev/urandom >"$blob"
digest="sha256:$(sha256sum "$blob" | cut -d' ' -f1)"
echo -n '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$E2E_DIR/config"
cdigest="sha256:$(sha256sum "$E2E_DIR/config" | cut -d' ' -f1)"
cat >"$E2E_DIR/manifest" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$cdigest","size":$(stat -c %s "$E2E_DIR/config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$digest","size":$(stat -c %s "$blob")}]}
JSON

for port in $ferry_port $registry_port; do
    e2e_upload_blob "127.0.0.1:$port" bench "$blob" >/dev/null
    e2e_upload_blob "127.0.0.1:$port" bench "$E2E_DIR/config" >/dev/null
    curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
        --data-binary @"$E2E_DIR/manifest" "http://127.0.0.1:$port/v2/bench/manifests/v1" -o /dev/null
done

# MiB/s for N parallel clients downloading the blob (curl with FLAGS); best of 3 runs.
throughput() { # port clients [flags]
    local best=0 t0 t1 rate
    for _ in 1 2 3; do
        t0=$(date +%s.%N)
        for _ in $(seq 1 "$2"); do
            curl -sf ${3:-} -o /dev/null "http://127.0.0.1:$1/v2/bench/blobs/$digest" &
        done
        wait
        t1=$(date +%s.%N)
        rate=$(echo "$size_mib * $2 / ($t1 - $t0)" | bc -l)
        best=$(echo "if ($rate > $best) $rate else $best" | bc -l)
    done
    printf '%.0f' "$best"
}
# HEAD requests/s with keep-alive (wrk cannot do HEAD: it waits for a body after
# Content-Length); best of 3.
heads() { # port
    local best=0 r
    for _ in 1 2 3; do
        r=$(ab -q -i -k -c 16 -n 50000 -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
            "http://127.0.0.1:$1/v2/bench/manifests/v1" | awk '/Requests per second/{printf "%.0f", $4}')
        [ "$r" -gt "$best" ] && best=$r
    done
    echo "$best"
}

# Warm the page cache once so both read from memory.
cat "$blob" >/dev/null
f1=$(throughput $ferry_port 1); r1=$(throughput $registry_port 1)
f8=$(throughput $ferry_port 8); r8=$(throughput $registry_port 8)
# HTTP/2 without TLS (h2c): distribution serves HTTP/2 over TLS only.
f2=$(throughput $ferry_port 1 --http2-prior-knowledge)
fh=$(heads $ferry_port); rh=$(heads $registry_port)
rss=$(awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$ferry_pid/status")

echo
echo "| metric | ferry | distribution 2.8 |"
echo "|---|---|---|"
echo "| blob GET, ${size_mib} MiB, 1 client (MiB/s) | $f1 | $r1 |"
echo "| blob GET, ${size_mib} MiB, 8 clients (MiB/s, total) | $f8 | $r8 |"
echo "| blob GET, ${size_mib} MiB, 1 client over HTTP/2 (h2c; MiB/s) | $f2 | (TLS only) |"
echo "| manifest HEAD (requests/s, 16 connections) | $fh | $rh |"
echo "| ferry peak RSS (MiB) | $rss | |"
rm -f "$blob"
