#!/usr/bin/env bash
# Pull benchmarks of the docker and containerd backends, side by side with distribution
# (Debian's docker-registry 2.8) in one run, through the k3s path: containerd's `ctr image pull`
# with a hosts.toml mirror. Prints a markdown table.
#
#  docker backend (Docker 20.10, legacy export), an image of SIZE MiB in 8 layers:
#   - floor: `docker save > /dev/null` + a pull of the same image from a warm registry
#   - today: `docker push` into the registry + the pull
#   - ferry cold (empty cache) and warm; the registry pull; ferry's peak RSS
#  containerd backend (Docker 26.1 + containerd 1.7, containerd image store):
#   - fast path: ferry with containerd first (namespace moby) vs the registry pull
#   - heal: a missing 256 MiB layer served through ferry vs fetched straight from the registry,
#     on loopback and behind a throttled link (bench/throttle.py)
#
# Every figure is the best of 3 runs. Usage: bench/pull.sh [SIZE_MIB]   (root; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fpull-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-512}
layers=8
trap 'e2e_cleanup "$own_dir"' EXIT
bench_setup
command -v python3 >/dev/null || apt-get install -y -q python3 >/dev/null
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
d20="unix://$E2E_DIR/docker20/docker.sock"
trixie=$(e2e_fetch_trixie)
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" e2e_start_containerd ctd17 "$trixie/usr/bin/containerd"
echo '{"features": {"containerd-snapshotter": true}}' >"$E2E_DIR/docker26.json"
PATH="$trixie/usr/bin:$trixie/usr/sbin:$PATH" DOCKERD="$trixie/usr/sbin/dockerd" \
    e2e_start_dockerd docker26 ctd17 "$E2E_DIR/docker26.json"
d26="unix://$E2E_DIR/docker26/docker.sock"
reg_port=$(e2e_free_port)
e2e_start_registry registry "$reg_port"
reg="127.0.0.1:$reg_port"

ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
DOCKER_BUILDKIT=0 docker -H "$d20" build -q -t benchimg:1 "$ctx" >/dev/null
rm -rf "$ctx"

hosts() { # dir registry target
    mkdir -p "$1/$2"
    printf 'server = "https://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$2" "$3" >"$1/$2/hosts.toml"
}
start_ferry() { # name config-body
    local port; port=$(e2e_free_port)
    mkdir -p "$E2E_DIR/$1"
    printf '[cache]\ndir = "%s/%s/data"\n%s\n' "$E2E_DIR" "$1" "$2" >"$E2E_DIR/$1/config.toml"
    e2e_spawn "$1" target/release/ferry serve --config "$E2E_DIR/$1/config.toml" --addr "127.0.0.1:$port" --log-level warn
    e2e_wait "$1" 30 curl -sf "http://127.0.0.1:$port/v2/"
    echo "127.0.0.1:$port"
}

runs=3
T="$E2E_DIR/times"; mkdir -p "$T"

# --- docker backend ---
for _ in $(seq 1 $runs); do
    sync; t0=$(now); docker -H "$d20" save benchimg:1 >/dev/null; t1=$(now); secs "$t0" "$t1" >>"$T/save"
done
# Each push goes to an empty registry of its own, so no layer is there already.
for _ in $(seq 1 $runs); do
    name="push$(date +%s%N)"; port=$(e2e_free_port)
    e2e_start_registry "$name" "$port" >/dev/null
    docker -H "$d20" tag benchimg:1 "127.0.0.1:$port/bench/img:1"
    sync; t0=$(now); docker -H "$d20" push -q "127.0.0.1:$port/bench/img:1" >/dev/null; t1=$(now)
    secs "$t0" "$t1" >>"$T/push"
    docker -H "$d20" rmi "127.0.0.1:$port/bench/img:1" >/dev/null
    e2e_stop "$name"; rm -rf "${E2E_DIR:?}/$name"
done
docker -H "$d20" tag benchimg:1 "$reg/bench/img:1" && docker -H "$d20" push -q "$reg/bench/img:1" >/dev/null
timed_pull "$reg/bench/img:1" "" "$T/warmup"        # the registry's page cache is warm from here on
for _ in $(seq 1 $runs); do timed_pull "$reg/bench/img:1" "" "$T/reg"; done

f=$(start_ferry ferry-docker "[[backends]]
type = \"docker\"
socket = \"$d20\"")
hosts "$E2E_DIR/hosts-docker" docker.io "$f"
docker_rss=0
for _ in $(seq 1 $runs); do
    # Cold: ferry restarted on an empty cache.
    e2e_stop ferry-docker; rm -rf "$E2E_DIR/ferry-docker/data"
    e2e_spawn ferry-docker target/release/ferry serve --config "$E2E_DIR/ferry-docker/config.toml" --addr "$f" --log-level warn
    e2e_wait ferry-docker 30 curl -sf "http://$f/v2/"
    timed_pull docker.io/library/benchimg:1 "$E2E_DIR/hosts-docker" "$T/cold"
    docker_rss=$(max "$(rss ferry-docker)" "$docker_rss")
done
for _ in $(seq 1 $runs); do timed_pull docker.io/library/benchimg:1 "$E2E_DIR/hosts-docker" "$T/warm"; done
docker_rss=$(max "$(rss ferry-docker)" "$docker_rss")
save=$(best "$T/save"); push=$(best "$T/push"); reg_pull=$(best "$T/reg")
cold=$(best "$T/cold"); warm=$(best "$T/warm")
floor=$(echo "$save + $reg_pull" | bc -l)
today=$(echo "$push + $reg_pull" | bc -l)

# --- containerd backend: fast path (ferry keeps no cache here: every pull is cold) ---
docker -H "$d26" pull -q "$reg/bench/img:1" >/dev/null
# The heals below fetch from the registry and from a throttled link in front of it: loopback
# origins are contacted only when named.
slow_port=$(e2e_free_port)
f=$(start_ferry ferry-fast "[origins]
allow = [\"$reg\", \"127.0.0.1:$slow_port\"]
[[backends]]
type = \"containerd\"
socket = \"$E2E_DIR/ctd17/containerd.sock\"
namespace = \"moby\"
[[backends]]
type = \"docker\"
socket = \"$d26\"")
hosts "$E2E_DIR/hosts-fast" "$reg" "$f"
for _ in $(seq 1 $runs); do
    timed_pull "$reg/bench/img:1" "$E2E_DIR/hosts-fast" "$T/fast"
    timed_pull "$reg/bench/img:1" "" "$T/reg2"
done
fast=$(best "$T/fast"); reg_pull2=$(best "$T/reg2")

# --- containerd backend: heal of a missing 256 MiB layer (a new one each run) ---
# Makes content in Docker 26's namespace name the blob, as an image's manifest names a layer
# the store lacks (moby#49473): ferry heals only blobs that content of the namespace names.
name_in_moby() { # digest
    local body named i
    body="{\"names\":\"$1\",\"nonce\":\"$(date +%s%N)\"}"
    named="sha256:$(printf '%s' "$body" | sha256sum | cut -d' ' -f1)"
    for i in 1 2 3; do   # containerd may collect it between the ingest and the label
        printf '%s' "$body" | ctr -a "$E2E_DIR/ctd17/containerd.sock" -n moby content ingest \
            --expected-size ${#body} --expected-digest "$named" "bench-$(date +%s%N)"
        ctr -a "$E2E_DIR/ctd17/containerd.sock" -n moby content label "$named" \
            containerd.io/gc.root=bench "containerd.io/gc.ref.content.l.0=$1" >/dev/null && return
    done
    return 1
}
# Times, $runs times, a fresh 256 MiB blob fetched from ORIGIN directly and healed through
# ferry from it; appends to $T/NAME-direct and $T/NAME-heal.
measure_heal() { # name origin (host:port in front of the registry)
    local dg t0 t1
    for _ in $(seq 1 $runs); do
        head -c $((256 * 1024 * 1024)) /dev/urandom >"$E2E_DIR/missing"
        dg=$(e2e_upload_blob "$reg" "bench/$1" "$E2E_DIR/missing")
        rm -f "$E2E_DIR/missing"
        name_in_moby "$dg"
        curl -sf -o /dev/null "http://$reg/v2/bench/$1/blobs/$dg"  # warm the registry's page cache
        t0=$(now); curl -sf -o /dev/null "http://$2/v2/bench/$1/blobs/$dg"; t1=$(now); secs "$t0" "$t1" >>"$T/$1-direct"
        t0=$(now); curl -sf -o /dev/null "http://$f/v2/bench/$1/blobs/$dg?ns=$2"; t1=$(now); secs "$t0" "$t1" >>"$T/$1-heal"
    done
}
measure_heal heal "$reg"
direct=$(best "$T/heal-direct"); heal=$(best "$T/heal-heal")

# The same through a throttled link to the origin (bench/throttle.py in front of the registry,
# capped at 100 MiB/s; Python's own overhead brings it lower), as across a network.
e2e_spawn throttle python3 bench/throttle.py "$slow_port" "$reg_port" 100
e2e_wait throttle 10 curl -sf "http://127.0.0.1:$slow_port/v2/"
measure_heal slow "127.0.0.1:$slow_port"
slow_direct=$(best "$T/slow-direct"); slow_heal=$(best "$T/slow-heal")
heal_rss=$(rss ferry-fast)

echo
echo "| measurement (${size_mib} MiB, $layers layers; best of $runs) | seconds | ratio |"
echo "|---|---|---|"
printf '| docker save > /dev/null | %.2f | |\n' "$save"
printf '| docker push into distribution | %.2f | |\n' "$push"
printf '| pull from warm distribution | %.2f | |\n' "$reg_pull"
printf '| floor = save + pull | %.2f | |\n' "$floor"
printf '| today = push + pull | %.2f | |\n' "$today"
printf '| ferry cold pull (docker backend, Docker 20) | %.2f | %s× floor, %s× today |\n' "$cold" "$(ratio "$cold" "$floor")" "$(ratio "$cold" "$today")"
printf '| ferry warm pull | %.2f | %s× distribution |\n' "$warm" "$(ratio "$warm" "$reg_pull")"
printf '| ferry fast path cold pull (containerd first, Docker 26) | %.2f | %s× distribution (%.2f s) |\n' "$fast" "$(ratio "$fast" "$reg_pull2")" "$reg_pull2"
printf '| 256 MiB blob straight from distribution | %.3f | |\n' "$direct"
printf '| 256 MiB missing blob healed through ferry | %.3f | %s× direct |\n' "$heal" "$(ratio "$heal" "$direct")"
printf '| 256 MiB blob from distribution behind a throttled link (%.0f MiB/s) | %.3f | |\n' "$(echo "256 / $slow_direct" | bc -l)" "$slow_direct"
printf '| 256 MiB missing blob healed through ferry, origin behind that link | %.3f | %s× direct |\n' "$slow_heal" "$(ratio "$slow_heal" "$slow_direct")"
echo
echo "| ferry peak RSS (MiB) | |"
echo "|---|---|"
echo "| docker backend, cold + warm pull | $docker_rss |"
echo "| containerd backend, fast path + heal | $heal_rss |"
