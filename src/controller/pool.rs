//! The pool controller: makes a pool's ENIs match `spec.nodes` (create missing ones, adopt
//! existing ones by tag, drain and remove the highest-index ones on scale-down), publishes the
//! virtual nodes in the pool's status for the node tasks, and on deletion removes every node
//! and ENI before releasing its finalizer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::events::EventType;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::cloud::{Eni, EniRequest, InstanceFilter};
use crate::crd::{
    ConditionStatus, Ec2Instance, Ec2NodePool, Ec2NodePoolSpec, annotations, labels, set_condition, tags,
};
use crate::runtime::synced::Synced;
use crate::runtime::{Context, Error, Result, records};
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

pub async fn reconcile(pool: Arc<Ec2NodePool>, pc: Arc<PoolContext>) -> Result<Action> {
    let pools = api(&pc.ctx);
    finalizer::finalizer(&pools, FINALIZER, pool, |event| async {
        match event {
            FinalizerEvent::Apply(pool) => apply(&pool, &pc).await,
            FinalizerEvent::Cleanup(pool) => cleanup(&pool, &pc.ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// Transient failures retry soon; the rest wait for the resync (a spec change triggers sooner).
pub fn error_policy(pool: Arc<Ec2NodePool>, error: &Error, pc: Arc<PoolContext>) -> Action {
    tracing::warn!(pool = %pool.name_any(), %error, reason = error.reason(), "pool reconcile failed");
    let resync = Duration::from_secs(pc.ctx.config.sync.pool_resync_seconds.into());
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

/// The pool controller's context: the runtime every task shares, and the controller's own
/// reflector stores, from which it reads nodes and pods instead of listing them per node.
pub struct PoolContext {
    pub ctx: Arc<Context>,
    /// The nodes of every pool (label `ec2-kubelet.io/pool`).
    pub nodes: Store<Node>,
    /// Every pod's node and phase.
    pub pods: Store<PodPlacement>,
    /// Whether `nodes` and `pods` have taken in their first list.
    pub synced: (Synced, Synced),
}

/// A pod as the pool controller keeps it: where it runs and how far it got. Full objects, even
/// slimmed, cost about 2 KiB each in memory (every optional field of the spec and status is
/// there); at 10,000 pods that was 22 MiB of the operator's heap for two fields.
#[derive(Clone, Debug, PartialEq)]
pub struct PodPlacement {
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub phase: Option<String>,
}

impl PodPlacement {
    pub fn of(pod: Pod) -> PodPlacement {
        PodPlacement {
            name: pod.metadata.name.unwrap_or_default(),
            namespace: pod.metadata.namespace.unwrap_or_default(),
            node: pod.spec.and_then(|s| s.node_name),
            phase: pod.status.and_then(|s| s.phase),
        }
    }

    /// A pod watcher's event as the placement store takes it.
    pub fn event(event: watcher::Event<Pod>) -> watcher::Event<PodPlacement> {
        use watcher::Event;
        match event {
            Event::Apply(pod) => Event::Apply(PodPlacement::of(pod)),
            Event::Delete(pod) => Event::Delete(PodPlacement::of(pod)),
            Event::Init => Event::Init,
            Event::InitApply(pod) => Event::InitApply(PodPlacement::of(pod)),
            Event::InitDone => Event::InitDone,
        }
    }
}

/// So that kube's reflector keeps placements as it keeps pods (by namespace and name).
impl kube::runtime::reflector::Lookup for PodPlacement {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }

    fn namespace(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.namespace))
    }

    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }

    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// A node of the pool as the controller decides on it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    /// When a scale-down cordoned it ([`DRAIN_STARTED`], as written), if one did.
    pub drain_started: Option<String>,
}

/// What the controller read before deciding: the pool's ENIs, its registered nodes, and the
/// phases of the pods bound to each node.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub enis: Vec<Eni>,
    pub nodes: Vec<NodeView>,
    pub pods: BTreeMap<String, Vec<String>>,
}

impl Observed {
    fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Pods on `node` that have not finished.
    fn active_pods(&self, node: &str) -> usize {
        self.pods
            .get(node)
            .into_iter()
            .flatten()
            .filter(|phase| !matches!(phase.as_str(), "Succeeded" | "Failed"))
            .count()
    }
}

/// Reads the pool's state: its ENIs (a fresh DescribeNetworkInterfaces, shared with the node
/// tasks), and its nodes and their pods from the stores once they have synced.
async fn observe(pc: &PoolContext, pool: &Ec2NodePool) -> Result<Observed> {
    let name = pool.name_any();
    let enis = pc.ctx.pool_enis(&name, std::time::Instant::now()).await?.to_vec();
    // A store that has not synced yet would read as a pool without pods: never drain on that.
    pc.synced.0.wait().await;
    pc.synced.1.wait().await;
    let nodes: Vec<NodeView> = pc
        .nodes
        .state()
        .iter()
        .filter(|n| n.labels().get(labels::POOL) == Some(&name))
        .map(|n| NodeView {
            name: n.name_any(),
            ready: node_ready(n),
            drain_started: n.annotations().get(DRAIN_STARTED).cloned(),
        })
        .collect();
    let names: HashSet<String> = enis
        .iter()
        .map(|e| node_name(&e.private_ip, &name))
        .chain(nodes.iter().map(|n| n.name.clone()))
        .collect();
    let mut pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pod in pc.pods.state() {
        if let Some(node) = pod.node.as_ref().filter(|node| names.contains(*node)) {
            let phase = pod.phase.clone().unwrap_or_else(|| "Pending".into());
            pods.entry(node.clone()).or_default().push(phase);
        }
    }
    Ok(Observed { enis, nodes, pods })
}

/// Scale-up (and a lost ENI's replacement): the node indexes below `wanted` without an ENI.
pub fn missing_indexes(wanted: u32, enis: &[Eni]) -> Vec<u32> {
    (0..wanted)
        .filter(|index| !enis.iter().any(|e| e.index == *index))
        .collect()
}

/// One decision about a node of the pool.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Scale-down starts: cordon the node, record when its drain started, and evict its pods.
    Cordon { node: String },
    /// Scale-down waits: the node still runs `active` pods (evictions a PodDisruptionBudget
    /// refused are asked again).
    Wait { node: String, active: usize },
    /// Scale-down ends: remove the node, its leases and its ENI. `left_running` pods still ran
    /// when the drain timeout passed (they are released with the node).
    Remove {
        node: String,
        eni_id: String,
        left_running: usize,
    },
    /// A registered node whose ENI is gone (deleted behind our back, or replaced): remove it.
    RemoveOrphan { node: String },
}

/// What to do with the pool's nodes, given its ENIs (after scale-up) and what was observed:
/// the ENIs past `wanted` are drained and removed highest index first, each cordoned, then
/// removed once no pod is active on it or `drain_timeout` has passed; a registered node that
/// no ENI names is an orphan.
pub fn plan_nodes(
    pool: &str,
    wanted: u32,
    observed: &Observed,
    now: jiff::Timestamp,
    drain_timeout: jiff::SignedDuration,
) -> Vec<Step> {
    let mut extra: Vec<&Eni> = observed.enis.iter().filter(|e| e.index >= wanted).collect();
    extra.sort_by_key(|e| std::cmp::Reverse(e.index));
    let mut steps = Vec::new();
    for eni in extra {
        let node = node_name(&eni.private_ip, pool);
        let remove = |left_running| Step::Remove {
            node: node.clone(),
            eni_id: eni.eni_id.clone(),
            left_running,
        };
        let step = match observed.node(&node) {
            None => remove(0),
            Some(NodeView {
                drain_started: None, ..
            }) => Step::Cordon { node: node.clone() },
            Some(NodeView {
                drain_started: Some(started),
                ..
            }) => {
                let active = observed.active_pods(&node);
                // An unreadable mark counts as long past: the node is not held forever.
                let timed_out = started
                    .parse::<jiff::Timestamp>()
                    .map(|t| t + drain_timeout < now)
                    .unwrap_or(true);
                match active {
                    0 => remove(0),
                    _ if timed_out => remove(active),
                    _ => Step::Wait {
                        node: node.clone(),
                        active,
                    },
                }
            }
        };
        steps.push(step);
    }
    let named: HashSet<String> = observed
        .enis
        .iter()
        .map(|e| node_name(&e.private_ip, pool))
        .collect();
    for node in &observed.nodes {
        if !named.contains(&node.name) {
            steps.push(Step::RemoveOrphan {
                node: node.name.clone(),
            });
        }
    }
    steps
}

/// The pool's status as counted from what was observed, after the steps were taken.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// One entry per node (merge-patched by name); `null` for a node no longer in the pool.
    pub entries: serde_json::Map<String, Value>,
    pub ready_nodes: i32,
    pub pods: i32,
    /// Pods per phase, for the metrics.
    pub phases: BTreeMap<String, i64>,
    pub all_ready: bool,
}

/// Counts the pool's status from `observed` as the steps left it (their removed ENIs gone);
/// `current` is the status's node list, whose nodes no longer in the pool are removed.
pub fn summarize(
    pool: &str,
    wanted: u32,
    observed: &Observed,
    current: &BTreeMap<String, crate::crd::PoolNodeStatus>,
) -> Summary {
    let mut entries = serde_json::Map::new();
    let mut ready_nodes = 0;
    let mut pods = 0;
    let mut phases: BTreeMap<String, i64> = ["Pending", "Running", "Succeeded", "Failed"]
        .into_iter()
        .map(|p| (p.to_string(), 0))
        .collect();
    for eni in &observed.enis {
        let node = node_name(&eni.private_ip, pool);
        let ready = observed.node(&node).is_some_and(|n| n.ready);
        let on_node = observed.pods.get(&node).map(Vec::as_slice).unwrap_or_default();
        for phase in on_node {
            *phases.entry(phase.clone()).or_insert(0) += 1;
        }
        if ready && eni.index < wanted {
            ready_nodes += 1;
        }
        pods += on_node.len() as i32;
        entries.insert(
            node,
            json!({"index": eni.index, "eniId": eni.eni_id, "privateIp": eni.private_ip, "ready": ready, "pods": on_node.len()}),
        );
    }
    for stale in current.keys() {
        if !entries.contains_key(stale) {
            entries.insert(stale.clone(), Value::Null);
        }
    }
    Summary {
        entries,
        ready_nodes,
        pods,
        phases,
        all_ready: ready_nodes as u32 >= wanted,
    }
}

/// Observe, plan, act: creates the missing ENIs, takes the node steps, collects orphaned
/// instances, and writes the status.
async fn apply(pool: &Ec2NodePool, pc: &PoolContext) -> Result<Action> {
    let ctx = &*pc.ctx;
    let name = pool.name_any();
    let spec = &pool.spec;
    let resync = Action::requeue(Duration::from_secs(ctx.config.sync.pool_resync_seconds.into()));
    super::upgrade::move_bindings(ctx, pool).await?;
    if let Err(error) = validate(spec) {
        report_invalid(ctx, pool, error.reason(), &error.to_string()).await?;
        return Ok(resync);
    }
    let mut observed = match observe(pc, pool).await {
        Ok(observed) => observed,
        Err(error) => {
            if matches!(error, Error::Cloud(_)) {
                let message = format!("describing the pool's ENIs: {error}");
                report_invalid(ctx, pool, error.reason(), &message).await?;
            }
            return Err(error);
        }
    };
    let wanted = spec.nodes.max(0) as u32;
    let missing = missing_indexes(wanted, &observed.enis);
    for &index in &missing {
        let request = EniRequest {
            pool: name.clone(),
            index,
            subnet_id: spec.subnet_ids[index as usize % spec.subnet_ids.len()].clone(),
            security_group_ids: spec.security_group_ids.clone(),
            tags: spec.tags.clone(),
        };
        match ctx.compute.ensure_eni(&request).await {
            Ok(eni) => observed.enis.push(eni),
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
    if !missing.is_empty() {
        let note = format!("created {} node ENI(s); {wanted} node(s) wanted", missing.len());
        publish(ctx, pool, EventType::Normal, "ScaledUp", note, "ScaleUp").await;
    }
    let steps = plan_nodes(
        &name,
        wanted,
        &observed,
        jiff::Timestamp::now(),
        jiff::SignedDuration::from_secs(i64::from(ctx.config.sync.drain_timeout_seconds)),
    );
    let mut draining = false;
    for step in &steps {
        act(ctx, pool, step).await?;
        match step {
            Step::Cordon { .. } | Step::Wait { .. } => draining = true,
            Step::Remove { eni_id, .. } => observed.enis.retain(|e| e.eni_id != *eni_id),
            Step::RemoveOrphan { .. } => {}
        }
    }

    collect_orphans(ctx, pool).await?;

    let current = pool.status.as_ref().map(|s| s.nodes.clone()).unwrap_or_default();
    let summary = summarize(&name, wanted, &observed, &current);
    for (phase, count) in &summary.phases {
        let labels = crate::metrics::PoolPhaseLabels {
            pool: name.clone(),
            phase: phase.clone(),
        };
        ctx.metrics.pods.get_or_create(&labels).set(*count);
    }
    let labels = crate::metrics::PoolLabels { pool: name.clone() };
    ctx.metrics
        .nodes_ready
        .get_or_create(&labels)
        .set(i64::from(summary.ready_nodes));
    write_status(ctx, pool, wanted, &summary, draining).await?;
    let settle = Duration::from_secs(u64::from(ctx.config.lease.renew_interval_seconds.max(1)));
    Ok(if draining || !summary.all_ready {
        Action::requeue(settle)
    } else {
        resync
    })
}

/// Takes one node step, with the event that tells the user.
async fn act(ctx: &Context, pool: &Ec2NodePool, step: &Step) -> Result<()> {
    match step {
        Step::Cordon { node } => {
            let patch = json!({"metadata": {"annotations": {DRAIN_STARTED: jiff::Timestamp::now().to_string()}},
                "spec": {"unschedulable": true}});
            let nodes: Api<Node> = Api::all(ctx.client.clone());
            match nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
                other => other?,
            };
            let note = format!("cordoned {node} for scale-down");
            publish(ctx, pool, EventType::Normal, "DrainingNode", note, "ScaleDown").await;
            evict_pods(ctx, pool, node).await?;
        }
        Step::Wait { node, .. } => evict_pods(ctx, pool, node).await?,
        Step::Remove {
            node,
            eni_id,
            left_running,
        } => {
            if *left_running > 0 {
                let note = format!(
                    "{node} still had {left_running} pod(s) after the drain timeout; removing it anyway"
                );
                publish(ctx, pool, EventType::Warning, "DrainTimeout", note, "ScaleDown").await;
            }
            remove_node(ctx, node, eni_id).await?;
            let note = format!("removed {node} and ENI {eni_id}");
            publish(ctx, pool, EventType::Normal, "NodeRemoved", note, "ScaleDown").await;
        }
        Step::RemoveOrphan { node } => {
            remove_node_objects(ctx, node).await?;
            let note = format!("removed {node}: its ENI no longer exists");
            publish(ctx, pool, EventType::Warning, "NodeEniLost", note, "Reconcile").await;
        }
    }
    Ok(())
}

/// Evicts the pods still running on a cordoned node through the Eviction API, as `kubectl
/// drain` and Karpenter do: the API server refuses (429) an eviction that a
/// PodDisruptionBudget does not allow, and the next pass asks again, until the drain timeout.
/// Pods already going and pods that finished are left alone (the node's removal releases the
/// finished ones).
async fn evict_pods(ctx: &Context, pool: &Ec2NodePool, node: &str) -> Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    let mut evicted = Vec::new();
    let mut refused = Vec::new();
    for pod in on_node.items {
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending");
        if pod.metadata.deletion_timestamp.is_some() || matches!(phase, "Succeeded" | "Failed") {
            continue;
        }
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.evict(&name, &EvictParams::default()).await {
            Ok(_) => evicted.push(format!("{namespace}/{name}")),
            Err(kube::Error::Api(status)) if status.code == 429 => {
                refused.push(format!("{namespace}/{name} ({})", status.message));
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(error) => return Err(error.into()),
        }
    }
    if !evicted.is_empty() {
        let note = format!(
            "evicted {} pod(s) from {node}: {}",
            evicted.len(),
            evicted.join(", ")
        );
        publish(ctx, pool, EventType::Normal, "EvictedPods", note, "ScaleDown").await;
    }
    if !refused.is_empty() {
        let note = format!(
            "{node}: {} pod(s) not evicted yet, retrying until the drain timeout: {}",
            refused.len(),
            refused.join(", ")
        );
        publish(
            ctx,
            pool,
            EventType::Warning,
            "EvictionRefused",
            note,
            "ScaleDown",
        )
        .await;
    }
    Ok(())
}

/// Writes the summary, the conditions and the observed generation into the pool's status.
async fn write_status(
    ctx: &Context,
    pool: &Ec2NodePool,
    wanted: u32,
    summary: &Summary,
    draining: bool,
) -> Result<()> {
    let generation = pool.metadata.generation;
    let mut conditions = conditions_of(pool);
    let counted = format!("{}/{wanted} nodes Ready", summary.ready_nodes);
    let (ready, reason) = match summary.all_ready {
        true => (ConditionStatus::True, "AllNodesReady"),
        false => (ConditionStatus::False, "NodesNotReady"),
    };
    set_condition(
        &mut conditions,
        "Ready",
        ready,
        reason,
        &counted,
        generation,
        now(),
    );
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
        "readyNodes": summary.ready_nodes,
        "pods": summary.pods,
        "nodes": summary.entries,
        "conditions": conditions,
    }});
    api(ctx)
        .patch_status(&pool.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
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
/// so a launch in flight is never mistaken for one) and retires the records of pods that are
/// gone. Only instances carrying this cluster's and pool's tags are ever looked at.
async fn collect_orphans(ctx: &Context, pool: &Ec2NodePool) -> Result<()> {
    let name = pool.name_any();
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    // UIDs are metadata: at 10,000 pods a full list per pool reconcile would dominate the
    // API server's work after a restart.
    let metadata = pods.list_metadata(&ListParams::default()).await?.items;
    let live: HashSet<String> = metadata.iter().filter_map(|p| p.uid()).collect();
    let records = ctx.records.of_pool(&name);
    // The instance each pod runs on, as its record names it (or a pod of an operator before
    // records, its annotation).
    let mut recorded: HashMap<String, String> = HashMap::new();
    for pod in &metadata {
        if let (Some(uid), Some(id)) = (pod.uid(), pod.annotations().get(annotations::INSTANCE_ID)) {
            recorded.insert(uid, id.clone());
        }
    }
    for record in &records {
        if let (Some(uid), Some(id)) = (record.pod_uid(), record.instance_id()) {
            recorded.insert(uid.to_string(), id.to_string());
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
    // Records of pods that are gone (a pod deleted while no operator ran): their instances
    // are terminated above, or now if they were younger than the grace.
    let stale: Vec<&Ec2Instance> = records
        .iter()
        .map(|r| r.as_ref())
        .filter(|r| {
            let old = r
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| now - t.0.as_millisecond() >= grace);
            old && r.metadata.deletion_timestamp.is_none()
                && r.pod_uid().is_some_and(|uid| !live.contains(uid))
        })
        .collect();
    let ids = records::terminate_instances_of(ctx, &name, &stale, std::time::Instant::now()).await?;
    for record in &stale {
        records::retire(&ctx.client, &record.name_any(), &ctx.metrics.record_writes).await?;
    }
    if !stale.is_empty() {
        tracing::info!(pool = %name, records = stale.len(), instances = ?ids, "retired the records of pods that no longer exist");
    }
    Ok(())
}

/// Deletes every node and ENI of the pool; the finalizer goes once this returns Ok.
async fn cleanup(pool: &Ec2NodePool, ctx: &Context) -> Result<Action> {
    let name = pool.name_any();
    let enis = ctx.compute.describe_enis(&name).await?;
    tracing::info!(pool = %name, enis = enis.len(), "cleaning up a deleted pool");
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
    // Every record of the pool goes, each after its instance (the pods' were terminated with
    // their nodes), and every warm instance, recorded or not: no pod of the pool can claim
    // them any more. One snapshot, one TerminateInstances.
    let records: Api<Ec2Instance> = Api::all(ctx.client.clone());
    let listed = records
        .list(&ListParams::default().labels(&format!("{}={name}", labels::POOL)))
        .await?;
    let mut owned: Vec<Ec2Instance> = listed.items;
    for record in ctx.records.of_pool(&name) {
        if !owned.iter().any(|r| r.name_any() == record.name_any()) {
            owned.push((*record).clone());
        }
    }
    let instances = ctx.pool_instances(&name, std::time::Instant::now()).await?;
    let doomed: Vec<&crate::cloud::Instance> = instances
        .iter()
        .filter(|i| i.state.is_alive())
        .filter(|i| i.tag(tags::WARM) == Some("true") || owned.iter().any(|r| records::belongs(i, r)))
        .collect();
    let warm = doomed
        .iter()
        .filter(|i| i.tag(tags::WARM) == Some("true"))
        .count();
    let ids: Vec<String> = doomed.iter().map(|i| i.instance_id.clone()).collect();
    if !ids.is_empty() {
        ctx.compute.terminate_instances(&ids).await?;
        tracing::info!(pool = %name, instances = ?ids, "terminated the remaining instances of a deleted pool");
    }
    for record in &owned {
        records::retire(&ctx.client, &record.name_any(), &ctx.metrics.record_writes).await?;
    }
    let note = format!(
        "removed {} node(s) and their ENIs, terminated {} warm instance(s), removed {} instance record(s)",
        enis.len(),
        warm,
        owned.len()
    );
    tracing::info!(pool = %name, "{note}; the pool goes");
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

    fn eni(index: u32, ip: &str) -> Eni {
        Eni {
            eni_id: format!("eni-{index}-{ip}"),
            private_ip: ip.into(),
            subnet_id: "subnet-1".into(),
            pool: "gpu".into(),
            index,
            tags: Default::default(),
        }
    }

    fn node(ip: &str, ready: bool, drain_started: Option<&str>) -> NodeView {
        NodeView {
            name: node_name(ip, "gpu"),
            ready,
            drain_started: drain_started.map(String::from),
        }
    }

    fn pods(ip: &str, phases: &[&str]) -> (String, Vec<String>) {
        (
            node_name(ip, "gpu"),
            phases.iter().map(|p| p.to_string()).collect(),
        )
    }

    const NOW: &str = "2026-11-30T12:00:00Z";
    const TIMEOUT: jiff::SignedDuration = jiff::SignedDuration::from_secs(300);

    fn plan(wanted: u32, observed: &Observed) -> Vec<Step> {
        plan_nodes("gpu", wanted, observed, NOW.parse().unwrap(), TIMEOUT)
    }

    #[test]
    fn scale_up_creates_the_missing_indexes_and_a_lost_eni_is_replaced() {
        assert_eq!(missing_indexes(3, &[eni(1, "10.0.0.2")]), [0, 2]);
        assert_eq!(
            missing_indexes(2, &[eni(0, "10.0.0.1"), eni(1, "10.0.0.2"), eni(2, "10.0.0.3")]),
            [] as [u32; 0]
        );
        // Index 1's ENI was deleted behind our back: a new one (new address) takes its place,
        // and the node the old address named is removed as an orphan.
        let mut observed = Observed {
            enis: vec![eni(0, "10.0.0.1")],
            nodes: vec![node("10.0.0.1", true, None), node("10.0.0.2", true, None)],
            pods: BTreeMap::new(),
        };
        assert_eq!(missing_indexes(2, &observed.enis), [1]);
        observed.enis.push(eni(1, "10.0.0.9"));
        assert_eq!(
            plan(2, &observed),
            [Step::RemoveOrphan {
                node: node_name("10.0.0.2", "gpu")
            }]
        );
    }

    #[test]
    fn scale_down_cordons_first_then_waits_for_active_pods_highest_index_first() {
        let observed = Observed {
            enis: vec![eni(0, "10.0.0.1"), eni(1, "10.0.0.2"), eni(2, "10.0.0.3")],
            nodes: vec![
                node("10.0.0.1", true, None),
                node("10.0.0.2", true, None),
                node("10.0.0.3", true, Some("2026-11-30T11:59:00Z")),
            ],
            pods: BTreeMap::from([pods("10.0.0.3", &["Running", "Succeeded", "Pending"])]),
        };
        assert_eq!(
            plan(1, &observed),
            [
                Step::Wait {
                    node: node_name("10.0.0.3", "gpu"),
                    active: 2
                },
                Step::Cordon {
                    node: node_name("10.0.0.2", "gpu")
                },
            ]
        );
        assert_eq!(plan(3, &observed), []);
    }

    #[test]
    fn a_drained_node_goes_and_so_does_one_past_the_drain_timeout_or_never_registered() {
        let observed = Observed {
            enis: vec![
                eni(0, "10.0.0.1"),
                eni(1, "10.0.0.2"),
                eni(2, "10.0.0.3"),
                eni(3, "10.0.0.4"),
            ],
            nodes: vec![
                node("10.0.0.1", true, None),
                // Only finished pods left.
                node("10.0.0.2", true, Some("2026-11-30T11:59:00Z")),
                // Cordoned more than the timeout ago, still running one pod.
                node("10.0.0.3", true, Some("2026-11-30T11:50:00Z")),
            ],
            pods: BTreeMap::from([
                pods("10.0.0.2", &["Succeeded", "Failed"]),
                pods("10.0.0.3", &["Running"]),
            ]),
        };
        let removed = |ip: &str, index: u32, left_running| Step::Remove {
            node: node_name(ip, "gpu"),
            eni_id: eni(index, ip).eni_id,
            left_running,
        };
        assert_eq!(
            plan(1, &observed),
            [
                removed("10.0.0.4", 3, 0),
                removed("10.0.0.3", 2, 1),
                removed("10.0.0.2", 1, 0)
            ]
        );
        // An unreadable drain mark does not hold a node forever.
        let observed = Observed {
            enis: vec![eni(0, "10.0.0.1")],
            nodes: vec![node("10.0.0.1", true, Some("yesterday"))],
            pods: BTreeMap::from([pods("10.0.0.1", &["Running"])]),
        };
        assert_eq!(plan(0, &observed), [removed("10.0.0.1", 0, 1)]);
    }

    #[test]
    fn the_summary_counts_ready_nodes_within_the_spec_and_every_pod_and_drops_stale_entries() {
        let observed = Observed {
            enis: vec![eni(0, "10.0.0.1"), eni(1, "10.0.0.2"), eni(2, "10.0.0.3")],
            nodes: vec![
                node("10.0.0.1", true, None),
                node("10.0.0.2", false, None),
                node("10.0.0.3", true, Some(NOW)),
            ],
            pods: BTreeMap::from([
                pods("10.0.0.1", &["Running", "Running", "Pending"]),
                pods("10.0.0.3", &["Succeeded"]),
            ]),
        };
        let current = BTreeMap::from([(
            "ip-10-0-0-7.gpu".to_string(),
            serde_json::from_value(json!({"index": 4, "eniId": "eni-x", "privateIp": "10.0.0.7"})).unwrap(),
        )]);
        let summary = summarize("gpu", 2, &observed, &current);
        // The draining node (index 2) is Ready but past the spec: not counted.
        assert_eq!((summary.ready_nodes, summary.all_ready), (1, false));
        assert_eq!(summary.pods, 4);
        assert_eq!(summary.phases["Running"], 2);
        assert_eq!(summary.phases["Pending"], 1);
        assert_eq!(summary.phases["Succeeded"], 1);
        assert_eq!(summary.phases["Failed"], 0);
        assert_eq!(summary.entries["ip-10-0-0-7.gpu"], Value::Null);
        assert_eq!(
            summary.entries[&node_name("10.0.0.1", "gpu")],
            json!({"index": 0, "eniId": "eni-0-10.0.0.1", "privateIp": "10.0.0.1", "ready": true, "pods": 3})
        );
        let first = Observed {
            enis: observed.enis[..1].to_vec(),
            ..observed.clone()
        };
        assert!(summarize("gpu", 1, &first, &BTreeMap::new()).all_ready);
    }

    #[test]
    fn a_placement_keeps_the_pods_name_node_and_phase_only() {
        use kube::runtime::reflector::{Lookup, ObjectRef};
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "a", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "ip-10-0-0-1.gpu", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5"},
        }))
        .unwrap();
        let placement = PodPlacement {
            name: "web".into(),
            namespace: "a".into(),
            node: Some("ip-10-0-0-1.gpu".into()),
            phase: Some("Running".into()),
        };
        assert_eq!(PodPlacement::of(pod.clone()), placement);
        assert!(
            matches!(PodPlacement::event(watcher::Event::Delete(pod)), watcher::Event::Delete(p) if p == placement)
        );
        assert_eq!(placement.to_object_ref(()), ObjectRef::new("web").within("a"));
        let pending = PodPlacement::of(
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "a"}})).unwrap(),
        );
        assert_eq!((pending.node, pending.phase), (None, None));
    }
}
