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
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out.new" .
mv "$out.new" "$out"
