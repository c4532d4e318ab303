#!/usr/bin/env bash
# Builds the real control plane (e2e/control-plane) into .tools/bin/control-plane, stamped with
# the Kubernetes version go.mod pins (kubectl version reports it). Go's build cache makes a
# rebuild with nothing changed take seconds; `go build` itself decides what is stale.
set -euo pipefail
cd "$(dirname "$0")"
out=../../.tools/bin/control-plane
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$version" | cut -d. -f2)
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
mkdir -p "$(dirname "$out")"
# Progress: go build -v names every package it compiles (about 2,000 on a first build).
CGO_ENABLED=0 go build -v -trimpath -ldflags "$ldflags" -o "$out.new" . 2>&1 |
  awk '/^#|:[0-9]+:/ { print; next } { n++ } n % 200 == 0 && n > 0 { printf "control plane: %d packages compiled\n", n; fflush() } END { if (n) printf "control plane: %d packages compiled\n", n }' >&2
[ -f "$out.new" ] || { echo "control plane: the build failed (above)" >&2; exit 1; }
mv "$out.new" "$out"
