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

phase "tools (kubectl, helm, moto, control plane, metrics-server)" bash e2e/tools.sh
phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo build (every binary of the workspace)" cargo build --locked --bins
phase "cargo test (build and suites)" cargo test --locked
# The operator suites again, on the real control plane (tests/common/cluster.rs); the others
# reach inside the dev cluster (its audit, token issuer, kubelet-caller identities).
phase "cargo test, operator suites on the real control plane" \
  env EC2_KUBELET_TEST_CLUSTER=real cargo test --locked \
  --test pools --test pods --test warm --test templates --test security --test crashloop --test faults \
  --test badinput --test ec2faults
phase "make demo, end to end (e2e/demo.sh)" bash e2e/demo.sh
phase "make e2e, real control plane (e2e/real.sh)" bash e2e/real.sh

echo "test: phase times"
printf 'test:   %s\n' "${timings[@]}"
echo "test: all phases passed in $((SECONDS - started)) s"
