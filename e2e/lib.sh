# Shared by the end-to-end scripts (sourced): the real control plane, the operator run outside
# the cluster on the local backend, waiting, and reading the local cloud's records.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kubectl="$root/.tools/bin/kubectl"
helm="$root/.tools/bin/helm"
control_plane="$root/.tools/bin/control-plane"

e2e_started=$SECONDS
phase_started=$SECONDS
phase() {
  [ -n "${phase_name:-}" ] && say "phase '$phase_name' took $((SECONDS - phase_started)) s"
  phase_name="$*"
  phase_started=$SECONDS
  say "== $*"
}
say() { printf '%s: [%4d s] %s\n' "$(basename "$0")" "$((SECONDS - e2e_started))" "$*"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_for <seconds> <what> <command...>: runs the command every second until it succeeds.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  while ! "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      fail "timed out after ${seconds} s waiting for $what"
    fi
    sleep 1
  done
  say "ok: $what"
}

# Starts the real control plane in $work/control-plane; sets KUBECONFIG, cp_pid and server.
start_control_plane() {
  local out="$work/control-plane.out"
  "$control_plane" --dir "$work/control-plane" --kubeconfig "$work/admin.kubeconfig" "$@" >"$out" 2>&1 &
  cp_pid=$!
  local deadline=$((SECONDS + 180))
  until grep -q 'control-plane: ready' "$out"; do
    kill -0 "$cp_pid" 2>/dev/null || { cat "$out" >&2; fail "the control plane exited before it was ready"; }
    [ $SECONDS -lt $deadline ] || { cat "$out" >&2; fail "the control plane was not ready in 180 s"; }
    sleep 0.2
  done
  grep 'control-plane: ready' "$out"
  export KUBECONFIG="$work/admin.kubeconfig"
  server=$("$kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
}

stop_control_plane() {
  [ -n "${cp_pid:-}" ] || return 0
  kill -TERM "$cp_pid" 2>/dev/null || true
  wait "$cp_pid" 2>/dev/null || true
  cp_pid=
}

# The local cloud's instances: "<id> <state> <pod namespace/name>" per line, state "running"
# only while its agent process is alive.
instances() {
  python3 - "$cloud" <<'PY'
import json, os, sys, glob
for path in sorted(glob.glob(os.path.join(sys.argv[1], "instances", "*.json"))):
    record = json.load(open(path))
    instance, pid = record["instance"], record.get("agent_pid")
    if pid is None:
        try:
            pid = int(open(path[:-5] + "/agent.pid").read())
        except OSError:
            pid = None
    alive = False
    if pid:
        try:
            os.kill(pid, 0)
            alive = True
        except OSError:
            pass
    state = instance["state"]
    if state in ("Pending", "Running"):
        state = "running" if alive else "stopped"
    elif alive:
        state = state.lower() + "-but-alive"
    else:
        state = state.lower()
    pod = instance["tags"].get("ec2-kubelet.io/pod", "-")
    print(instance["instance_id"], state, pod)
PY
}
running_instances() { instances | awk '$2 == "running"' | wc -l; }
launched_instances() { instances | wc -l; }
enis() { ls "$cloud/enis" 2>/dev/null | grep -c '\.json$' || true; }

# check_port_forward <namespace>: kubectl port-forward as a user runs it, through the API
# server (WebSocket from kubectl, SPDY to the kubelet API) to a port of the pod's instance: a pod
# serving HTTP is reached by two connections at once, and a port nobody listens on gets
# kubectl's error naming the pod and the refusal. Removes its pod. The pod runs on a node whose
# InternalIP is not the API server's address: the API server passes its own client's Host
# (127.0.0.1:6443) on with this upgrade, and the kubelet API must still find the right node.
# forwarding <pid> <port> <log>: waits until kubectl port-forward (pid) listens on the port.
forwarding() {
  local pid=$1 port=$2 log=$3 deadline=$((SECONDS + 30))
  until grep -q "Forwarding from 127.0.0.1:$port" "$log"; do
    if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge "$deadline" ]; then
      cat "$log" >&2
      fail "kubectl port-forward did not listen on $port"
    fi
    sleep 0.2
  done
}
check_port_forward() {
  local ns=$1 dir remote closed local_port pf node api_ip
  dir=$(mktemp -d "${TMPDIR:-/tmp}/ec2-kubelet-port-forward-XXXXXX")
  api_ip=$("$kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.server}' | sed -E 's|https://([^:/]+).*|\1|')
  node=$("$kubectl" get nodes -l type=virtual-kubelet \
    -o jsonpath='{range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' \
    | awk -v api="$api_ip" '$2 != api {print $1; exit}')
  [ -n "$node" ] || fail "no virtual node with an address other than the API server's ($api_ip)"
  remote=$(free_port)
  closed=$(free_port)
  "$kubectl" -n "$ns" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: server}
spec:
  nodeSelector: {type: virtual-kubelet, kubernetes.io/hostname: $node}
  tolerations: [{key: virtual-kubelet.io/provider, operator: Exists}]
  containers:
    - name: http
      image: local/shell
      command: [/bin/sh, -c, 'exec python3 "$root/e2e/portforward.py" serve $remote']
      readinessProbe: {tcpSocket: {port: $remote}, periodSeconds: 1}
EOF
  "$kubectl" -n "$ns" wait --for=condition=Ready pod/server --timeout=90s >/dev/null
  local_port=$(free_port)
  "$kubectl" -n "$ns" port-forward pod/server "$local_port:$remote" >"$dir/forward.log" 2>&1 &
  pf=$!
  forwarding "$pf" "$local_port" "$dir/forward.log"
  python3 "$root/e2e/portforward.py" check "$local_port" \
    || { cat "$dir/forward.log" >&2; fail "kubectl port-forward pod/server $local_port:$remote"; }
  kill "$pf" 2>/dev/null || true
  wait "$pf" 2>/dev/null || true
  local_port=$(free_port)
  "$kubectl" -n "$ns" port-forward pod/server "$local_port:$closed" >"$dir/refused.log" 2>&1 &
  pf=$!
  forwarding "$pf" "$local_port" "$dir/refused.log"
  python3 "$root/e2e/portforward.py" refused "$local_port" \
    || { cat "$dir/refused.log" >&2; fail "kubectl port-forward to a closed port"; }
  wait_for 30 "kubectl naming the refused port" grep -q \
    "error forwarding port $closed to pod $ns/server, uid .*: dial tcp localhost:$closed: connect: connection refused" "$dir/refused.log"
  say "kubectl port-forward to a closed port: $(grep -o "an error occurred forwarding.*refused" "$dir/refused.log" | head -n 1)"
  kill "$pf" 2>/dev/null || true
  wait "$pf" 2>/dev/null || true
  "$kubectl" -n "$ns" delete pod server --wait=false >/dev/null
  rm -rf "$dir"
}
