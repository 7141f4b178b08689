#!/usr/bin/env bash
# Compares builds of ferry-bench in alternating runs, so the machine's drift falls on each alike.
#
#   scripts/bench-ab.sh ONLY ROUNDS PATTERN DIR...
#
# Each DIR holds a copy of target/release/ferry-bench and target/release/ferry-server from one
# build. Every round runs `DIR/ferry-bench quick` once per DIR, in turn, with
# FERRY_BENCH_ONLY=ONLY (send, recv, wire, memory, many, failure; comma-separated); then the
# figures whose names match the extended regex PATTERN are printed per DIR: the median of the
# rounds' medians, and each round's. FERRY_BENCH_ROWS, FERRY_BENCH_DEVICES and DATABASE_URL
# pass through (DATABASE_URL defaults to the local test database).
#
#   scripts/bench-ab.sh recv 4 'recv-initial-pg-100k' /tmp/before /tmp/after
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
only=$1 rounds=$2 pattern=$3
shift 3
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test} FERRY_BENCH_ONLY=$only
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq 1 "$rounds"); do
    for dir in "$@"; do
        # Lines like "  send-pg   18,650 events/s  (runs: …)": the figure and its median.
        "$dir/ferry-bench" quick 2>&1 | grep -E "^  ($pattern)" | awk -v d="$dir" '{gsub(",", "", $2); print d, $1, $2}' >> "$out"
    done
done
python3 - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    build, figure, value = line.split()
    runs[(figure, build)].append(float(value))
for (figure, build), values in sorted(runs.items()):
    def fmt(v):  # as the table prints figures: large ones whole, small ones to 3 significant digits
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    shown = " / ".join(fmt(v) for v in values)
    print(f"{figure:36s} {build:16s} median {fmt(statistics.median(values)):>12s}   rounds {shown}")
PY
