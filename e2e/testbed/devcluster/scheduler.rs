//! A minimal scheduler: binds pending pods to Ready, schedulable nodes whose labels match the
//! pod's `nodeSelector` and required node affinity, whose taints the pod tolerates and that
//! have room (`allocatable.pods`). Unschedulable pods get `PodScheduled=False` and a
//! `FailedScheduling` event saying why, like kube-scheduler's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::selector::{Requirement, labels_of, string_map};
use super::store::{PatchKind, Store, Subresource, WriteOptions, now};

const SCHEDULER_NAME: &str = "default-scheduler";

fn tolerates(toleration: &Value, taint: &Value) -> bool {
    let effect = toleration["effect"].as_str().unwrap_or_default();
    if !effect.is_empty() && Some(effect) != taint["effect"].as_str() {
        return false;
    }
    let key = toleration["key"].as_str().unwrap_or_default();
    match toleration["operator"].as_str().unwrap_or("Equal") {
        "Exists" => key.is_empty() || Some(key) == taint["key"].as_str(),
        _ => {
            Some(key) == taint["key"].as_str()
                && toleration["value"].as_str().unwrap_or_default()
                    == taint["value"].as_str().unwrap_or_default()
        }
    }
}

/// The first taint (NoSchedule or NoExecute) of `node` that `pod` does not tolerate.
fn untolerated_taint<'a>(pod: &Value, node: &'a Value) -> Option<&'a Value> {
    let tolerations = pod["spec"]["tolerations"].as_array().cloned().unwrap_or_default();
    node["spec"]["taints"].as_array()?.iter().find(|taint| {
        matches!(taint["effect"].as_str(), Some("NoSchedule" | "NoExecute"))
            && !tolerations.iter().any(|t| tolerates(t, taint))
    })
}

fn matches_affinity(pod: &Value, labels: &BTreeMap<String, String>) -> bool {
    let selector = string_map(&pod["spec"]["nodeSelector"]);
    if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return false;
    }
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let Some(terms) = terms.as_array() else {
        return true;
    };
    // Terms are ORed; the expressions of one term are ANDed.
    terms.iter().any(|term| {
        term["matchExpressions"]
            .as_array()
            .map(|expressions| {
                expressions.iter().all(|e| {
                    Requirement::from_expression(e)
                        .map(|r| r.matches(labels))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(true)
    })
}

fn is_ready(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn pod_capacity(node: &Value) -> usize {
    node["status"]["allocatable"]["pods"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .or_else(|| node["status"]["allocatable"]["pods"].as_u64().map(|p| p as usize))
        .unwrap_or(110)
}

/// Why no node fits, in kube-scheduler's words.
fn failure_message(total: usize, reasons: &BTreeMap<String, usize>) -> String {
    let mut parts: Vec<String> = reasons
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{total} nodes are available: no nodes available to schedule pods.")
    } else {
        format!("0/{total} nodes are available: {}.", parts.join(", "))
    }
}

/// One scheduling decision for a pending pod.
pub fn pick_node(pod: &Value, nodes: &[Arc<Value>], load: &HashMap<String, usize>) -> Result<String, String> {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut best: Option<(usize, &str)> = None;
    for node in nodes {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        let reason = if !is_ready(node) {
            Some("node(s) were not ready".to_string())
        } else if node["spec"]["unschedulable"] == json!(true) {
            Some("node(s) were unschedulable".to_string())
        } else if !matches_affinity(pod, &labels_of(node)) {
            Some("node(s) didn't match Pod's node affinity/selector".to_string())
        } else if let Some(taint) = untolerated_taint(pod, node) {
            let key = taint["key"].as_str().unwrap_or_default();
            let value = taint["value"].as_str().unwrap_or_default();
            Some(format!("node(s) had untolerated taint {{{key}: {value}}}"))
        } else if load.get(name).copied().unwrap_or(0) >= pod_capacity(node) {
            Some("Too many pods".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => *reasons.entry(reason).or_default() += 1,
            None => {
                let pods = load.get(name).copied().unwrap_or(0);
                if best.is_none_or(|(n, b)| pods < n || (pods == n && name < b)) {
                    best = Some((pods, name));
                }
            }
        }
    }
    best.map(|(_, name)| name.to_string())
        .ok_or_else(|| failure_message(nodes.len(), &reasons))
}

fn record_event(store: &Store, pod: &Value, type_: &str, reason: &str, message: &str) {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let now = now();
    let suffix: u64 = rand::random();
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": format!("{name}.{suffix:016x}"), "namespace": namespace},
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name,
            "uid": pod["metadata"]["uid"], "resourceVersion": pod["metadata"]["resourceVersion"],
        },
        "reason": reason,
        "message": message,
        "type": type_,
        "source": {"component": SCHEDULER_NAME},
        "reportingComponent": SCHEDULER_NAME,
        "reportingInstance": SCHEDULER_NAME,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    if let Err(error) = store.create_builtin("", "events", Some(namespace), event) {
        tracing::debug!(error = %error.message, "scheduler event not recorded");
    }
}

/// The scheduler's loop state: the last failure reported per pod uid, so a pod that stays
/// unschedulable gets one event per distinct reason rather than one per pass.
#[derive(Default)]
pub struct Scheduler {
    reported: HashMap<String, String>,
}

impl Scheduler {
    /// One pass over every pending pod.
    pub fn schedule_pending(&mut self, store: &Store) {
        let pods = store.objects("", "pods");
        let nodes = store.objects("", "nodes");
        let mut load: HashMap<String, usize> = HashMap::new();
        for pod in &pods {
            let phase = pod["status"]["phase"].as_str().unwrap_or_default();
            if let Some(node) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty())
                && !matches!(phase, "Succeeded" | "Failed")
            {
                *load.entry(node.to_string()).or_default() += 1;
            }
        }
        let Some(pod_type) = store.find_type("", "v1", "pods") else {
            return;
        };
        let pending = pods.iter().filter(|pod| {
            pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty)
                && pod["metadata"]["deletionTimestamp"].is_null()
                && pod["spec"]["schedulerName"].as_str().unwrap_or(SCHEDULER_NAME) == SCHEDULER_NAME
        });
        let mut seen = Vec::new();
        for pod in pending {
            let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
            seen.push(uid.clone());
            match pick_node(pod, &nodes, &load) {
                Ok(node) => {
                    if store.bind(namespace, name, &node).is_ok() {
                        *load.entry(node.clone()).or_default() += 1;
                        self.reported.remove(&uid);
                        let message = format!("Successfully assigned {namespace}/{name} to {node}");
                        record_event(store, pod, "Normal", "Scheduled", &message);
                    }
                }
                Err(message) => {
                    if self.reported.get(&uid) == Some(&message) {
                        continue;
                    }
                    self.reported.insert(uid, message.clone());
                    let patch = json!({"status": {"conditions": [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": message, "lastTransitionTime": now(),
                    }]}});
                    let _ = store.patch(
                        &pod_type,
                        "v1",
                        Some(namespace),
                        name,
                        PatchKind::Strategic,
                        patch,
                        Subresource::Status,
                        &WriteOptions::default(),
                    );
                    record_event(store, pod, "Warning", "FailedScheduling", &message);
                }
            }
        }
        self.reported.retain(|uid, _| seen.contains(uid));
    }
}

/// Runs the scheduler until `stop` turns true: a pass after every batch of pod or node
/// changes, and at least every second (to retry).
pub async fn run(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut changes = store.subscribe();
    let mut scheduler = Scheduler::default();
    loop {
        scheduler.schedule_pending(&store);
        tokio::select! {
            _ = super::stopped(&mut stop) => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            change = changes.recv() => {
                if let Ok(change) = change
                    && !(change.storage.group.is_empty()
                        && matches!(change.storage.resource.as_str(), "pods" | "nodes"))
                {
                    continue;
                }
                // Let a burst of changes land before the next pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: Value, taints: Value, ready: bool) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
            "status": {"allocatable": {"pods": "2"},
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        }))
    }

    #[test]
    fn picks_a_ready_matching_tolerated_node_with_room() {
        let taint = json!([{"key": "virtual-kubelet.io/provider", "value": "ec2", "effect": "NoSchedule"}]);
        let nodes = vec![
            node("a", json!({"pool": "x"}), json!([]), false),
            node("b", json!({"pool": "y"}), json!([]), true),
            node("c", json!({"pool": "x"}), taint.clone(), true),
            node("d", json!({"pool": "x"}), taint, true),
        ];
        let pod = json!({"spec": {"nodeSelector": {"pool": "x"},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}]}});
        let mut load = HashMap::new();
        load.insert("c".to_string(), 2);
        assert_eq!(pick_node(&pod, &nodes, &load).unwrap(), "d");
        load.insert("d".to_string(), 2);
        let message = pick_node(&pod, &nodes, &load).unwrap_err();
        assert_eq!(
            message,
            "0/4 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) were not ready, 2 Too many pods."
        );
        let intolerant = json!({"spec": {"nodeSelector": {"pool": "x"}}});
        let message = pick_node(&intolerant, &nodes, &HashMap::new()).unwrap_err();
        assert!(
            message.contains("2 node(s) had untolerated taint {virtual-kubelet.io/provider: ec2}"),
            "{message}"
        );
    }

    #[test]
    fn required_node_affinity_is_honoured() {
        let nodes = vec![
            node("a", json!({"zone": "1"}), json!([]), true),
            node("b", json!({"zone": "2"}), json!([]), true),
        ];
        let pod = json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["2"]}]}]}}}}});
        assert_eq!(pick_node(&pod, &nodes, &HashMap::new()).unwrap(), "b");
    }
}
