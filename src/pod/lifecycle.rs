//! The pod half of a virtual node: every pod bound to the node gets one worker that launches
//! its instance (idempotently, recorded in the pool's bindings and in EC2 tags), hands the pod
//! to the instance's agent, mirrors the agent's status stream into the pod, and on deletion
//! stops the pod, terminates the instance and releases the pod object (grace 0), as a kubelet.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::settings::{self, InvalidSetting};
use super::{sizing, spec, status};
use crate::agent::proto::agent_client::AgentClient;
use crate::agent::proto::{LaunchPodRequest, PingRequest, TerminatePodRequest, WatchPodStatusRequest};
use crate::cloud::{Instance, InstanceFilter, LaunchRequest};
use crate::controller::{Context, Error, Result};
use crate::crd::{Ec2NodePool, Ec2PodTemplate, annotations, tags};
use crate::node::VirtualNode;
use crate::node::supervisor::stopped;

type AgentChannel = AgentClient<tonic::transport::Channel>;

async fn publish(ctx: &Context, pod: &Pod, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::debug!(%error, "recording a pod event");
    }
}

fn pods(ctx: &Context, namespace: &str) -> Api<Pod> {
    Api::namespaced(ctx.client.clone(), namespace)
}

/// Writes (or with `None`, removes) the pod's binding in the pool status, keyed by node and UID.
async fn set_binding(ctx: &Context, node: &VirtualNode, uid: &str, binding: Option<Value>) -> Result<()> {
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let patch = json!({"status": {"bindings": {node.name.clone(): {uid: binding}}}});
    pools
        .patch_status(&node.pool, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Marks a pod Failed with a reason and message (bad launch settings, lost instance).
async fn fail_pod(ctx: &Context, pod: &Pod, reason: &str, message: &str) -> Result<()> {
    let namespace = pod.namespace().unwrap_or_default();
    let patch = json!({"status": {"phase": "Failed", "reason": reason, "message": message}});
    pods(ctx, &namespace)
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    publish(ctx, pod, EventType::Warning, reason, message.to_string()).await;
    Ok(())
}

/// The instance already launched for this pod, found by its `pod-uid` tag.
async fn existing_instance(ctx: &Context, node: &VirtualNode, uid: &str) -> Result<Option<Instance>> {
    let instances = ctx
        .compute
        .describe_instances(&InstanceFilter::Pool(node.pool.clone()))
        .await?;
    Ok(instances
        .into_iter()
        .find(|i| i.tag(tags::POD_UID) == Some(uid) && i.state.is_alive()))
}

/// Resolves the launch request for a pod: settings, then the instance type.
async fn launch_request(
    ctx: &Context,
    node: &VirtualNode,
    pod: &Pod,
) -> Result<Result<(LaunchRequest, String), InvalidSetting>> {
    let namespace = pod.namespace().unwrap_or_default();
    let pod_annotations = pod.annotations().clone();
    let template = match settings::template_ref(&namespace, &pod_annotations, &node.spec) {
        Some((template_namespace, name)) => {
            let templates: Api<Ec2PodTemplate> = Api::namespaced(ctx.client.clone(), &template_namespace);
            match templates.get_opt(&name).await? {
                Some(template) => Some(template),
                None => {
                    return Ok(Err(InvalidSetting {
                        field: annotations::TEMPLATE.into(),
                        message: format!("Ec2PodTemplate {template_namespace}/{name} not found"),
                    }));
                }
            }
        }
        None => None,
    };
    let resolved_image = template
        .as_ref()
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.resolved_image_id.clone());
    let node_subnet = node.spec.subnet_ids[node.index as usize % node.spec.subnet_ids.len().max(1)].clone();
    let uid = pod.uid().unwrap_or_default();
    let settings = match settings::resolve(
        &node.spec,
        template.as_ref().map(|t| &t.spec),
        resolved_image.as_deref(),
        &pod_annotations,
        &uid,
        &node_subnet,
    ) {
        Ok(settings) => settings,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let (instance_type, why) = match &settings.requested_type {
        Some(requested) => {
            let known = ctx
                .compute
                .instance_types(std::slice::from_ref(requested))
                .await?;
            if known.is_empty() {
                return Ok(Err(InvalidSetting {
                    field: annotations::INSTANCE_TYPE.into(),
                    message: format!("{requested} is not offered by EC2 in this region"),
                }));
            }
            (
                requested.clone(),
                format!(
                    "{requested}: set by the {} annotation",
                    annotations::INSTANCE_TYPE
                ),
            )
        }
        None if !settings.allowed_types.is_empty() => {
            let needs = match sizing::pod_needs(pod) {
                Ok(needs) => needs,
                Err(message) => {
                    return Ok(Err(InvalidSetting {
                        field: "spec.containers".into(),
                        message,
                    }));
                }
            };
            let catalogue = ctx.compute.instance_types(&settings.allowed_types).await?;
            match sizing::smallest_fit(&catalogue, &needs, node.spec.arch) {
                Ok((info, why)) => (info.name.clone(), why),
                Err(message) => match &settings.default_type {
                    Some(default) => (
                        default.clone(),
                        format!("{default}: the template default ({message})"),
                    ),
                    None => {
                        return Ok(Err(InvalidSetting {
                            field: "spec.containers".into(),
                            message,
                        }));
                    }
                },
            }
        }
        None => {
            match &settings.default_type {
                Some(default) => (default.clone(), format!("{default}: the template default")),
                None => {
                    return Ok(Err(InvalidSetting {
                    field: annotations::INSTANCE_TYPE.into(),
                    message: "no instance type: set the annotation, or instanceTypes/instanceType in the template".into(),
                }));
                }
            }
        }
    };
    let mut launch_tags = settings.tags;
    launch_tags.insert(tags::AGENT_PORT.into(), settings.agent_port.to_string());
    let request = LaunchRequest {
        pod_uid: uid,
        pool: node.pool.clone(),
        node: node.name.clone(),
        namespace,
        name: pod.name_any(),
        instance_type,
        image_id: settings.image_id,
        subnet_id: settings.subnet_id,
        security_group_ids: settings.security_group_ids,
        iam_instance_profile: settings.iam_instance_profile,
        user_data: settings.user_data,
        key_name: settings.key_name,
        spot: settings.spot,
        agent_port: settings.agent_port,
        tags: launch_tags,
    };
    Ok(Ok((request, why)))
}

/// Connects to the instance's agent, waiting (with a deadline) until it answers a ping.
async fn connect_agent(endpoint: &str, deadline: Duration) -> Option<AgentChannel> {
    let until = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < until {
        if let Ok(mut client) = AgentClient::connect(endpoint.to_string()).await
            && client.ping(PingRequest {}).await.is_ok()
        {
            return Some(client);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// ConfigMaps and Secrets the pod refers to, from its namespace.
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
    Ok(sources)
}

/// Stops the pod on its agent, terminates the instance, removes the binding and releases the
/// pod object with grace 0.
async fn finish_deletion(
    ctx: &Context,
    node: &VirtualNode,
    pod: &Pod,
    instance: Option<&Instance>,
    agent: Option<&mut AgentChannel>,
) -> Result<()> {
    let uid = pod.uid().unwrap_or_default();
    let grace = pod.metadata.deletion_grace_period_seconds;
    publish(
        ctx,
        pod,
        EventType::Normal,
        "Terminating",
        "stopping the pod's containers".into(),
    )
    .await;
    if let Some(agent) = agent {
        let request = TerminatePodRequest {
            pod_uid: uid.clone(),
            grace_period_seconds: grace,
        };
        if let Err(error) = agent.terminate_pod(request).await {
            tracing::debug!(%error, "TerminatePod");
        }
    }
    if let Some(instance) = instance {
        ctx.compute
            .terminate_instances(std::slice::from_ref(&instance.instance_id))
            .await?;
        publish(
            ctx,
            pod,
            EventType::Normal,
            "Terminated",
            format!("terminated instance {}", instance.instance_id),
        )
        .await;
    }
    set_binding(ctx, node, &uid, None).await?;
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

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Drives one pod from bound to gone. Returns when the pod is released, or with an error the
/// caller retries.
async fn drive(ctx: Arc<Context>, node: VirtualNode, mut pod_rx: watch::Receiver<Pod>) -> Result<()> {
    let pod = pod_rx.borrow().clone();
    let uid = pod.uid().unwrap_or_default();
    let namespace = pod.namespace().unwrap_or_default();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let mut instance = existing_instance(&ctx, &node, &uid).await?;
    if instance.is_none() && deleting(&pod) {
        return finish_deletion(&ctx, &node, &pod, None, None).await;
    }
    if instance.is_none() && matches!(phase.as_str(), "Succeeded" | "Failed") {
        // Finished earlier: nothing to run, the pod waits for its deletion.
        let _ = pod_rx.wait_for(deleting).await;
        let pod = pod_rx.borrow().clone();
        return finish_deletion(&ctx, &node, &pod, None, None).await;
    }
    if instance.is_none() {
        let (request, why) = match launch_request(&ctx, &node, &pod).await? {
            Ok(resolved) => resolved,
            Err(invalid) => {
                fail_pod(&ctx, &pod, "InvalidLaunchSettings", &invalid.to_string()).await?;
                let _ = pod_rx.wait_for(deleting).await;
                let pod = pod_rx.borrow().clone();
                return finish_deletion(&ctx, &node, &pod, None, None).await;
            }
        };
        publish(
            &ctx,
            &pod,
            EventType::Normal,
            "Launching",
            format!("launching {why}"),
        )
        .await;
        let launch_time = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        set_binding(
            &ctx,
            &node,
            &uid,
            Some(json!({"namespace": namespace, "name": pod.name_any(),
            "instanceType": request.instance_type, "phase": "Launching", "launchTime": launch_time})),
        )
        .await?;
        let launched = ctx.compute.launch_instance(&request).await?;
        publish(
            &ctx,
            &pod,
            EventType::Normal,
            "Launched",
            format!("launched {} ({})", launched.instance_id, launched.instance_type),
        )
        .await;
        instance = Some(launched);
    }
    let instance = instance.expect("an instance exists past this point");
    let pod_ip = instance.private_ip.clone();
    set_binding(
        &ctx,
        &node,
        &uid,
        Some(json!({"namespace": namespace, "name": pod.name_any(),
        "instanceId": instance.instance_id, "instanceType": instance.instance_type, "privateIp": pod_ip,
        "phase": "Booting"})),
    )
    .await?;
    let annotate = json!({"metadata": {"annotations": {annotations::INSTANCE_ID: instance.instance_id}}});
    pods(&ctx, &namespace)
        .patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&annotate))
        .await?;

    let port = instance
        .tag(tags::AGENT_PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or(node.spec.agent.port as u16);
    let endpoint = ctx.compute.agent_endpoint(&instance, port)?;
    let deadline = Duration::from_secs(u64::from(ctx.config.sync.agent_lost_seconds.max(1)));
    let Some(mut agent) = connect_agent(&endpoint, deadline).await else {
        let pod = pod_rx.borrow().clone();
        fail_pod(
            &ctx,
            &pod,
            "InstanceLost",
            &format!(
                "the agent of {} did not answer at {endpoint}",
                instance.instance_id
            ),
        )
        .await?;
        let _ = pod_rx.wait_for(deleting).await;
        let pod = pod_rx.borrow().clone();
        return finish_deletion(&ctx, &node, &pod, Some(&instance), None).await;
    };
    publish(
        &ctx,
        &pod,
        EventType::Normal,
        "AgentReady",
        format!("the agent of {} answers", instance.instance_id),
    )
    .await;
    let placement = spec::Placement {
        pod_ip: pod_ip.clone().unwrap_or_default(),
        host_ip: node.private_ip.clone(),
    };
    if !deleting(&pod_rx.borrow()) {
        let pod = pod_rx.borrow().clone();
        match spec::agent_spec(&pod, &sources(&ctx, &pod).await?, &placement) {
            Ok(agent_spec) => {
                let reply = agent
                    .launch_pod(LaunchPodRequest {
                        pod: Some(agent_spec),
                    })
                    .await
                    .map_err(|e| Error::Agent(format!("LaunchPod: {e}")))?;
                if !reply.into_inner().already_known {
                    publish(
                        &ctx,
                        &pod,
                        EventType::Normal,
                        "Started",
                        format!("containers started on {}", instance.instance_id),
                    )
                    .await;
                }
            }
            Err(invalid) => {
                fail_pod(&ctx, &pod, "CreateContainerConfigError", &invalid.to_string()).await?;
            }
        }
        set_binding(&ctx, &node, &uid, Some(json!({"phase": "Running"}))).await?;
    }

    // Mirror the agent's status stream until the pod is deleted.
    let placement = status::Placement {
        instance_id: instance.instance_id.clone(),
        pod_ip,
        host_ip: node.private_ip.clone(),
    };
    let mut stream = agent
        .watch_pod_status(WatchPodStatusRequest { pod_uid: uid.clone() })
        .await
        .map_err(|e| Error::Agent(format!("WatchPodStatus: {e}")))?
        .into_inner();
    let mut last: Option<Value> = None;
    loop {
        if deleting(&pod_rx.borrow()) {
            break;
        }
        tokio::select! {
            changed = pod_rx.changed() => if changed.is_err() { return Ok(()) },
            report = stream.next() => match report {
                Some(Ok(report)) => {
                    let pod = pod_rx.borrow().clone();
                    let spec_json = serde_json::to_value(pod.spec.clone().unwrap_or_default()).unwrap_or_default();
                    let previous = serde_json::to_value(pod.status.clone().unwrap_or_default()).unwrap_or_default();
                    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
                    let new = status::pod_status(&report, &spec_json, &previous, &placement, &now);
                    if last.as_ref() != Some(&new) {
                        pods(&ctx, &namespace)
                            .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&json!({"status": new})))
                            .await?;
                        last = Some(new);
                    }
                }
                Some(Err(error)) => return Err(Error::Agent(format!("status stream: {error}"))),
                None => return Err(Error::Agent("the agent closed the status stream".into())),
            },
        }
    }
    let pod = pod_rx.borrow().clone();
    finish_deletion(&ctx, &node, &pod, Some(&instance), Some(&mut agent)).await
}

struct Worker {
    pod: watch::Sender<Pod>,
    handle: JoinHandle<()>,
}

/// A pod object deleted outright (grace 0, or its namespace went): its instance and binding
/// must still go.
async fn cleanup_deleted(ctx: &Context, node: &VirtualNode, pod: &Pod) -> Result<()> {
    let uid = pod.uid().unwrap_or_default();
    if let Some(instance) = existing_instance(ctx, node, &uid).await? {
        ctx.compute
            .terminate_instances(std::slice::from_ref(&instance.instance_id))
            .await?;
        tracing::info!(pod = %pod.name_any(), instance_id = %instance.instance_id, "terminated the instance of a deleted pod");
    }
    set_binding(ctx, node, &uid, None).await
}

/// Runs pod workers for every pod bound to `node` until `stop` turns true.
pub async fn run(ctx: Arc<Context>, node: VirtualNode, mut stop: watch::Receiver<bool>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut workers: HashMap<String, Worker> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = stopped(&mut stop) => break,
            event = events.next() => match event {
                Some(Ok(event)) => event,
                Some(Err(error)) => { tracing::warn!(%error, node = %node.name, "watching pods"); continue }
                None => break,
            },
        };
        workers.retain(|_, w| !w.handle.is_finished());
        let pod = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => pod,
            watcher::Event::Delete(pod) => {
                if let Some(worker) = workers.remove(&pod.uid().unwrap_or_default()) {
                    worker.handle.abort();
                }
                let (ctx, node) = (ctx.clone(), node.clone());
                tokio::spawn(async move {
                    if let Err(error) = cleanup_deleted(&ctx, &node, &pod).await {
                        tracing::warn!(%error, pod = %pod.name_any(), "cleaning up after a deleted pod");
                    }
                });
                continue;
            }
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        let uid = pod.uid().unwrap_or_default();
        match workers.get(&uid) {
            Some(worker) => {
                worker.pod.send_replace(pod);
            }
            None => {
                let (tx, rx) = watch::channel(pod);
                let (ctx, node) = (ctx.clone(), node.clone());
                let handle = tokio::spawn(async move {
                    let mut backoff = Duration::from_secs(1);
                    loop {
                        match drive(ctx.clone(), node.clone(), rx.clone()).await {
                            Ok(()) => return,
                            Err(error) => {
                                tracing::warn!(%error, retry_in = ?backoff, "pod worker failed; retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                            }
                        }
                    }
                });
                workers.insert(uid, Worker { pod: tx, handle });
            }
        }
    }
    for worker in workers.values() {
        worker.handle.abort();
    }
}
