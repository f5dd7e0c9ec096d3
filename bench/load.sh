#!/usr/bin/env bash
# Load on ferry's default chain (docker backend on Docker 20.10, then the push store), as a
# hostile network would bring it. Prints a markdown table.
#  1. 200 clients at once pull one cold image of SIZE MiB (8 layers): errors (every blob is
#     hash-checked), exports (must be 1), ferry's peak RSS.
#  2. 1000 slow connections (500 idle, 500 slowloris) held for 45 s while a normal client
#     pulls the same image: the normal client's time, against its time with no load.
# Usage: bench/load.sh [SIZE_MIB] [CLIENTS]   (root; installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."
# A directory of its own, removed at the end (set E2E_DIR to keep one).
own_dir=; [ -n "${E2E_DIR:-}" ] || own_dir=/tmp/fload-$$
export E2E_DIR=${E2E_DIR:-$own_dir}
source tests/env/lib.sh
source bench/lib.sh
size_mib=${1:-270}
clients=${2:-200}
layers=8
e2e_install_packages
trap 'e2e_cleanup "$own_dir"' EXIT

cargo build --release -q -p ferry-server
e2e_start_containerd ctd16
e2e_start_dockerd docker20 ctd16
d20="unix://$E2E_DIR/docker20/docker.sock"

ctx="$E2E_DIR/ctx"; bench_image_context "$ctx" "$size_mib" "$layers"
DOCKER_BUILDKIT=0 docker -H "$d20" build -q -t load:v1 "$ctx" >/dev/null
rm -rf "$ctx"

port=$(e2e_free_port)
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
e2e_spawn ferry target/release/ferry serve --config "$E2E_DIR/ferry/ferry.toml" --addr "127.0.0.1:$port"
e2e_wait ferry 30 curl -sf "http://127.0.0.1:$port/v2/"
pid=$(cat "$E2E_DIR/pids/ferry.pid")
hwm() { awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$pid/status"; }

cold=$(python3 bench/pull_clients.py "127.0.0.1:$port" load v1 "$clients")
exports=$(grep -c "exporting image from the engine" "$E2E_DIR/logs/ferry.log" || true)
rss_cold=$(hwm)

alone=$(python3 bench/pull_clients.py "127.0.0.1:$port" load v1 1)
(ulimit -n 8192; python3 tests/env/slow_clients.py 127.0.0.1 "$port" 500 500 45 >"$E2E_DIR/slow.json") &
slow_pid=$!
sleep 3
loaded=$(python3 bench/pull_clients.py "127.0.0.1:$port" load v1 1)
wait "$slow_pid"
rss_all=$(hwm)
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

echo "### ferry under load — $(date -u +%Y-%m-%d), $(nproc) cores, image ${size_mib} MiB in $layers layers"
echo
echo "| what | result |"
echo "|---|---|"
echo "| $clients clients pull the cold image at once | $(field "$cold" errors) errors, $(field "$cold" bytes) bytes hash-checked in $(field "$cold" seconds) s |"
echo "| exports for those $clients pulls | $exports |"
echo "| ferry peak RSS after them | ${rss_cold} MiB |"
echo "| one client's warm pull, no load | $(field "$alone" seconds) s, $(field "$alone" errors) errors |"
echo "| the same while 1000 slow connections are held | $(field "$loaded" seconds) s, $(field "$loaded" errors) errors |"
echo "| slow connections: held / closed by ferry's timeouts | $(cat "$E2E_DIR/slow.json") |"
echo "| ferry peak RSS at the end | ${rss_all} MiB |"
