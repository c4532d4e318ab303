#!/usr/bin/env bash
# Runs the whole suite (every cargo test binary, then the demo end to end) N times in a row and
# reports each failure with its test name, to find tests that fail only sometimes.
#
#   bash e2e/repeat.sh [N]          (default 10; logs in target/repeat/<run>.log)
#
# Builds once first; each run is `cargo test --no-fail-fast` (so one failure does not hide
# another) followed by e2e/demo.sh. Exits non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
logs=target/repeat
mkdir -p "$logs"
bash e2e/tools.sh >/dev/null
cargo test --locked --no-run --quiet || exit 1
cargo build --locked --quiet --bins || exit 1

green=0
declare -A failed_tests=()
summary=()
for run in $(seq 1 "$runs"); do
  log="$logs/$run.log"
  started=$(date +%s)
  cargo test --locked --no-fail-fast >"$log" 2>&1
  tests_status=$?
  bash e2e/demo.sh >>"$log" 2>&1
  demo_status=$?
  seconds=$(( $(date +%s) - started ))
  # "test name ... FAILED" lines name the failed tests; the binary is the "Running" line before.
  failures=$(awk '/^     Running /{binary=$0; sub(/^ *Running /,"",binary); sub(/ \(.*$/,"",binary)} / \.\.\. FAILED$/{sub(/^test /,""); sub(/ \.\.\. FAILED$/,""); print binary": "$0}' "$log")
  if [ "$demo_status" -ne 0 ]; then
    failures="${failures:+$failures
}e2e/demo.sh"
  fi
  if [ "$tests_status" -eq 0 ] && [ "$demo_status" -eq 0 ]; then
    green=$((green + 1))
    line="run $run/$runs: green in ${seconds}s"
  else
    [ -n "$failures" ] || failures="cargo test exited $tests_status (no test named: see $log)"
    line="run $run/$runs: FAILED in ${seconds}s: $(echo "$failures" | paste -sd ';' -)"
    while IFS= read -r name; do
      failed_tests["$name"]=$(( ${failed_tests["$name"]:-0} + 1 ))
    done <<<"$failures"
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "repeat: $green of $runs runs green ($(uname -n), $(nproc) cores)"
for name in "${!failed_tests[@]}"; do
  echo "  failed ${failed_tests[$name]}x: $name"
done
[ "$green" -eq "$runs" ]
