#!/usr/bin/env bash
# Summarizes an e2e run's output (`just e2e` pipes it here): scenarios per area and backend,
# skipped backends, failures.
set -euo pipefail
log="$1"
passed() { grep -Ec "^test .*::$1 \.\.\. ok$" "$log" || true; }
failed=$(grep -Ec '^test .* \.\.\. FAILED$' "$log" || true)
skipped=$(grep -c 'SKIPPED (PostgreSQL variant)' "$log" || true)
echo
echo "== e2e summary =="
printf '%-10s %8s %8s\n' area sqlite postgres
for area in $(grep -Eo '^test [a-z_]+::.*::(sqlite|postgres) ' "$log" | sed 's/^test //; s/::.*//' | sort -u); do
  s=$(grep -Ec "^test $area::.*::sqlite \.\.\. ok$" "$log" || true)
  p=$(grep -Ec "^test $area::.*::postgres \.\.\. ok$" "$log" || true)
  printf '%-10s %8s %8s\n' "$area" "$s" "$p"
done
echo "passed: sqlite $(passed sqlite), postgres $(passed postgres); failed: $failed; PostgreSQL variants skipped: $skipped"
echo "model-based cases per backend: ${FERRY_MODEL_CASES:-default}"
