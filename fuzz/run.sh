#!/usr/bin/env bash
# Runs every fuzz target (libFuzzer through cargo fuzz) for SECONDS each (default 600), from
# the seeds in fuzz/corpus/<target>; findings land in fuzz/artifacts/<target>.
# cargo fuzz wants a nightly compiler for its -Z flags: RUSTC_BOOTSTRAP lets this machine's
# stable one take them, and no sanitizer is asked for (stable ships none to link).
# Usage: fuzz/run.sh [SECONDS] [TARGET ...]   (FUZZ_QUICK=1: a debug build, for the
# short pass of the test command, which builds faster than it fuzzes)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(names manifests ranges exports tarsplit)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
opt=(-O)
[ "${FUZZ_QUICK:-}" = 1 ] && opt=(--dev)
cargo fuzz build -s none "${opt[@]}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%-10s %8s %10s %8s %s\n' target seconds runs corpus result
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "corpus/$t"
    cp -r "corpus/$t/." "$work/$t/" 2>/dev/null || true
    log="$work/$t.log"
    if cargo fuzz run -s none "${opt[@]}" "$t" "$work/$t" -- -max_total_time="$seconds" -max_len=1048576 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FOUND (see fuzz/artifacts/$t and $log)"
        cp "$log" "artifacts/$t.log" 2>/dev/null || true
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    printf '%-10s %8s %10s %8s %s\n' "$t" "$seconds" "$runs" "$(ls "$work/$t" | wc -l)" "$result"
    [ "$result" = ok ] || exit 1
done
