#!/usr/bin/env bash
# `make test` (and `.ci/run`): every phase in order, each timed; the first failure stops the run.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
timings=()
phase() {
  local name=$1
  shift
  local begun=$SECONDS
  echo "test: == $name"
  "$@"
  timings+=("$(printf '%-44s %5d s' "$name" $((SECONDS - begun)))")
  echo "test: $name took $((SECONDS - begun)) s"
}

phase "tools (kubectl, helm, moto, control plane)" bash e2e/tools.sh
phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo test (build and suites)" cargo test --locked
phase "make demo, end to end (e2e/demo.sh)" bash e2e/demo.sh
phase "make e2e, real control plane (e2e/real.sh)" bash e2e/real.sh

echo "test: phase times"
printf 'test:   %s\n' "${timings[@]}"
echo "test: all phases passed in $((SECONDS - started)) s"
