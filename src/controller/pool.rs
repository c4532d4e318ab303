//! The pool controller: makes a pool's ENIs match `spec.nodes` (create missing ones, adopt
//! existing ones by tag, drain and remove the highest-index ones on scale-down), publishes the
//! virtual nodes in the pool's status for the node tasks, and on deletion removes every node
//! and ENI before releasing its finalizer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::events::EventType;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::cloud::{Eni, EniRequest, InstanceFilter};
use crate::crd::{ConditionStatus, Ec2NodePool, Ec2NodePoolSpec, annotations, labels, set_condition, tags};
use crate::runtime::{Context, Error, Result};
use crate::runtime::{NODE_LEASE_NAMESPACE, node_name};

/// Held on every pool until its nodes and ENIs are gone.
pub const FINALIZER: &str = "ec2-kubelet.io/pool-cleanup";
/// When a scale-down started draining a node (RFC 3339), on the node.
pub const DRAIN_STARTED: &str = "ec2-kubelet.io/drain-started";

/// Taint key prefixes the node lifecycle controller owns; a pool must not set them.
const RESERVED_TAINT_PREFIXES: &[&str] = &["node.kubernetes.io/", "node.cloudprovider.kubernetes.io/"];

/// Checks what the CRD schema cannot: the fields a user must fix, with the fix.
pub fn validate(spec: &Ec2NodePoolSpec) -> Result<(), Error> {
    let invalid = |field: String, message: &str| Error::InvalidSpec {
        field,
        message: message.to_string(),
    };
    if spec.subnet_ids.is_empty() {
        return Err(invalid(
            "spec.subnetSelector".into(),
            "selecting subnets by tag is not supported yet: list the node subnets in spec.subnetIds",
        ));
    }
    if spec.security_group_ids.is_empty() && spec.template_ref.is_none() {
        return Err(invalid(
            "spec.securityGroupIds".into(),
            "node ENIs need at least one security group: set spec.securityGroupIds (or a templateRef whose template sets them)",
        ));
    }
    let mut seen = HashSet::new();
    for (i, taint) in spec.node_taints.iter().enumerate() {
        if let Some(prefix) = RESERVED_TAINT_PREFIXES.iter().find(|p| taint.key.starts_with(*p)) {
            return Err(invalid(
                format!("spec.nodeTaints[{i}].key"),
                &format!(
                    "taint keys under {prefix} are set by the node lifecycle controller: choose another key"
                ),
            ));
        }
        if !seen.insert((taint.key.as_str(), taint.effect.as_str())) {
            return Err(invalid(
                format!("spec.nodeTaints[{i}]"),
                &format!(
                    "duplicate taint {}:{}: each key may appear once per effect",
                    taint.key,
                    taint.effect.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// Cloud errors that only a change of the pool can fix, with the field to change.
fn permanent_field(error: &crate::cloud::Error) -> Option<&'static str> {
    use crate::cloud::Error as Cloud;
    match error {
        Cloud::SubnetNotFound { .. } => Some("spec.subnetIds"),
        Cloud::SecurityGroupNotFound { .. } => Some("spec.securityGroupIds"),
        Cloud::InvalidParameter { .. } => Some("spec"),
        _ => None,
    }
}

/// The pool's current conditions (to update with `set_condition`).
fn conditions_of(pool: &Ec2NodePool) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    pool.status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn api(ctx: &Context) -> Api<Ec2NodePool> {
    Api::all(ctx.client.clone())
}

pub async fn reconcile(pool: Arc<Ec2NodePool>, ctx: Arc<Context>) -> Result<Action> {
    let pools = api(&ctx);
    finalizer::finalizer(&pools, FINALIZER, pool, |event| async {
        match event {
            FinalizerEvent::Apply(pool) => apply(&pool, &ctx).await,
            FinalizerEvent::Cleanup(pool) => cleanup(&pool, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// Transient failures retry soon; the rest wait for the resync (a spec change triggers sooner).
pub fn error_policy(pool: Arc<Ec2NodePool>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(pool = %pool.name_any(), %error, reason = error.reason(), "pool reconcile failed");
    let resync = Duration::from_secs(ctx.config.sync.pool_resync_seconds.into());
    Action::requeue(crate::runtime::retry_after(error, resync))
}

async fn publish(
    ctx: &Context,
    pool: &Ec2NodePool,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    ctx.events
        .publish(&pool.object_ref(&()), type_, reason, note, action)
        .await;
}

/// Marks the pool `Ready=False`/`Degraded=True` with the field at fault, and records a warning
/// event when the message is new. Nothing else is touched.
async fn report_invalid(ctx: &Context, pool: &Ec2NodePool, reason: &str, message: &str) -> Result<()> {
    let generation = pool.metadata.generation;
    let mut conditions = conditions_of(pool);
    let changed = set_condition(
        &mut conditions,
        "Ready",
        ConditionStatus::False,
        reason,
        message,
        generation,
        now(),
    );
    set_condition(
        &mut conditions,
        "Degraded",
        ConditionStatus::True,
        reason,
        message,
        generation,
        now(),
    );
    if changed {
        let patch = json!({"status": {"conditions": conditions, "observedGeneration": generation}});
        api(ctx)
            .patch_status(&pool.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        publish(
            ctx,
            pool,
            EventType::Warning,
            reason,
            message.to_string(),
            "Reconcile",
        )
        .await;
    }
    Ok(())
}

/// How far draining a node has come.
enum Drain {
    Done,
    Waiting,
}

/// Cordons the node, then waits until its pods are gone or the drain timeout passes.
async fn drain(ctx: &Context, pool: &Ec2NodePool, name: &str) -> Result<Drain> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let Some(node) = nodes.get_opt(name).await? else {
        return Ok(Drain::Done);
    };
    let started = node.annotations().get(DRAIN_STARTED).cloned();
    let Some(started) = started else {
        let patch = json!({"metadata": {"annotations": {DRAIN_STARTED: jiff::Timestamp::now().to_string()}},
            "spec": {"unschedulable": true}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        publish(
            ctx,
            pool,
            EventType::Normal,
            "DrainingNode",
            format!("cordoned {name} for scale-down"),
            "ScaleDown",
        )
        .await;
        return Ok(Drain::Waiting);
    };
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await?;
    let active = on_node
        .items
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .count();
    if active == 0 {
        return Ok(Drain::Done);
    }
    let timeout = jiff::SignedDuration::from_secs(i64::from(ctx.config.sync.drain_timeout_seconds));
    let timed_out = started
        .parse::<jiff::Timestamp>()
        .map(|t| t + timeout < jiff::Timestamp::now())
        .unwrap_or(true);
    if timed_out {
        let note = format!("{name} still had {active} pod(s) after the drain timeout; removing it anyway");
        publish(ctx, pool, EventType::Warning, "DrainTimeout", note, "ScaleDown").await;
        return Ok(Drain::Done);
    }
    Ok(Drain::Waiting)
}

/// Deletes a node object and its heartbeat and ownership leases.
/// Releases the pods still bound to a node that is going away, as a cluster's pod garbage
/// collector does for pods of deleted nodes: their instances are terminated and the pods
/// deleted with grace 0 (their controllers replace them). Nothing is left running unowned.
async fn release_pods(ctx: &Context, node: &str) -> Result<usize> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let bound = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    if bound.items.is_empty() {
        return Ok(0);
    }
    let instances = ctx.compute.describe_instances(&InstanceFilter::Cluster).await?;
    let doomed: Vec<String> = instances
        .into_iter()
        .filter(|i| i.state.is_alive() && i.tag(tags::NODE) == Some(node))
        .map(|i| i.instance_id)
        .collect();
    if !doomed.is_empty() {
        ctx.compute.terminate_instances(&doomed).await?;
    }
    for pod in &bound.items {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams::default().grace_period(0);
        ignore_not_found(api.delete(&pod.name_any(), &params).await.map(|_| ()))?;
    }
    tracing::info!(%node, pods = bound.items.len(), instances = doomed.len(), "released the pods of a removed node");
    Ok(bound.items.len())
}

async fn remove_node_objects(ctx: &Context, name: &str) -> Result<()> {
    release_pods(ctx, name).await?;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    ignore_not_found(nodes.delete(name, &DeleteParams::default()).await.map(|_| ()))?;
    for namespace in [NODE_LEASE_NAMESPACE, ctx.config.namespace.as_str()] {
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), namespace);
        ignore_not_found(leases.delete(name, &DeleteParams::default()).await.map(|_| ()))?;
    }
    Ok(())
}

/// Deletes a node, its leases and its ENI.
async fn remove_node(ctx: &Context, name: &str, eni_id: &str) -> Result<()> {
    remove_node_objects(ctx, name).await?;
    ctx.compute.delete_eni(eni_id).await?;
    Ok(())
}

fn ignore_not_found(result: Result<(), kube::Error>) -> Result<()> {
    match result {
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn apply(pool: &Ec2NodePool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let spec = &pool.spec;
    let resync = Action::requeue(Duration::from_secs(ctx.config.sync.pool_resync_seconds.into()));
    if let Err(error) = validate(spec) {
        report_invalid(ctx, pool, error.reason(), &error.to_string()).await?;
        return Ok(resync);
    }
    let mut enis = match ctx.pool_enis(&name, std::time::Instant::now()).await {
        Ok(enis) => enis.to_vec(),
        Err(error) => {
            report_invalid(
                ctx,
                pool,
                error.reason(),
                &format!("describing the pool's ENIs: {error}"),
            )
            .await?;
            return Err(error);
        }
    };
    let wanted = spec.nodes.max(0) as u32;
    let mut added = 0;
    for index in 0..wanted {
        if enis.iter().any(|e| e.index == index) {
            continue;
        }
        let request = EniRequest {
            pool: name.clone(),
            index,
            subnet_id: spec.subnet_ids[index as usize % spec.subnet_ids.len()].clone(),
            security_group_ids: spec.security_group_ids.clone(),
            tags: spec.tags.clone(),
        };
        match ctx.compute.ensure_eni(&request).await {
            Ok(eni) => {
                enis.push(eni);
                added += 1;
            }
            Err(error) => {
                let message = match permanent_field(&error) {
                    Some(field) => format!("{field}: {error}"),
                    None => format!("creating the ENI of node {index}: {error}"),
                };
                report_invalid(ctx, pool, error.reason(), &message).await?;
                return Err(error.into());
            }
        }
    }
    if added > 0 {
        let note = format!("created {added} node ENI(s); {wanted} node(s) wanted");
        publish(ctx, pool, EventType::Normal, "ScaledUp", note, "ScaleUp").await;
    }

    // Scale-down: the highest indexes first, each drained before it goes.
    let mut extra: Vec<&Eni> = enis.iter().filter(|e| e.index >= wanted).collect();
    extra.sort_by_key(|e| std::cmp::Reverse(e.index));
    let mut removed = Vec::new();
    let mut draining = false;
    for eni in extra {
        let node = node_name(&eni.private_ip, &name);
        match drain(ctx, pool, &node).await? {
            Drain::Done => {
                remove_node(ctx, &node, &eni.eni_id).await?;
                publish(
                    ctx,
                    pool,
                    EventType::Normal,
                    "NodeRemoved",
                    format!("removed {node} and ENI {}", eni.eni_id),
                    "ScaleDown",
                )
                .await;
                removed.push(eni.eni_id.clone());
            }
            Drain::Waiting => draining = true,
        }
    }
    enis.retain(|e| !removed.contains(&e.eni_id));

    collect_orphans(ctx, pool).await?;

    // Status: one entry per node (merge-patched by name), counts and conditions.
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let registered = nodes_api
        .list(&ListParams::default().labels(&format!("{}={name}", labels::POOL)))
        .await?;
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let mut entries = serde_json::Map::new();
    let mut ready_nodes = 0;
    let mut pod_total = 0;
    let mut phases: BTreeMap<String, i64> = ["Pending", "Running", "Succeeded", "Failed"]
        .into_iter()
        .map(|p| (p.to_string(), 0))
        .collect();
    let current: BTreeMap<String, crate::crd::PoolNodeStatus> =
        pool.status.as_ref().map(|s| s.nodes.clone()).unwrap_or_default();
    for eni in &enis {
        let node = node_name(&eni.private_ip, &name);
        let ready = registered
            .items
            .iter()
            .any(|n| n.name_any() == node && node_ready(n));
        let on_node = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?
            .items;
        for pod in &on_node {
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
            *phases
                .entry(phase.unwrap_or_else(|| "Pending".into()))
                .or_insert(0) += 1;
        }
        let pod_count = on_node.len() as i32;
        if ready && eni.index < wanted {
            ready_nodes += 1;
        }
        pod_total += pod_count;
        entries.insert(
            node,
            json!({"index": eni.index, "eniId": eni.eni_id, "privateIp": eni.private_ip, "ready": ready, "pods": pod_count}),
        );
    }
    // Nodes whose ENI is gone (deleted behind our back, replaced above) go too.
    for orphan in registered
        .items
        .iter()
        .filter(|n| !entries.contains_key(&n.name_any()))
    {
        let orphan = orphan.name_any();
        remove_node_objects(ctx, &orphan).await?;
        let note = format!("removed {orphan}: its ENI no longer exists");
        publish(ctx, pool, EventType::Warning, "NodeEniLost", note, "Reconcile").await;
    }
    let stale: Vec<String> = current
        .keys()
        .filter(|k| !entries.contains_key(*k))
        .cloned()
        .collect();
    for name in stale {
        entries.insert(name, Value::Null);
    }
    let generation = pool.metadata.generation;
    let mut conditions = conditions_of(pool);
    let all_ready = ready_nodes as u32 >= wanted;
    for (phase, count) in phases {
        let labels = crate::metrics::PoolPhaseLabels {
            pool: name.clone(),
            phase,
        };
        ctx.metrics.pods.get_or_create(&labels).set(count);
    }
    let labels = crate::metrics::PoolLabels { pool: name.clone() };
    ctx.metrics
        .nodes_ready
        .get_or_create(&labels)
        .set(i64::from(ready_nodes));
    let summary = format!("{ready_nodes}/{wanted} nodes Ready");
    if all_ready {
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "AllNodesReady",
            &summary,
            generation,
            now(),
        );
    } else {
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "NodesNotReady",
            &summary,
            generation,
            now(),
        );
    }
    let (degraded, reason, message) = if draining {
        (
            ConditionStatus::True,
            "Draining",
            "scale-down is waiting for pods to leave cordoned nodes",
        )
    } else {
        (
            ConditionStatus::False,
            "AsExpected",
            "every node ENI matches the spec",
        )
    };
    set_condition(
        &mut conditions,
        "Degraded",
        degraded,
        reason,
        message,
        generation,
        now(),
    );
    if let Some((status, reason, message)) = template_condition(ctx, pool).await? {
        set_condition(
            &mut conditions,
            "TemplateReady",
            status,
            reason,
            &message,
            generation,
            now(),
        );
    }
    let patch = json!({"status": {
        "observedGeneration": generation,
        "readyNodes": ready_nodes,
        "pods": pod_total,
        "nodes": entries,
        "conditions": conditions,
    }});
    api(ctx)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let settle = Duration::from_secs(u64::from(ctx.config.lease.renew_interval_seconds.max(1)));
    Ok(if draining || !all_ready {
        Action::requeue(settle)
    } else {
        resync
    })
}

/// The pool's `TemplateReady` condition: whether its `templateRef` exists and the template
/// controller found it valid (pods launch from it; its nodes do not need it).
async fn template_condition(
    ctx: &Context,
    pool: &Ec2NodePool,
) -> Result<Option<(ConditionStatus, &'static str, String)>> {
    let Some(reference) = &pool.spec.template_ref else {
        return Ok(None);
    };
    let templates: Api<crate::crd::Ec2PodTemplate> =
        Api::namespaced(ctx.client.clone(), &reference.namespace);
    let name = format!("{}/{}", reference.namespace, reference.name);
    Ok(Some(match templates.get_opt(&reference.name).await? {
        None => (
            ConditionStatus::False,
            "TemplateNotFound",
            format!(
                "spec.templateRef: Ec2PodTemplate {name} does not exist: create it or point templateRef at another"
            ),
        ),
        Some(template) => {
            let ready = template
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
            match ready {
                Some(c) if c.status == "False" && c.reason != "InUse" => (
                    ConditionStatus::False,
                    "TemplateInvalid",
                    format!(
                        "spec.templateRef: Ec2PodTemplate {name} is invalid ({}): {}",
                        c.reason, c.message
                    ),
                ),
                Some(c) if c.status == "True" || c.reason == "InUse" => (
                    ConditionStatus::True,
                    "TemplateValid",
                    format!("Ec2PodTemplate {name} is valid"),
                ),
                _ => (
                    ConditionStatus::Unknown,
                    "TemplateNotChecked",
                    format!("Ec2PodTemplate {name} has not been checked yet"),
                ),
            }
        }
    }))
}

/// Terminates the pool's instances whose pod no longer exists (after `sync.orphanGraceSeconds`,
/// so a launch in flight is never mistaken for one) and drops bindings of pods that are gone.
/// Only instances carrying this cluster's and pool's tags are ever looked at.
async fn collect_orphans(ctx: &Context, pool: &Ec2NodePool) -> Result<()> {
    let name = pool.name_any();
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    // UIDs are metadata: at 10,000 pods a full list per pool reconcile would dominate the
    // API server's work after a restart.
    let metadata = pods.list_metadata(&ListParams::default()).await?.items;
    let live: HashSet<String> = metadata.iter().filter_map(|p| p.uid()).collect();
    // The instance each pod runs on, as recorded on the pod or in its binding.
    let mut recorded: HashMap<String, String> = pool
        .status
        .iter()
        .flat_map(|s| s.bindings.values())
        .flat_map(|pods| pods.iter())
        .filter_map(|(uid, b)| Some((uid.clone(), b.instance_id.clone()?)))
        .collect();
    for pod in &metadata {
        if let (Some(uid), Some(id)) = (pod.uid(), pod.annotations().get(annotations::INSTANCE_ID)) {
            recorded.insert(uid, id.clone());
        }
    }
    let grace = i64::from(ctx.config.sync.orphan_grace_seconds) * 1000;
    let now = jiff::Timestamp::now().as_millisecond();
    let instances = ctx.pool_instances(&name, std::time::Instant::now()).await?;
    let settled: Vec<&crate::cloud::Instance> = instances
        .iter()
        .filter(|i| i.state.is_alive() && now - i.launch_time >= grace)
        // Warm instances have no pod yet: the warm pool tends (and retires) them.
        .filter(|i| i.tag(tags::WARM) != Some("true"))
        .collect();
    let orphans: Vec<&crate::cloud::Instance> = settled
        .iter()
        .copied()
        .filter(|i| i.tag(tags::POD_UID).is_some_and(|uid| !live.contains(uid)))
        .collect();
    // A second instance for a live pod that runs on another one: a launch whose answer was
    // lost and that EC2 did not fold into the first (a retry without its idempotency token).
    let duplicates: Vec<String> = settled
        .iter()
        .filter(|i| {
            i.tag(tags::POD_UID)
                .and_then(|uid| recorded.get(uid))
                .is_some_and(|id| *id != i.instance_id)
        })
        .map(|i| i.instance_id.clone())
        .collect();
    if !duplicates.is_empty() {
        ctx.compute.terminate_instances(&duplicates).await?;
        let note = format!(
            "terminated {} instance(s) launched again for a pod that runs on another: {}",
            duplicates.len(),
            duplicates.join(", ")
        );
        publish(
            ctx,
            pool,
            EventType::Warning,
            "DuplicateInstancesTerminated",
            note,
            "GarbageCollect",
        )
        .await;
    }
    if !orphans.is_empty() {
        let ids: Vec<String> = orphans.iter().map(|i| i.instance_id.clone()).collect();
        ctx.compute.terminate_instances(&ids).await?;
        let note = format!(
            "terminated {} instance(s) whose pod no longer exists: {}",
            ids.len(),
            ids.join(", ")
        );
        publish(
            ctx,
            pool,
            EventType::Warning,
            "OrphanInstancesTerminated",
            note,
            "GarbageCollect",
        )
        .await;
    }
    let bindings = pool
        .status
        .as_ref()
        .map(|s| s.bindings.clone())
        .unwrap_or_default();
    let mut stale = serde_json::Map::new();
    for (node, pods) in &bindings {
        let gone: serde_json::Map<String, Value> = pods
            .keys()
            .filter(|uid| !live.contains(*uid))
            .map(|uid| (uid.clone(), Value::Null))
            .collect();
        if !gone.is_empty() {
            stale.insert(node.clone(), Value::Object(gone));
        }
    }
    if !stale.is_empty() {
        let patch = json!({"status": {"bindings": stale}});
        api(ctx)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// Deletes every node and ENI of the pool; the finalizer goes once this returns Ok.
async fn cleanup(pool: &Ec2NodePool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let enis = ctx.compute.describe_enis(&name).await?;
    for eni in &enis {
        remove_node(ctx, &node_name(&eni.private_ip, &name), &eni.eni_id).await?;
    }
    // Nodes whose ENI was already gone.
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leftover = nodes
        .list(&ListParams::default().labels(&format!("{}={name}", labels::POOL)))
        .await?;
    for node in leftover.items {
        remove_node_objects(ctx, &node.name_any()).await?;
    }
    // Warm instances (recorded or not): no pod of the pool can claim them any more.
    let warm: Vec<String> = ctx
        .pool_instances(&name, std::time::Instant::now())
        .await?
        .iter()
        .filter(|i| i.state.is_alive() && i.tag(tags::WARM) == Some("true"))
        .map(|i| i.instance_id.clone())
        .collect();
    if !warm.is_empty() {
        ctx.compute.terminate_instances(&warm).await?;
        tracing::info!(pool = %name, instances = ?warm, "terminated the warm instances of a deleted pool");
    }
    let note = format!(
        "removed {} node(s) and their ENIs, terminated {} warm instance(s)",
        enis.len(),
        warm.len()
    );
    publish(ctx, pool, EventType::Normal, "PoolDeleted", note, "Delete").await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: Value) -> Ec2NodePoolSpec {
        let mut base = json!({"nodes": 1, "subnetIds": ["subnet-1"], "securityGroupIds": ["sg-1"]});
        json_patch::merge(&mut base, &extra);
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn validation_names_the_field_and_the_fix() {
        assert!(validate(&spec(json!({}))).is_ok());
        let error = validate(&spec(json!({"securityGroupIds": null}))).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.securityGroupIds: node ENIs need at least one security group")
        );
        let error = validate(&spec(json!({"nodeTaints": [
            {"key": "a", "effect": "NoSchedule"}, {"key": "a", "value": "x", "effect": "NoSchedule"}]})))
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.nodeTaints[1]: duplicate taint a:NoSchedule"),
            "{error}"
        );
        let error = validate(&spec(
            json!({"nodeTaints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]}),
        ))
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.nodeTaints[0].key: taint keys under node.kubernetes.io/")
        );
    }
}
