//! Virtual nodes: one tokio task per node ENI keeps its `Node` registered and alive
//! (ownership lease between replicas, `kube-node-lease` heartbeat, node status), like a
//! kubelet's node loop (virtual-kubelet `node.go`, `lease_controller_v1.go`).

pub mod supervisor;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::crd::{Ec2NodePoolSpec, GROUP, VERSION, labels};
use crate::runtime::backoff::Backoff;
use crate::runtime::lease::LeaseLock;
use crate::runtime::{Context, Result};
use crate::runtime::{NODE_LEASE_NAMESPACE, VirtualNode};
use crate::task::OwnedTask;

/// `v1.34.0-ec2-kubelet-<version>`, the kubelet version virtual nodes report.
pub fn kubelet_version() -> String {
    format!("v1.34.0-ec2-kubelet-{}", env!("CARGO_PKG_VERSION"))
}

fn quantity_or(
    value: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    default: &str,
) -> String {
    value
        .as_ref()
        .map(|q| q.0.clone())
        .unwrap_or_else(|| default.to_string())
}

/// Capacity (and allocatable) a node of this pool advertises.
pub fn capacity(spec: &Ec2NodePoolSpec) -> BTreeMap<String, String> {
    let mut capacity = BTreeMap::from([
        ("cpu".to_string(), quantity_or(&spec.capacity.cpu, "1k")),
        ("memory".to_string(), quantity_or(&spec.capacity.memory, "4Ti")),
        (
            "pods".to_string(),
            quantity_or(&spec.capacity.pods, &spec.max_pods_per_node.to_string()),
        ),
        ("ephemeral-storage".to_string(), "1Ti".to_string()),
    ]);
    if let Some(gpu) = &spec.capacity.gpu {
        capacity.insert("nvidia.com/gpu".into(), gpu.0.clone());
    }
    capacity
}

/// The labels of a virtual node: the built-in virtual-kubelet ones, then the pool's.
pub fn node_labels(node: &VirtualNode) -> BTreeMap<String, String> {
    let mut labels = node.spec.node_labels.clone();
    for (key, value) in [
        ("type", "virtual-kubelet"),
        ("kubernetes.io/role", "agent"),
        ("kubernetes.io/os", node.spec.os.as_str()),
        ("kubernetes.io/arch", node.spec.arch.as_str()),
        ("kubernetes.io/hostname", node.name.as_str()),
        ("node.kubernetes.io/instance-type", "virtual"),
        (labels::POOL, node.pool.as_str()),
    ] {
        labels.insert(key.into(), value.into());
    }
    labels.insert(labels::NODE_INDEX.into(), node.index.to_string());
    labels
}

/// The `Node` object (metadata and spec) registered for a virtual node.
pub fn node_object(node: &VirtualNode) -> Value {
    let taints: Vec<Value> = node
        .spec
        .node_taints
        .iter()
        .map(|t| {
            let mut taint = json!({"key": t.key, "effect": t.effect.as_str()});
            if !t.value.is_empty() {
                taint["value"] = json!(t.value);
            }
            taint
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": node_labels(node),
            "ownerReferences": [{
                "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "Ec2NodePool",
                "name": node.pool, "uid": node.pool_uid,
            }],
        },
        "spec": {"taints": taints},
    })
}

/// Why a node is (not) Ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

/// The node's `status`: conditions from `health`, addresses, capacity, endpoints, nodeInfo.
pub fn node_status(node: &VirtualNode, health: &Health, kubelet_port: u16, transition: &str) -> Value {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let healthy = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "False", "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": transition})
    };
    let capacity = capacity(&node.spec);
    json!({
        "conditions": [
            {"type": "Ready", "status": if health.ready { "True" } else { "False" }, "reason": health.reason,
                "message": health.message, "lastHeartbeatTime": now, "lastTransitionTime": transition},
            healthy("MemoryPressure", "KubeletHasSufficientMemory", "the instances of this node's pods are sized per pod"),
            healthy("DiskPressure", "KubeletHasNoDiskPressure", "each pod has its own instance volume"),
            healthy("PIDPressure", "KubeletHasSufficientPID", "each pod has its own instance"),
            {"type": "NetworkUnavailable", "status": if health.ready { "False" } else { "True" },
                "reason": if health.ready { "EniAttached" } else { health.reason.as_str() },
                "message": format!("ENI {}", node.eni_id), "lastHeartbeatTime": now, "lastTransitionTime": transition},
        ],
        "addresses": [
            {"type": "InternalIP", "address": node.private_ip},
            {"type": "Hostname", "address": node.name},
        ],
        "capacity": capacity,
        "allocatable": capacity,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": node.eni_id, "systemUUID": node.eni_id, "bootID": "",
            "kernelVersion": "", "osImage": format!("ec2-kubelet virtual node ({})", node.spec.os.as_str()),
            "containerRuntimeVersion": format!("ec2-kubelet://{}", env!("CARGO_PKG_VERSION")),
            "kubeletVersion": kubelet_version(), "kubeProxyVersion": "",
            "operatingSystem": node.spec.os.as_str(), "architecture": node.spec.arch.as_str(),
        },
    })
}

/// Whether the node's ENI still exists, asked of the cloud.
async fn check_health(ctx: &Context, node: &VirtualNode, max_age: Duration) -> Health {
    // One snapshot of the pool's ENIs serves every node of the pool checking within `max_age`.
    let not_before = Instant::now().checked_sub(max_age).unwrap_or_else(Instant::now);
    let mut enis = ctx.pool_enis(&node.pool, not_before).await;
    if enis
        .as_ref()
        .is_ok_and(|enis| !enis.iter().any(|e| e.eni_id == node.eni_id))
    {
        // Missing from an older snapshot (taken before the ENI was made?): ask again.
        enis = ctx.pool_enis(&node.pool, Instant::now()).await;
    }
    match enis {
        Ok(enis) if enis.iter().any(|e| e.eni_id == node.eni_id) => Health {
            ready: true,
            reason: "KubeletReady".into(),
            message: format!("ec2-kubelet is posting ready status for ENI {}", node.eni_id),
        },
        Ok(_) => Health {
            ready: false,
            reason: "EniMissing".into(),
            message: format!("ENI {} of this node no longer exists", node.eni_id),
        },
        Err(error) => Health {
            ready: false,
            reason: "CloudUnavailable".into(),
            message: format!("cannot check ENI {}: {error}", node.eni_id),
        },
    }
}

/// Creates the node, or brings its labels, taints and owner up to date (never `unschedulable`,
/// which belongs to whoever cordons it).
async fn register(ctx: &Context, node: &VirtualNode) -> Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let object = node_object(node);
    match nodes.get_opt(&node.name).await? {
        None => {
            let created: Node =
                serde_json::from_value(object).map_err(|e| crate::runtime::Error::InvalidSpec {
                    field: "spec".into(),
                    message: e.to_string(),
                })?;
            match nodes.create(&PostParams::default(), &created).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_already_exists() => {}
                Err(error) => return Err(error.into()),
            }
        }
        Some(existing) => {
            let patch = registration_patch(&object);
            // A restart finds its nodes as it left them: no write (a kubelet too patches its
            // node only for what changed).
            let unchanged = serde_json::to_value(&existing)
                .is_ok_and(|current| !crate::pod::status::changes(&current, &patch));
            if !unchanged {
                nodes
                    .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
    }
    Ok(())
}

/// What `register` brings an existing node to: the labels, owner and taints of `object` (a
/// `node_object`).
fn registration_patch(object: &Value) -> Value {
    json!({"metadata": {"labels": object["metadata"]["labels"],
        "ownerReferences": object["metadata"]["ownerReferences"]}, "spec": {"taints": object["spec"]["taints"]}})
}

/// Renews (or creates) the node's heartbeat lease in `kube-node-lease`, as a kubelet does.
async fn renew_node_lease(ctx: &Context, node: &VirtualNode, duration: Duration) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    let heartbeat = LeaseLock::new(leases, &node.name, &node.name, duration);
    heartbeat.try_acquire_or_renew().await?;
    Ok(())
}

async fn patch_status(ctx: &Context, node: &VirtualNode, status: Value) -> Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    nodes
        .patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": status})),
        )
        .await?;
    Ok(())
}

/// Records this node's readiness in the pool's status (a merge patch keyed by node name, so
/// node tasks never overwrite each other).
async fn patch_pool_readiness(ctx: &Context, node: &VirtualNode, ready: bool) -> Result<()> {
    let pools: Api<crate::crd::Ec2NodePool> = Api::all(ctx.client.clone());
    let patch = json!({"status": {"nodes": {node.name.clone(): {"ready": ready}}}});
    match pools
        .patch_status(&node.pool, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Runs one virtual node until `stop` turns true: waits to hold the node's ownership lease,
/// then registers the node and keeps it alive, as a kubelet's node loop does. A failed step
/// (a 5xx, a 429, a conflict, no answer) is retried with backoff on the next tick and never
/// stops the node's pods: they run as long as this replica holds the ownership lease, which a
/// failed renewal gives up only at the renew deadline (two thirds of the lease), well before
/// another replica could take the node.
pub async fn run(
    ctx: Arc<Context>,
    mut node: watch::Receiver<VirtualNode>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let renew = Duration::from_secs(u64::from(ctx.config.lease.renew_interval_seconds.max(1)));
    let duration = Duration::from_secs(u64::from(ctx.config.lease.duration_seconds.max(1)));
    let renew_deadline = duration * 2 / 3;
    let status_every = Duration::from_secs(u64::from(ctx.config.sync.node_status_seconds.max(1)));
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let current = node.borrow().clone();
    let ownership = LeaseLock::new(leases, &current.name, &ctx.identity, duration);
    let mut held = false;
    let mut renewed = Instant::now();
    let mut retry = Backoff::new(Duration::from_secs(1), renew);
    let mut state = Alive::default();
    let mut ticker = tokio::time::interval(renew);
    loop {
        tokio::select! {
            _ = crate::task::stopped(&mut stop) => break,
            _ = ticker.tick() => {}
            changed = node.changed() => if changed.is_err() { break },
        }
        let current = node.borrow().clone();
        match ownership.try_acquire_or_renew().await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                if held {
                    tracing::info!(node = %current.name, "lost the node's ownership lease; another replica runs it");
                }
                held = false;
                state.stop().await;
                continue;
            }
            Err(error) if held && renewed.elapsed() < renew_deadline => {
                let delay = retry.next_delay();
                tracing::warn!(node = %current.name, %error, retry_in = ?delay, "renewing the node's ownership lease; retrying");
                ticker.reset_after(delay);
                continue;
            }
            Err(error) => {
                if held {
                    tracing::warn!(node = %current.name, %error, "renewing the node's ownership lease failed past the renew deadline; stopping its pods");
                }
                held = false;
                state.stop().await;
                let delay = retry.next_delay();
                ticker.reset_after(delay);
                continue;
            }
        }
        if !held {
            tracing::info!(node = %current.name, identity = %ctx.identity, "running virtual node");
            held = true;
        }
        match state.keep(&ctx, &current, duration, status_every).await {
            Ok(()) => retry.reset(),
            Err(error) => {
                let delay = retry.next_delay();
                tracing::warn!(node = %current.name, %error, retry_in = ?delay, "keeping the node alive; retrying");
                ticker.reset_after(delay);
            }
        }
    }
    state.stop().await;
    if held {
        ownership.release_on_stop().await;
    }
    Ok(())
}

/// What a held node's loop keeps between ticks.
#[derive(Default)]
struct Alive {
    registered: Option<VirtualNode>,
    last_health: Option<Health>,
    last_status: Option<Instant>,
    transition: String,
    /// The node's pods run while this replica holds the node.
    pods: Option<OwnedTask>,
}

impl Alive {
    /// Stops the node's pods and forgets the registration (after the node was lost).
    async fn stop(&mut self) {
        self.stop_pods().await;
        self.registered = None;
    }

    /// Stops the node's pod loop and waits for its end: a new loop for the node starts only
    /// after the old one has let go of every pod.
    async fn stop_pods(&mut self) {
        if let Some(pods) = self.pods.take() {
            pods.stop().await;
        }
    }

    /// One tick of a held node: registered, its pods running, heartbeat renewed, status fresh.
    async fn keep(
        &mut self,
        ctx: &Arc<Context>,
        current: &VirtualNode,
        duration: Duration,
        status_every: Duration,
    ) -> Result<()> {
        if self.registered.as_ref() != Some(current) {
            // A changed node (its spec, its address) restarts its pods on the new one.
            self.stop_pods().await;
            register(ctx, current).await?;
            self.registered = Some(current.clone());
            self.last_health = None;
        }
        if self.pods.as_ref().is_none_or(OwnedTask::is_finished) {
            // A loop that ended on its own (its watch stream closed) is joined first.
            self.stop_pods().await;
            let (ctx, node) = (ctx.clone(), current.clone());
            self.pods = Some(OwnedTask::spawn(move |stop| {
                crate::pod::lifecycle::run(ctx, node, stop)
            }));
        }
        renew_node_lease(ctx, current, duration).await?;
        let due =
            self.last_health.is_none() || self.last_status.is_none_or(|at| at.elapsed() >= status_every);
        if due {
            let health = check_health(ctx, current, status_every).await;
            let changed = self.last_health.as_ref().is_none_or(|h| h.ready != health.ready);
            if changed || self.transition.is_empty() {
                self.transition = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
            }
            patch_status(
                ctx,
                current,
                node_status(current, &health, ctx.kubelet_port(), &self.transition),
            )
            .await?;
            if changed {
                patch_pool_readiness(ctx, current, health.ready).await?;
            }
            self.last_health = Some(health);
            self.last_status = Some(Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::node_name;

    fn virtual_node() -> VirtualNode {
        let spec: Ec2NodePoolSpec = serde_json::from_value(json!({
            "nodes": 1, "subnetIds": ["subnet-1"], "nodeLabels": {"team": "a", "type": "overridden"},
            "capacity": {"gpu": "4"}, "maxPodsPerNode": 20,
        }))
        .unwrap();
        VirtualNode {
            name: node_name("10.0.1.23", "gpu"),
            pool: "gpu".into(),
            pool_uid: "uid-1".into(),
            index: 2,
            eni_id: "eni-1".into(),
            private_ip: "10.0.1.23".into(),
            spec,
        }
    }

    #[test]
    fn node_names_come_from_the_eni_address() {
        assert_eq!(node_name("10.0.1.23", "gpu"), "ip-10-0-1-23.gpu");
    }

    #[test]
    fn node_objects_carry_the_virtual_kubelet_labels_taint_and_capacity() {
        let node = virtual_node();
        let object = node_object(&node);
        let labels = &object["metadata"]["labels"];
        assert_eq!(
            labels["type"], "virtual-kubelet",
            "built-in labels win over the pool's"
        );
        assert_eq!(labels["team"], "a");
        assert_eq!(labels["kubernetes.io/role"], "agent");
        assert_eq!(labels["ec2-kubelet.io/pool"], "gpu");
        assert_eq!(labels["ec2-kubelet.io/node-index"], "2");
        assert_eq!(
            object["spec"]["taints"],
            json!([{"key": "virtual-kubelet.io/provider", "value": "ec2", "effect": "NoSchedule"}])
        );
        let health = Health {
            ready: true,
            reason: "KubeletReady".into(),
            message: String::new(),
        };
        let status = node_status(&node, &health, 10250, "2026-01-01T00:00:00Z");
        assert_eq!(status["capacity"]["pods"], "20");
        assert_eq!(status["capacity"]["nvidia.com/gpu"], "4");
        assert_eq!(
            status["addresses"][0],
            json!({"type": "InternalIP", "address": "10.0.1.23"})
        );
        assert_eq!(status["daemonEndpoints"]["kubeletEndpoint"]["Port"], 10250);
        assert_eq!(status["conditions"][0]["status"], "True");
        assert!(
            status["nodeInfo"]["kubeletVersion"]
                .as_str()
                .unwrap()
                .starts_with("v1.34.0-ec2-kubelet-")
        );
    }

    #[test]
    fn a_node_as_registered_is_not_patched_again() {
        let wanted = node_object(&virtual_node());
        let patch = registration_patch(&wanted);
        let changes = |node: &Node| crate::pod::status::changes(&serde_json::to_value(node).unwrap(), &patch);
        let mut existing: Node = serde_json::from_value(wanted.clone()).unwrap();
        existing
            .metadata
            .labels
            .get_or_insert_default()
            .insert("topology.kubernetes.io/zone".into(), "set by someone else".into());
        assert!(!changes(&existing), "other labels are left alone");

        let mut relabelled = existing.clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_default()
            .insert("team".into(), "b".into());
        assert!(changes(&relabelled), "a label of ours changed");

        let mut untainted = existing.clone();
        untainted.spec.get_or_insert_default().taints = None;
        assert!(changes(&untainted), "our taint is missing");

        let mut adopted = existing;
        adopted.metadata.owner_references.get_or_insert_default()[0].uid = "another-pool".into();
        assert!(changes(&adopted), "another owner");
    }
}
