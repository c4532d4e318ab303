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
# The instance ids of the pods `kubectl get pods "$@"` lists, from their Ec2Instance records
# (found by the pod's UID), sorted.
pod_instances() {
  local uid
  for uid in $("$kubectl" get pods "$@" -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}'); do
    "$kubectl" get ec2instances -l "ec2-kubelet.io/pod-uid=$uid" -o jsonpath='{range .items[*]}{.status.instanceId}{"\n"}{end}'
  done | sort
}
# How many Ec2Instance records there are.
records_are() { [ "$("$kubectl" get ec2instances -o name | grep -c .)" -eq "$1" ]; }
running_instances() { instances | awk '$2 == "running"' | wc -l; }
launched_instances() { instances | wc -l; }
enis() { ls "$cloud/enis" 2>/dev/null | grep -c '\.json$' || true; }

# check_port_forward <namespace>: kubectl port-forward as a user runs it, through the API
# server (WebSocket from kubectl, SPDY to the kubelet API) to a port of the pod's instance: a pod
# serving HTTP is reached by two connections at once, and a port nobody listens on gets
# kubectl's error naming the pod and the refusal. Removes its pod. The pod runs on a node whose
# InternalIP is not the API server's address: the API server passes its own client's Host
# (127.0.0.1:6443) on with this upgrade, and the kubelet API must still find the right node.
# start_forward <namespace> <pod port> <log>: kubectl port-forward pod/server from a free local
# port, waited for until it listens; sets pf (its pid) and local_port.
start_forward() {
  local ns=$1 remote=$2 log=$3 deadline=$((SECONDS + 30))
  local_port=$(free_port)
  "$kubectl" -n "$ns" port-forward pod/server "$local_port:$remote" >"$log" 2>&1 &
  pf=$!
  until grep -q "Forwarding from 127.0.0.1:$local_port" "$log"; do
    if ! kill -0 "$pf" 2>/dev/null || [ $SECONDS -ge "$deadline" ]; then
      cat "$log" >&2
      fail "kubectl port-forward did not listen on $local_port"
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
  start_forward "$ns" "$remote" "$dir/forward.log"
  python3 "$root/e2e/portforward.py" check "$local_port" \
    || { cat "$dir/forward.log" >&2; fail "kubectl port-forward pod/server $local_port:$remote"; }
  kill "$pf" 2>/dev/null || true
  wait "$pf" 2>/dev/null || true
  start_forward "$ns" "$closed" "$dir/refused.log"
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

# sa_kubeconfig <namespace> <serviceaccount> <file>: a kubeconfig that authenticates as the
# ServiceAccount (a 2 h token from the TokenRequest API), for a process run outside the cluster.
sa_kubeconfig() {
  local ns=$1 sa=$2 file=$3 token ca
  token=$("$kubectl" -n "$ns" create token "$sa" --duration=2h)
  ca=$(mktemp)
  "$kubectl" config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$ca"
  KUBECONFIG="$file" "$kubectl" config set-cluster e2e --server="$server" --certificate-authority="$ca" --embed-certs >/dev/null
  KUBECONFIG="$file" "$kubectl" config set-credentials "$sa" --token="$token" >/dev/null
  KUBECONFIG="$file" "$kubectl" config set-context e2e --cluster=e2e --user="$sa" >/dev/null
  KUBECONFIG="$file" "$kubectl" config use-context e2e >/dev/null
  rm -f "$ca"
}

# start_metrics_server <dir> <kubelet CA>: the real metrics-server on the host, registered as the
# cluster's metrics.k8s.io (e2e/metrics-server.yaml), scraping every node's kubelet API at the
# address and port the node publishes (InternalIP, daemonEndpoints) every 10 s, verifying its
# certificate with the CA; sets metrics_server_pid.
start_metrics_server() {
  local dir=$1 kubelet_ca=$2 port
  port=$(free_port)
  mkdir -p "$dir"
  sed "s/METRICS_SERVER_PORT/$port/" "$root/e2e/metrics-server.yaml" | "$kubectl" apply -f - >/dev/null
  sa_kubeconfig kube-system metrics-server "$dir/kubeconfig"
  "$root/.tools/bin/metrics-server" --secure-port="$port" --bind-address=127.0.0.1 --cert-dir="$dir/certs" \
    --kubeconfig="$dir/kubeconfig" --authentication-kubeconfig="$dir/kubeconfig" \
    --authorization-kubeconfig="$dir/kubeconfig" --kubelet-certificate-authority="$kubelet_ca" \
    --kubelet-preferred-address-types=InternalIP --kubelet-use-node-status-port \
    --metric-resolution=10s --kubelet-request-timeout=5s >"$dir/metrics-server.log" 2>&1 &
  metrics_server_pid=$!
}
# Unregisters metrics.k8s.io first: an aggregated API that is registered but down fails the
# namespace controller's discovery, and no namespace could be deleted.
stop_metrics_server() {
  [ -n "${metrics_server_pid:-}" ] || return 0
  "$kubectl" delete apiservice v1beta1.metrics.k8s.io --ignore-not-found >/dev/null 2>&1 || true
  kill "$metrics_server_pid" 2>/dev/null || true
  wait "$metrics_server_pid" 2>/dev/null || true
  metrics_server_pid=
}

# check_kubectl_top <namespace> <metrics-server dir>: a pod that uses some CPU; kubectl top pod
# and kubectl top node show its usage and its node's, as metrics-server computed them from the
# kubelet API's /metrics/resource. Removes its pod.
check_kubectl_top() {
  local ns=$1 dir=$2 node pod_top node_top
  "$kubectl" -n "$ns" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: busy}
spec:
  nodeSelector: {type: virtual-kubelet}
  tolerations: [{key: virtual-kubelet.io/provider, operator: Exists}]
  containers:
    - name: work
      image: local/shell
      command: [/bin/sh, -c, 'while true; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1; done']
EOF
  "$kubectl" -n "$ns" wait --for=condition=Ready pod/busy --timeout=90s >/dev/null
  node=$("$kubectl" -n "$ns" get pod busy -o jsonpath='{.spec.nodeName}')
  top_pod() { "$kubectl" -n "$ns" top pod busy --no-headers | grep -Eq '^busy +[1-9][0-9]*m +[1-9][0-9]*Mi *$'; }
  top_node() { "$kubectl" top node "$node" --no-headers | grep -Eq "^$node +[1-9][0-9]*m +[0-9]+% +[1-9][0-9]*Mi +[0-9]+% *$"; }
  local deadline=$((SECONDS + 120))
  until top_pod && top_node; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$metrics_server_pid" 2>/dev/null; then
      "$kubectl" -n "$ns" top pod busy || true
      "$kubectl" top node || true
      tail -n 30 "$dir/metrics-server.log" >&2
      fail "kubectl top showed no usage for pod busy and node $node in 120 s"
    fi
    sleep 2
  done
  pod_top=$("$kubectl" -n "$ns" top pod busy --no-headers)
  node_top=$("$kubectl" top node "$node" --no-headers)
  say "kubectl top pod: $(echo $pod_top)"
  say "kubectl top node: $(echo $node_top)"
  "$kubectl" -n "$ns" delete pod busy --wait=false >/dev/null
}

# verify_kubelet_certificate <ip> <port> <CA file>: a TLS handshake with the kubelet API at the
# node's address that verifies its certificate (chain to the CA, the IP among its SANs); prints
# its subject and issuer.
verify_kubelet_certificate() {
  python3 - "$@" <<'PY'
import socket, ssl, sys
ip, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
with socket.create_connection((ip, port), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname=ip) as tls:
        cert = tls.getpeercert()
name = lambda rdns: ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)
print(f"verified: subject {name(cert['subject'])}; issuer {name(cert['issuer'])}")
PY
}

# check_attach_terminal <namespace>: kubectl attach -it to a container that runs `sh -i` on a
# terminal of its own (tty: true, stdin: true), driven on a terminal of the test's own
# (e2e/terminal.py --attach): a prompt, a tty, its size and a resize, Ctrl-D ending the shell,
# whose exit code (1, from `false`) is the container's. Removes its pod.
check_attach_terminal() {
  local ns=$1 out
  "$kubectl" -n "$ns" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: console}
spec:
  restartPolicy: Never
  nodeSelector: {type: virtual-kubelet}
  tolerations: [{key: virtual-kubelet.io/provider, operator: Exists}]
  containers:
    - {name: shell, image: local/shell, command: [/bin/sh, -i], stdin: true, tty: true}
EOF
  "$kubectl" -n "$ns" wait --for=condition=Ready pod/console --timeout=90s >/dev/null
  out=$(python3 "$root/e2e/terminal.py" --attach "$kubectl" -n "$ns" attach -it console 2>&1) \
    || { echo "$out" >&2; fail "kubectl attach -it console"; }
  say "$(tail -n 1 <<<"$out")"
  console_exited() {
    [ "$("$kubectl" -n "$ns" get pod console -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')" = "$1" ]
  }
  wait_for 30 "the attached shell's exit code (1) as the container's" console_exited 1
  "$kubectl" -n "$ns" delete pod console --wait=false >/dev/null
}
