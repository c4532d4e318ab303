#!/usr/bin/env bash
# The README's first command, end to end and non-interactive: `make demo` runs until its pods
# are Running; the real kubectl then reads a pod's logs and runs commands in it (through the
# dev cluster's kubelet proxy and the operator's kubelet API); Ctrl-C (SIGINT) stops the demo,
# and no instance (agent process) may be left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

kubectl=.tools/bin/kubectl
export KUBECONFIG=.ec2-kubelet/dev/kubeconfig
log=$(mktemp)
fail() { echo "e2e/demo.sh: $*" >&2; echo "--- demo output ---" >&2; cat "$log" >&2; exit 1; }

for port in 6443 10250; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port is in use (is a demo already running?)"
  fi
done

# Its own process group, so Ctrl-C reaches make, cargo and the demo as from a terminal.
setsid make demo >"$log" 2>&1 </dev/null &
group=$!
trap 'kill -INT -- "-$group" 2>/dev/null || true' EXIT

# The first run builds the binaries: allow 15 minutes.
for _ in $(seq 1 900); do
  grep -q "Explore with kubectl" "$log" && break
  kill -0 "$group" 2>/dev/null || fail "the demo exited before it was ready"
  sleep 1
done
grep -q "Explore with kubectl" "$log" || fail "the demo was not ready in 15 minutes"
grep -Eq "^hello +Running" "$log" || fail "hello is not Running"

# kubectl logs: the pod's own output, from its instance.
logs=$("$kubectl" logs hello --tail=1)
[[ "$logs" == "hello from "* ]] || fail "kubectl logs hello printed: $logs"
worker=$("$kubectl" logs worker-0 --tail=1)
[[ "$worker" == "worker-0 tick "* ]] || fail "kubectl logs worker-0 printed: $worker"

# kubectl exec: output, exit code and standard input.
out=$("$kubectl" exec hello -- sh -c 'echo exec-ok')
[[ "$out" == "exec-ok" ]] || fail "kubectl exec printed: $out"
set +e
"$kubectl" exec hello -- sh -c 'exit 7'
code=$?
set -e
[[ $code -eq 7 ]] || fail "kubectl exec exit code $code, expected 7"
echoed=$(echo "piped" | "$kubectl" exec -i hello -- cat)
[[ "$echoed" == "piped" ]] || fail "kubectl exec -i printed: $echoed"

# The nodes and pods as a user lists them.
"$kubectl" get ecnp,nodes,pods -o wide

# Ctrl-C: everything stops, every local instance is terminated.
state_dirs=$(ls -d "${TMPDIR:-/tmp}"/ec2-kubelet-demo-* 2>/dev/null || true)
kill -INT -- "-$group"
for _ in $(seq 1 60); do
  kill -0 "$group" 2>/dev/null || break
  sleep 1
done
kill -0 "$group" 2>/dev/null && fail "the demo did not stop within 60 s of Ctrl-C"
trap - EXIT
for dir in $state_dirs; do
  if pgrep -f -- "--state-dir $dir" >/dev/null; then
    fail "agent processes of $dir outlived the demo"
  fi
done
echo "e2e/demo.sh: the demo ran, kubectl logs and exec worked, and Ctrl-C left nothing behind"
echo "e2e: 1 passed, 0 failed"
