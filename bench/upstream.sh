#!/usr/bin/env bash
# Pull benchmark of the upstream backend (a pull-through cache) beside the origin itself:
# distribution (Debian's docker-registry 2.8) holds an image of SIZE MiB in 8 layers, and
# containerd's `ctr image pull` fetches it
#   - straight from the origin (warm page cache): the reference;
#   - through ferry with an empty cache (cold: every blob fetched from the origin while it is
#     streamed to ctr) and with a full one (warm);
#   - the same from a second distribution serving that storage over TLS (a CA made here), as
#     every public registry does: ctr, or ferry in front of it, decrypts;
#   - the same, with the (plain HTTP) origin behind bench/throttle.py's link (100 MiB/s for
#     all connections together), as across a network.
# Also ferry's peak RSS over all of it, and its CPU time per pull. Every figure is the best
# of 3 runs (RUNS=N for more), the runs interleaved; then every run and the medians. Prints
# markdown. Usage: bench/upstream.sh [SIZE_MIB]   (root; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fupstream-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-512}
layers=8
runs=${RUNS:-3}
trap 'e2e_cleanup "$own_dir"' EXIT
bench_setup
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
d20="unix://$E2E_DIR/docker20/docker.sock"
reg_port=$(e2e_free_port)
e2e_start_registry origin "$reg_port"
reg="127.0.0.1:$reg_port"
# The TLS origin serves the same storage (distribution keeps no state outside it).
tls_port=$(e2e_free_port)
mkdir -p "$E2E_DIR/origin-tls"; ln -s "$E2E_DIR/origin/data" "$E2E_DIR/origin-tls/data"
e2e_make_server_cert "$E2E_DIR/tls" 127.0.0.1
e2e_start_registry origin-tls "$tls_port" "" 127.0.0.1 "$E2E_DIR/tls"
tls="127.0.0.1:$tls_port"
slow_port=$(e2e_free_port)
e2e_spawn throttle python3 bench/throttle.py "$slow_port" "$reg_port" 100
e2e_wait throttle 10 curl -sf "http://127.0.0.1:$slow_port/v2/"
slow="127.0.0.1:$slow_port"

# The image, pushed to the origin.
ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
DOCKER_BUILDKIT=0 docker -H "$d20" build -q -t "$reg/bench/img:1" "$ctx" >/dev/null
rm -rf "$ctx"
docker -H "$d20" push -q "$reg/bench/img:1" >/dev/null

hosts() { # dir registry target
    mkdir -p "$1/$2"
    printf 'server = "http://127.0.0.1:9"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$3" >"$1/$2/hosts.toml"
}

port=$(e2e_free_port)
f="127.0.0.1:$port"
mkdir -p "$E2E_DIR/ferry"
printf '[cache]\ndir = "%s/ferry/data"\n[[backends]]\ntype = "upstream"\nallow = ["%s", "%s", "%s"]\n[backends.hosts."%s"]\nca_file = "%s"\n' \
    "$E2E_DIR" "$reg" "$tls" "$slow" "$tls" "$E2E_DIR/tls/ca.pem" >"$E2E_DIR/ferry/config.toml"
start_ferry() { # fresh: with an empty cache
    e2e_stop ferry
    [ "$1" != fresh ] || rm -rf "$E2E_DIR/ferry/data"
    e2e_spawn ferry target/release/ferry serve --config "$E2E_DIR/ferry/config.toml" --addr "$f" --log-level warn
    e2e_wait ferry 30 curl -sf "http://$f/v2/"
}
hosts "$E2E_DIR/hosts" "$reg" "$f"
hosts "$E2E_DIR/hosts" "$slow" "$f"
hosts "$E2E_DIR/hosts" "$tls" "$f"
# ctr's own way to the TLS origin.
mkdir -p "$E2E_DIR/hosts-tls/$tls"
printf 'server = "https://%s"\n[host."https://%s"]\n  capabilities = ["pull", "resolve"]\n  ca = "%s"\n' \
    "$tls" "$tls" "$E2E_DIR/tls/ca.pem" >"$E2E_DIR/hosts-tls/$tls/hosts.toml"
direct_via() { [ "$1" != "$tls" ] || echo "$E2E_DIR/hosts-tls"; }

T="$E2E_DIR/times"; mkdir -p "$T"
peak=0
timed_pull "$reg/bench/img:1" "" "$T/warmup"        # the origin's page cache is warm from here on
# Runs interleave (direct, cold, warm, direct, …) so that a drift of the machine's speed over
# the minutes of a run falls on all three alike.
for origin in "$reg" "$tls" "$slow"; do
    for _ in $(seq 1 $runs); do
        timed_pull "$origin/bench/img:1" "$(direct_via "$origin")" "$T/$origin-direct"
        start_ferry fresh
        timed_pull "$origin/bench/img:1" "$E2E_DIR/hosts" "$T/$origin-cold"
        cpu ferry >>"$T/$origin-cold-cpu"
        c0=$(cpu ferry)
        timed_pull "$origin/bench/img:1" "$E2E_DIR/hosts" "$T/$origin-warm"
        echo "$(cpu ferry) - $c0" | bc -l >>"$T/$origin-warm-cpu"
        peak=$(max "$(rss ferry)" "$peak")
    done
done

mibs() { printf '%.0f' "$(echo "$size_mib / $1" | bc -l)"; }
echo
echo "| ctr pull of ${size_mib} MiB in $layers layers (best of $runs) | seconds | ratio | ferry CPU s (mean) | machine's cores busy (mean, of $(nproc)) |"
echo "|---|---|---|---|---|"
for origin in "$reg" "$tls" "$slow"; do
    case $origin in
        "$reg") label="origin on loopback" ;;
        "$tls") label="origin on loopback, TLS" ;;
        *) label="origin behind a throttled link ($(mibs "$(best "$T/$origin-direct")") MiB/s)" ;;
    esac
    direct=$(best "$T/$origin-direct"); cold=$(best "$T/$origin-cold"); warm=$(best "$T/$origin-warm")
    printf '| %s: straight from distribution | %.2f | | | %s |\n' "$label" "$direct" "$(mean "$T/$origin-direct-busy")"
    printf '| %s: through ferry, cold cache | %.2f | %s× direct | %s | %s |\n' "$label" "$cold" "$(ratio "$cold" "$direct")" "$(mean "$T/$origin-cold-cpu")" "$(mean "$T/$origin-cold-busy")"
    printf '| %s: through ferry, warm cache | %.2f | %s× direct | %.2f | %s |\n' "$label" "$warm" "$(ratio "$warm" "$(best "$T/$reg-direct")")" "$(mean "$T/$origin-warm-cpu")" "$(mean "$T/$origin-warm-busy")"
done
echo
echo "| ferry peak RSS (MiB), over every pull | $peak |"
echo "|---|---|"
echo
echo "Every run, sorted (seconds), and the ratios of the medians:"
for origin in "$reg" "$tls" "$slow"; do
    case $origin in "$reg") label="loopback" ;; "$tls") label="loopback, TLS" ;; *) label="behind the link" ;; esac
    for kind in direct cold warm; do echo "- $label $kind: $(sorted "$T/$origin-$kind")"; done
    echo "- $label medians: cold $(ratio "$(median "$T/$origin-cold")" "$(median "$T/$origin-direct")")× direct, warm $(ratio "$(median "$T/$origin-warm")" "$(median "$T/$reg-direct")")× the loopback direct"
done
