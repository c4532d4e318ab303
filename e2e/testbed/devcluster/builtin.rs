//! What the real API server does for particular built-in kinds on create and update: pod
//! defaults and spec immutability, namespace phase and finalizer, CRD checks, name rules.

use serde_json::{Value, json};

use super::error::ApiError;
use super::registry::{ResourceType, from_crd};

/// The tolerations the DefaultTolerationSeconds admission plugin adds to every pod.
fn default_tolerations() -> Vec<Value> {
    ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"]
        .iter()
        .map(|key| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}))
        .collect()
}

/// Adds the default not-ready/unreachable tolerations unless the pod already tolerates that
/// `NoExecute` taint (a toleration for its key, or for every key, with that effect or any).
fn add_default_tolerations(spec: &mut Value) {
    let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for toleration in default_tolerations() {
        let tolerated = tolerations.iter().any(|t| {
            let key = t["key"].as_str().unwrap_or_default();
            let effect = t["effect"].as_str().unwrap_or_default();
            (key.is_empty() || t["key"] == toleration["key"]) && (effect.is_empty() || effect == "NoExecute")
        });
        if !tolerated {
            tolerations.push(toleration);
        }
    }
    spec["tolerations"] = json!(tolerations);
}

/// Defaults each container's unset requests to its limits, as the API server does, and returns
/// the pod's QoS class: `Guaranteed` when every container's CPU and memory requests equal their
/// limits, `BestEffort` when no container requests or limits either, `Burstable` otherwise.
fn default_requests_and_qos(spec: &mut Value) -> &'static str {
    let (mut any, mut guaranteed) = (false, true);
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec[list].as_array_mut() else {
            continue;
        };
        for container in containers {
            let resources = &mut container["resources"];
            if let Some(limits) = resources["limits"].as_object().cloned() {
                for (name, quantity) in limits {
                    if resources["requests"][&name].is_null() {
                        resources["requests"][&name] = quantity;
                    }
                }
            }
            for name in ["cpu", "memory"] {
                let (request, limit) = (&resources["requests"][name], &resources["limits"][name]);
                any |= !request.is_null() || !limit.is_null();
                guaranteed &= !limit.is_null() && request == limit;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Admission on update: DefaultTolerationSeconds runs on updates too, so re-applying a pod
/// manifest whose tolerations list replaces the defaulted one changes nothing.
pub fn prepare_update(rt: &ResourceType, object: &mut Value) {
    if rt.is("", "pods") && object["spec"].is_object() {
        add_default_tolerations(&mut object["spec"]);
    }
    if rt.is("", "secrets") {
        fold_string_data(object);
    }
}

/// A Secret's `stringData` is write-only: merged into `data` (base64), then dropped.
fn fold_string_data(secret: &mut Value) {
    use base64::Engine;
    let Some(map) = secret.as_object_mut() else { return };
    let Some(Value::Object(strings)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default();
        data[key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

fn set_default(object: &mut Value, key: &str, value: Value) {
    if let Value::Object(map) = object
        && map.get(key).is_none_or(Value::is_null)
    {
        map.insert(key.into(), value);
    }
}

/// Defaults and status reset on create.
pub fn prepare_create(rt: &ResourceType, object: &mut Value) {
    if rt.status && !rt.is("", "nodes") {
        object.as_object_mut().map(|m| m.remove("status"));
    }
    match (rt.group.as_str(), rt.resource.as_str()) {
        ("", "pods") => {
            let spec = &mut object["spec"];
            set_default(spec, "restartPolicy", json!("Always"));
            set_default(spec, "terminationGracePeriodSeconds", json!(30));
            set_default(spec, "dnsPolicy", json!("ClusterFirst"));
            set_default(spec, "schedulerName", json!("default-scheduler"));
            set_default(spec, "serviceAccountName", json!("default"));
            let account = spec["serviceAccountName"].clone();
            set_default(spec, "serviceAccount", account);
            set_default(spec, "securityContext", json!({}));
            set_default(spec, "enableServiceLinks", json!(true));
            set_default(spec, "priority", json!(0));
            add_default_tolerations(spec);
            for list in ["initContainers", "containers"] {
                if let Some(containers) = spec[list].as_array_mut() {
                    for container in containers {
                        let image = container["image"].as_str().unwrap_or_default();
                        let tagged = image.rsplit('/').next().is_some_and(|last| last.contains(':'));
                        let policy = if !tagged || image.ends_with(":latest") {
                            "Always"
                        } else {
                            "IfNotPresent"
                        };
                        set_default(container, "imagePullPolicy", json!(policy));
                        set_default(container, "terminationMessagePath", json!("/dev/termination-log"));
                        set_default(container, "terminationMessagePolicy", json!("File"));
                        set_default(container, "resources", json!({}));
                    }
                }
            }
            let qos = default_requests_and_qos(&mut object["spec"]);
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        ("", "namespaces") => {
            let name = object["metadata"]["name"].clone();
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            object["spec"]["finalizers"] = json!(["kubernetes"]);
            object["status"] = json!({"phase": "Active"});
        }
        ("", "secrets") => {
            fold_string_data(object);
            set_default(object, "type", json!("Opaque"));
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            object["status"] = json!({});
        }
        _ => {}
    }
}

/// A name as the kind requires it (DNS-1123 subdomain or label; RBAC names are path segments).
pub fn validate_name(rt: &ResourceType, name: &str) -> Result<(), String> {
    let label_only = matches!(rt.resource.as_str(), "namespaces" | "services") && rt.group.is_empty();
    let path_segment = rt.group == "rbac.authorization.k8s.io";
    if path_segment {
        return if name.contains('/') || name.contains('%') || name == "." || name == ".." {
            Err(format!("may not contain '/' or '%' or be '.' or '..' ({name})"))
        } else {
            Ok(())
        };
    }
    let valid = if label_only {
        ec2_kubelet::crd::is_dns_label(name)
    } else {
        ec2_kubelet::crd::is_dns_subdomain(name)
    };
    if valid {
        Ok(())
    } else if label_only {
        Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into())
    }
}

/// Checks on create and update that the real server makes for built-in kinds.
pub fn validate(rt: &ResourceType, object: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let invalid = |path: &str, detail: &str, value: Value| {
        ApiError::invalid_field(&rt.group, &rt.kind, name, path, detail, value)
    };
    match (rt.group.as_str(), rt.resource.as_str()) {
        ("", "pods") => {
            let containers = object["spec"]["containers"].as_array();
            if containers.is_none_or(|c| c.is_empty()) {
                return Err(invalid("spec.containers", "", Value::Null));
            }
            for (i, container) in containers.into_iter().flatten().enumerate() {
                for field in ["name", "image"] {
                    if container[field].as_str().is_none_or(str::is_empty) && old.is_none() {
                        return Err(invalid(&format!("spec.containers[{i}].{field}"), "", Value::Null));
                    }
                }
            }
            if let Some(old) = old {
                validate_pod_update(rt, name, old, object)?;
            }
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let rt = from_crd(object).map_err(|e| {
                let (path, detail) = e.split_once(": ").unwrap_or(("spec", e.as_str()));
                invalid(path, detail, Value::Null)
            })?;
            let expected = format!("{}.{}", rt.resource, rt.group);
            if name != expected {
                return Err(invalid(
                    "metadata.name",
                    &format!("must be spec.names.plural+\".\"+spec.group (\"{expected}\")"),
                    json!(name),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Pod spec is immutable except images, `activeDeadlineSeconds` and added tolerations.
fn validate_pod_update(rt: &ResourceType, name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    let mutable_cleared = |spec: &Value| {
        let mut spec = spec.clone();
        for list in ["containers", "initContainers"] {
            if let Some(containers) = spec[list].as_array_mut() {
                for c in containers {
                    c.as_object_mut().map(|m| m.remove("image"));
                }
            }
        }
        if let Value::Object(map) = &mut spec {
            map.remove("activeDeadlineSeconds");
            map.remove("tolerations");
        }
        spec
    };
    if mutable_cleared(&old["spec"]) != mutable_cleared(&new["spec"]) {
        return Err(ApiError::invalid_field(
            &rt.group,
            &rt.kind,
            name,
            "spec",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations)",
            json!("object"),
        ));
    }
    Ok(())
}

/// The status of a CRD as the apiextensions controllers set it once the names are accepted.
pub fn established_crd_status(crd: &Value) -> Value {
    let now = super::store::now();
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now});
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|v| v["storage"] == json!(true))
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": crd["spec"]["names"],
        "storedVersions": stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_string_data_folds_into_base64_data() {
        let mut secret = json!({"data": {"kept": "a2VwdA=="}, "stringData": {"token": "s3cret"}});
        fold_string_data(&mut secret);
        assert_eq!(secret, json!({"data": {"kept": "a2VwdA==", "token": "czNjcmV0"}}));
    }
}
