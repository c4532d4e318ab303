//! `meta.k8s.io/v1 Table` responses, so `kubectl get` prints the same columns as against a
//! real server: built-in printers for the common kinds, `additionalPrinterColumns` for CRDs.

use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use super::registry::{Printer, PrinterColumn, ResourceType};
use super::selector::labels_of;

/// Which object each row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Go's `duration.HumanDuration`, which `kubectl get` shows as AGE.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let seconds = seconds.max(0);
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    format!("{}y", hours / 24 / 365)
}

/// The age of an RFC 3339 timestamp, or `<unknown>`.
pub fn age(timestamp: &Value) -> String {
    timestamp
        .as_str()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| human_duration((jiff::Timestamp::now() - t).get_seconds()))
        .unwrap_or_else(|| "<unknown>".into())
}

fn column(name: &str, type_: &str, priority: i64, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn count(value: &Value) -> usize {
    value.as_object().map(|m| m.len()).unwrap_or(0)
}

fn str_or<'a>(value: &'a Value, default: &'a str) -> &'a str {
    value.as_str().filter(|s| !s.is_empty()).unwrap_or(default)
}

fn condition_status<'a>(object: &'a Value, type_: &str) -> Option<&'a str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?["status"]
        .as_str()
}

fn pod_status(pod: &Value) -> String {
    let mut reason = pod["status"]["reason"]
        .as_str()
        .or(pod["status"]["phase"].as_str())
        .unwrap_or("Pending")
        .to_string();
    for status in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let state = &status["state"];
        if let Some(r) = state["waiting"]["reason"].as_str().filter(|r| !r.is_empty()) {
            reason = r.to_string();
        } else if let Some(r) = state["terminated"]["reason"].as_str().filter(|r| !r.is_empty()) {
            reason = r.to_string();
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        reason = "Terminating".into();
    }
    reason
}

fn node_roles(node: &Value) -> String {
    let mut roles: Vec<String> = labels_of(node)
        .iter()
        .filter_map(|(k, v)| {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                Some(role.to_string())
            } else if k == "kubernetes.io/role" {
                Some(v.clone())
            } else {
                None
            }
        })
        .filter(|r| !r.is_empty())
        .collect();
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        "<none>".into()
    } else {
        roles.join(",")
    }
}

fn node_address(node: &Value, type_: &str) -> String {
    node["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|addr| addr["type"] == type_))
        .and_then(|addr| addr["address"].as_str())
        .unwrap_or("<none>")
        .to_string()
}

/// Evaluates a printer column's JSONPath (`.status.readyNodes`) against an object.
fn json_path_cell(object: &Value, column: &PrinterColumn) -> Value {
    let path = format!("${}", column.json_path);
    let found: Vec<Value> = object
        .query(&path)
        .map(|values| values.into_iter().cloned().collect())
        .unwrap_or_default();
    let value = match found.len() {
        0 => return Value::Null,
        1 => found.into_iter().next().unwrap_or(Value::Null),
        _ => Value::Array(found),
    };
    match (column.type_.as_str(), value) {
        ("date", value) => json!(age(&value)),
        ("integer" | "number" | "boolean", value @ (Value::Number(_) | Value::Bool(_))) => value,
        (_, Value::String(s)) => json!(s),
        (_, other) => json!(other.to_string()),
    }
}

fn columns_and_cells(rt: &ResourceType, version: &str, object: &Value) -> (Vec<Value>, Vec<Value>) {
    let name = object["metadata"]["name"].clone();
    let created = age(&object["metadata"]["creationTimestamp"]);
    let name_column = column("Name", "string", 0, "Name must be unique within a namespace.");
    let age_column = column(
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match &rt.printer {
        Printer::Pods => {
            let containers = object["spec"]["containers"]
                .as_array()
                .map(|c| c.len())
                .unwrap_or(0);
            let statuses = object["status"]["containerStatuses"].as_array();
            let ready = statuses
                .map(|s| s.iter().filter(|c| c["ready"] == json!(true)).count())
                .unwrap_or(0);
            let restarts: i64 = statuses
                .map(|s| s.iter().map(|c| c["restartCount"].as_i64().unwrap_or(0)).sum())
                .unwrap_or(0);
            (
                vec![
                    name_column,
                    column(
                        "Ready",
                        "string",
                        0,
                        "The aggregate readiness state of this pod for accepting traffic.",
                    ),
                    column(
                        "Status",
                        "string",
                        0,
                        "The aggregate status of the containers in this pod.",
                    ),
                    column(
                        "Restarts",
                        "string",
                        0,
                        "The number of times the containers in this pod have been restarted.",
                    ),
                    age_column,
                    column("IP", "string", 1, "IP address allocated to the pod."),
                    column("Node", "string", 1, "Name of the node the pod is assigned to."),
                    column(
                        "Nominated Node",
                        "string",
                        1,
                        "Name of the node where the pod is nominated to run.",
                    ),
                    column("Readiness Gates", "string", 1, "Pod readiness gates."),
                ],
                vec![
                    name,
                    json!(format!("{ready}/{containers}")),
                    json!(pod_status(object)),
                    json!(restarts.to_string()),
                    json!(created),
                    json!(str_or(&object["status"]["podIP"], "<none>")),
                    json!(str_or(&object["spec"]["nodeName"], "<none>")),
                    json!(str_or(&object["status"]["nominatedNodeName"], "<none>")),
                    json!("<none>"),
                ],
            )
        }
        Printer::Nodes => {
            let mut status = match condition_status(object, "Ready") {
                Some("True") => "Ready".to_string(),
                Some("False") => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if object["spec"]["unschedulable"] == json!(true) {
                status.push_str(",SchedulingDisabled");
            }
            let info = &object["status"]["nodeInfo"];
            (
                vec![
                    name_column,
                    column("Status", "string", 0, "The status of the node"),
                    column("Roles", "string", 0, "The roles of the node"),
                    age_column,
                    column("Version", "string", 0, "Kubelet Version reported by the node."),
                    column("Internal-IP", "string", 1, "List of internal IPs in the node."),
                    column("External-IP", "string", 1, "List of external IPs in the node."),
                    column("OS-Image", "string", 1, "OS Image reported by the node."),
                    column(
                        "Kernel-Version",
                        "string",
                        1,
                        "Kernel Version reported by the node.",
                    ),
                    column(
                        "Container-Runtime",
                        "string",
                        1,
                        "Container Runtime Version reported by the node.",
                    ),
                ],
                vec![
                    name,
                    json!(status),
                    json!(node_roles(object)),
                    json!(created),
                    json!(str_or(&info["kubeletVersion"], "<none>")),
                    json!(node_address(object, "InternalIP")),
                    json!(node_address(object, "ExternalIP")),
                    json!(str_or(&info["osImage"], "<unknown>")),
                    json!(str_or(&info["kernelVersion"], "<unknown>")),
                    json!(str_or(&info["containerRuntimeVersion"], "<unknown>")),
                ],
            )
        }
        Printer::Namespaces => (
            vec![
                name_column,
                column("Status", "string", 0, "The status of the namespace"),
                age_column,
            ],
            vec![
                name,
                json!(str_or(&object["status"]["phase"], "Active")),
                json!(created),
            ],
        ),
        Printer::Events => {
            let core = if version == "v1" && rt.group.is_empty() {
                object.clone()
            } else {
                super::convert::to_storage(rt, object.clone())
            };
            let last = [
                &core["lastTimestamp"],
                &core["eventTime"],
                &core["metadata"]["creationTimestamp"],
            ]
            .into_iter()
            .find(|t| !t.is_null())
            .map(age)
            .unwrap_or_else(|| "<unknown>".into());
            let involved = &core["involvedObject"];
            let target = format!(
                "{}/{}",
                involved["kind"].as_str().unwrap_or_default().to_lowercase(),
                involved["name"].as_str().unwrap_or_default()
            );
            (
                vec![
                    column("Last Seen", "string", 0, "Time since the event was last seen."),
                    column("Type", "string", 0, "Type of this event (Normal, Warning)."),
                    column("Reason", "string", 0, "Why the action was taken."),
                    column("Object", "string", 0, "The object this event is about."),
                    column(
                        "Message",
                        "string",
                        0,
                        "A human-readable description of the status of this operation.",
                    ),
                ],
                vec![
                    json!(last),
                    core["type"].clone(),
                    core["reason"].clone(),
                    json!(target),
                    core["message"].clone(),
                ],
            )
        }
        Printer::Leases => (
            vec![
                name_column,
                column("Holder", "string", 0, "The holder of the lease."),
                age_column,
            ],
            vec![
                name,
                json!(str_or(&object["spec"]["holderIdentity"], "")),
                json!(created),
            ],
        ),
        Printer::ConfigMaps => (
            vec![
                name_column,
                column("Data", "string", 0, "Number of data entries."),
                age_column,
            ],
            vec![
                name,
                json!((count(&object["data"]) + count(&object["binaryData"])).to_string()),
                json!(created),
            ],
        ),
        Printer::Secrets => (
            vec![
                name_column,
                column("Type", "string", 0, "The type of the secret."),
                column("Data", "string", 0, "Number of data entries."),
                age_column,
            ],
            vec![
                name,
                json!(str_or(&object["type"], "Opaque")),
                json!(count(&object["data"]).to_string()),
                json!(created),
            ],
        ),
        Printer::Deployments => {
            let status = &object["status"];
            let ready = status["readyReplicas"].as_i64().unwrap_or(0);
            let wanted = object["spec"]["replicas"].as_i64().unwrap_or(1);
            (
                vec![
                    name_column,
                    column("Ready", "string", 0, "Number of ready replicas."),
                    column("Up-to-date", "string", 0, "Total number of updated replicas."),
                    column("Available", "string", 0, "Total number of available replicas."),
                    age_column,
                ],
                vec![
                    name,
                    json!(format!("{ready}/{wanted}")),
                    json!(status["updatedReplicas"].as_i64().unwrap_or(0).to_string()),
                    json!(status["availableReplicas"].as_i64().unwrap_or(0).to_string()),
                    json!(created),
                ],
            )
        }
        Printer::Crds => (
            vec![
                name_column,
                column("Created At", "date", 0, "The time the CRD was created."),
            ],
            vec![name, object["metadata"]["creationTimestamp"].clone()],
        ),
        Printer::Custom(by_version) => {
            let custom = by_version.get(version).cloned().unwrap_or_default();
            if custom.is_empty() {
                return (vec![name_column, age_column], vec![name, json!(created)]);
            }
            let mut columns = vec![name_column];
            let mut cells = vec![name];
            for c in &custom {
                columns.push(
                    json!({"name": c.name, "type": if c.type_ == "date" { "string" } else { &c.type_ },
                    "format": c.format, "description": c.description, "priority": c.priority}),
                );
                cells.push(json_path_cell(object, c));
            }
            (columns, cells)
        }
        Printer::Default => (vec![name_column, age_column], vec![name, json!(created)]),
    }
}

fn row(rt: &ResourceType, version: &str, object: &Value, include: IncludeObject) -> (Vec<Value>, Value) {
    let (columns, cells) = columns_and_cells(rt, version, object);
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::Object => row["object"] = object.clone(),
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object["metadata"],
            })
        }
        IncludeObject::None => {}
    }
    (columns, row)
}

/// A Table of objects (API form).
pub fn table(
    rt: &ResourceType,
    version: &str,
    objects: &[Value],
    metadata: Value,
    include: IncludeObject,
) -> Value {
    let mut columns = columns_and_cells(rt, version, &json!({"metadata": {}})).0;
    let mut rows = Vec::new();
    for object in objects {
        let (c, r) = row(rt, version, object, include);
        columns = c;
        rows.push(r);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_match_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(50 * 3600), "2d2h");
    }

    #[test]
    fn crd_columns_evaluate_json_paths() {
        let crd = ec2_kubelet::crd::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == "Ec2PodTemplate")
            .unwrap();
        let rt = super::super::registry::from_crd(&serde_json::to_value(crd).unwrap()).unwrap();
        let object = json!({"metadata": {"name": "t", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"instanceTypes": ["m5.large", "c5.large"]},
            "status": {"resolvedImageId": "ami-1", "conditions": [{"type": "Ready", "status": "True"}]}});
        let table = table(&rt, "v1alpha1", &[object], json!({}), IncludeObject::None);
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Image", "Types", "Ready", "Age"]);
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "ami-1");
        assert_eq!(cells[2], r#"["m5.large","c5.large"]"#);
        assert_eq!(cells[3], "True");
        assert!(cells[4].as_str().unwrap().ends_with('y') || cells[4].as_str().unwrap().ends_with('d'));
    }
}
