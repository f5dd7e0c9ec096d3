#!/usr/bin/env bash
# ferry under load, beside distribution (Debian's docker-registry) where it applies. Prints a
# markdown table.
#  1. Warm: manifest GETs and 1 MiB blob GETs from 64 connections for SECONDS (wrk): requests/s,
#     p50, p99, errors, ferry's peak RSS — ferry's push store and distribution, same content.
#  2. Cold: 200 clients pull 20 engine images at once (10 each) through ferry's default chain
#     on Docker 20: errors (every blob hash-checked), exports (0 with direct reads, else
#     one per image), peak RSS.
#  3. 50 pushers of distinct images at once (monolithic uploads, then the manifest), ferry and
#     distribution: errors, and every blob read back and hash-checked. Each row's peak RSS
#     is its own.
#  4. Memory on every path a blob takes (direct reads, export, push store, upstream) at 200
#     cold pulls of a 270 MiB image, and at 1000 streams: bench/ceilings.sh, on engines of
#     its own (STRESS_CEILINGS=0 leaves it out).
# Usage: bench/stress.sh [SECONDS]   (root; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fstress-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
seconds=${1:-60}
e2e_install_packages
command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null
trap 'e2e_cleanup "$own_dir"' EXIT

cargo build --release -q -p ferry-server
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
d20="unix://$E2E_DIR/docker20/docker.sock"
ferry_port=$(e2e_free_port) registry_port=$(e2e_free_port)
mkdir -p "$E2E_DIR/ferry"
cat >"$E2E_DIR/ferry/ferry.toml" <<TOML
[cache]
dir = "$E2E_DIR/ferry/data"
[[backends]]
type = "docker"
socket = "$d20"
[[backends]]
type = "push"
TOML
e2e_spawn ferry target/release/ferry serve --config "$E2E_DIR/ferry/ferry.toml" --addr "127.0.0.1:$ferry_port" --log-level info
e2e_start_registry registry "$registry_port"
e2e_wait ferry 30 curl -sf "http://127.0.0.1:$ferry_port/v2/"
pid=$(cat "$E2E_DIR/pids/ferry.pid")
hwm() { awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$pid/status"; }
# Each row's peak RSS is its own: the kernel's high-water mark is reset before it.
reset_hwm() { echo 5 >"/proc/$pid/clear_refs"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

# 1. Warm: the same manifest and blob in both registries.
blob="$E2E_DIR/blob"; head -c $((1024 * 1024)) /dev/urandom >"$blob"
digest="sha256:$(sha256sum "$blob" | cut -d' ' -f1)"
echo -n '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' >"$E2E_DIR/config"
cdigest="sha256:$(sha256sum "$E2E_DIR/config" | cut -d' ' -f1)"
cat >"$E2E_DIR/manifest" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$cdigest","size":$(stat -c %s "$E2E_DIR/config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$digest","size":$(stat -c %s "$blob")}]}
JSON
for port in $ferry_port $registry_port; do
    e2e_upload_blob "127.0.0.1:$port" warm "$blob" >/dev/null
    e2e_upload_blob "127.0.0.1:$port" warm "$E2E_DIR/config" >/dev/null
    curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
        --data-binary @"$E2E_DIR/manifest" "http://127.0.0.1:$port/v2/warm/manifests/v1" -o /dev/null
done
cat >"$E2E_DIR/accept.lua" <<'LUA'
wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %.0f %.2f %.2f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.connect + e.read + e.write + e.status + e.timeout))
end
LUA
warm() { # port path -> "req/s p50ms p99ms errors"
    wrk -t 2 -c 64 -d "${seconds}s" -s "$E2E_DIR/accept.lua" "http://127.0.0.1:$1$2" | awk '/^WRK/{print $2, $3, $4, $5}'
}
row_warm() { # label path
    reset_hwm
    read -r fr fp50 fp99 fe <<<"$(warm $ferry_port "$2")"
    local rss; rss=$(hwm)
    read -r rr rp50 rp99 re <<<"$(warm $registry_port "$2")"
    echo "| warm $1, 64 connections, ${seconds} s | $fr req/s, p50 $fp50 ms, p99 $fp99 ms, $fe errors, peak RSS $rss MiB | $rr req/s, p50 $rp50 ms, p99 $rp99 ms, $re errors |"
}
table=("| load | ferry | distribution |" "|---|---|---|")
table+=("$(row_warm "manifest GET" /v2/warm/manifests/v1)")
table+=("$(row_warm "1 MiB blob GET" "/v2/warm/blobs/$digest")")

# 2. Cold: 20 engine images, 10 clients each, all at once.
ctx="$E2E_DIR/ctx"; mkdir -p "$ctx"; cp /bin/busybox "$ctx/"
for i in $(seq 1 20); do
    { echo "FROM scratch"; echo "COPY busybox /bin/busybox"
      for l in 1 2 3; do head -c $((4 * 1024 * 1024)) /dev/urandom >"$ctx/l$l"; echo "COPY l$l /data/l$l"; done; } >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker -H "$d20" build -q -t "cold$i:v1" "$ctx" >/dev/null
done
rm -rf "$ctx"
pullers=()
reset_hwm
for i in $(seq 1 20); do
    python3 bench/pull_clients.py "127.0.0.1:$ferry_port" "cold$i" v1 10 >"$E2E_DIR/cold$i.json" &
    pullers+=($!)
done
wait "${pullers[@]}"   # not the daemons, which run in the background too
cold_errors=0; cold_seconds=0
for i in $(seq 1 20); do
    j=$(cat "$E2E_DIR/cold$i.json")
    cold_errors=$((cold_errors + $(field "$j" errors)))
    cold_seconds=$(python3 -c "print(max($cold_seconds, $(field "$j" seconds)))")
done
exports=$(grep -c "exporting image from the engine" "$E2E_DIR/logs/ferry.log" || true)
direct=$(grep -c "read from the engine's storage" "$E2E_DIR/logs/ferry.log" || true)
table+=("| cold: 200 clients, 20 engine images of 12 MiB at once | $cold_errors errors, $exports exports, $direct direct reads of image metadata, all done in $cold_seconds s, peak RSS $(hwm) MiB | (no engine) |")

# 3. 50 pushers of distinct images.
reset_hwm
pf=$(python3 bench/push_clients.py "127.0.0.1:$ferry_port" 50 3 1024)
pr=$(python3 bench/push_clients.py "127.0.0.1:$registry_port" 50 3 1024)
push_cell() { echo "$(field "$1" errors) errors, $(field "$1" images) images in $(field "$1" seconds) s, $(field "$1" verify_errors) bad blobs read back"; }
table+=("| 50 pushers, distinct 3 MiB images | $(push_cell "$pf"), peak RSS $(hwm) MiB | $(push_cell "$pr") |")
printf '%s\n' "${table[@]}"

# 4. Memory on every path.
if [ "${STRESS_CEILINGS:-1}" != 0 ]; then
    echo
    env -u E2E_DIR BENCH_FERRY="$PWD/target/release/ferry" bench/ceilings.sh 270 200 1000
fi
