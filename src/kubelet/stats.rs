//! `/stats/summary` (the kubelet's `stats/v1alpha1` Summary) for the virtual node a request is
//! addressed to: one `GetStats` per running pod, containers summed into pods and pods into the node, so
//! metrics-server and `kubectl top` work.

use hyper::{Response, StatusCode};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::{Body, Reply, full, pod_agent};
use crate::runtime::Context;
use ec2_kubelet_protocol::v1::GetStatsRequest;

fn rfc3339(unix_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(unix_ms)
        .unwrap_or_default()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn usage(time: &str, core_nanoseconds: u64, nanocores: u64, working_set: u64) -> (Value, Value) {
    (
        json!({"time": time, "usageCoreNanoSeconds": core_nanoseconds, "usageNanoCores": nanocores}),
        json!({"time": time, "workingSetBytes": working_set, "usageBytes": working_set, "rssBytes": working_set}),
    )
}

pub(crate) async fn summary(ctx: &Context, node: &Node) -> Result<Response<Body>, Reply> {
    let node_name = node.name_any();
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name},status.phase=Running")))
        .await
        .map_err(|e| Reply::unavailable(format!("listing pods: {e}")))?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let now = rfc3339(now_ms);
    let (mut node_cpu, mut node_nanocores, mut node_memory) = (0u64, 0u64, 0u64);
    let mut pod_entries = Vec::new();
    for pod in on_node.items {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let stats = match pod_agent(ctx, &node_name, &namespace, &name).await {
            Ok((pod, mut agent)) => agent
                .get_stats(GetStatsRequest {
                    pod_uid: pod.uid().unwrap_or_default(),
                })
                .await
                .map(|r| r.into_inner()),
            Err(reply) => {
                tracing::debug!(pod = %name, message = %reply.1, "no stats for pod");
                continue;
            }
        };
        let Ok(stats) = stats else { continue };
        let time = rfc3339(if stats.timestamp_unix_ms > 0 {
            stats.timestamp_unix_ms
        } else {
            now_ms
        });
        let start = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| now.clone());
        let (mut cpu, mut nanocores, mut memory) = (0u64, 0u64, 0u64);
        let containers: Vec<Value> = stats
            .containers
            .iter()
            .map(|c| {
                cpu += c.cpu_usage_core_nanoseconds;
                nanocores += c.cpu_usage_nanocores;
                memory += c.memory_working_set_bytes;
                let (cpu, memory) = usage(
                    &time,
                    c.cpu_usage_core_nanoseconds,
                    c.cpu_usage_nanocores,
                    c.memory_working_set_bytes,
                );
                json!({"name": c.name, "startTime": start, "cpu": cpu, "memory": memory})
            })
            .collect();
        node_cpu += cpu;
        node_nanocores += nanocores;
        node_memory += memory;
        let (cpu, memory) = usage(&time, cpu, nanocores, memory);
        pod_entries.push(json!({
            "podRef": {"name": name, "namespace": namespace, "uid": pod.uid()},
            "startTime": start,
            "containers": containers,
            "cpu": cpu,
            "memory": memory,
        }));
    }
    let start = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| now.clone());
    let (cpu, memory) = usage(&now, node_cpu, node_nanocores, node_memory);
    let body = json!({
        "node": {"nodeName": node_name, "startTime": start, "cpu": cpu, "memory": memory},
        "pods": pod_entries,
    });
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
