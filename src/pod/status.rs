//! A pod's Kubernetes status from its agent's `PodStatus`: phase, the four conditions,
//! container statuses, pod and host IPs. Condition transition times move only when a
//! condition's status changes, so an unchanged status is an identical object (no write).

use serde_json::{Value, json};

use ec2_kubelet_protocol::v1 as proto;

fn timestamp(unix_ms: i64) -> Option<String> {
    if unix_ms <= 0 {
        return None;
    }
    jiff::Timestamp::from_millisecond(unix_ms)
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn phase(phase: i32) -> &'static str {
    match proto::PodPhase::try_from(phase).unwrap_or(proto::PodPhase::Unspecified) {
        proto::PodPhase::Running => "Running",
        proto::PodPhase::Succeeded => "Succeeded",
        proto::PodPhase::Failed => "Failed",
        proto::PodPhase::Pending | proto::PodPhase::Unspecified => "Pending",
    }
}

fn state(state: Option<&proto::ContainerState>) -> Value {
    use proto::container_state::State;
    match state.and_then(|s| s.state.as_ref()) {
        Some(State::Running(running)) => {
            json!({"running": {"startedAt": timestamp(running.started_at_unix_ms)}})
        }
        Some(State::Terminated(t)) => {
            let mut terminated = json!({"exitCode": t.exit_code, "reason": t.reason,
                "startedAt": timestamp(t.started_at_unix_ms), "finishedAt": timestamp(t.finished_at_unix_ms)});
            if t.signal != 0 {
                terminated["signal"] = json!(t.signal);
            }
            if !t.message.is_empty() {
                terminated["message"] = json!(t.message);
            }
            json!({"terminated": terminated})
        }
        Some(State::Waiting(w)) => {
            let mut waiting = json!({"reason": w.reason});
            if !w.message.is_empty() {
                waiting["message"] = json!(w.message);
            }
            json!({"waiting": waiting})
        }
        None => json!({"waiting": {"reason": "ContainerCreating"}}),
    }
}

/// Where the pod runs: the instance's private IP and the node ENI's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Placement {
    pub instance_id: String,
    pub pod_ip: Option<String>,
    pub host_ip: String,
}

/// The transition time a condition keeps: the previous one if its status did not change.
fn transition(previous: &Value, type_: &str, status: &str, now: &str) -> String {
    previous["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .filter(|c| c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str())
        .unwrap_or(now)
        .to_string()
}

/// The pod `status` for an agent's report. `spec` is the pod's spec (container images and
/// order), `previous` its current status (for transition times and `startTime`).
pub fn pod_status(
    agent: &proto::PodStatus,
    spec: &Value,
    previous: &Value,
    placement: &Placement,
    now: &str,
) -> Value {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|container| {
            let name = container["name"].as_str().unwrap_or_default();
            let reported = agent.containers.iter().find(|c| c.name == name);
            let mut status = json!({
                "name": name,
                "image": container["image"],
                "imageID": "",
                "containerID": format!("ec2-kubelet://{}/{name}", placement.instance_id),
                "ready": reported.is_some_and(|c| c.ready),
                "started": reported.is_some_and(|c| c.started),
                "restartCount": reported.map(|c| c.restart_count).unwrap_or(0),
                "state": state(reported.and_then(|c| c.state.as_ref())),
            });
            if let Some(last) = reported
                .and_then(|c| c.last_state.as_ref())
                .filter(|s| s.state.is_some())
            {
                status["lastState"] = state(Some(last));
            }
            status
        })
        .collect();
    let all_ready = !statuses.is_empty() && statuses.iter().all(|s| s["ready"] == json!(true));
    let phase = phase(agent.phase);
    let ready = if all_ready && phase == "Running" {
        "True"
    } else {
        "False"
    };
    let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "lastTransitionTime": transition(previous, type_, status, now)});
    let mut status = json!({
        "phase": phase,
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "hostIP": placement.host_ip,
        "hostIPs": [{"ip": placement.host_ip}],
        "containerStatuses": statuses,
        "startTime": previous["startTime"].as_str().map(String::from)
            .or_else(|| timestamp(agent.started_at_unix_ms))
            .unwrap_or_else(|| now.to_string()),
    });
    if let Some(ip) = &placement.pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    if !agent.reason.is_empty() {
        status["reason"] = json!(agent.reason);
    }
    if !agent.message.is_empty() {
        status["message"] = json!(agent.message);
    }
    if let Some(qos) = previous.get("qosClass") {
        status["qosClass"] = qos.clone();
    }
    status
}

/// The status patch for a pod whose agent stopped answering: Ready and ContainersReady go
/// False with the reason, every container stops being ready; the rest is left as it was.
pub fn unreachable(previous: &Value, reason: &str, message: &str, now: &str) -> Value {
    let conditions: Vec<Value> = previous["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut condition| {
            if condition["type"] == "Ready" || condition["type"] == "ContainersReady" {
                if condition["status"] != "False" {
                    condition["lastTransitionTime"] = json!(now);
                }
                condition["status"] = json!("False");
                condition["reason"] = json!(reason);
                condition["message"] = json!(message);
            }
            condition
        })
        .collect();
    let containers: Vec<Value> = previous["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut container| {
            container["ready"] = json!(false);
            container
        })
        .collect();
    json!({"conditions": conditions, "containerStatuses": containers})
}

/// Whether merging `patch` into `status` would change it (a patch that changes nothing is
/// not sent).
pub fn changes(status: &Value, patch: &Value) -> bool {
    let mut merged = status.clone();
    json_patch::merge(&mut merged, patch);
    &merged != status
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::container_state::State;

    fn running(name: &str, ready: bool, restarts: i32) -> proto::ContainerStatus {
        proto::ContainerStatus {
            name: name.into(),
            state: Some(proto::ContainerState {
                state: Some(State::Running(proto::Running {
                    started_at_unix_ms: 1_700_000_000_000,
                })),
            }),
            last_state: None,
            ready,
            started: true,
            restart_count: restarts,
        }
    }

    fn placement() -> Placement {
        Placement {
            instance_id: "i-1".into(),
            pod_ip: Some("10.0.2.7".into()),
            host_ip: "10.0.1.23".into(),
        }
    }

    #[test]
    fn a_running_ready_pod() {
        let agent = proto::PodStatus {
            pod_uid: "u".into(),
            phase: proto::PodPhase::Running as i32,
            containers: vec![running("app", true, 2)],
            started_at_unix_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let spec = json!({"containers": [{"name": "app", "image": "local/shell"}]});
        let status = pod_status(&agent, &spec, &json!({}), &placement(), "2026-01-01T00:00:00Z");
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.0.2.7");
        assert_eq!(status["hostIP"], "10.0.1.23");
        assert_eq!(status["startTime"], "2023-11-14T22:13:20Z");
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "True");
        let container = &status["containerStatuses"][0];
        assert_eq!(container["restartCount"], 2);
        assert_eq!(container["image"], "local/shell");
        assert_eq!(container["containerID"], "ec2-kubelet://i-1/app");
        assert!(container["state"]["running"]["startedAt"].is_string());
    }

    #[test]
    fn transition_times_hold_while_a_condition_keeps_its_status() {
        let agent = proto::PodStatus {
            phase: proto::PodPhase::Running as i32,
            containers: vec![running("app", false, 0)],
            ..Default::default()
        };
        let spec = json!({"containers": [{"name": "app", "image": "x"}]});
        let first = pod_status(&agent, &spec, &json!({}), &placement(), "2026-01-01T00:00:00Z");
        let again = pod_status(&agent, &spec, &first, &placement(), "2026-01-01T00:05:00Z");
        assert_eq!(first, again, "an unchanged report gives an identical status");
        let ready_agent = proto::PodStatus {
            containers: vec![running("app", true, 0)],
            ..agent
        };
        let later = pod_status(&ready_agent, &spec, &first, &placement(), "2026-01-01T00:06:00Z");
        let ready = later["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:06:00Z");
    }

    #[test]
    fn finished_pods_carry_exit_codes() {
        let agent = proto::PodStatus {
            phase: proto::PodPhase::Failed as i32,
            containers: vec![proto::ContainerStatus {
                name: "job".into(),
                state: Some(proto::ContainerState {
                    state: Some(State::Terminated(proto::Terminated {
                        exit_code: 1,
                        signal: 0,
                        reason: "Error".into(),
                        message: String::new(),
                        started_at_unix_ms: 1_700_000_000_000,
                        finished_at_unix_ms: 1_700_000_005_000,
                    })),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let spec = json!({"containers": [{"name": "job", "image": "x"}]});
        let status = pod_status(&agent, &spec, &json!({}), &placement(), "2026-01-01T00:00:00Z");
        assert_eq!(status["phase"], "Failed");
        let terminated = &status["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 1);
        assert_eq!(terminated["reason"], "Error");
        assert_eq!(terminated["finishedAt"], "2023-11-14T22:13:25Z");
    }

    #[test]
    fn an_unreachable_agent_makes_the_pod_unready_and_nothing_else() {
        let previous = json!({"phase": "Running", "podIP": "10.0.2.7",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "t0"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "t0"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 1}]});
        let patch = unreachable(&previous, "AgentUnreachable", "no answer", "t1");
        let ready = patch["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "AgentUnreachable");
        assert_eq!(ready["lastTransitionTime"], "t1");
        assert_eq!(patch["conditions"][0]["status"], "True");
        assert_eq!(patch["containerStatuses"][0]["ready"], false);
        assert_eq!(patch["containerStatuses"][0]["restartCount"], 1);
        assert!(patch.get("phase").is_none());
        assert!(changes(&previous, &patch));
        let mut after = previous.clone();
        json_patch::merge(&mut after, &patch);
        assert!(!changes(&after, &patch), "the same patch again changes nothing");
        assert!(!changes(
            &after,
            &unreachable(&after, "AgentUnreachable", "no answer", "t2")
        ));
    }
}
