//! Warm pools: instances kept booted, agent Ready, waiting for pods (`spec.warmPool`).
//!
//! The replica that runs the pool controller tends every warm pool ([`run`]): it launches
//! instances until `size` are warm, marks them Ready once their agent answers, replaces the
//! ones whose agent stops answering, recycles those older than `maxAge`, and terminates the
//! extra ones when the pool shrinks or goes. Each warm instance has its `Ec2Instance` record,
//! written before RunInstances (named by the launch's idempotency key, labelled
//! `ec2-kubelet.io/warm=true`), so one launched just before a crash is found again.
//!
//! A pod worker whose resolved launch settings match a Ready warm instance claims it
//! ([`claim`]) instead of launching: one write of the pod into that instance's record, carrying
//! the resourceVersion it read, so two claims (from two pods, or two replicas) can never both
//! succeed, and a claim competes with nothing but other claims of the same instance. Retiring a
//! warm instance is a delete with the same precondition, so it never takes one a pod just got.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::Store;
use serde_json::json;

use crate::cloud::{Instance, InstanceState, LaunchRequest};
use crate::crd::{Ec2Instance, Ec2NodePool, Ec2PodTemplate, InstancePhase, PodRef, annotations, tags};
use crate::launch::settings;
use crate::runtime::synced::Synced;
use crate::runtime::{Context, Result, records};

/// How often every warm pool is looked after.
const TEND_EVERY: Duration = Duration::from_secs(1);

/// What a pod must match to take a warm instance (besides an allowed instance type).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Settings {
    image_id: String,
    subnet_id: String,
    security_group_ids: Vec<String>,
    iam_instance_profile: Option<String>,
}

impl Settings {
    /// Security groups in any order are the same settings.
    fn new(image_id: &str, subnet_id: &str, groups: &[String], profile: &Option<String>) -> Settings {
        let mut security_group_ids = groups.to_vec();
        security_group_ids.sort();
        Settings {
            image_id: image_id.to_string(),
            subnet_id: subnet_id.to_string(),
            security_group_ids,
            iam_instance_profile: profile.clone(),
        }
    }

    fn of_request(r: &LaunchRequest) -> Settings {
        Settings::new(
            &r.image_id,
            &r.subnet_id,
            &r.security_group_ids,
            &r.iam_instance_profile,
        )
    }

    fn of_record(r: &Ec2Instance) -> Settings {
        let s = &r.spec;
        Settings::new(
            &s.image_id,
            &s.subnet_id,
            &s.security_group_ids,
            &s.iam_instance_profile,
        )
    }
}

/// A warm instance no pod has claimed, and that is not being retired.
fn waiting(record: &Ec2Instance) -> bool {
    record.spec.pod.is_none() && record.metadata.deletion_timestamp.is_none()
}

/// The type the instance runs as (the record's status, else what was asked).
fn type_of(record: &Ec2Instance) -> &str {
    record
        .status
        .as_ref()
        .and_then(|s| s.instance_type.as_deref())
        .unwrap_or(&record.spec.instance_type)
}

/// Whether a pod launching `request` (or one of the `fallbacks` types) may take `warm`: Ready
/// and unclaimed, same image, subnet, security groups and instance profile, an allowed type,
/// on-demand, no placement, the same agent port.
pub fn matches(warm: &Ec2Instance, request: &LaunchRequest, fallbacks: &[String]) -> bool {
    let instance_type = type_of(warm);
    waiting(warm)
        && warm.phase() == Some(InstancePhase::Ready)
        && warm.instance_id().is_some()
        && !request.spot
        && request.placement.is_none()
        && i64::from(request.agent_port) == i64::from(warm.spec.agent_port)
        && (instance_type == request.instance_type || fallbacks.iter().any(|t| t == instance_type))
        && Settings::of_record(warm) == Settings::of_request(request)
}

fn launch_time(record: &Ec2Instance) -> jiff::Timestamp {
    record
        .status
        .as_ref()
        .and_then(|s| s.launch_time.as_ref())
        .or(record.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now)
}

/// The order in which a pod prefers warm instances: its first-choice type, then its fallbacks
/// in order; among equals, the oldest (it would be recycled first).
fn preference(warm: &Ec2Instance, request: &LaunchRequest, fallbacks: &[String]) -> (usize, jiff::Timestamp) {
    let instance_type = type_of(warm);
    let rank = if instance_type == request.instance_type {
        0
    } else {
        1 + fallbacks
            .iter()
            .position(|t| t == instance_type)
            .unwrap_or(usize::MAX - 1)
    };
    (rank, launch_time(warm))
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn instance_of(id: &str, warm: &Ec2Instance, pod: &PodRef, node: &str) -> Instance {
    let mut instance_tags = pod_tags(pod, node);
    instance_tags.insert(tags::AGENT_PORT.into(), warm.spec.agent_port.to_string());
    instance_tags.insert(tags::RECORD.into(), warm.name_any());
    let status = warm.status.clone().unwrap_or_default();
    Instance {
        instance_id: id.to_string(),
        state: InstanceState::Running,
        instance_type: type_of(warm).to_string(),
        private_ip: status.private_ip,
        launch_time: launch_time(warm).as_millisecond(),
        tags: instance_tags,
    }
}

/// The tags a claimed instance takes: its pod's, and `warm=false`.
pub fn pod_tags(pod: &PodRef, node: &str) -> BTreeMap<String, String> {
    let name = format!("{}/{}", pod.namespace, pod.name);
    BTreeMap::from([
        (tags::WARM.to_string(), "false".to_string()),
        (tags::POD_UID.to_string(), pod.uid.clone()),
        (tags::POD.to_string(), name.clone()),
        (tags::NODE.to_string(), node.to_string()),
        (tags::NAME.to_string(), name),
    ])
}

/// A claimed instance, ready for the pod.
pub struct Claimed {
    pub instance: Instance,
    /// How long the instance had been warm.
    pub warm_for: Duration,
}

/// Claims a Ready warm instance of the pod's pool that matches its launch settings: writes the
/// pod into the instance's record with the resourceVersion it read as a precondition (a lost
/// race tries the next instance), then re-tags the instance with its pod. `None` when none
/// matches (the pod launches cold). A claim that a crash interrupted before the re-tag is
/// finished by the pod's worker, which finds the instance through the record.
pub async fn claim(ctx: &Context, request: &LaunchRequest, fallbacks: &[String]) -> Result<Option<Claimed>> {
    let pool = &request.pool;
    let labels = crate::metrics::PoolLabels { pool: pool.clone() };
    let mut candidates = ctx
        .records
        .of_pool_where(pool, |r| matches(r, request, fallbacks));
    candidates.sort_by_key(|r| preference(r, request, fallbacks));
    let api: Api<Ec2Instance> = Api::all(ctx.client.clone());
    let pod = PodRef {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
        uid: request.pod_uid.clone(),
    };
    let new_labels = records::record_labels(pool, &request.node, Some(&pod));
    for candidate in candidates {
        let name = candidate.name_any();
        let patch = json!({
            "metadata": {"resourceVersion": candidate.resource_version(), "labels": new_labels},
            "spec": {"pod": pod, "node": request.node},
        });
        ctx.metrics.record_writes.inc();
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Claimed or retired by another meanwhile (or gone): the next one.
            Err(kube::Error::Api(status)) if status.code == 409 || status.is_not_found() => continue,
            Err(error) => return Err(error.into()),
        }
        let Some(id) = candidate.instance_id().map(String::from) else {
            continue;
        };
        ctx.metrics.warm_hits.get_or_create(&labels).inc();
        let new_tags = pod_tags(&pod, &request.node);
        ctx.gate
            .call(pool, || ctx.compute.tag_instance(&id, &new_tags))
            .await?;
        let warm_for = candidate
            .status
            .as_ref()
            .and_then(|s| s.ready_time.as_ref())
            .map(|t| jiff::Timestamp::now().duration_since(t.0))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
        return Ok(Some(Claimed {
            instance: instance_of(&id, &candidate, &pod, &request.node),
            warm_for,
        }));
    }
    ctx.metrics.warm_misses.get_or_create(&labels).inc();
    Ok(None)
}

/// Whether a pool keeps (or still has) warm instances, so pods of it try to claim one.
pub fn enabled(pool: &crate::crd::Ec2NodePoolSpec) -> bool {
    pool.warm_pool.as_ref().is_some_and(|w| w.size > 0)
}

/// Parses a Go duration (`90s`, `1h30m`, `1.5h`) as the CRD's `maxAge` allows it.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// What the tending loop remembers between rounds (only to decide when to give up on an
/// agent; everything that matters is in the records and the tags).
#[derive(Default)]
struct Memory {
    /// Since when each warm instance's agent has not answered.
    silent_since: HashMap<String, Instant>,
}

/// Tends every warm pool until the stream of pools ends (in the replica that holds the
/// controller lease).
pub async fn run(ctx: Arc<Context>, pools: Store<Ec2NodePool>, synced: Synced) {
    synced.wait().await;
    ctx.records.ready().await;
    let mut memory = Memory::default();
    let mut ticker = tokio::time::interval(TEND_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for pool in pools.state() {
            let name = pool.name_any();
            let has_warm = !ctx.records.of_pool_where(&name, waiting).is_empty();
            if !enabled(&pool.spec) && !has_warm {
                continue;
            }
            if let Err(error) = tend(&ctx, &pool, &mut memory).await {
                tracing::warn!(%error, pool = %name, "tending the warm pool");
            }
        }
    }
}

fn age(since: jiff::Timestamp) -> Duration {
    Duration::try_from(jiff::Timestamp::now().duration_since(since)).unwrap_or_default()
}

fn instance_age(instance: &Instance) -> Duration {
    let now = jiff::Timestamp::now().as_millisecond();
    Duration::from_millis(now.saturating_sub(instance.launch_time).max(0) as u64)
}

/// Writes what a warm instance's record learned: its instance (Booting), or its agent (Ready).
async fn note(ctx: &Context, record: &str, instance: &Instance, phase: InstancePhase) -> Result<bool> {
    let at = now();
    let mut status = json!({"phase": phase.as_str(), "instanceId": instance.instance_id,
        "instanceType": instance.instance_type, "privateIp": instance.private_ip,
        "launchTime": jiff::Timestamp::from_millisecond(instance.launch_time).map(Time).unwrap_or_else(|_| at.clone())});
    if phase == InstancePhase::Ready {
        status["readyTime"] = json!(at);
        status["conditions"] = json!([{"type": "Ready", "status": "True", "reason": "AgentReady",
            "message": "the agent answers: a pod may claim the instance", "lastTransitionTime": at}]);
    }
    records::set_status(&ctx.client, record, status, &ctx.metrics.record_writes).await
}

/// One round for one pool.
async fn tend(ctx: &Context, cached: &Ec2NodePool, memory: &mut Memory) -> Result<()> {
    let name = cached.name_any();
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let Some(pool) = pools.get_opt(&name).await? else {
        return Ok(());
    };
    if pool
        .status
        .as_ref()
        .is_some_and(|s| !s.warm.is_empty() || !s.bindings.is_empty())
    {
        // An older operator's status: the pool controller moves it into records first.
        return Ok(());
    }
    let spec = pool.spec.warm_pool.clone().unwrap_or_default();
    let going = pool.metadata.deletion_timestamp.is_some();
    let want = if going { 0 } else { spec.size.max(0) as usize };
    let max_age = spec.max_age.as_deref().and_then(parse_duration);
    let sync = &ctx.config.sync;
    let lost_after = Duration::from_secs(u64::from(sync.agent_lost_seconds.max(1)));
    let instances = ctx.pool_instances(&name, Instant::now() - TEND_EVERY).await?;
    let warm = ctx.records.of_pool_where(&name, waiting);

    // Warm instances no record names (their record was deleted, or they were launched by an
    // operator before records and not listed in its status): terminated once they are older
    // than any record write that could still be on its way.
    let unrecorded: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.state.is_alive() && i.tag(tags::WARM) == Some("true") && instance_age(i) > lost_after)
        .collect();
    let pool_records = match unrecorded.is_empty() {
        true => Vec::new(),
        false => ctx.records.of_pool(&name),
    };
    for instance in unrecorded
        .into_iter()
        .filter(|i| !pool_records.iter().any(|r| records::belongs(i, r)))
    {
        let ids = [instance.instance_id.clone()];
        ctx.gate
            .call(&name, || ctx.compute.terminate_instances(&ids))
            .await?;
        tracing::info!(pool = %name, instance_id = %instance.instance_id, "terminated a warm instance without a record");
    }

    // Each record: its instance found, gone, Ready, silent for too long, too old.
    let mut doomed: Vec<(Arc<Ec2Instance>, &'static str)> = Vec::new();
    let mut kept: Vec<Arc<Ec2Instance>> = Vec::new();
    for record in warm {
        let record_name = record.name_any();
        let created = record
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(jiff::Timestamp::now);
        let found = instances.iter().find(|i| records::belongs(i, &record)).cloned();
        let Some(instance) = found.filter(|i| i.state.is_alive()) else {
            // Launched and gone, or never launched (the record's write outlived its launch).
            if age(created) > Duration::from_secs(5) {
                doomed.push((record, "the instance is gone"));
            } else {
                kept.push(record);
            }
            continue;
        };
        if record.instance_id().is_none() {
            // Launched just before a crash: the record learns its instance now.
            note(ctx, &record_name, &instance, InstancePhase::Booting).await?;
        }
        if let Some(max_age) = max_age
            && age(launch_time(&record)) > max_age
        {
            doomed.push((record, "older than maxAge"));
            continue;
        }
        let endpoint = ctx
            .compute
            .agent_endpoint(&instance, record.spec.agent_port as u16)?;
        let answers = ctx
            .agents
            .ping(&endpoint, &instance.instance_id, lost_after)
            .await
            .is_some();
        if answers {
            memory.silent_since.remove(&record_name);
            if record.phase() != Some(InstancePhase::Ready) {
                note(ctx, &record_name, &instance, InstancePhase::Ready).await?;
                let waited = age(launch_time(&record));
                let labels = crate::metrics::PoolLabels { pool: name.clone() };
                ctx.metrics
                    .warm_refill_duration
                    .get_or_create(&labels)
                    .observe(waited.as_secs_f64());
                tracing::info!(pool = %name, instance_id = %instance.instance_id, waited = ?waited, "warm instance Ready");
            }
        } else {
            let since = *memory
                .silent_since
                .entry(record_name.clone())
                .or_insert_with(Instant::now);
            // A booting instance gets the same grace as a silent one, counted from its launch.
            let silent = match record.phase() {
                Some(InstancePhase::Ready) => since.elapsed(),
                _ => age(launch_time(&record)),
            };
            if silent > lost_after {
                doomed.push((record, "its agent stopped answering"));
                continue;
            }
        }
        kept.push(record);
    }

    // Too many (the pool shrank or goes): the ones still booting first, then the oldest.
    kept.sort_by_key(|r| {
        (
            r.phase() == Some(InstancePhase::Ready),
            std::cmp::Reverse(launch_time(r)),
        )
    });
    while kept.len() > want {
        doomed.push((kept.remove(0), "the warm pool is smaller"));
    }
    for (record, why) in &doomed {
        retire(ctx, record, why).await?;
        memory.silent_since.remove(&record.name_any());
    }

    // Too few: launch the missing ones (through the pool's throttling gate), each recorded
    // before its launch. A launch costs more than a list: the records are counted again from
    // the API server first, in case this replica's store has not seen one yet (just moved
    // from an older operator's status, or written by the previous leader).
    let mut missing = want.saturating_sub(kept.len());
    if missing > 0 {
        let api: Api<Ec2Instance> = Api::all(ctx.client.clone());
        let selector = format!(
            "{}={name},{}=true",
            crate::crd::labels::POOL,
            crate::crd::labels::WARM
        );
        let listed = api.list(&ListParams::default().labels(&selector)).await?;
        let waiting_now = listed
            .items
            .iter()
            .filter(|r| waiting(r) && !doomed.iter().any(|(d, _)| d.name_any() == r.name_any()))
            .count();
        missing = want.saturating_sub(waiting_now.max(kept.len()));
    }
    if missing > 0 {
        let template = template_of(ctx, &pool).await?;
        for slot in 0..missing {
            let enrollment = ctx.agents.tls().map(|tls| tls.enrollment());
            let request = match warm_request(&pool, template.as_ref(), kept.len() + slot, enrollment) {
                Ok(request) => request,
                Err(message) => {
                    tracing::warn!(pool = %name, %message, "cannot launch warm instances");
                    break;
                }
            };
            let record_name = request.pod_uid.clone();
            let spec = records::spec_of_request(&request, None);
            let record = records::new_record(&record_name, spec, &pool.uid().unwrap_or_default());
            records::create(&ctx.client, &record, &ctx.metrics.record_writes).await?;
            let instance = ctx
                .gate
                .call(&name, || ctx.compute.launch_instance(&request))
                .await?;
            note(ctx, &record_name, &instance, InstancePhase::Booting).await?;
            tracing::info!(pool = %name, instance_id = %instance.instance_id, "launched a warm instance");
        }
    }
    publish_gauges(ctx, &name);
    Ok(())
}

/// `(ready, booting)` warm instances of a pool, from the records.
pub fn counts(ctx: &Context, pool: &str) -> (i32, i32) {
    let warm = ctx.records.of_pool_where(pool, waiting);
    let ready = warm
        .iter()
        .filter(|r| r.phase() == Some(InstancePhase::Ready))
        .count() as i32;
    (ready, warm.len() as i32 - ready)
}

/// The warm gauges, from the records.
fn publish_gauges(ctx: &Context, pool: &str) {
    let (ready, launching) = counts(ctx, pool);
    for (state, count) in [("Ready", ready), ("Launching", launching)] {
        let labels = crate::metrics::PoolPhaseLabels {
            pool: pool.to_string(),
            phase: state.to_string(),
        };
        ctx.metrics
            .warm_instances
            .get_or_create(&labels)
            .set(i64::from(count));
    }
}

/// Retires a warm instance: deletes its record on the condition that no pod claimed it since
/// it was read (its finalizer keeps it while the instance is terminated here), then terminates
/// the instance and lets the record go.
async fn retire(ctx: &Context, record: &Ec2Instance, why: &str) -> Result<()> {
    let api: Api<Ec2Instance> = Api::all(ctx.client.clone());
    let name = record.name_any();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: None,
            resource_version: record.resource_version(),
        }),
        ..Default::default()
    };
    ctx.metrics.record_writes.inc();
    match api.delete(&name, &params).await {
        Ok(_) => {}
        // Claimed meanwhile (or gone): nothing to retire.
        Err(kube::Error::Api(status)) if status.code == 409 || status.is_not_found() => return Ok(()),
        Err(error) => return Err(error.into()),
    }
    let ids = records::terminate_instances_of(ctx, &record.spec.pool, &[record], Instant::now()).await?;
    records::retire(&ctx.client, &name, &ctx.metrics.record_writes).await?;
    tracing::info!(pool = %record.spec.pool, record = %name, instances = ?ids, %why, "terminated a warm instance");
    Ok(())
}

/// The template warm instances are launched from: the warm pool's, else the pool's.
async fn template_of(ctx: &Context, pool: &Ec2NodePool) -> Result<Option<Ec2PodTemplate>> {
    let reference = pool
        .spec
        .warm_pool
        .as_ref()
        .and_then(|w| w.template_ref.clone())
        .or_else(|| pool.spec.template_ref.clone());
    let Some(reference) = reference else {
        return Ok(None);
    };
    let templates: Api<Ec2PodTemplate> = Api::namespaced(ctx.client.clone(), &reference.namespace);
    Ok(templates.get_opt(&reference.name).await?)
}

/// The launch request of warm slot `slot`: the template's settings as a pod without
/// annotations would get them on the node of that index, one of `instanceTypes`.
fn warm_request(
    pool: &Ec2NodePool,
    template: Option<&Ec2PodTemplate>,
    slot: usize,
    enrollment: Option<crate::cloud::Enrollment>,
) -> std::result::Result<LaunchRequest, String> {
    let name = pool.name_any();
    let spec = &pool.spec;
    let warm = spec.warm_pool.clone().unwrap_or_default();
    // The record's name is the launch's idempotency key.
    let token = records::warm_name(&name);
    let node_subnet = spec
        .subnet_ids
        .get(slot % spec.subnet_ids.len().max(1))
        .cloned()
        .unwrap_or_default();
    let resolved_image = template
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.resolved_image_id.clone());
    let settings = settings::resolve(
        spec,
        template.map(|t| &t.spec),
        resolved_image.as_deref(),
        &BTreeMap::new(),
        &token,
        &node_subnet,
    )
    .map_err(|invalid| format!("{}: {}", invalid.field, invalid.message))?;
    let types: Vec<String> = if !warm.instance_types.is_empty() {
        warm.instance_types.clone()
    } else if let Some(default) = &settings.default_type {
        vec![default.clone()]
    } else {
        settings.allowed_types.clone()
    };
    let instance_type = types.get(slot % types.len().max(1)).cloned().ok_or_else(|| {
        format!(
            "no instance type: set spec.warmPool.instanceTypes, or instanceType/instanceTypes in the template ({})",
            annotations::TEMPLATE
        )
    })?;
    let mut request = LaunchRequest {
        pod_uid: token,
        pool: name.clone(),
        name: format!("warm/{name}"),
        spot: false,
        known_absent: true,
        ..settings.into_request(instance_type, enrollment)
    };
    request.tags.insert(tags::WARM.into(), "true".into());
    request.tags.insert(tags::RECORD.into(), request.pod_uid.clone());
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Ec2InstanceSpec, Ec2InstanceStatus};

    fn warm(instance_type: &str, phase: InstancePhase) -> Ec2Instance {
        let mut record = Ec2Instance::new(
            "warm-gpu-1",
            Ec2InstanceSpec {
                pool: "gpu".into(),
                instance_type: instance_type.into(),
                image_id: "ami-1".into(),
                subnet_id: "subnet-a".into(),
                security_group_ids: vec!["sg-2".into(), "sg-1".into()],
                agent_port: 10350,
                ..Default::default()
            },
        );
        record.status = Some(Ec2InstanceStatus {
            phase: Some(phase),
            instance_id: Some("i-1".into()),
            instance_type: Some(instance_type.into()),
            ..Default::default()
        });
        record
    }

    fn request(instance_type: &str) -> LaunchRequest {
        LaunchRequest {
            pod_uid: "uid".into(),
            instance_type: instance_type.into(),
            image_id: "ami-1".into(),
            subnet_id: "subnet-a".into(),
            security_group_ids: vec!["sg-1".into(), "sg-2".into()],
            agent_port: 10350,
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_matches_a_ready_unclaimed_instance_of_its_settings_and_an_allowed_type() {
        let fallbacks = vec!["m5.large".to_string()];
        let ready = |t| warm(t, InstancePhase::Ready);
        assert!(matches(&ready("t3.micro"), &request("t3.micro"), &[]));
        assert!(matches(&ready("m5.large"), &request("t3.micro"), &fallbacks));
        assert!(!matches(&ready("m5.large"), &request("t3.micro"), &[]));
        assert!(!matches(
            &warm("t3.micro", InstancePhase::Booting),
            &request("t3.micro"),
            &[]
        ));
        let mut claimed = ready("t3.micro");
        claimed.spec.pod = Some(PodRef {
            namespace: "a".into(),
            name: "b".into(),
            uid: "c".into(),
        });
        assert!(!matches(&claimed, &request("t3.micro"), &[]));
        let mut retiring = ready("t3.micro");
        retiring.metadata.deletion_timestamp = Some(now());
        assert!(!matches(&retiring, &request("t3.micro"), &[]));
        let mut other_image = request("t3.micro");
        other_image.image_id = "ami-2".into();
        assert!(!matches(&ready("t3.micro"), &other_image, &[]));
        let mut spot = request("t3.micro");
        spot.spot = true;
        assert!(!matches(&ready("t3.micro"), &spot, &[]));
        let mut other_subnet = request("t3.micro");
        other_subnet.subnet_id = "subnet-b".into();
        assert!(!matches(&ready("t3.micro"), &other_subnet, &[]));
    }

    #[test]
    fn the_first_choice_type_is_preferred() {
        let fallbacks = vec!["m5.large".to_string()];
        let first = preference(
            &warm("t3.micro", InstancePhase::Ready),
            &request("t3.micro"),
            &fallbacks,
        );
        let second = preference(
            &warm("m5.large", InstancePhase::Ready),
            &request("t3.micro"),
            &fallbacks,
        );
        assert!(first < second);
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("12x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn a_claimed_instance_is_tagged_with_its_pod_and_record() {
        let pod = PodRef {
            namespace: "default".into(),
            name: "web".into(),
            uid: "uid".into(),
        };
        let instance = instance_of("i-1", &warm("t3.micro", InstancePhase::Ready), &pod, "n");
        assert_eq!(instance.tag(tags::POD_UID), Some("uid"));
        assert_eq!(instance.tag(tags::RECORD), Some("warm-gpu-1"));
        assert_eq!(instance.tag(tags::WARM), Some("false"));
        assert_eq!(instance.tag(tags::AGENT_PORT), Some("10350"));
    }
}
