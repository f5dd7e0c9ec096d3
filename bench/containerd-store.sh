#!/usr/bin/env bash
# Docker 28 on its containerd image store (the default of Docker 29 and Docker Desktop),
# through ferry's default chain with nothing configured: a cold pull (ctr with a hosts.toml
# mirror, the k3s path) side by side with a pull of the same image from a warm distribution,
# ferry's peak RSS, and `docker push` of an image the engine holds into a fresh ferry vs into
# a fresh distribution (Tilt's loop). Best of RUNS runs (default 5). Prints a markdown table.
# Usage: [RUNS=5] bench/containerd-store.sh [SIZE_MIB]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fctdstore-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-270}
layers=8
runs=${RUNS:-5}
trap 'e2e_cleanup "$own_dir"' EXIT
bench_setup
sid=$(e2e_fetch_sid)
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" e2e_start_containerd ctd21 "$sid/usr/bin/containerd"
echo '{"features": {"containerd-snapshotter": true}}' >"$E2E_DIR/docker28.json"
PATH="$sid/usr/bin:$sid/usr/sbin:$PATH" DOCKERD="$sid/usr/sbin/dockerd" \
    e2e_start_dockerd docker28 ctd21 "$E2E_DIR/docker28.json"
engine="unix://$E2E_DIR/docker28/docker.sock"

ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
DOCKER_BUILDKIT=0 docker -H "$engine" build -q -t benchimg:1 "$ctx" >/dev/null 2>&1
rm -rf "$ctx"

# A registry of its own on a free port; prints its address.
fresh_registry() { # name
    local port; port=$(e2e_free_port)
    e2e_stop "$1"; rm -rf "${E2E_DIR:?}/$1"
    e2e_start_registry "$1" "$port" >/dev/null
    echo "127.0.0.1:$port"
}
# A fresh ferry (empty data directory), the default chain on the engine; prints its address.
fresh_ferry() { # name
    local port; port=$(e2e_free_port)
    e2e_stop "$1"; rm -rf "${E2E_DIR:?}/$1"; mkdir -p "$E2E_DIR/$1"
    printf '[cache]\ndir = "%s/%s/data"\n' "$E2E_DIR" "$1" >"$E2E_DIR/$1/config.toml"
    DOCKER_HOST="$engine" e2e_spawn "$1" target/release/ferry serve --config "$E2E_DIR/$1/config.toml" \
        --addr "127.0.0.1:$port" --log-level info
    e2e_wait "$1" 30 curl -sf "http://127.0.0.1:$port/v2/"
    echo "127.0.0.1:$port"
}
hosts() { # dir target
    mkdir -p "$1/docker.io"
    printf 'server = "http://127.0.0.1:9"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$2" >"$1/docker.io/hosts.toml"
}
timed_push() { # registry times-file
    local t0 t1
    docker -H "$engine" tag benchimg:1 "$1/app:1"
    t0=$(now); docker -H "$engine" push -q "$1/app:1" >/dev/null; t1=$(now)
    docker -H "$engine" rmi "$1/app:1" >/dev/null
    secs "$t0" "$t1" >>"$2"
}

T="$E2E_DIR/times"; mkdir -p "$T"
reg=$(fresh_registry warm)
docker -H "$engine" tag benchimg:1 "$reg/img:1" && docker -H "$engine" push -q "$reg/img:1" >/dev/null
timed_pull "$reg/img:1" "" "$T/warmup"
peak=0; exports=0
for _ in $(seq 1 "$runs"); do
    timed_pull "$reg/img:1" "" "$T/reg"
    f=$(fresh_ferry ferry)
    hosts "$E2E_DIR/hosts" "$f"
    timed_pull docker.io/library/benchimg:1 "$E2E_DIR/hosts" "$T/ferry"
    peak=$(max "$(rss ferry)" "$peak")
    exports=$((exports + $(grep -c 'exporting image' "$E2E_DIR/logs/ferry.log" || true)))
done
for _ in $(seq 1 "$runs"); do
    timed_push "$(fresh_registry pushreg)" "$T/push-reg"
    f=$(fresh_ferry pushferry)
    timed_push "$f" "$T/push-ferry"
    uploads=$(grep -c '/blobs/uploads/' "$E2E_DIR/logs/pushferry.log" || true)
done
r=$(best "$T/reg"); c=$(best "$T/ferry"); pr=$(best "$T/push-reg"); pf=$(best "$T/push-ferry")
echo "| Docker 28 containerd store, ${size_mib} MiB / $layers layers | warm distribution pull | ferry cold pull (default chain) | ratio | peak RSS | exports | docker push to distribution | docker push to ferry | ratio | blob uploads to ferry |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '| best of %s | %.2f s | %.2f s | %s× | %s MiB | %s | %.2f s | %.2f s | %s× | %s |\n' "$runs" "$r" "$c" "$(ratio "$c" "$r")" \
    "$peak" "$exports" "$pr" "$pf" "$(ratio "$pf" "$pr")" "$uploads"
echo "runs: distribution $(sorted "$T/reg") | ferry $(sorted "$T/ferry") | push to distribution $(sorted "$T/push-reg") | push to ferry $(sorted "$T/push-ferry")"
