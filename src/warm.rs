//! Warm pools: instances kept booted, agent Ready, waiting for pods (`spec.warmPool`).
//!
//! The replica that runs the pool controller tends every warm pool ([`run`]): it launches
//! instances until `size` are warm, marks them Ready once their agent answers, replaces the
//! ones whose agent stops answering, recycles those older than `maxAge`, and terminates the
//! extra ones when the pool shrinks or goes. A pod worker whose resolved launch settings match
//! a Ready warm instance claims it ([`claim`]) instead of launching: one status write removes
//! the instance from `status.warm` and adds the pod's binding, carrying the resourceVersion it
//! read, so two claims (from two pods, or two replicas) can never both succeed.
//!
//! Every write to `status.warm` carries a resourceVersion precondition: a merge patch without
//! one could bring back an entry a pod just claimed. Warm instances are tagged
//! `ec2-kubelet.io/warm=true` with their launch settings, so one launched just before a crash
//! (not yet in the status) is adopted by the next leader; a claimed one is re-tagged with its
//! pod and is never adopted again, since its binding names it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::{Value, json};

use crate::cloud::{Instance, InstanceState, LaunchRequest};
use crate::crd::{Ec2NodePool, Ec2PodTemplate, WarmInstance, WarmState, annotations, tags};
use crate::launch::settings;
use crate::runtime::{Context, Error, Result};

/// How often every warm pool is looked after.
const TEND_EVERY: Duration = Duration::from_secs(1);
/// Attempts of a compare-and-swap write before giving up (the status changes with every
/// binding write of the pool).
const CAS_ATTEMPTS: usize = 12;
/// Tag holding a warm instance's launch settings (compact JSON), for adoption after a crash.
pub const SETTINGS_TAG: &str = "ec2-kubelet.io/warm-settings";

/// What a pod must match to take a warm instance (besides an allowed instance type).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Settings {
    #[serde(rename = "i")]
    image_id: String,
    #[serde(rename = "s")]
    subnet_id: String,
    #[serde(rename = "g", default)]
    security_group_ids: Vec<String>,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
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

    fn of_warm(w: &WarmInstance) -> Settings {
        Settings::new(
            &w.image_id,
            &w.subnet_id,
            &w.security_group_ids,
            &w.iam_instance_profile,
        )
    }
}

/// A warm instance launched from `request` (its settings, as `instance_type`).
fn warm_instance(
    request: &LaunchRequest,
    instance_type: String,
    private_ip: Option<String>,
    state: WarmState,
    launch_time: Time,
) -> WarmInstance {
    WarmInstance {
        instance_type,
        image_id: request.image_id.clone(),
        subnet_id: request.subnet_id.clone(),
        security_group_ids: request.security_group_ids.clone(),
        iam_instance_profile: request.iam_instance_profile.clone(),
        private_ip,
        agent_port: i32::from(request.agent_port),
        state,
        launch_time,
        ready_time: None,
    }
}

/// Whether a pod launching `request` (or one of the `fallbacks` types) may take `warm`: same
/// image, subnet, security groups and instance profile, an allowed type, on-demand, no
/// placement, the same agent port.
pub fn matches(warm: &WarmInstance, request: &LaunchRequest, fallbacks: &[String]) -> bool {
    warm.state == WarmState::Ready
        && !request.spot
        && request.placement.is_none()
        && i64::from(request.agent_port) == i64::from(warm.agent_port)
        && (warm.instance_type == request.instance_type || fallbacks.contains(&warm.instance_type))
        && Settings::of_warm(warm) == Settings::of_request(request)
}

/// The order in which a pod prefers warm instances: its first-choice type, then its fallbacks
/// in order; among equals, the oldest (it would be recycled first).
fn preference(
    warm: &WarmInstance,
    request: &LaunchRequest,
    fallbacks: &[String],
) -> (usize, jiff::Timestamp) {
    let rank = if warm.instance_type == request.instance_type {
        0
    } else {
        1 + fallbacks
            .iter()
            .position(|t| *t == warm.instance_type)
            .unwrap_or(usize::MAX - 1)
    };
    (rank, warm.launch_time.0)
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Reads the pool, lets `change` compute a status merge patch from it (`None`: nothing to
/// write), and writes it with the pool's resourceVersion as a precondition, reading again
/// after a conflict. Returns what `change` returned with the patch, or `None` if it had
/// nothing to write.
async fn compare_and_swap<T>(
    ctx: &Context,
    pool: &str,
    mut change: impl FnMut(&Ec2NodePool) -> Option<(Value, T)>,
) -> Result<Option<T>> {
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    for _ in 0..CAS_ATTEMPTS {
        let current = pools.get(pool).await?;
        let Some((mut patch, outcome)) = change(&current) else {
            return Ok(None);
        };
        patch["metadata"] = json!({"resourceVersion": current.resource_version()});
        match pools
            .patch_status(pool, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(Some(outcome)),
            Err(kube::Error::Api(response)) if response.code == 409 => {
                tokio::time::sleep(Duration::from_millis(rand::random_range(5..50))).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::Contended {
        object: format!("pool {pool}"),
        attempts: CAS_ATTEMPTS,
    })
}

/// `warmReady` and `warmLaunching` for the warm map after `removed` leave and `added` join.
fn counts(
    warm: &BTreeMap<String, WarmInstance>,
    removed: &[&str],
    added: &[(&str, WarmState)],
) -> (i32, i32) {
    let mut states: BTreeMap<&str, WarmState> = warm.iter().map(|(id, w)| (id.as_str(), w.state)).collect();
    for id in removed {
        states.remove(id);
    }
    for (id, state) in added {
        states.insert(id, *state);
    }
    let ready = states.values().filter(|s| **s == WarmState::Ready).count() as i32;
    (ready, states.len() as i32 - ready)
}

/// The pod's binding that a warm claim writes.
fn claimed_binding(request: &LaunchRequest, id: &str, warm: &WarmInstance) -> Value {
    json!({"namespace": request.namespace, "name": request.name, "instanceId": id,
        "instanceType": warm.instance_type, "privateIp": warm.private_ip, "phase": "Booting",
        "launchTime": warm.launch_time})
}

fn instance_of(id: &str, warm: &WarmInstance, request: &LaunchRequest) -> Instance {
    let mut instance_tags = pod_tags(request);
    instance_tags.insert(tags::AGENT_PORT.into(), warm.agent_port.to_string());
    Instance {
        instance_id: id.to_string(),
        state: InstanceState::Running,
        instance_type: warm.instance_type.clone(),
        private_ip: warm.private_ip.clone(),
        launch_time: warm.launch_time.0.as_millisecond(),
        tags: instance_tags,
    }
}

/// The tags a claimed instance takes: its pod's, and `warm=false`.
fn pod_tags(request: &LaunchRequest) -> BTreeMap<String, String> {
    let pod = format!("{}/{}", request.namespace, request.name);
    BTreeMap::from([
        (tags::WARM.to_string(), "false".to_string()),
        (tags::POD_UID.to_string(), request.pod_uid.clone()),
        (tags::POD.to_string(), pod.clone()),
        (tags::NODE.to_string(), request.node.clone()),
        (tags::NAME.to_string(), pod),
    ])
}

/// A claimed instance, ready for the pod.
pub struct Claimed {
    pub instance: Instance,
    /// How long the instance had been warm.
    pub warm_for: Duration,
}

/// Claims a Ready warm instance of the pod's pool that matches its launch settings: writes
/// the pod's binding and removes the instance from `status.warm` in one conditional write,
/// then re-tags the instance with its pod. `None` when none matches (the pod launches cold).
/// A claim that a crash interrupted before the re-tag is found again in the pod's binding.
pub async fn claim(ctx: &Context, request: &LaunchRequest, fallbacks: &[String]) -> Result<Option<Claimed>> {
    let (pool, node, uid) = (&request.pool, &request.node, &request.pod_uid);
    let claimed = compare_and_swap(ctx, pool, |current| {
        let status = current.status.as_ref()?;
        // Claimed before a crash: the binding names the instance; the status no longer has it.
        if let Some(id) = status
            .bindings
            .get(node)
            .and_then(|pods| pods.get(uid))
            .and_then(|b| b.instance_id.clone())
        {
            let binding = &status.bindings[node][uid];
            let warm = warm_instance(
                request,
                binding.instance_type.clone().unwrap_or_default(),
                binding.private_ip.clone(),
                WarmState::Ready,
                binding.launch_time.clone().unwrap_or_else(now),
            );
            // Nothing to write: the patch re-states the binding.
            let patch =
                json!({"status": {"bindings": {node.as_str(): {uid.as_str(): {"phase": "Booting"}}}}});
            return Some((patch, (id, warm, true)));
        }
        let (id, warm) = status
            .warm
            .iter()
            .filter(|(_, w)| matches(w, request, fallbacks))
            .min_by_key(|(_, w)| preference(w, request, fallbacks))?;
        let (ready, launching) = counts(&status.warm, &[id], &[]);
        let patch = json!({"status": {
            "warm": {id.as_str(): null},
            "warmReady": ready,
            "warmLaunching": launching,
            "bindings": {node.as_str(): {uid.as_str(): claimed_binding(request, id, warm)}},
        }});
        Some((patch, (id.clone(), warm.clone(), false)))
    })
    .await?;
    let labels = crate::metrics::PoolLabels { pool: pool.clone() };
    let Some((id, warm, resumed)) = claimed else {
        ctx.metrics.warm_misses.get_or_create(&labels).inc();
        return Ok(None);
    };
    if resumed {
        // Only a claim cut short before its re-tag is resumed: the instance is still tagged
        // warm. Anything else (a cold launch's instance that died) launches anew.
        let instances = ctx.pool_instances(pool, Instant::now()).await?;
        let still_warm = instances
            .iter()
            .any(|i| i.instance_id == id && i.state.is_alive() && i.tag(tags::WARM) == Some("true"));
        if !still_warm {
            return Ok(None);
        }
    }
    ctx.metrics.warm_hits.get_or_create(&labels).inc();
    let new_tags = pod_tags(request);
    ctx.gate
        .call(pool, || ctx.compute.tag_instance(&id, &new_tags))
        .await?;
    let warm_for = warm
        .ready_time
        .as_ref()
        .map(|t| jiff::Timestamp::now().duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    Ok(Some(Claimed {
        instance: instance_of(&id, &warm, request),
        warm_for,
    }))
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
/// agent; everything that matters is in the status and the tags).
#[derive(Default)]
struct Memory {
    /// Since when each warm instance's agent has not answered.
    silent_since: HashMap<String, Instant>,
}

/// Tends every warm pool until the stream of pools ends (in the replica that holds the
/// controller lease).
pub async fn run(ctx: Arc<Context>, pools: Store<Ec2NodePool>) {
    let _ = pools.wait_until_ready().await;
    let mut memory = Memory::default();
    let mut ticker = tokio::time::interval(TEND_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for pool in pools.state() {
            let has_warm = pool.status.as_ref().is_some_and(|s| !s.warm.is_empty());
            if !enabled(&pool.spec) && !has_warm {
                continue;
            }
            if let Err(error) = tend(&ctx, &pool, &mut memory).await {
                tracing::warn!(%error, pool = %pool.name_any(), "tending the warm pool");
            }
        }
    }
}

/// One round for one pool.
async fn tend(ctx: &Context, cached: &Ec2NodePool, memory: &mut Memory) -> Result<()> {
    let name = cached.name_any();
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let Some(pool) = pools.get_opt(&name).await? else {
        return Ok(());
    };
    let spec = pool.spec.warm_pool.clone().unwrap_or_default();
    let status = pool.status.clone().unwrap_or_default();
    // The warm instances as this round sees them: the status's, and the ones it adopts.
    let mut warm_set = status.warm.clone();
    let want = if pool.metadata.deletion_timestamp.is_some() {
        0
    } else {
        spec.size.max(0) as usize
    };
    let max_age = spec.max_age.as_deref().and_then(parse_duration);
    let sync = &ctx.config.sync;
    let lost_after = Duration::from_secs(u64::from(sync.agent_lost_seconds.max(1)));
    let instances = ctx.pool_instances(&name, Instant::now() - TEND_EVERY).await?;
    let by_id: HashMap<&str, &Instance> = instances.iter().map(|i| (i.instance_id.as_str(), i)).collect();

    // Launched just before a crash, not yet recorded: adopt (if its settings are on its tags)
    // unless a pod's binding names it.
    let bound: std::collections::HashSet<&str> = status
        .bindings
        .values()
        .flat_map(|pods| pods.values())
        .filter_map(|b| b.instance_id.as_deref())
        .collect();
    for instance in instances.iter().filter(|i| {
        i.state.is_alive()
            && i.tag(tags::WARM) == Some("true")
            && !status.warm.contains_key(&i.instance_id)
            && !bound.contains(i.instance_id.as_str())
    }) {
        match adoptable(instance) {
            Some(warm) => {
                if record(ctx, &name, &instance.instance_id, warm.clone()).await? {
                    warm_set.insert(instance.instance_id.clone(), warm);
                }
                tracing::info!(pool = %name, instance_id = %instance.instance_id, "adopted a warm instance");
            }
            None => {
                // Older than the status write that would have recorded it, without settings.
                if instance_age(instance) > lost_after {
                    ctx.gate
                        .call(&name, || {
                            ctx.compute
                                .terminate_instances(std::slice::from_ref(&instance.instance_id))
                        })
                        .await?;
                }
            }
        }
    }

    // Each recorded instance: gone, Ready, silent for too long, too old.
    let mut doomed: Vec<(String, &'static str)> = Vec::new();
    for (id, warm) in &warm_set {
        let alive = by_id.get(id.as_str()).is_some_and(|i| i.state.is_alive());
        if !alive && age_of(warm) > Duration::from_secs(5) {
            doomed.push((id.clone(), "the instance is gone"));
            continue;
        }
        if let Some(max_age) = max_age
            && age_of(warm) > max_age
        {
            doomed.push((id.clone(), "older than maxAge"));
            continue;
        }
        let endpoint = match by_id.get(id.as_str()) {
            Some(instance) => ctx.compute.agent_endpoint(instance, warm.agent_port as u16)?,
            None => continue,
        };
        let answers = ctx.agents.ping(&endpoint, id, lost_after).await.is_some();
        if answers {
            memory.silent_since.remove(id);
            if warm.state == WarmState::Launching {
                let ready_at = now();
                let became_ready = compare_and_swap(ctx, &name, |current| {
                    let status = current.status.as_ref()?;
                    let entry = status.warm.get(id)?;
                    (entry.state == WarmState::Launching).then(|| {
                        let (ready, launching) = counts(&status.warm, &[], &[(id, WarmState::Ready)]);
                        let patch = json!({"status": {"warm": {id.as_str(): {"state": "Ready", "readyTime": ready_at}},
                            "warmReady": ready, "warmLaunching": launching}});
                        (patch, ())
                    })
                })
                .await?;
                if became_ready.is_some() {
                    let waited = age_of(warm);
                    let labels = crate::metrics::PoolLabels { pool: name.clone() };
                    ctx.metrics
                        .warm_refill_duration
                        .get_or_create(&labels)
                        .observe(waited.as_secs_f64());
                    tracing::info!(pool = %name, instance_id = %id, waited = ?waited, "warm instance Ready");
                }
            }
        } else {
            let since = *memory.silent_since.entry(id.clone()).or_insert_with(Instant::now);
            // A booting instance gets the same grace as a silent one, counted from its launch.
            let silent = match warm.state {
                WarmState::Launching => age_of(warm),
                WarmState::Ready => since.elapsed(),
            };
            if silent > lost_after {
                doomed.push((id.clone(), "its agent stopped answering"));
            }
        }
    }

    // Too many (the pool shrank or goes): the ones still launching first, then the oldest.
    let mut keep: Vec<(&String, &WarmInstance)> = warm_set
        .iter()
        .filter(|(id, _)| !doomed.iter().any(|(d, _)| d == *id))
        .collect();
    keep.sort_by_key(|(_, w)| (w.state == WarmState::Ready, std::cmp::Reverse(w.launch_time.0)));
    while keep.len() > want {
        let (id, _) = keep.remove(0);
        doomed.push((id.clone(), "the warm pool is smaller"));
    }
    for (id, why) in &doomed {
        retire(ctx, &name, id, why).await?;
        memory.silent_since.remove(id);
    }

    // Too few: launch the missing ones (through the pool's throttling gate).
    let missing = want.saturating_sub(keep.len());
    if missing > 0 {
        let template = template_of(ctx, &pool).await?;
        for slot in 0..missing {
            let enrollment = ctx.agents.tls().map(|tls| tls.enrollment());
            let request = match warm_request(&pool, template.as_ref(), keep.len() + slot, enrollment) {
                Ok(request) => request,
                Err(message) => {
                    tracing::warn!(pool = %name, %message, "cannot launch warm instances");
                    break;
                }
            };
            let instance = ctx
                .gate
                .call(&name, || ctx.compute.launch_instance(&request))
                .await?;
            let warm = warm_instance(
                &request,
                request.instance_type.clone(),
                instance.private_ip.clone(),
                WarmState::Launching,
                now(),
            );
            record(ctx, &name, &instance.instance_id, warm).await?;
            tracing::info!(pool = %name, instance_id = %instance.instance_id, "launched a warm instance");
        }
    }
    publish_gauges(ctx, &name).await
}

/// The warm gauges, from the status as it is now.
async fn publish_gauges(ctx: &Context, pool: &str) -> Result<()> {
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let status = pools.get(pool).await?.status.unwrap_or_default();
    for (state, count) in [("Ready", status.warm_ready), ("Launching", status.warm_launching)] {
        let labels = crate::metrics::PoolPhaseLabels {
            pool: pool.to_string(),
            phase: state.to_string(),
        };
        ctx.metrics
            .warm_instances
            .get_or_create(&labels)
            .set(i64::from(count));
    }
    Ok(())
}

fn age_of(warm: &WarmInstance) -> Duration {
    Duration::try_from(jiff::Timestamp::now().duration_since(warm.launch_time.0)).unwrap_or_default()
}

fn instance_age(instance: &Instance) -> Duration {
    let now = jiff::Timestamp::now().as_millisecond();
    Duration::from_millis(now.saturating_sub(instance.launch_time).max(0) as u64)
}

/// A warm instance as its tags describe it.
fn adoptable(instance: &Instance) -> Option<WarmInstance> {
    let settings: Settings = serde_json::from_str(instance.tag(SETTINGS_TAG)?).ok()?;
    let agent_port = instance.tag(tags::AGENT_PORT)?.parse().ok()?;
    Some(WarmInstance {
        instance_type: instance.instance_type.clone(),
        image_id: settings.image_id,
        subnet_id: settings.subnet_id,
        security_group_ids: settings.security_group_ids,
        iam_instance_profile: settings.iam_instance_profile,
        private_ip: instance.private_ip.clone(),
        agent_port,
        state: WarmState::Launching,
        launch_time: jiff::Timestamp::from_millisecond(instance.launch_time)
            .map(Time)
            .unwrap_or_else(|_| now()),
        ready_time: None,
    })
}

/// Adds a warm instance to the status (unless a pod's binding already names it). A pool being
/// deleted records nothing: the instance is terminated instead (the pool's finalizer may
/// already have run its clean-up). Whether it was recorded.
async fn record(ctx: &Context, pool: &str, id: &str, warm: WarmInstance) -> Result<bool> {
    let mut going = false;
    let recorded = compare_and_swap(ctx, pool, |current| {
        if current.metadata.deletion_timestamp.is_some() {
            going = true;
            return None;
        }
        let status = current.status.clone().unwrap_or_default();
        let bound = status
            .bindings
            .values()
            .flat_map(|pods| pods.values())
            .any(|b| b.instance_id.as_deref() == Some(id));
        if bound || status.warm.contains_key(id) {
            return None;
        }
        let (ready, launching) = counts(&status.warm, &[], &[(id, warm.state)]);
        let patch =
            json!({"status": {"warm": {id: warm.clone()}, "warmReady": ready, "warmLaunching": launching}});
        Some((patch, ()))
    })
    .await;
    let gone = matches!(&recorded, Err(Error::Kube(kube::Error::Api(response))) if response.code == 404);
    if going || gone {
        let ids = [id.to_string()];
        ctx.gate
            .call(pool, || ctx.compute.terminate_instances(&ids))
            .await?;
        return Ok(false);
    }
    Ok(recorded?.is_some())
}

/// Removes a warm instance from the status (if no pod claimed it meanwhile) and terminates it.
async fn retire(ctx: &Context, pool: &str, id: &str, why: &str) -> Result<()> {
    let removed = compare_and_swap(ctx, pool, |current| {
        let status = current.status.as_ref()?;
        status.warm.get(id)?;
        let (ready, launching) = counts(&status.warm, &[id], &[]);
        let patch = json!({"status": {"warm": {id: null}, "warmReady": ready, "warmLaunching": launching}});
        Some((patch, ()))
    })
    .await?;
    if removed.is_some() {
        let ids = [id.to_string()];
        ctx.gate
            .call(pool, || ctx.compute.terminate_instances(&ids))
            .await?;
        tracing::info!(%pool, instance_id = %id, %why, "terminated a warm instance");
    }
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
    let token = format!("warm-{name}-{:016x}", rand::random::<u64>());
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
    let encoded = serde_json::to_string(&Settings::of_request(&request)).unwrap_or_default();
    if encoded.len() <= 256 {
        request.tags.insert(SETTINGS_TAG.into(), encoded);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(instance_type: &str, state: WarmState) -> WarmInstance {
        WarmInstance {
            instance_type: instance_type.into(),
            image_id: "ami-1".into(),
            subnet_id: "subnet-a".into(),
            security_group_ids: vec!["sg-2".into(), "sg-1".into()],
            iam_instance_profile: None,
            private_ip: Some("127.0.0.9".into()),
            agent_port: 10350,
            state,
            launch_time: now(),
            ready_time: None,
        }
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
    fn a_pod_matches_a_ready_instance_of_its_settings_and_an_allowed_type() {
        let fallbacks = vec!["m5.large".to_string()];
        assert!(matches(
            &warm("t3.micro", WarmState::Ready),
            &request("t3.micro"),
            &[]
        ));
        assert!(matches(
            &warm("m5.large", WarmState::Ready),
            &request("t3.micro"),
            &fallbacks
        ));
        assert!(!matches(
            &warm("m5.large", WarmState::Ready),
            &request("t3.micro"),
            &[]
        ));
        assert!(!matches(
            &warm("t3.micro", WarmState::Launching),
            &request("t3.micro"),
            &[]
        ));
        let mut other_image = request("t3.micro");
        other_image.image_id = "ami-2".into();
        assert!(!matches(&warm("t3.micro", WarmState::Ready), &other_image, &[]));
        let mut spot = request("t3.micro");
        spot.spot = true;
        assert!(!matches(&warm("t3.micro", WarmState::Ready), &spot, &[]));
        let mut other_subnet = request("t3.micro");
        other_subnet.subnet_id = "subnet-b".into();
        assert!(!matches(&warm("t3.micro", WarmState::Ready), &other_subnet, &[]));
    }

    #[test]
    fn the_first_choice_type_is_preferred() {
        let fallbacks = vec!["m5.large".to_string()];
        let first = preference(
            &warm("t3.micro", WarmState::Ready),
            &request("t3.micro"),
            &fallbacks,
        );
        let second = preference(
            &warm("m5.large", WarmState::Ready),
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
    fn counts_follow_removals_and_additions() {
        let map = BTreeMap::from([
            ("i-1".to_string(), warm("t3.micro", WarmState::Ready)),
            ("i-2".to_string(), warm("t3.micro", WarmState::Launching)),
        ]);
        assert_eq!(counts(&map, &[], &[]), (1, 1));
        assert_eq!(counts(&map, &["i-1"], &[]), (0, 1));
        assert_eq!(counts(&map, &[], &[("i-2", WarmState::Ready)]), (2, 0));
    }

    #[test]
    fn settings_tag_round_trips() {
        let mut tagged = request("t3.micro");
        tagged.security_group_ids = vec!["sg-2".into(), "sg-1".into()];
        let encoded = serde_json::to_string(&Settings::of_request(&tagged)).unwrap();
        assert!(encoded.len() < 256, "{encoded}");
        let instance = Instance {
            instance_id: "i-1".into(),
            state: InstanceState::Running,
            instance_type: "t3.micro".into(),
            private_ip: None,
            launch_time: 0,
            tags: BTreeMap::from([
                (SETTINGS_TAG.to_string(), encoded),
                (tags::AGENT_PORT.to_string(), "10350".to_string()),
            ]),
        };
        let adopted = adoptable(&instance).unwrap();
        assert_eq!(Settings::of_warm(&adopted), Settings::of_request(&tagged));
    }
}
