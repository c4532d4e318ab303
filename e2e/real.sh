#!/usr/bin/env bash
# `make e2e`: ec2-kubelet on a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler from e2e/control-plane), driven as a user drives it,
# with the real kubectl and helm:
#
#  1. the CRDs and every sample through the real schema and CEL checks; helm install, upgrade;
#  2. the operator binary (local backend) outside the cluster as the chart's ServiceAccount, so
#     the real RBAC authorizer checks the chart grants enough;
#  3. a pool's nodes Ready under the real node lifecycle controller, each with a serving
#     certificate from the cluster's CSR signer, which the API server verifies; a Deployment of 3 scheduled
#     by kube-scheduler, each pod Running and Ready on its own instance; logs -f, exec, attach
#     and port-forward through the API server's kubelet proxy; kubectl top through the real
#     metrics-server scraping the kubelet API; scale 1 and back; rollout restart;
#  4. the operator stopped past the node lease: nodes Unknown and tainted by the real node
#     lifecycle controller, back Ready on restart with no instance relaunched; stopped past a
#     short tolerationSeconds: pods evicted, their instances terminated, replacements on new
#     instances;
#  5. the namespace deleted: the namespace controller deletes the pods, every instance is
#     terminated; the pool deleted, helm uninstall: nothing left (pods, instances, ENIs, nodes).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$root"

work=$(mktemp -d "${TMPDIR:-/tmp}/ec2-kubelet-e2e-XXXXXX")
cloud="$work/cloud"
operator_log="$work/operator.log"
release_ns=ec2-kubelet-system
app_ns=e2e
operator_pid=

fail() {
  trap - ERR
  say "FAILED: $*"
  {
    echo "--- operator log (last 60 lines) ---"; tail -n 60 "$operator_log" 2>/dev/null || true
    echo "--- cluster ---"; "$kubectl" get nodes,pods -A -o wide 2>/dev/null || true
    echo "--- events ---"; "$kubectl" get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 || true
    echo "--- instances ---"; instances 2>/dev/null || true
  } >&2
  if [ -n "${E2E_PAUSE_ON_FAILURE:-}" ]; then
    say "paused for debugging: KUBECONFIG=$KUBECONFIG, operator log $operator_log (Ctrl-C ends)"
    sleep 3600
  fi
  exit 1
}

cleanup() {
  stop_metrics_server
  stop_operator
  stop_control_plane
  # Any agent the scenarios left running (a failure): killed by process group, state removed.
  for record in "$cloud"/instances/*/agent.pid; do
    [ -f "$record" ] && kill -KILL -- "-$(cat "$record")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
set -E
trap 'fail "line $LINENO: $BASH_COMMAND exited $?"' ERR

start_operator() {
  "$root/target/debug/ec2-kubelet" run --config "$work/operator.yaml" >>"$operator_log" 2>&1 &
  operator_pid=$!
}
stop_operator() {
  local signal=${1:-TERM}
  [ -n "$operator_pid" ] || return 0
  kill "-$signal" "$operator_pid" 2>/dev/null || true
  wait "$operator_pid" 2>/dev/null || true
  operator_pid=
}

node_ready() { "$kubectl" get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
all_nodes_are() {
  local want=$1 node
  for node in $(virtual_nodes); do [ "$(node_ready "$node")" = "$want" ] || return 1; done
}
virtual_nodes() { "$kubectl" get nodes -l type=virtual-kubelet -o name | sed 's|node/||'; }
all_nodes_tainted() {
  local node
  for node in $(virtual_nodes); do
    [[ "$("$kubectl" get node "$node" -o jsonpath='{.spec.taints[*].key}')" == *node.kubernetes.io/unreachable* ]] || return 1
  done
}
no_node_tainted_unreachable() { [[ "$("$kubectl" get nodes -o jsonpath='{.items[*].spec.taints[*].key}')" != *unreachable* ]]; }
web_pods() { "$kubectl" -n "$app_ns" get pods -l app=web -o name; }
# n pods of the Deployment, each Running and Ready, and no other pod of it.
web_ready() {
  local want=$1
  local ready
  ready=$("$kubectl" -n "$app_ns" get pods -l app=web -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}{"|"}{.status.phase}{"|"}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
  [ "$(echo "$ready" | grep -c '^|Running|True$')" -eq "$want" ] && [ "$(echo "$ready" | grep -c .)" -eq "$want" ]
}
# The instance ids of the Deployment's pods (from their Ec2Instance records), sorted.
web_instances() { pod_instances -n "$app_ns" -l app=web; }
running_is() { [ "$(running_instances)" -eq "$1" ]; }
instance_gone() { ! grep -q "^$1 running" <<<"$(instances)"; }
being_deleted() { [ -n "$("$kubectl" -n "$app_ns" get "$1" -o jsonpath='{.metadata.deletionTimestamp}')" ]; }
node_count_is() { [ "$(virtual_nodes | grep -c . || true)" -eq "$1" ]; }
eni_count_is() { [ "$(enis)" -eq "$1" ]; }
no_pods() { [ -z "$("$kubectl" get pods -A -o name)" ]; }
serving_certificates_are() {
  [ "$("$kubectl" -n "$release_ns" get secrets -l ec2-kubelet.io/kubelet-serving -o name | grep -c . || true)" -eq "$1" ]
}

# ---------------------------------------------------------------------------------------------
phase "building the operator and the control plane"
cargo build --quiet --bins
bash e2e/tools.sh >/dev/null

phase "starting the real control plane"
# One ordinary node beside the virtual ones (heartbeated by the control plane as its kubelet
# would): with every node of a cluster Unknown, the node lifecycle controller assumes it is
# itself cut off and evicts nothing. A real cluster has the nodes the operator runs on.
# The API server verifies kubelet serving certificates with the cluster CA, which signs the
# virtual nodes' through their CSRs (kubernetes.io/kubelet-serving).
start_control_plane --node-monitor-period=2s --node-monitor-grace-period=20s --node=worker-a \
  --apiserver-arg=--kubelet-certificate-authority="$work/control-plane/pki/ca.crt"
"$kubectl" version
[[ "$("$kubectl" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')" == v1.34.* ]] \
  || fail "the server is not Kubernetes v1.34"

phase "CRDs and samples through the real schema and CEL checks"
"$kubectl" apply --server-side -f crds/
"$kubectl" wait --for=condition=Established --timeout=60s crd/ec2nodepools.ec2-kubelet.io crd/ec2podtemplates.ec2-kubelet.io
"$kubectl" apply --dry-run=server -f config/samples/ >/dev/null
# An invalid pool is refused by the API server itself, naming the field.
if out=$("$kubectl" apply --dry-run=server -f - 2>&1 <<'EOF'
apiVersion: ec2-kubelet.io/v1alpha1
kind: Ec2NodePool
metadata: {name: bad}
spec: {nodes: -1, subnetIds: [subnet-1]}
EOF
); then fail "a pool with nodes: -1 was accepted"; fi
grep -q 'spec.nodes' <<<"$out" || fail "the refusal does not name spec.nodes: $out"
"$kubectl" apply -f config/samples/template.yaml

phase "helm install and upgrade"
"$helm" install ec2-kubelet charts/ec2-kubelet --namespace "$release_ns" --create-namespace \
  --set config.compute=local --set config.clusterName=e2e
"$helm" upgrade ec2-kubelet charts/ec2-kubelet --namespace "$release_ns" \
  --set config.compute=local --set config.clusterName=e2e --set replicaCount=1
[ "$("$kubectl" -n "$release_ns" get deploy ec2-kubelet -o jsonpath='{.spec.replicas}')" = 1 ] \
  || fail "helm upgrade did not change the Deployment"
[[ "$("$helm" status ec2-kubelet --namespace "$release_ns")" == *"REVISION: 2"* ]] || fail "not at revision 2"

phase "the operator as the chart's ServiceAccount"
sa_kubeconfig "$release_ns" ec2-kubelet "$work/operator.kubeconfig"
kubelet_port=$(free_port)
cat >"$work/operator.yaml" <<EOF
clusterName: e2e
compute: local
namespace: $release_ns
lease: {durationSeconds: 20, renewIntervalSeconds: 5}
sync: {nodeStatusSeconds: 10, orphanGraceSeconds: 30}
server:
  metricsAddress: 127.0.0.1:$(free_port)
  healthAddress: 127.0.0.1:$(free_port)
  enrollAddress: 127.0.0.1:$(free_port)
  # The API server dials each node's InternalIP (127.0.x.y, the local backend's ENI address).
  kubeletAddress: 0.0.0.0:$kubelet_port
local:
  stateDir: $cloud
EOF
export OPERATOR_KUBECONFIG="$work/operator.kubeconfig"
start_operator_as_sa() { KUBECONFIG="$OPERATOR_KUBECONFIG" start_operator; }
start_operator_as_sa

phase "a pool of 2 virtual nodes, Ready under the node lifecycle controller"
"$kubectl" apply -f config/samples/pool.yaml
wait_for 90 "2 virtual nodes" node_count_is 2
wait_for 60 "both nodes Ready" all_nodes_are True
wait_for 60 "each node's serving certificate issued (CSR, kubernetes.io/kubelet-serving)" serving_certificates_are 2
for node in $(virtual_nodes); do
  ip=$("$kubectl" get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  say "kubelet API of $node: $(verify_kubelet_certificate "$ip" "$kubelet_port" "$work/control-plane/pki/ca.crt")"
done
say "CSRs: $("$kubectl" get csr -o jsonpath='{range .items[*]}{.metadata.name} {.spec.signerName} {.status.conditions[0].type}{"\n"}{end}' | grep -c 'kubernetes.io/kubelet-serving Approved') approved kubelet-serving requests"
sleep 25 # longer than the node monitor grace period: the nodes must stay Ready on their leases
all_nodes_are True || fail "a node left Ready while the operator renews its lease"

phase "a Deployment of 3 on the virtual nodes, by kube-scheduler"
"$kubectl" create namespace "$app_ns"
"$kubectl" -n "$app_ns" apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      nodeSelector: {type: virtual-kubelet}
      tolerations:
        - {key: virtual-kubelet.io/provider, operator: Equal, value: ec2, effect: NoSchedule}
      containers:
        - name: web
          image: local/shell
          # Paths a pod names are under the local instance's root: the API server's projected
          # service-account volume (kube-api-access-*) is the working directory.
          workingDir: /var/run/secrets/kubernetes.io/serviceaccount
          command: [/bin/sh, -c]
          args: ['echo "web $(cat namespace) up"; while true; do echo "tick $(date -u +%T)"; sleep 1; done']
          resources: {requests: {cpu: 100m, memory: 64Mi}}
          readinessProbe:
            exec: {command: [/bin/sh, -c, 'test -s token && test -s ca.crt']}
            periodSeconds: 2
EOF
"$kubectl" -n "$app_ns" rollout status deploy/web --timeout=180s
wait_for 60 "3 pods Running and Ready" web_ready 3
[ "$(web_instances | uniq | grep -c .)" -eq 3 ] || fail "the 3 pods are not on 3 instances: $(web_instances)"
wait_for 30 "3 instances running" running_is 3
"$kubectl" -n "$app_ns" get pods -o wide
# Every pod's instance in its record, as a user lists them.
"$kubectl" get ec2instances -o wide
records=$("$kubectl" get ec2instances -l "ec2-kubelet.io/pod-namespace=$app_ns" -o jsonpath='{range .items[*]}{.status.phase} {.status.instanceId}{"\n"}{end}')
[ "$(grep -c '^Running i-' <<<"$records")" -eq 3 ] || fail "3 Running records with an instance expected: $records"

phase "kubectl logs -f, exec and attach through the API server's kubelet proxy"
pods=$(web_pods)
pod=${pods%%$'\n'*}
grep -q "^web e2e up$" <<<"$("$kubectl" -n "$app_ns" logs "$pod")" \
  || fail "the pod did not read its namespace from the projected service-account volume"
follow=$(timeout 4 "$kubectl" -n "$app_ns" logs -f --tail=1 "$pod" || true)
[ "$(grep -c '^tick ' <<<"$follow")" -ge 2 ] || fail "kubectl logs -f streamed: $follow"
[ "$("$kubectl" -n "$app_ns" exec "$pod" -- sh -c 'echo exec-ok')" = exec-ok ] || fail "kubectl exec"
code=0; "$kubectl" -n "$app_ns" exec "$pod" -- sh -c 'exit 3' || code=$?
[ $code -eq 3 ] || fail "kubectl exec exit code $code, expected 3"
[ "$(echo piped | "$kubectl" -n "$app_ns" exec -i "$pod" -- cat)" = piped ] || fail "kubectl exec -i"
attached=$(timeout 4 "$kubectl" -n "$app_ns" attach "$pod" 2>/dev/null || true)
grep -q '^tick ' <<<"$attached" || fail "kubectl attach printed: $attached"
# kubectl exec -it on a terminal of the test's own: a prompt, a tty, its size and a resize,
# Ctrl-D ending it with the shell's exit code.
python3 e2e/terminal.py "$kubectl" -n "$app_ns" exec -it "$pod" -- sh -i >"$work/terminal.out" 2>&1 \
  || { cat "$work/terminal.out" >&2; fail "kubectl exec -it"; }
say "$(tail -n 1 "$work/terminal.out")"
# kubectl attach -it to a container with a terminal of its own (tty: true, stdin: true).
check_attach_terminal "$app_ns"
# A pod that fails before it has an instance: kubectl logs names why (a 400 from the kubelet
# API, which the API server turns into a BadRequest with its text), not a NotFound.
"$kubectl" -n "$app_ns" apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: bad
  annotations: {ec2-kubelet.io/instance-type: m5.24xlarge}
spec:
  nodeSelector: {type: virtual-kubelet}
  tolerations: [{key: virtual-kubelet.io/provider, operator: Exists}]
  containers: [{name: main, image: local/shell, command: [sleep, "3600"]}]
EOF
bad_failed() { [ "$("$kubectl" -n "$app_ns" get pod bad -o jsonpath='{.status.phase}')" = Failed ]; }
wait_for 60 "pod bad Failed before it had an instance" bad_failed
out=$("$kubectl" -n "$app_ns" logs bad 2>&1) && fail "kubectl logs succeeded for a pod without an instance: $out"
grep -q "Error from server (BadRequest): pod $app_ns/bad has no instance: InvalidLaunchSettings: " <<<"$out" \
  || fail "kubectl logs bad printed: $out"
say "kubectl logs bad: $out"
"$kubectl" -n "$app_ns" delete pod bad --wait=false

phase "kubectl port-forward through the API server"
check_port_forward "$app_ns"

phase "kubectl top through the real metrics-server"
start_metrics_server "$work/metrics-server" "$work/control-plane/pki/ca.crt"
check_kubectl_top "$app_ns" "$work/metrics-server"
stop_metrics_server

phase "scale to 1 and back to 3"
"$kubectl" -n "$app_ns" scale deploy/web --replicas=1
wait_for 90 "1 pod left" web_ready 1
wait_for 60 "1 instance running" running_is 1
"$kubectl" -n "$app_ns" scale deploy/web --replicas=3
"$kubectl" -n "$app_ns" rollout status deploy/web --timeout=180s
wait_for 60 "3 pods Running and Ready" web_ready 3
wait_for 60 "3 instances running" running_is 3

phase "rollout restart"
before=$(web_instances)
"$kubectl" -n "$app_ns" rollout restart deploy/web
"$kubectl" -n "$app_ns" rollout status deploy/web --timeout=240s
wait_for 90 "3 new pods Running and Ready" web_ready 3
after=$(web_instances)
[ -z "$(comm -12 <(echo "$before") <(echo "$after"))" ] || fail "a restarted pod kept an old instance"
wait_for 90 "the old instances terminated, 3 running" running_is 3

phase "the operator down past the node lease, back within tolerationSeconds"
launched=$(launched_instances)
kept=$(web_instances)
stop_operator KILL
wait_for 90 "nodes Unknown (node lifecycle controller)" all_nodes_are Unknown
wait_for 60 "nodes tainted unreachable" all_nodes_tainted
start_operator_as_sa
wait_for 90 "nodes Ready again" all_nodes_are True
wait_for 60 "the unreachable taints removed" no_node_tainted_unreachable
wait_for 90 "3 pods Running and Ready again" web_ready 3
[ "$(web_instances)" = "$kept" ] || fail "pods changed instances across the restart"
[ "$(launched_instances)" -eq "$launched" ] || fail "an instance was launched again: $(instances)"
running_is 3 || fail "instances running after the restart: $(instances)"

phase "the operator down past a short tolerationSeconds: eviction"
"$kubectl" -n "$app_ns" patch deploy/web --type=json -p='[{"op": "add", "path": "/spec/template/spec/tolerations/-", "value": {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}}]'
"$kubectl" -n "$app_ns" rollout status deploy/web --timeout=240s
wait_for 90 "3 pods Running and Ready" web_ready 3
wait_for 90 "3 instances running" running_is 3
evicted=$(web_instances)
evicted_pods=$(web_pods)
stop_operator KILL
wait_for 90 "nodes Unknown" all_nodes_are Unknown
for p in $evicted_pods; do
  wait_for 60 "$p evicted by the taint manager" being_deleted "$p"
done
start_operator_as_sa
wait_for 90 "nodes Ready again" all_nodes_are True
wait_for 180 "3 replacements Running and Ready" web_ready 3
replacements=$(web_instances)
[ -z "$(comm -12 <(echo "$evicted") <(echo "$replacements"))" ] || fail "a replacement runs on an evicted pod's instance"
for id in $evicted; do
  wait_for 60 "evicted instance $id terminated" instance_gone "$id"
done
wait_for 30 "3 instances running" running_is 3

phase "deleting the namespace"
"$kubectl" delete namespace "$app_ns" --timeout=180s
wait_for 60 "every instance terminated" running_is 0

phase "deleting the pool, helm uninstall: nothing left"
"$kubectl" delete ec2nodepool default --timeout=120s
wait_for 60 "no virtual node" node_count_is 0
wait_for 30 "no ENI" eni_count_is 0
wait_for 30 "no Ec2Instance record left" records_are 0
wait_for 60 "the serving certificates gone with their nodes (garbage collector)" serving_certificates_are 0
if grep -a 'forbidden: User "system:serviceaccount' "$operator_log"; then
  fail "the RBAC authorizer refused the chart's ServiceAccount a request (above)"
fi
stop_operator TERM
"$helm" uninstall ec2-kubelet --namespace "$release_ns" --wait --timeout 60s
"$kubectl" get clusterrole ec2-kubelet >/dev/null 2>&1 && fail "helm uninstall left the ClusterRole"
leftover=$(instances | awk '$2 != "terminated"')
[ -z "$leftover" ] || fail "instances not terminated: $leftover"
wait_for 60 "no pod left in the cluster" no_pods
phase "done"
say "e2e: the operator on the real control plane, $(launched_instances) instances launched and all terminated"
echo "e2e: 1 passed, 0 failed"
