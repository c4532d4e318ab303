//! The pod half of a virtual node: every pod bound to the node gets one worker that launches
//! its instance (idempotently, recorded in its `Ec2Instance` record and in EC2 tags), hands the pod
//! to the instance's agent, mirrors the agent's status stream into the pod, and on deletion
//! stops the pod, terminates the instance and releases the pod object (grace 0), as a kubelet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::events::EventType;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::kept::KeptPod;
use super::writer::StatusWriter;
use super::{spec, status};
use crate::agent_client::AgentChannel;
use crate::cloud::{self, Instance, LaunchRequest};
use crate::crd::{Ec2PodTemplate, InstancePhase, PodRef, annotations, tags};
use crate::faults;
use crate::launch::plan;
use crate::launch::settings::{self, InvalidSetting};
use crate::runtime::VirtualNode;
use crate::runtime::backoff::Backoff;
use crate::runtime::records;
use crate::runtime::{Context, Error, Result};
use crate::task::stopped;
use ec2_kubelet_protocol::v1::{LaunchPodRequest, TerminatePodRequest, WatchPodStatusRequest};

/// Records a pod event. A pod's events do not repeat (one launch, one termination), so they
/// skip the recorder's cache of recent events.
async fn publish(ctx: &Context, pod: &Pod, type_: EventType, reason: &str, note: String) {
    ctx.events
        .publish_once(pod.object_ref(&()), type_, reason, note)
        .await;
}

fn pods(ctx: &Context, namespace: &str) -> Api<Pod> {
    Api::namespaced(ctx.client.clone(), namespace)
}

/// The name of the pod's `Ec2Instance` record: the one its instance is tagged with, else the
/// one this replica's store has for the pod, else the pod's UID (a cold launch's name).
fn record_name(ctx: &Context, uid: &str, instance: Option<&Instance>) -> String {
    if let Some(name) = instance.and_then(|i| i.tag(tags::RECORD)) {
        return name.to_string();
    }
    ctx.records
        .of_pod(uid)
        .map(|r| r.name_any())
        .unwrap_or_else(|| uid.to_string())
}

/// Removes the pod's record (its instance is terminated or never existed).
async fn retire_record(ctx: &Context, uid: &str, instance: Option<&Instance>) -> Result<()> {
    let name = record_name(ctx, uid, instance);
    records::retire(&ctx.client, &name, &ctx.metrics.record_writes).await
}

/// The instance the pod's record names (or, for a pod of an operator before records, its
/// `instance-id` annotation).
fn recorded_instance(ctx: &Context, pod: &Pod) -> Option<String> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    ctx.records
        .of_pod(uid)
        .and_then(|r| r.instance_id().map(String::from))
        .or_else(|| pod.annotations().get(annotations::INSTANCE_ID).cloned())
}

/// The instance already launched for this pod, found by its `pod-uid` tag (or as the instance
/// its record names: a warm claim cut short before the re-tag) in a snapshot of the pool's
/// instances taken after `asked` (one `DescribeInstances` serves every pod that asks
/// meanwhile). Should there be two (a launch EC2 did not fold into the first), the one the pod
/// records, else the oldest: the pool controller terminates the other.
async fn existing_instance(
    ctx: &Context,
    node: &VirtualNode,
    uid: &str,
    recorded: Option<&str>,
    asked: std::time::Instant,
) -> Result<Option<Instance>> {
    let instances = ctx.pool_instances(&node.pool, asked).await?;
    let mut found: Vec<&Instance> = instances
        .of_pod(uid)
        .chain(recorded.and_then(|id| instances.get(id)))
        .filter(|i| i.state.is_alive())
        .collect();
    found.sort_by_key(|i| (Some(i.instance_id.as_str()) != recorded, i.launch_time));
    Ok(found.first().map(|i| (*i).clone()))
}

/// What to launch for a pod: the request (with the first choice of instance type), the types
/// to fall back to in order when EC2 has no capacity, and why the first was chosen.
struct Launch {
    request: LaunchRequest,
    fallbacks: Vec<String>,
    why: String,
}

/// Resolves the launch request for a pod: reads the template its settings name and the
/// instance types EC2 offers, and leaves the decisions to `crate::launch::plan`.
async fn launch_request(
    ctx: &Context,
    node: &VirtualNode,
    pod: &Pod,
) -> Result<Result<Launch, InvalidSetting>> {
    let namespace = pod.namespace().unwrap_or_default();
    let template = match settings::template_ref(&namespace, pod.annotations(), &node.spec) {
        Ok(None) => plan::Template::NotNamed,
        Ok(Some((template_namespace, name))) => {
            let templates: Api<Ec2PodTemplate> = Api::namespaced(ctx.client.clone(), &template_namespace);
            match templates.get_opt(&name).await? {
                Some(template) => plan::Template::Found(Box::new(template)),
                None => plan::Template::Missing(template_namespace, name),
            }
        }
        Err(invalid) => return Ok(Err(invalid)),
    };
    let node_subnet = &node.spec.subnet_ids[node.index as usize % node.spec.subnet_ids.len().max(1)];
    let settings = match plan::settings_for(&node.spec, node_subnet, pod, &template) {
        Ok(settings) => settings,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let types = plan::types_to_describe(&settings);
    let offered = match types.is_empty() {
        true => Vec::new(),
        false => ctx.compute.instance_types(&types).await?,
    };
    let choice = match plan::choose_type(&settings, pod, &offered, node.spec.arch) {
        Ok(choice) => choice,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let placement = match &template {
        plan::Template::Found(template) => template.spec.placement.clone(),
        _ => None,
    };
    let request = LaunchRequest {
        pod_uid: pod.uid().unwrap_or_default(),
        pool: node.pool.clone(),
        node: node.name.clone(),
        namespace,
        name: pod.name_any(),
        placement,
        ..settings.into_request(choice.instance_type, ctx.agents.tls().map(|tls| tls.enrollment()))
    };
    Ok(Ok(Launch {
        request,
        fallbacks: choice.fallbacks,
        why: choice.why,
    }))
}

/// ConfigMaps and Secrets the pod refers to, from its namespace, and the service-account tokens
/// its projected volumes ask for, issued by the API server for the pod (bound to it, so they
/// stop working when it is deleted), as the kubelet requests them.
async fn sources(ctx: &Context, pod: &Pod) -> Result<spec::Sources> {
    let namespace = pod.namespace().unwrap_or_default();
    let (config_map_names, secret_names) = spec::references(pod);
    let mut sources = spec::Sources::default();
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    for name in config_map_names {
        if let Some(cm) = config_maps.get_opt(&name).await? {
            let mut data: std::collections::BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            sources.config_maps.insert(name, data);
        }
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    for name in secret_names {
        if let Some(secret) = secrets.get_opt(&name).await? {
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            sources.secrets.insert(name, data);
        }
    }
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    for wanted in spec::token_requests(pod) {
        let request = TokenRequest {
            metadata: Default::default(),
            spec: TokenRequestSpec {
                // None: the API server's own audiences.
                audiences: if wanted.audience.is_empty() {
                    Vec::new()
                } else {
                    vec![wanted.audience.clone()]
                },
                expiration_seconds: Some(wanted.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            status: None,
        };
        let issued = accounts
            .create_token_request(&service_account, &PostParams::default(), &request)
            .await?;
        if let Some(status) = issued.status {
            sources.tokens.insert(wanted, status.token);
        }
    }
    Ok(sources)
}

/// What the pod workers of one node share.
#[derive(Clone)]
struct Shared {
    ctx: Arc<Context>,
    node: VirtualNode,
    status: StatusWriter,
}

fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn status_field(pod: &Pod, field: fn(&k8s_openapi::api::core::v1::PodStatus) -> Option<&String>) -> &str {
    pod.status.as_ref().and_then(field).map_or("", String::as_str)
}

fn finished(pod: &Pod) -> bool {
    matches!(status_field(pod, |s| s.phase.as_ref()), "Succeeded" | "Failed")
}

/// Failed by the operator itself (not by its containers): there is nothing left to run.
fn failed_by_us(pod: &Pod) -> bool {
    status_field(pod, |s| s.phase.as_ref()) == "Failed"
        && matches!(
            status_field(pod, |s| s.reason.as_ref()),
            "InstanceLost" | "InvalidLaunchSettings" | "SpotInterrupted"
        )
}

/// Marks a pod Failed with a reason and message (bad launch settings, lost instance); its
/// Ready condition goes False with the same reason.
async fn fail_pod(shared: &Shared, pod: &Pod, reason: &str, message: &str) {
    let previous = serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or_default();
    let mut patch = status::unreachable(&previous, reason, message, &now());
    patch["phase"] = json!("Failed");
    patch["reason"] = json!(reason);
    patch["message"] = json!(message);
    shared.status.send(pod, patch);
    publish(&shared.ctx, pod, EventType::Warning, reason, message.to_string()).await;
}

/// Waits until the pod is deleted, then finishes the deletion (no instance left to stop).
async fn release_when_deleted(shared: &Shared, pod_rx: &mut watch::Receiver<KeptPod>) -> Result<()> {
    let _ = pod_rx.wait_for(KeptPod::deleting).await;
    let pod = pod_rx.borrow().pod()?;
    finish_deletion(shared, &pod, None, None).await
}

/// Terminates instances of this pod through the pool's throttling gate.
async fn terminate(shared: &Shared, instance_id: &str) -> Result<()> {
    let ids = [instance_id.to_string()];
    shared
        .ctx
        .gate
        .call(&shared.node.pool, || shared.ctx.compute.terminate_instances(&ids))
        .await?;
    Ok(())
}

/// The pod's instance is gone or its agent stopped answering for good: the pod is Failed with
/// `InstanceLost` (so its controller replaces it), the instance is terminated, and the pod is
/// released once deleted.
async fn instance_lost(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    instance_id: Option<&str>,
    why: &str,
) -> Result<()> {
    let pod = pod_rx.borrow().pod()?;
    fail_pod(shared, &pod, "InstanceLost", why).await;
    if let Some(instance_id) = instance_id {
        terminate(shared, instance_id).await?;
    }
    release_when_deleted(shared, pod_rx).await
}

/// EC2 is reclaiming the pod's spot instance: the pod fails with `SpotInterrupted` (so its
/// controller replaces it right away, not two minutes later), with a `DisruptionTarget`
/// condition and an event; the instance is terminated and the pod released once deleted.
async fn spot_interrupted(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    instance: &Instance,
    at_unix_ms: i64,
) -> Result<()> {
    let pod = pod_rx.borrow().pod()?;
    let at = jiff::Timestamp::from_millisecond(at_unix_ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "soon".into());
    let message = format!(
        "spot instance {} is being reclaimed by EC2 at {at}",
        instance.instance_id
    );
    let previous = serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or_default();
    let mut patch = status::unreachable(&previous, "SpotInterrupted", &message, &now());
    if let Some(conditions) = patch["conditions"].as_array_mut() {
        conditions.retain(|c| c["type"] != "DisruptionTarget");
        conditions.push(
            json!({"type": "DisruptionTarget", "status": "True", "reason": "SpotInterrupted",
            "message": message, "lastTransitionTime": now()}),
        );
    }
    patch["phase"] = json!("Failed");
    patch["reason"] = json!("SpotInterrupted");
    patch["message"] = json!(message);
    shared.status.send(&pod, patch);
    publish(&shared.ctx, &pod, EventType::Warning, "SpotInterrupted", message).await;
    terminate(shared, &instance.instance_id).await?;
    release_when_deleted(shared, pod_rx).await
}

/// Stops the pod on its agent, terminates the instance, removes its record and releases the
/// pod object with grace 0.
async fn finish_deletion(
    shared: &Shared,
    pod: &Pod,
    instance: Option<&Instance>,
    agent: Option<&mut AgentChannel>,
) -> Result<()> {
    let ctx = &shared.ctx;
    let uid = pod.uid().unwrap_or_default();
    if let Some(instance) = instance {
        if let Some(agent) = agent {
            let request = TerminatePodRequest {
                pod_uid: uid.clone(),
                grace_period_seconds: pod.metadata.deletion_grace_period_seconds,
            };
            if let Err(error) = agent.terminate_pod(request).await {
                tracing::debug!(%error, "TerminatePod");
            }
        }
        terminate(shared, &instance.instance_id).await?;
        publish(
            ctx,
            pod,
            EventType::Normal,
            "Terminated",
            format!(
                "stopped the containers and terminated instance {}",
                instance.instance_id
            ),
        )
        .await;
        let subject = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        faults::point(faults::POD_TERMINATED, &subject).await;
    }
    retire_record(ctx, &uid, instance).await?;
    let namespace = pod.namespace().unwrap_or_default();
    let params = DeleteParams::default()
        .grace_period(0)
        .preconditions(kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
    match pods(ctx, &namespace).delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() || status.is_conflict() => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// [`finish_deletion`] of the pod as its watch channel has it now.
async fn finish_deletion_of(
    shared: &Shared,
    pod_rx: &watch::Receiver<KeptPod>,
    instance: Option<&Instance>,
    agent: Option<&mut AgentChannel>,
) -> Result<()> {
    let pod = pod_rx.borrow().pod()?;
    finish_deletion(shared, &pod, instance, agent).await
}

/// Launches the pod's instance, falling back through the allowed types that fit when EC2 has
/// no capacity. `None` when there is nothing to launch (bad settings, or deleted meanwhile):
/// the pod was dealt with.
///
/// Called only after [`drive`] found no live instance of the pod in a snapshot taken since, so
/// the backend skips its own look-up (capacity errors launch nothing; any other error sends the
/// worker back through `drive`).
async fn launch(shared: &Shared, pod_rx: &mut watch::Receiver<KeptPod>) -> Result<Option<Instance>> {
    let ctx = &shared.ctx;
    let node = &shared.node;
    let pod = pod_rx.borrow().pod()?;
    let Launch {
        mut request,
        fallbacks,
        why,
    } = match launch_request(ctx, node, &pod).await? {
        Ok(launch) => launch,
        Err(invalid) => {
            fail_pod(shared, &pod, "InvalidLaunchSettings", &invalid.to_string()).await;
            release_when_deleted(shared, pod_rx).await?;
            return Ok(None);
        }
    };
    if crate::warm::enabled(&node.spec) {
        // Served warm: the claim wrote the pod into the warm instance's record; the agent is
        // already up.
        if let Some(claimed) = crate::warm::claim(ctx, &request, &fallbacks).await? {
            let note = format!(
                "claimed warm instance {} ({}, warm for {} s): {why}",
                claimed.instance.instance_id,
                claimed.instance.instance_type,
                claimed.warm_for.as_secs()
            );
            publish(ctx, &pod, EventType::Normal, "ClaimedWarmInstance", note).await;
            return Ok(Some(claimed.instance));
        }
    }
    // The record first: a crash after RunInstances finds the instance through it and its tags.
    let pod_ref = PodRef {
        namespace: request.namespace.clone(),
        name: request.name.clone(),
        uid: request.pod_uid.clone(),
    };
    let spec = records::spec_of_request(&request, Some(pod_ref));
    let record = records::new_record(&request.pod_uid, spec, &node.pool_uid);
    records::create(&ctx.client, &record, &ctx.metrics.record_writes).await?;
    request.tags.insert(tags::RECORD.into(), request.pod_uid.clone());
    request.known_absent = true;
    let types: Vec<String> = std::iter::once(request.instance_type.clone())
        .chain(fallbacks)
        .collect();
    for (i, instance_type) in types.iter().enumerate() {
        if pod_rx.borrow().deleting() {
            let pod = pod_rx.borrow().pod()?;
            finish_deletion(shared, &pod, None, None).await?;
            return Ok(None);
        }
        request.instance_type = instance_type.clone();
        match ctx
            .gate
            .call(&node.pool, || ctx.compute.launch_instance(&request))
            .await
        {
            Ok(instance) => {
                faults::point(
                    faults::POD_LAUNCHED,
                    &format!("{}/{}", request.namespace, request.name),
                )
                .await;
                publish(
                    ctx,
                    &pod,
                    EventType::Normal,
                    "LaunchedInstance",
                    format!("launched {}: {why}", instance.instance_id),
                )
                .await;
                return Ok(Some(instance));
            }
            Err(cloud::Error::InsufficientCapacity { .. }) => {
                let note = match types.get(i + 1) {
                    Some(next) => format!("EC2 has no capacity for {instance_type}; trying {next}"),
                    None => format!(
                        "EC2 has no capacity for any allowed type that fits ({}); the pod stays Pending and the launch is retried with backoff",
                        types.join(", ")
                    ),
                };
                publish(
                    ctx,
                    &pod,
                    EventType::Warning,
                    "InsufficientInstanceCapacity",
                    note,
                )
                .await;
            }
            Err(error) => {
                // The pod stays Pending and its worker retries with backoff: a retryable error
                // (EC2 unavailable, timed out, throttled past the gate) may pass by itself; any
                // other (an image or subnet gone, a parameter EC2 refuses) waits for the
                // template or pool to be fixed.
                let note = format!(
                    "launching {instance_type}: {error}; {}",
                    if error.is_retryable() {
                        "retrying with backoff"
                    } else {
                        "retrying with backoff until the template or pool is fixed"
                    }
                );
                // It repeats while the worker retries: the recorder folds the repeats.
                ctx.events
                    .publish(
                        &pod.object_ref(&()),
                        EventType::Warning,
                        "FailedLaunch",
                        note,
                        "Launch",
                    )
                    .await;
                return Err(error.into());
            }
        }
    }
    Err(cloud::Error::InsufficientCapacity {
        instance_type: types.join(", "),
    }
    .into())
}

/// How waiting for an agent ended.
enum AgentWait {
    Ready(AgentChannel),
    Lost(String),
    Deleting,
}

/// Waits until the instance's agent answers. Gives up after `sync.agentLostSeconds`, or as soon
/// as the instance is found stopped or terminated. For a pod that was running (`since` the
/// agent stopped answering), Ready goes False after `sync.agentUnreachableSeconds`.
async fn wait_for_agent(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    instance: &Instance,
    endpoint: &str,
    since: Option<tokio::time::Instant>,
) -> Result<AgentWait> {
    let sync = &shared.ctx.config.sync;
    let lost_after = Duration::from_secs(u64::from(sync.agent_lost_seconds.max(1)));
    let unready_after = Duration::from_secs(u64::from(sync.agent_unreachable_seconds));
    let start = since.unwrap_or_else(tokio::time::Instant::now);
    let check_every = (lost_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut next_check = tokio::time::Instant::now() + check_every;
    let mut unready = since.is_none();
    // As the last look at the instance found it: EC2 has not started it yet.
    let mut pending = instance.state == crate::cloud::InstanceState::Pending;
    loop {
        if pod_rx.borrow().deleting() {
            return Ok(AgentWait::Deleting);
        }
        if let Some(client) = shared
            .ctx
            .agents
            .ping(endpoint, &instance.instance_id, unready_after)
            .await
        {
            return Ok(AgentWait::Ready(client));
        }
        let now_ = tokio::time::Instant::now();
        if now_ >= start + lost_after {
            return Ok(AgentWait::Lost(if pending {
                format!(
                    "instance {} never reached running: still pending after {} s",
                    instance.instance_id,
                    lost_after.as_secs()
                )
            } else {
                format!(
                    "the agent of {} did not answer at {endpoint} for {} s",
                    instance.instance_id,
                    lost_after.as_secs()
                )
            }));
        }
        if !unready && now_ >= start + unready_after {
            unready = true;
            let pod = pod_rx.borrow().pod()?;
            let previous = serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or_default();
            let message = format!(
                "the agent of {} has not answered for {} s",
                instance.instance_id,
                (now_ - start).as_secs()
            );
            shared.status.send(
                &pod,
                status::unreachable(&previous, "AgentUnreachable", &message, &now()),
            );
            publish(&shared.ctx, &pod, EventType::Warning, "AgentUnreachable", message).await;
        }
        if now_ >= next_check {
            next_check = now_ + check_every;
            // A snapshot of the pool no older than the check interval: every waiting pod of the
            // pool shares it.
            let not_before = std::time::Instant::now() - check_every;
            let found = shared.ctx.pool_instances(&shared.node.pool, not_before).await?;
            match found.get(&instance.instance_id) {
                Some(current) if current.state.is_alive() => {
                    pending = current.state == crate::cloud::InstanceState::Pending;
                }
                Some(current) => {
                    return Ok(AgentWait::Lost(format!(
                        "instance {} is {:?} (stopped or terminated outside the operator)",
                        instance.instance_id, current.state
                    )));
                }
                None => {
                    return Ok(AgentWait::Lost(format!(
                        "instance {} no longer exists",
                        instance.instance_id
                    )));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            changed = pod_rx.changed() => if changed.is_err() {
                return Err(Error::WorkerStopped);
            },
        }
    }
}

/// Hands the pod to the agent (idempotent: an agent that knows the pod says so). A finished pod
/// is not handed again.
async fn hand_over(shared: &Shared, pod: &Pod, agent: &mut AgentChannel, instance: &Instance) -> Result<()> {
    if deleting(pod) || finished(pod) {
        return Ok(());
    }
    let placement = spec::Placement {
        pod_ip: instance.private_ip.clone().unwrap_or_default(),
        host_ip: shared.node.private_ip.clone(),
    };
    match spec::agent_spec(pod, &sources(&shared.ctx, pod).await?, &placement) {
        Ok(agent_spec) => {
            let reply = agent
                .launch_pod(LaunchPodRequest {
                    pod: Some(agent_spec),
                })
                .await
                .map_err(|source| Error::Agent {
                    call: "LaunchPod",
                    source,
                })?;
            // No event: the pod's status says its containers started (and when); events cost a
            // write each, and a pod lifecycle stays within a handful of writes.
            let _ = reply.into_inner().already_known;
        }
        Err(invalid) => fail_pod(shared, pod, "CreateContainerConfigError", &invalid.to_string()).await,
    }
    Ok(())
}

/// How mirroring the agent's status stream ended.
enum Mirror {
    Deleting,
    Lost(String),
    /// A spot interruption notice: the instance is reclaimed at this time (unix ms).
    SpotInterrupted(i64),
}

/// A hash of a JSON value (of its serialization, whose key order serde_json keeps sorted).
fn fingerprint(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut hasher);
    hasher.finish()
}

/// Mirrors the agent's status stream into the pod (through the node's writer, only what
/// changes) until the pod is deleted or the stream breaks.
async fn mirror(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    agent: &mut AgentChannel,
    placement: &status::Placement,
    bound_at: &mut Option<tokio::time::Instant>,
) -> Result<Mirror> {
    let uid = pod_rx.borrow().uid().to_string();
    let opened = Box::pin(agent.watch_pod_status(WatchPodStatusRequest { pod_uid: uid })).await;
    let mut stream = match opened {
        Ok(stream) => stream.into_inner(),
        Err(error) => return Ok(Mirror::Lost(format!("WatchPodStatus: {error}"))),
    };
    // A fingerprint of the last status sent, not the status itself: one is kept per pod.
    let mut last: Option<u64> = None;
    loop {
        if pod_rx.borrow().deleting() {
            return Ok(Mirror::Deleting);
        }
        tokio::select! {
            changed = pod_rx.changed() => if changed.is_err() {
                return Err(Error::WorkerStopped);
            },
            report = stream.next() => match report {
                Some(Ok(report)) if report.spot_interruption => {
                    return Ok(Mirror::SpotInterrupted(report.spot_interruption_at_unix_ms));
                }
                Some(Ok(report)) => {
                    let pod = pod_rx.borrow().pod()?;
                    let spec_json = serde_json::to_value(pod.spec.clone().unwrap_or_default()).unwrap_or_default();
                    let previous = serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or_default();
                    let new = status::pod_status(&report, &spec_json, &previous, placement, &now());
                    let fingerprint = fingerprint(&new);
                    if last != Some(fingerprint) && status::changes(&previous, &new) {
                        shared.status.send(&pod, new.clone());
                    }
                    if new["phase"] == "Running"
                        && let Some(bound) = bound_at.take()
                    {
                        let labels = crate::metrics::PoolLabels { pool: shared.node.pool.clone() };
                        let histogram = shared.ctx.metrics.launch_duration.get_or_create(&labels);
                        histogram.observe(bound.elapsed().as_secs_f64());
                    }
                    last = Some(fingerprint);
                }
                Some(Err(error)) => return Ok(Mirror::Lost(format!("status stream: {error}"))),
                None => return Ok(Mirror::Lost("the agent closed the status stream".into())),
            },
        }
    }
}

/// How much of the instance the pod's record has, as far as this worker knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Noted {
    Nothing,
    Booting,
    Running,
}

/// How long a cold-launched instance's record waits for its agent before it is written as
/// Booting: an agent that answers sooner gets one write, Running with everything.
const BOOTING_AFTER: Duration = Duration::from_secs(1);

/// Writes the instance and `phase` into the pod's record. A record that is gone (deleted by
/// hand, or a pod of an operator before records) is written again first.
async fn note_instance(
    shared: &Shared,
    pod: &PodRef,
    instance: &Instance,
    phase: InstancePhase,
) -> Result<()> {
    let ctx = &shared.ctx;
    let name = record_name(ctx, &pod.uid, Some(instance));
    let launch_time = jiff::Timestamp::from_millisecond(instance.launch_time)
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    let at = now();
    let (ready, reason, message) = match phase {
        InstancePhase::Booting => ("False", "Booting", "waiting for the agent to answer"),
        _ => ("True", "AgentReady", "the agent runs the pod"),
    };
    let mut status = json!({"phase": phase.as_str(), "instanceId": instance.instance_id,
        "instanceType": instance.instance_type, "privateIp": instance.private_ip,
        "launchTime": launch_time,
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message,
            "lastTransitionTime": at}]});
    if phase == InstancePhase::Running {
        status["readyTime"] = json!(at);
    }
    let writes = &ctx.metrics.record_writes;
    if records::set_status(&ctx.client, &name, status.clone(), writes).await? {
        return Ok(());
    }
    let spec = records::spec_of_instance(&shared.node, instance, pod.clone());
    let record = records::new_record(&name, spec, &shared.node.pool_uid);
    records::create(&ctx.client, &record, writes).await?;
    records::set_status(&ctx.client, &name, status, writes).await?;
    Ok(())
}

/// Runs the pod on its instance: records the instance, waits for the agent, hands the pod
/// over, mirrors its status, rides out agent outages up to `sync.agentLostSeconds`, and on
/// deletion stops and terminates everything.
async fn attach(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    instance: Instance,
    bound_at: Option<tokio::time::Instant>,
) -> Result<()> {
    let ctx = &shared.ctx;
    let node = &shared.node;
    let pod = {
        let pod = pod_rx.borrow();
        PodRef {
            namespace: pod.namespace().to_string(),
            name: pod.name().to_string(),
            uid: pod.uid().to_string(),
        }
    };
    let noted = match ctx.records.of_pod(&pod.uid) {
        Some(record) if record.instance_id() == Some(instance.instance_id.as_str()) => match record.phase() {
            Some(InstancePhase::Running) => Noted::Running,
            Some(_) => Noted::Booting,
            None => Noted::Nothing,
        },
        _ => Noted::Nothing,
    };
    if instance.tag(tags::POD_UID) != Some(pod.uid.as_str()) {
        // A warm claim that a crash cut short before the instance was re-tagged.
        let new_tags = crate::warm::pod_tags(&pod, &node.name);
        let id = &instance.instance_id;
        Box::pin(
            ctx.gate
                .call(&node.pool, || ctx.compute.tag_instance(id, &new_tags)),
        )
        .await?;
    }
    let port = instance
        .tag(tags::AGENT_PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or(node.spec.agent.port as u16);
    let endpoint = ctx.compute.agent_endpoint(&instance, port)?;
    let placement = status::Placement {
        instance_id: instance.instance_id.clone(),
        pod_ip: instance.private_ip.clone(),
        host_ip: node.private_ip.clone(),
    };
    let outcome = run_on(
        shared, pod_rx, &pod, &instance, &endpoint, &placement, noted, bound_at,
    )
    .await;
    // The instance is done with (or the worker retries and dials again).
    ctx.agents.forget(&endpoint, &instance.instance_id);
    outcome
}

/// The part of [`attach`] that talks to the agent at `endpoint`.
#[allow(clippy::too_many_arguments)]
async fn run_on(
    shared: &Shared,
    pod_rx: &mut watch::Receiver<KeptPod>,
    pod: &PodRef,
    instance: &Instance,
    endpoint: &str,
    placement: &status::Placement,
    mut noted: Noted,
    mut bound_at: Option<tokio::time::Instant>,
) -> Result<()> {
    let ctx = &shared.ctx;
    let node = &shared.node;
    let mut unreachable_since = None;
    loop {
        let waited = {
            let mut wait = Box::pin(wait_for_agent(
                shared,
                pod_rx,
                instance,
                endpoint,
                unreachable_since,
            ));
            match noted {
                // The record learns the instance now, or with Running if the agent answers soon.
                Noted::Nothing => tokio::select! {
                    waited = &mut wait => waited?,
                    _ = tokio::time::sleep(BOOTING_AFTER) => {
                        Box::pin(note_instance(shared, pod, instance, InstancePhase::Booting)).await?;
                        noted = Noted::Booting;
                        wait.await?
                    }
                },
                _ => wait.await?,
            }
        };
        let mut agent = match waited {
            AgentWait::Ready(agent) => agent,
            AgentWait::Lost(why) => {
                return Box::pin(instance_lost(shared, pod_rx, Some(&instance.instance_id), &why)).await;
            }
            AgentWait::Deleting => {
                return Box::pin(finish_deletion_of(shared, pod_rx, Some(instance), None)).await;
            }
        };
        if unreachable_since.take().is_some() {
            tracing::info!(pod = %pod.name, instance_id = %instance.instance_id, "the agent answers again");
        }
        // The copy of the pod lives in the boxed future, not in the worker's.
        Box::pin(async {
            let pod = pod_rx.borrow().pod()?;
            hand_over(shared, &pod, &mut agent, instance).await
        })
        .await?;
        // The record says Running before the pod's status ever does (it is written before the
        // status is mirrored), so a Running pod re-attached after a restart writes nothing.
        if noted != Noted::Running {
            Box::pin(note_instance(shared, pod, instance, InstancePhase::Running)).await?;
            noted = Noted::Running;
        }
        match mirror(shared, pod_rx, &mut agent, placement, &mut bound_at).await? {
            Mirror::Deleting => {
                return Box::pin(finish_deletion_of(
                    shared,
                    pod_rx,
                    Some(instance),
                    Some(&mut agent),
                ))
                .await;
            }
            Mirror::SpotInterrupted(at) => {
                return Box::pin(spot_interrupted(shared, pod_rx, instance, at)).await;
            }
            Mirror::Lost(why) => {
                tracing::warn!(pod = %pod.name, instance_id = %instance.instance_id, %why, "lost the agent");
                let labels = crate::metrics::PoolLabels {
                    pool: node.pool.clone(),
                };
                ctx.metrics.agent_reconnects.get_or_create(&labels).inc();
                unreachable_since = Some(tokio::time::Instant::now());
            }
        }
    }
}

/// How old a snapshot of the pool's instances may be to tell whether a recorded instance lives.
const RECORDED_SNAPSHOT_AGE: Duration = crate::runtime::SNAPSHOT_RETAIN;

/// Drives one pod from bound to gone. Returns when the pod is released, or with an error the
/// caller retries.
async fn drive(shared: &Shared, pod_rx: &mut watch::Receiver<KeptPod>) -> Result<()> {
    // A worker spends its life awaiting inside `attach` (the status stream), and its task is as
    // large as the largest state it can be in: the steps taken once (launch, deletion, losses)
    // are boxed so that they take memory only while they run, and no copy of the pod is held
    // across an await (the watch channel has it).
    let bound_at = tokio::time::Instant::now();
    let (uid, recorded, failed, deleted, done) = {
        let pod = pod_rx.borrow().pod()?;
        (
            pod.uid().unwrap_or_default(),
            recorded_instance(&shared.ctx, &pod),
            failed_by_us(&pod),
            deleting(&pod),
            finished(&pod),
        )
    };
    // A pod without an instance yet needs a snapshot taken after its record could have been
    // written (or it might launch twice); for a pod whose instance is recorded, any recent
    // snapshot tells whether that instance is alive, so after a restart one `DescribeInstances`
    // per pool serves every pod that comes back (a stale answer is caught by `wait_for_agent`).
    let asked = match &recorded {
        Some(_) => std::time::Instant::now()
            .checked_sub(RECORDED_SNAPSHOT_AGE)
            .unwrap_or_else(std::time::Instant::now),
        None => std::time::Instant::now(),
    };
    let mut found = Box::pin(existing_instance(
        &shared.ctx,
        &shared.node,
        &uid,
        recorded.as_deref(),
        asked,
    ))
    .await?;
    if found.is_none() && recorded.is_some() {
        // The snapshot may predate the instance (a worker retried right after its launch):
        // only one taken now can tell that it is gone.
        let now = std::time::Instant::now();
        found = Box::pin(existing_instance(
            &shared.ctx,
            &shared.node,
            &uid,
            recorded.as_deref(),
            now,
        ))
        .await?;
    }
    match found {
        Some(instance) if failed => {
            Box::pin(terminate(shared, &instance.instance_id)).await?;
            Box::pin(release_when_deleted(shared, pod_rx)).await
        }
        Some(instance) => attach(shared, pod_rx, instance, None).await,
        None if deleted => Box::pin(finish_deletion_of(shared, pod_rx, None, None)).await,
        // Finished earlier: nothing to run, the pod waits for its deletion.
        None if done => Box::pin(release_when_deleted(shared, pod_rx)).await,
        None if recorded.is_some() => {
            let id = recorded.unwrap_or_default();
            let why = format!("instance {id} was stopped or terminated outside the operator");
            Box::pin(instance_lost(shared, pod_rx, Some(&id), &why)).await
        }
        None => match Box::pin(launch(shared, pod_rx)).await? {
            Some(instance) => attach(shared, pod_rx, instance, Some(bound_at)).await,
            None => Ok(()),
        },
    }
}

struct Worker {
    pod: watch::Sender<KeptPod>,
    handle: JoinHandle<()>,
}

/// A pod object deleted outright (grace 0, or its namespace went): its instance and record
/// must still go.
async fn cleanup_deleted(shared: &Shared, pod: &Pod) -> Result<()> {
    let uid = pod.uid().unwrap_or_default();
    let asked = std::time::Instant::now();
    let recorded = recorded_instance(&shared.ctx, pod);
    let found = existing_instance(&shared.ctx, &shared.node, &uid, recorded.as_deref(), asked).await?;
    if let Some(instance) = &found {
        terminate(shared, &instance.instance_id).await?;
        tracing::info!(pod = %pod.name_any(), instance_id = %instance.instance_id, "terminated the instance of a deleted pod");
    }
    // Most pods were released by their worker, record first: a record is retired here only if
    // one is known (one this replica's watch has not seen go yet costs a 404; one it has not
    // seen at all is retired by the garbage collector).
    if found.is_some() || shared.ctx.records.of_pod(&uid).is_some() {
        retire_record(&shared.ctx, &uid, found.as_ref()).await?;
    }
    Ok(())
}

/// One pod's worker: drives the pod, retrying failures with jittered exponential backoff (cut
/// short when the pod is deleted meanwhile).
async fn work(shared: Arc<Shared>, mut pod_rx: watch::Receiver<KeptPod>) {
    let mut backoff = Backoff::default();
    loop {
        match drive(&shared, &mut pod_rx).await {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.next_delay();
                let pod = pod_rx.borrow().name().to_string();
                tracing::warn!(%error, %pod, retry_in = ?delay, "pod worker failed; retrying");
                let already_deleting = pod_rx.borrow().deleting();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = pod_rx.wait_for(KeptPod::deleting), if !already_deleting => {}
                }
            }
        }
    }
}

/// The workers whose pod a completed re-list did not return: their pods are gone.
fn vanished<'a>(workers: impl Iterator<Item = &'a String>, listed: &HashSet<String>) -> Vec<String> {
    workers.filter(|uid| !listed.contains(*uid)).cloned().collect()
}

/// A pod object is gone: its worker stops, and its instance and record are cleaned up (unless
/// its worker released it itself).
fn deleted(shared: &Arc<Shared>, worker: Option<Worker>, pod: Pod) {
    if let Some(worker) = worker {
        if worker.handle.is_finished() {
            // Its worker released the pod itself (a worker ends only then): instance
            // terminated, record retired. Nothing is left to clean up.
            return;
        }
        worker.handle.abort();
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(error) = cleanup_deleted(&shared, &pod).await {
            tracing::warn!(%error, pod = %pod.name_any(), "cleaning up after a deleted pod");
        }
    });
}

/// Runs pod workers for every pod bound to `node` until `stop` turns true.
pub async fn run(ctx: Arc<Context>, node: VirtualNode, mut stop: watch::Receiver<bool>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let window = Duration::from_millis(u64::from(ctx.config.sync.pod_status_batch_millis));
    let (status, writer) =
        StatusWriter::start(ctx.client.clone(), window, ctx.metrics.pod_status_writes.clone());
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        node: node.clone(),
        status,
    });
    let mut workers: HashMap<String, Worker> = HashMap::new();
    // The pods a re-list returned so far, while one is under way.
    let mut relisted: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            _ = stopped(&mut stop) => break,
            event = events.next() => match event {
                Some(Ok(event)) => event,
                Some(Err(error)) => { tracing::warn!(%error, node = %node.name, "watching pods"); continue }
                None => break,
            },
        };
        // A finished worker stays until its pod's Delete event: it tells that event that the
        // pod was released already.
        let pod = match event {
            watcher::Event::Apply(pod) => pod,
            watcher::Event::InitApply(pod) => {
                if let Some(listed) = relisted.as_mut() {
                    listed.insert(pod.uid().unwrap_or_default());
                }
                pod
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.uid().unwrap_or_default();
                deleted(&shared, workers.remove(&uid), pod);
                continue;
            }
            watcher::Event::Init => {
                relisted = Some(HashSet::new());
                continue;
            }
            // A pod deleted while the watch was down (a gap the re-list closed) never gets a
            // Delete event: a worker whose pod the re-list no longer returns is one.
            watcher::Event::InitDone => {
                let listed = relisted.take().unwrap_or_default();
                for uid in vanished(workers.keys(), &listed) {
                    if let Some(worker) = workers.remove(&uid) {
                        let pod = worker.pod.borrow().pod();
                        match pod {
                            Ok(pod) => {
                                tracing::info!(pod = %pod.name_any(), "the pod was deleted while the watch was down");
                                deleted(&shared, Some(worker), pod);
                            }
                            Err(error) => tracing::error!(%error, %uid, "decoding a deleted pod's last copy"),
                        }
                    }
                }
                continue;
            }
        };
        let uid = pod.uid().unwrap_or_default();
        match workers.get(&uid) {
            Some(worker) => {
                worker.pod.send_replace(KeptPod::new(pod));
            }
            None => {
                let (tx, rx) = watch::channel(KeptPod::new(pod));
                let handle = tokio::spawn(work(shared.clone(), rx));
                workers.insert(uid, Worker { pod: tx, handle });
            }
        }
    }
    for worker in workers.values() {
        worker.handle.abort();
    }
    // What the workers queued is still written; the writer ends with the last handle.
    drop(workers);
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of two owned arguments returns.
    fn future_size<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_relist_that_no_longer_returns_a_pod_ends_its_worker() {
        let workers = ["a".to_string(), "b".to_string(), "c".to_string()];
        let listed = HashSet::from(["a".to_string(), "c".to_string(), "d".to_string()]);
        assert_eq!(vanished(workers.iter(), &listed), ["b"]);
        assert!(vanished(workers.iter(), &workers.iter().cloned().collect()).is_empty());
    }

    #[test]
    fn a_pod_worker_task_stays_small() {
        // Every pod has one worker task for its whole life: at 10,000 pods each KiB of it is
        // 10 MiB of operator memory.
        let size = future_size(work);
        eprintln!("pod worker task: {size} bytes");
        assert!(size <= 3072, "the pod worker future is {size} bytes");
    }
}
