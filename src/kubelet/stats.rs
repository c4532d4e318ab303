//! Resource usage of the virtual node a request is addressed to, from one `GetStats` per running
//! pod (containers summed into pods, pods into the node), in the two forms a kubelet serves:
//!
//! * `/stats/summary`: the kubelet's `stats/v1alpha1` Summary (JSON);
//! * `/metrics/resource`: the Prometheus text metrics metrics-server (v0.6 and later) scrapes for
//!   `kubectl top` (`node_cpu_usage_seconds_total`, `container_memory_working_set_bytes`, ...),
//!   each sample with its timestamp, so that metrics-server computes CPU rates between scrapes.

use std::fmt::Write as _;

use hyper::{Response, StatusCode};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::{Body, Reply, full, pod_agent};
use crate::runtime::Context;
use ec2_kubelet_protocol::v1::GetStatsRequest;

/// One container's usage at `time_ms`.
#[derive(Debug, Clone, PartialEq)]
struct ContainerUsage {
    name: String,
    /// When its current run started (Unix ms), from the pod's container status.
    started_ms: Option<i64>,
    cpu_core_nanoseconds: u64,
    cpu_nanocores: u64,
    working_set_bytes: u64,
}

/// One pod's containers, sampled by its agent at `time_ms`.
#[derive(Debug, Clone, PartialEq)]
struct PodUsage {
    namespace: String,
    name: String,
    uid: String,
    started_ms: Option<i64>,
    time_ms: i64,
    containers: Vec<ContainerUsage>,
}

impl PodUsage {
    fn cpu_core_nanoseconds(&self) -> u64 {
        self.containers.iter().map(|c| c.cpu_core_nanoseconds).sum()
    }
    fn cpu_nanocores(&self) -> u64 {
        self.containers.iter().map(|c| c.cpu_nanocores).sum()
    }
    fn working_set_bytes(&self) -> u64 {
        self.containers.iter().map(|c| c.working_set_bytes).sum()
    }
}

/// The node's usage: the pods it runs (an empty node uses nothing).
struct NodeUsage {
    name: String,
    started_ms: Option<i64>,
    time_ms: i64,
    pods: Vec<PodUsage>,
}

fn unix_ms(time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    time.0.as_millisecond()
}

/// Asks the agent of every Running pod on `node` for its usage. A pod whose agent cannot be
/// reached is left out (as a kubelet leaves out a container it has no stats for).
async fn collect(ctx: &Context, node: &Node) -> Result<NodeUsage, Reply> {
    let node_name = node.name_any();
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name},status.phase=Running")))
        .await
        .map_err(|e| Reply::unavailable(format!("listing pods: {e}")))?;
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut usage = Vec::new();
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
        let status = pod.status.as_ref();
        let container_started = |container: &str| {
            status
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|all| all.iter().find(|c| c.name == container))
                .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                .map(unix_ms)
        };
        usage.push(PodUsage {
            uid: pod.uid().unwrap_or_default(),
            started_ms: status.and_then(|s| s.start_time.as_ref()).map(unix_ms),
            time_ms: if stats.timestamp_unix_ms > 0 {
                stats.timestamp_unix_ms
            } else {
                now_ms
            },
            containers: stats
                .containers
                .iter()
                .map(|c| ContainerUsage {
                    name: c.name.clone(),
                    started_ms: container_started(&c.name),
                    cpu_core_nanoseconds: c.cpu_usage_core_nanoseconds,
                    cpu_nanocores: c.cpu_usage_nanocores,
                    working_set_bytes: c.memory_working_set_bytes,
                })
                .collect(),
            namespace,
            name,
        });
    }
    Ok(NodeUsage {
        name: node_name,
        started_ms: node.metadata.creation_timestamp.as_ref().map(unix_ms),
        time_ms: now_ms,
        pods: usage,
    })
}

fn rfc3339(unix_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(unix_ms)
        .unwrap_or_default()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn cpu_and_memory(time: &str, core_nanoseconds: u64, nanocores: u64, working_set: u64) -> (Value, Value) {
    (
        json!({"time": time, "usageCoreNanoSeconds": core_nanoseconds, "usageNanoCores": nanocores}),
        json!({"time": time, "workingSetBytes": working_set, "usageBytes": working_set, "rssBytes": working_set}),
    )
}

/// The `stats/v1alpha1` Summary of `node`.
fn summary_json(node: &NodeUsage) -> Value {
    let now = rfc3339(node.time_ms);
    let pods: Vec<Value> = node
        .pods
        .iter()
        .map(|pod| {
            let time = rfc3339(pod.time_ms);
            let start = pod.started_ms.map(rfc3339).unwrap_or_else(|| now.clone());
            let containers: Vec<Value> = pod
                .containers
                .iter()
                .map(|c| {
                    let (cpu, memory) = cpu_and_memory(
                        &time,
                        c.cpu_core_nanoseconds,
                        c.cpu_nanocores,
                        c.working_set_bytes,
                    );
                    let start = c.started_ms.map(rfc3339).unwrap_or_else(|| start.clone());
                    json!({"name": c.name, "startTime": start, "cpu": cpu, "memory": memory})
                })
                .collect();
            let (cpu, memory) = cpu_and_memory(
                &time,
                pod.cpu_core_nanoseconds(),
                pod.cpu_nanocores(),
                pod.working_set_bytes(),
            );
            json!({
                "podRef": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid},
                "startTime": start,
                "containers": containers,
                "cpu": cpu,
                "memory": memory,
            })
        })
        .collect();
    let (cpu, memory) = cpu_and_memory(
        &now,
        node.pods.iter().map(PodUsage::cpu_core_nanoseconds).sum(),
        node.pods.iter().map(PodUsage::cpu_nanocores).sum(),
        node.pods.iter().map(PodUsage::working_set_bytes).sum(),
    );
    let start = node.started_ms.map(rfc3339).unwrap_or_else(|| now.clone());
    json!({
        "node": {"nodeName": node.name, "startTime": start, "cpu": cpu, "memory": memory},
        "pods": pods,
    })
}

/// A label value in the text exposition format (backslash, quote and newline escaped).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1e9
}

/// The resource metrics of `node`, as the kubelet's `/metrics/resource` writes them.
fn resource_metrics(node: &NodeUsage) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64, i64)>| {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value, time_ms) in samples {
            let _ = writeln!(out, "{name}{labels} {value} {time_ms}");
        }
    };
    let container_labels = |pod: &PodUsage, c: &ContainerUsage| {
        format!(
            "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}",
            label(&c.name),
            label(&pod.namespace),
            label(&pod.name)
        )
    };
    let pod_labels = |pod: &PodUsage| {
        format!(
            "{{namespace=\"{}\",pod=\"{}\"}}",
            label(&pod.namespace),
            label(&pod.name)
        )
    };
    let containers = || {
        node.pods
            .iter()
            .flat_map(|pod| pod.containers.iter().map(move |c| (pod, c)))
    };
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        containers()
            .map(|(pod, c)| {
                (
                    container_labels(pod, c),
                    seconds(c.cpu_core_nanoseconds),
                    pod.time_ms,
                )
            })
            .collect(),
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
        containers()
            .map(|(pod, c)| (container_labels(pod, c), c.working_set_bytes as f64, pod.time_ms))
            .collect(),
    );
    family(
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds",
        containers()
            .filter_map(|(pod, c)| {
                let started = c.started_ms.or(pod.started_ms)?;
                Some((container_labels(pod, c), started as f64 / 1e3, pod.time_ms))
            })
            .collect(),
    );
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        vec![(
            String::new(),
            seconds(node.pods.iter().map(PodUsage::cpu_core_nanoseconds).sum()),
            node.time_ms,
        )],
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
        vec![(
            String::new(),
            node.pods.iter().map(PodUsage::working_set_bytes).sum::<u64>() as f64,
            node.time_ms,
        )],
    );
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        node.pods
            .iter()
            .map(|pod| (pod_labels(pod), seconds(pod.cpu_core_nanoseconds()), pod.time_ms))
            .collect(),
    );
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
        node.pods
            .iter()
            .map(|pod| (pod_labels(pod), pod.working_set_bytes() as f64, pod.time_ms))
            .collect(),
    );
    let _ = writeln!(
        out,
        "# HELP resource_scrape_error [STABLE] 1 if there was an error while getting container metrics, 0 otherwise"
    );
    let _ = writeln!(out, "# TYPE resource_scrape_error gauge");
    let _ = writeln!(out, "resource_scrape_error 0");
    out
}

fn respond(body: String, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// `/stats/summary`.
pub(crate) async fn summary(ctx: &Context, node: &Node) -> Result<Response<Body>, Reply> {
    let usage = collect(ctx, node).await?;
    Ok(respond(summary_json(&usage).to_string(), "application/json"))
}

/// `/metrics/resource`.
pub(crate) async fn metrics_resource(ctx: &Context, node: &Node) -> Result<Response<Body>, Reply> {
    let usage = collect(ctx, node).await?;
    Ok(respond(
        resource_metrics(&usage),
        "text/plain; version=0.0.4; charset=utf-8",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeUsage {
        let container = |name: &str, cpu: u64, memory: u64, started_ms| ContainerUsage {
            name: name.into(),
            started_ms,
            cpu_core_nanoseconds: cpu,
            cpu_nanocores: cpu / 10,
            working_set_bytes: memory,
        };
        NodeUsage {
            name: "ip-10-0-1-7.default".into(),
            started_ms: Some(1_700_000_000_000),
            time_ms: 1_700_000_100_000,
            pods: vec![
                PodUsage {
                    namespace: "default".into(),
                    name: "web".into(),
                    uid: "u1".into(),
                    started_ms: Some(1_700_000_010_000),
                    time_ms: 1_700_000_099_500,
                    containers: vec![
                        container("main", 1_500_000_000, 4096, Some(1_700_000_020_000)),
                        container("side", 500_000_000, 1024, None),
                    ],
                },
                PodUsage {
                    namespace: "jobs".into(),
                    name: "batch".into(),
                    uid: "u2".into(),
                    started_ms: None,
                    time_ms: 1_700_000_099_000,
                    containers: vec![container("main", 250_000_000, 2048, None)],
                },
            ],
        }
    }

    #[test]
    fn resource_metrics_are_what_metrics_server_parses() {
        let text = resource_metrics(&node());
        for line in [
            "# TYPE container_cpu_usage_seconds_total counter",
            "container_cpu_usage_seconds_total{container=\"main\",namespace=\"default\",pod=\"web\"} 1.5 1700000099500",
            "container_cpu_usage_seconds_total{container=\"main\",namespace=\"jobs\",pod=\"batch\"} 0.25 1700000099000",
            "container_memory_working_set_bytes{container=\"side\",namespace=\"default\",pod=\"web\"} 1024 1700000099500",
            // A container's own start, else its pod's; none without either.
            "container_start_time_seconds{container=\"main\",namespace=\"default\",pod=\"web\"} 1700000020 1700000099500",
            "container_start_time_seconds{container=\"side\",namespace=\"default\",pod=\"web\"} 1700000010 1700000099500",
            "node_cpu_usage_seconds_total 2.25 1700000100000",
            "node_memory_working_set_bytes 7168 1700000100000",
            "pod_cpu_usage_seconds_total{namespace=\"default\",pod=\"web\"} 2 1700000099500",
            "pod_memory_working_set_bytes{namespace=\"jobs\",pod=\"batch\"} 2048 1700000099000",
            "resource_scrape_error 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("container_start_time_seconds{container=\"main\",namespace=\"jobs\""));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_summary_sums_containers_into_pods_and_pods_into_the_node() {
        let summary = summary_json(&node());
        assert_eq!(summary["node"]["nodeName"], "ip-10-0-1-7.default");
        assert_eq!(summary["node"]["cpu"]["usageCoreNanoSeconds"], 2_250_000_000u64);
        assert_eq!(summary["node"]["memory"]["workingSetBytes"], 7168);
        let web = &summary["pods"][0];
        assert_eq!(web["podRef"]["uid"], "u1");
        assert_eq!(web["cpu"]["usageNanoCores"], 200_000_000);
        assert_eq!(web["containers"][0]["startTime"], "2023-11-14T22:13:40Z");
        assert_eq!(web["containers"][1]["startTime"], "2023-11-14T22:13:30Z");
        assert_eq!(web["cpu"]["time"], "2023-11-14T22:14:59Z");
    }
}
