#!/usr/bin/env bash
# The README's first command, end to end and non-interactive: `make demo` runs on the real
# control plane until its pods are Running; the real kubectl then talks to a real Kubernetes
# v1.34 API server (version, explain), reads a pod's logs, runs commands in it, attaches to a
# terminal and forwards a port (through the API server's kubelet proxy and the operator's kubelet
# API), and creates a Deployment that the real controllers and scheduler put on two instances;
# Ctrl-C (SIGINT) stops the demo, and no instance (agent process) and no control-plane process may
# be left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/lib.sh

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

# The first run builds the binaries and the control plane: allow 25 minutes.
for _ in $(seq 1 1500); do
  grep -q "Explore with kubectl" "$log" && break
  kill -0 "$group" 2>/dev/null || fail "the demo exited before it was ready"
  sleep 1
done
grep -q "Explore with kubectl" "$log" || fail "the demo was not ready in 25 minutes"
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
# kubectl exec -it on a terminal (e2e/terminal.py): prompt, tty, size and resize, Ctrl-D.
term_out=$(python3 e2e/terminal.py "$kubectl" exec -it hello -- sh -i 2>&1) || fail "kubectl exec -it: $term_out"

# kubectl attach -it to a container with a terminal (tty: true, stdin: true), e2e/lib.sh.
check_attach_terminal default

# kubectl port-forward (e2e/lib.sh): a pod's HTTP server reached by two connections at once,
# and a closed port named in kubectl's error.
check_port_forward default

# A pod that failed before it had an instance: kubectl logs names why.
"$kubectl" run bad --image=local/shell --restart=Never \
  --annotations=ec2-kubelet.io/instance-type=m5.24xlarge \
  --overrides='{"spec":{"nodeSelector":{"type":"virtual-kubelet"},"tolerations":[{"key":"virtual-kubelet.io/provider","operator":"Exists"}]}}' \
  -- sleep 3600
for _ in $(seq 1 60); do
  [ "$("$kubectl" get pod bad -o jsonpath='{.status.phase}')" = Failed ] && break
  sleep 1
done
out=$("$kubectl" logs bad 2>&1) && fail "kubectl logs bad succeeded: $out"
[[ "$out" == "Error from server (BadRequest): pod default/bad has no instance: InvalidLaunchSettings: "* ]] \
  || fail "kubectl logs bad printed: $out"

# The real API server: its version, the OpenAPI of built-in types.
server=$("$kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
[[ "$server" == v1.34.* ]] || fail "kubectl version reports the server as $server, not v1.34.x"
"$kubectl" explain pod.spec.tolerations >/dev/null || fail "kubectl explain pod failed"

# A Deployment as a user creates it, then allowed onto the virtual nodes: two pods, two instances.
"$kubectl" create deployment web --image=local/shell --replicas=2 -- sh -c 'while true; do date; sleep 5; done'
"$kubectl" patch deployment web -p '{"spec":{"template":{"spec":{"tolerations":[{"key":"virtual-kubelet.io/provider","operator":"Exists"}]}}}}'
"$kubectl" rollout status deployment/web --timeout=120s || fail "the Deployment did not roll out"
instances=$(pod_instances -l app=web | sort -u | grep -c '^i-' || true)
[ "$instances" -eq 2 ] || fail "the Deployment's 2 pods are on $instances instances"

# The nodes, pods and instance records as a user lists them.
"$kubectl" get ecnp,nodes,pods,ec2instances -o wide

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
  if pgrep -f -- "--dir $dir/control-plane" >/dev/null; then
    fail "the control plane of $dir outlived the demo"
  fi
  [ ! -e "$dir/control-plane" ] || fail "the control plane left $dir/control-plane behind"
done
echo "e2e/demo.sh: the demo ran on Kubernetes $server, kubectl logs, exec, attach, port-forward and a Deployment worked, and Ctrl-C left nothing behind"
echo "e2e: 1 passed, 0 failed"
