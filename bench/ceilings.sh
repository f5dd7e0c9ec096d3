#!/usr/bin/env bash
# ferry's memory under many streams, on each path a blob can take. Prints a markdown table.
# Each path gets a ferry of its own, fresh, and each row's peak RSS is its own (the kernel's
# high-water mark is reset before it):
#  - direct reads: the docker backend assembling layers from Docker 20's overlay2 storage;
#  - export: the same backend with direct reads off (one `docker save`, then the cache);
#  - push store: the image pushed into ferry first;
#  - upstream: a ferry whose upstream cache fetches from distribution (docker-registry), cold.
# On each, CLIENTS clients pull the cold SIZE MiB image at once (every blob hash-checked);
# then STREAMS clients GET its largest layer at once from the push store and by direct reads.
# Usage: bench/ceilings.sh [SIZE_MIB] [CLIENTS] [STREAMS]   (root; installs what it needs)
#        BENCH_FERRY=path/to/ferry to measure another build (the static one).
set -euo pipefail
cd "$(dirname "$0")/.."
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fceil-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-270} clients=${2:-200} streams=${3:-1000}
layers=8
e2e_install_packages
trap 'e2e_cleanup "$own_dir"' EXIT
ferry=${BENCH_FERRY:-target/release/ferry}
[ -n "${BENCH_FERRY:-}" ] || cargo build --release -q -p ferry-server

e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
d20="unix://$E2E_DIR/docker20/docker.sock"
ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
DOCKER_BUILDKIT=0 docker -H "$d20" build -q -t load:v1 "$ctx" >/dev/null
rm -rf "$ctx"

start_ferry() { # name toml -> port
    local port; port=$(e2e_free_port)
    mkdir -p "$E2E_DIR/$1"
    printf '[cache]\ndir = "%s"\n%s' "$E2E_DIR/$1/data" "$2" >"$E2E_DIR/$1/ferry.toml"
    e2e_spawn "$1" "$ferry" serve --config "$E2E_DIR/$1/ferry.toml" --addr "127.0.0.1:$port"
    e2e_wait "$1" 30 curl -sf "http://127.0.0.1:$port/v2/"
    echo "$port"
}
pid_of() { cat "$E2E_DIR/pids/$1.pid"; }
hwm() { awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$(pid_of "$1")/status"; }
reset_hwm() { echo 5 >"/proc/$(pid_of "$1")/clear_refs"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
# A row's failures, on stderr.
why() { [ "$(field "$1" errors)" = 0 ] || echo "$2: $(field "$1" first_errors)" >&2; }
exports() { grep -c "exporting image from the engine" "$E2E_DIR/logs/$1.log" || true; }
rows=()
pulls() { # label ferry-name port [query]
    reset_hwm "$2"
    local out; out=$(python3 bench/pull_clients.py "127.0.0.1:$3" load v1 "$clients" "${4:-}")
    why "$out" "$1"
    rows+=("| $1: $clients cold pulls at once | $(field "$out" errors) errors | $(field "$out" seconds) s | $(exports "$2") | $(hwm "$2") MiB |")
}
blobs() { # label ferry-name port digest
    reset_hwm "$2"
    local out; out=$(ulimit -n "$(ulimit -Hn)"; python3 bench/blob_clients.py "127.0.0.1:$3" load "$4" "$streams")
    why "$out" "$1"
    rows+=("| $1: $streams streams of one $((size_mib / layers)) MiB layer at once | $(field "$out" errors) errors | $(field "$out" seconds) s | $(exports "$2") | $(hwm "$2") MiB |")
}

docker_toml=$(printf '[[backends]]\ntype = "docker"\nsocket = "%s"\n' "$d20")
direct=$(start_ferry direct "$docker_toml")
pulls "direct reads" direct "$direct"
export_port=$(start_ferry export "$docker_toml"$'\ndirect_reads = false\n')
pulls "export" export "$export_port"
push=$(start_ferry push $'[[backends]]\ntype = "push"\n')
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
    "docker://127.0.0.1:$direct/load:v1" "docker://127.0.0.1:$push/load:v1"
pulls "push store" push "$push"
origin=$(e2e_free_port)
e2e_start_registry registry "$origin"
skopeo copy -q --src-tls-verify=false --dest-tls-verify=false \
    "docker://127.0.0.1:$direct/load:v1" "docker://127.0.0.1:$origin/load:v1"
up=$(start_ferry upstream "$(printf '[[backends]]\ntype = "upstream"\nallow = ["127.0.0.1:%s"]\n[backends.hosts."127.0.0.1:%s"]\nendpoint = "http://127.0.0.1:%s"\n' "$origin" "$origin" "$origin")")
pulls "upstream" upstream "$up" "?ns=127.0.0.1:$origin"
largest() { # port: the digest of the image's largest layer there
    curl -sf -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        "http://127.0.0.1:$1/v2/load/manifests/v1" |
        python3 -c 'import json,sys; print(max(json.load(sys.stdin)["layers"], key=lambda l: l["size"])["digest"])'
}
blobs "push store" push "$push" "$(largest "$push")"
blobs "direct reads" direct "$direct" "$(largest "$direct")"

echo "### ferry's memory under many streams — $(date -u +%Y-%m-%d), $(nproc) cores, $("$ferry" --version), image ${size_mib} MiB in $layers layers"
echo
echo "| path and load | errors | time | exports | peak RSS |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
