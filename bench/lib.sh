# Helpers the pull benchmarks share. Source after tests/env/lib.sh; the timed pulls go to the
# containerd started by bench_start_client, at $client.

# Installs what the benchmarks run, builds ferry for them and starts the client containerd.
bench_setup() {
    e2e_install_packages
    command -v bc >/dev/null || apt-get install -y -q bc >/dev/null
    cargo build --release -q -p ferry-server
    # Every timed pull removes its image and content after it, so the next one fetches again.
    e2e_start_containerd client
    client="$E2E_DIR/client/containerd.sock"
}

# Writes into DIR the build context of the benchmarks' image: busybox + LAYERS layers of
# random (incompressible) data, SIZE_MIB in all.
bench_image_context() { # dir size-mib layers
    local i
    mkdir -p "$1"; cp /bin/busybox "$1/"
    { echo "FROM scratch"; echo "COPY busybox /bin/busybox"
      for i in $(seq 1 "$3"); do
          head -c $(($2 * 1024 * 1024 / $3)) /dev/urandom >"$1/l$i"; echo "COPY l$i /data/l$i"
      done
      echo 'CMD ["/bin/busybox", "true"]'; } >"$1/Dockerfile"
}

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l; }
# The machine's busy CPU seconds so far (every process: user, nice, system, irq, softirq).
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu /{printf "%.2f\n", ($2 + $3 + $4 + $7 + $8) / hz}' /proc/stat; }
# Times one ctr pull (with unpack) of $1 into a fresh namespace, through hosts dir $2 (or
# plain HTTP when $2 is empty), appending the seconds to file $3 and the machine's busy
# cores over it to $3-busy. Dirty pages are flushed before, and the namespace's image,
# content and snapshots removed after, so one pull's writeback does not slow the next.
timed_pull() { # image hosts-dir times-file
    local ns t0 t1 b0 b1; ns="b$(date +%s%N)"
    sync
    b0=$(busy); t0=$(now)
    if [ -n "$2" ]; then
        ctr -a "$client" -n "$ns" image pull --hosts-dir "$2" "$1" >/dev/null
    else
        ctr -a "$client" -n "$ns" image pull --plain-http "$1" >/dev/null
    fi
    t1=$(now); b1=$(busy)
    secs "$t0" "$t1" >>"$3"
    echo "($b1 - $b0) / ($t1 - $t0)" | bc -l >>"$3-busy"
    ctr -a "$client" -n "$ns" image rm --sync "$1" >/dev/null
    ctr -a "$client" -n "$ns" content ls -q | xargs -r ctr -a "$client" -n "$ns" content rm >/dev/null
    sync
}

# Peak RSS (MiB) and CPU seconds so far (user + system) of the daemon started as NAME.
rss() { awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$(cat "$E2E_DIR/pids/$1.pid")/status"; }
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / hz}' "/proc/$(cat "$E2E_DIR/pids/$1.pid")/stat"; }

# Figures over a file of one number per line, and of two numbers.
best() { sort -n "$1" | head -1; }
mean() { awk '{s += $1} END {printf "%.2f", s / NR}' "$1"; }
median() { sort -n "$1" | awk '{v[NR] = $1} END {printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
sorted() { sort -n "$1" | awk '{printf "%s%.2f", (NR > 1 ? " " : ""), $1}'; }
ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
max() { echo "if ($1 > $2) $1 else $2" | bc -l; }
