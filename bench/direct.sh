#!/usr/bin/env bash
# Cold pulls with no export (direct reads), side by side with the export path and with a pull
# from a warm distribution (Debian's docker-registry), through the k3s path (ctr with a
# hosts.toml mirror), on Docker 20 (overlay2) and rootful Podman (vfs). Also the time to the
# first manifest of a 5-layer image on a fresh ferry, and ferry's peak RSS. Best of 3 runs.
# Prints a markdown table. Usage: [ENGINES="docker20 podman"] bench/direct.sh [SIZE_MIB]   (root)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fdirect-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-512}
layers=8
trap 'e2e_cleanup "$own_dir"' EXIT
bench_setup
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
e2e_start_podman podman
reg_port=$(e2e_free_port)
e2e_start_registry registry "$reg_port"
reg="127.0.0.1:$reg_port"
engines=()
for e in ${ENGINES:-docker20 podman}; do   # ENGINES=podman bench/direct.sh: one engine only
    case $e in
        docker20) engines+=("docker20 unix://$E2E_DIR/docker20/docker.sock docker") ;;
        podman) engines+=("podman unix://$E2E_DIR/podman/podman.sock podman") ;;
    esac
done

ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
small="$E2E_DIR/small"; mkdir -p "$small"; cp /bin/busybox "$small/"
{ echo "FROM scratch"; echo "COPY busybox /bin/busybox"
  for i in 1 2 3 4; do echo "small $i" >"$small/s$i"; echo "COPY s$i /data/s$i"; done; } >"$small/Dockerfile"
for e in "${engines[@]}"; do
    read -r _ sock cli <<<"$e"
    if [ "$cli" = docker ]; then
        DOCKER_BUILDKIT=0 docker -H "$sock" build -q -t benchimg:1 "$ctx" >/dev/null
        DOCKER_BUILDKIT=0 docker -H "$sock" build -q -t five:1 "$small" >/dev/null
    else
        podman --url "$sock" build -q -t benchimg:1 "$ctx" >/dev/null
        podman --url "$sock" build -q -t five:1 "$small" >/dev/null
    fi
done
rm -rf "$ctx" "$small"

# A fresh ferry (empty cache) on engine socket $2, direct reads $3; prints its address.
fresh_ferry() { # name socket direct
    local port; port=$(e2e_free_port)
    e2e_stop "$1"; rm -rf "${E2E_DIR:?}/$1"; mkdir -p "$E2E_DIR/$1"
    printf '[cache]\ndir = "%s/%s/data"\n[[backends]]\ntype = "docker"\nsocket = "%s"\ndirect_reads = %s\n' \
        "$E2E_DIR" "$1" "$2" "$3" >"$E2E_DIR/$1/config.toml"
    e2e_spawn "$1" target/release/ferry serve --config "$E2E_DIR/$1/config.toml" --addr "127.0.0.1:$port" --log-level warn
    e2e_wait "$1" 30 curl -sf "http://127.0.0.1:$port/v2/"
    echo "127.0.0.1:$port"
}
hosts() { # dir target
    mkdir -p "$1/docker.io"
    printf 'server = "http://127.0.0.1:9"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$2" >"$1/docker.io/hosts.toml"
}

T="$E2E_DIR/times"; mkdir -p "$T"
echo "| engine | warm distribution pull | ferry cold, direct | ratio | ferry cold, export | first manifest (5 layers), direct | peak RSS, direct |"
echo "|---|---|---|---|---|---|---|"
for e in "${engines[@]}"; do
    read -r name sock cli <<<"$e"
    # The same image in a warm distribution.
    if [ "$cli" = docker ]; then
        docker -H "$sock" tag benchimg:1 "$reg/$name/img:1" && docker -H "$sock" push -q "$reg/$name/img:1" >/dev/null
    else
        podman --url "$sock" push -q --tls-verify=false benchimg:1 "docker://$reg/$name/img:1" >/dev/null
    fi
    timed_pull "$reg/$name/img:1" "" "$T/$name-warmup"
    for _ in 1 2 3; do timed_pull "$reg/$name/img:1" "" "$T/$name-reg"; done
    peak=0
    for mode in true false; do
        for _ in 1 2 3; do
            f=$(fresh_ferry "ferry-$name-$mode" "$sock" "$mode")
            hosts "$E2E_DIR/hosts-$name-$mode" "$f"
            timed_pull docker.io/library/benchimg:1 "$E2E_DIR/hosts-$name-$mode" "$T/$name-$mode"
            [ "$mode" = false ] || peak=$(max "$(rss "ferry-$name-$mode")" "$peak")
        done
    done
    for _ in 1 2 3; do
        f=$(fresh_ferry "ferry-$name-first" "$sock" true)
        curl -s -o /dev/null -w '%{time_total}\n' -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
            "http://$f/v2/five/manifests/1" >>"$T/$name-first"
    done
    r=$(best "$T/$name-reg"); d=$(best "$T/$name-true"); x=$(best "$T/$name-false"); m=$(best "$T/$name-first")
    printf '| %s | %.2f s | %.2f s | %s× | %.2f s | %.0f ms | %s MiB |\n' "$name" "$r" "$d" "$(ratio "$d" "$r")" "$x" \
        "$(echo "$m * 1000" | bc -l)" "$peak"
done
