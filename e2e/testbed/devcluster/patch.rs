//! The four patch types of the API server: JSON patch (RFC 6902) and JSON merge patch
//! (RFC 7386) through the `json-patch` crate, strategic merge patch for built-in kinds (lists
//! merged by their patch merge keys, `$patch`/`$retainKeys`/`$deleteFromPrimitiveList`
//! directives) and server-side apply (create-or-merge per field manager).

use serde_json::{Map, Value};

/// How a list field merges.
#[derive(Clone, Debug, PartialEq)]
pub enum ListKind {
    /// Replaced as a whole.
    Atomic,
    /// Items are matched by these keys (`patchMergeKey` / `x-kubernetes-list-map-keys`).
    Map(Vec<String>),
    /// A set of scalars (`finalizers`).
    Set,
}

/// The merge semantics of a list field of a built-in kind, from the Kubernetes API types'
/// `patchMergeKey`/`listType` markers. `items` lets `ports` pick `containerPort` (containers)
/// or `port` (services).
pub fn builtin_list_kind(field: &str, items: &[Value]) -> ListKind {
    let key = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" | "addresses" => "type",
        "taints" => "key",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "finalizers" => return ListKind::Set,
        _ => return ListKind::Atomic,
    };
    ListKind::Map(vec![key.to_string()])
}

/// The list semantics a CRD schema declares for a field (`x-kubernetes-list-type`).
fn schema_list_kind(schema: Option<&Value>) -> ListKind {
    let Some(schema) = schema else {
        return ListKind::Atomic;
    };
    match schema["x-kubernetes-list-type"].as_str() {
        Some("map") => ListKind::Map(
            schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|keys| keys.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                .unwrap_or_default(),
        ),
        Some("set") => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Where list semantics come from: the built-in table, or a CRD's schema.
#[derive(Clone, Copy)]
pub enum Semantics<'a> {
    Builtin,
    Schema(Option<&'a Value>),
}

impl<'a> Semantics<'a> {
    fn field(self, name: &str) -> Semantics<'a> {
        match self {
            Semantics::Builtin => Semantics::Builtin,
            Semantics::Schema(schema) => Semantics::Schema(schema.and_then(|s| {
                s["properties"]
                    .get(name)
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
            })),
        }
    }

    fn items(self) -> Semantics<'a> {
        match self {
            Semantics::Builtin => Semantics::Builtin,
            Semantics::Schema(schema) => Semantics::Schema(schema.and_then(|s| s.get("items"))),
        }
    }

    fn list_kind(self, field: &str, items: &[Value]) -> ListKind {
        match self {
            Semantics::Builtin => builtin_list_kind(field, items),
            // metadata lists keep their built-in meaning in custom resources too.
            Semantics::Schema(_) if field == "finalizers" || field == "ownerReferences" => {
                builtin_list_kind(field, items)
            }
            Semantics::Schema(schema) => schema_list_kind(schema),
        }
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// RFC 6902 JSON patch, with the API server's reading of `test`: a missing path equals `null`
/// (kube-runtime's finalizer helper tests `/metadata/finalizers` against `null` before adding).
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let mut operations = patch
        .as_array()
        .cloned()
        .ok_or("a JSON patch must be a list of operations")?;
    operations.retain(|op| {
        let missing_null_test = op["op"] == "test"
            && op["value"].is_null()
            && op["path"]
                .as_str()
                .is_some_and(|path| target.pointer(path).is_none());
        !missing_null_test
    });
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(operations)).map_err(|e| e.to_string())?;
    json_patch::patch(target, &patch).map_err(|e| e.to_string())
}

fn item_matches(item: &Value, other: &Value, keys: &[String]) -> bool {
    !keys.is_empty()
        && keys
            .iter()
            .all(|k| item.get(k).is_some() && item.get(k) == other.get(k))
}

/// Strategic merge patch of a built-in object.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        return Err("strategic merge patch must be a JSON object".into());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        strategic_map(map, patch)?;
    }
    Ok(())
}

fn strategic_map(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> Result<(), String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replacement = patch.clone();
            replacement.remove("$patch");
            *target = replacement;
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        _ => {}
    }
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) = (target.get_mut(field), value) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(sub) => {
                if sub.get("$patch").and_then(Value::as_str) == Some("delete") {
                    target.remove(key);
                    continue;
                }
                let entry = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(entry) = entry {
                    strategic_map(entry, sub)?;
                }
            }
            Value::Array(items) => {
                let kind = builtin_list_kind(key, items);
                let current = target.remove(key);
                let merged = strategic_list(current, items, &kind)?;
                target.insert(key.clone(), merged);
            }
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let Some(Value::Array(retain)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn strategic_list(current: Option<Value>, items: &[Value], kind: &ListKind) -> Result<Value, String> {
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let mut list = match current {
        Some(Value::Array(list)) if !replace => list,
        _ => Vec::new(),
    };
    match kind {
        ListKind::Atomic => {
            return Ok(Value::Array(
                items
                    .iter()
                    .filter(|i| i.get("$patch").is_none())
                    .cloned()
                    .collect(),
            ));
        }
        ListKind::Set => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListKind::Map(keys) => {
            for item in items {
                let directive = item.get("$patch").and_then(Value::as_str);
                if directive == Some("replace") {
                    continue;
                }
                let position = list
                    .iter()
                    .position(|existing| item_matches(existing, item, keys));
                match (directive, position) {
                    (Some("delete"), Some(index)) => {
                        list.remove(index);
                    }
                    (Some("delete"), None) => {}
                    (_, Some(index)) => {
                        if let (Value::Object(existing), Value::Object(patch)) = (&mut list[index], item) {
                            strategic_map(existing, patch)?;
                        }
                    }
                    (_, None) => {
                        let mut item = item.clone();
                        if let Value::Object(map) = &mut item {
                            strip_directives(map);
                        }
                        list.push(item);
                    }
                }
            }
        }
    }
    Ok(Value::Array(list))
}

fn strip_directives(map: &mut Map<String, Value>) {
    map.retain(|k, _| !k.starts_with('$'));
    for value in map.values_mut() {
        if let Value::Object(inner) = value {
            strip_directives(inner);
        }
    }
}

/// Server-side apply: merges the applied configuration into the live object and removes what
/// this field manager applied before but no longer does. Lists merge by their keys (built-in
/// table or the CRD schema's `x-kubernetes-list-type`); other lists are replaced.
pub fn apply(live: &mut Value, config: &Value, previous: Option<&Value>, semantics: Semantics) {
    match (live, config) {
        (Value::Object(live), Value::Object(config)) => {
            let previous = previous.and_then(Value::as_object);
            if let Some(previous) = previous {
                for key in previous.keys() {
                    if !config.contains_key(key) && key != "apiVersion" && key != "kind" {
                        live.remove(key);
                    }
                }
            }
            for (key, value) in config {
                let before = previous.and_then(|p| p.get(key));
                let sub = semantics.field(key);
                match (live.get_mut(key), value) {
                    (Some(existing), Value::Object(_)) if existing.is_object() => {
                        apply(existing, value, before, sub)
                    }
                    (Some(Value::Array(existing)), Value::Array(items)) => {
                        let kind = sub.list_kind(key, items);
                        apply_list(
                            existing,
                            items,
                            before.and_then(Value::as_array),
                            &kind,
                            sub.items(),
                        );
                    }
                    _ => {
                        live.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (live, config) => *live = config.clone(),
    }
}

fn apply_list(
    live: &mut Vec<Value>,
    items: &[Value],
    previous: Option<&Vec<Value>>,
    kind: &ListKind,
    semantics: Semantics,
) {
    match kind {
        ListKind::Atomic => *live = items.to_vec(),
        ListKind::Set => {
            if let Some(previous) = previous {
                live.retain(|v| !previous.contains(v) || items.contains(v));
            }
            for item in items {
                if !live.contains(item) {
                    live.push(item.clone());
                }
            }
        }
        ListKind::Map(keys) => {
            if let Some(previous) = previous {
                live.retain(|existing| {
                    let was_applied = previous.iter().any(|p| item_matches(existing, p, keys));
                    let still_applied = items.iter().any(|i| item_matches(existing, i, keys));
                    !was_applied || still_applied
                });
            }
            for item in items {
                let before = previous.and_then(|p| p.iter().find(|p| item_matches(p, item, keys)));
                match live
                    .iter_mut()
                    .find(|existing| item_matches(existing, item, keys))
                {
                    Some(existing) => apply(existing, item, before, semantics),
                    None => live.push(item.clone()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name_and_conditions_by_type() {
        let mut pod = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {"containers": [{"name": "app", "image": "v1"}, {"name": "side", "image": "s"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        });
        let patch = json!({
            "metadata": {"finalizers": ["b"], "labels": {"x": null, "y": "2"}},
            "spec": {
                "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
                "containers": [{"name": "app", "image": "v2"}, {"name": "side", "$patch": "delete"}],
            },
            "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}]},
        });
        strategic_merge(&mut pod, &patch).unwrap();
        assert_eq!(pod["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(pod["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(pod["spec"]["containers"], json!([{"name": "app", "image": "v2"}]));
        assert_eq!(
            pod["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}])
        );
    }

    #[test]
    fn json_patch_test_of_a_missing_path_against_null_passes() {
        let mut object = json!({"metadata": {"name": "a"}});
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": []},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "x"},
        ]);
        json_patch(&mut object, &patch).unwrap();
        assert_eq!(object["metadata"]["finalizers"], json!(["x"]));
        assert!(
            json_patch(
                &mut object,
                &json!([{"op": "test", "path": "/metadata/name", "value": "b"}])
            )
            .is_err()
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let mut obj =
            json!({"spec": {"a": 1, "b": 2, "tolerations": [{"key": "x"}], "finalizers": ["p", "q"]}});
        let patch = json!({"spec": {"$retainKeys": ["a", "tolerations", "finalizers"], "tolerations": [{"key": "y"}],
            "$deleteFromPrimitiveList/finalizers": ["p"]}});
        strategic_merge(&mut obj, &patch).unwrap();
        assert_eq!(
            obj,
            json!({"spec": {"a": 1, "tolerations": [{"key": "y"}], "finalizers": ["q"]}})
        );
        let mut obj = json!({"data": {"a": "1"}});
        strategic_merge(&mut obj, &json!({"data": {"$patch": "replace", "b": "2"}})).unwrap();
        assert_eq!(obj, json!({"data": {"b": "2"}}));
    }

    #[test]
    fn apply_removes_what_the_manager_stopped_applying() {
        let first = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"k": "v", "old": "x"}});
        let mut live = first.clone();
        // Another writer adds a label the manager never applied.
        live["metadata"]["labels"]["other"] = json!("kept");
        let second = json!({"metadata": {"labels": {"a": "1"}}, "data": {"k": "v2"}});
        apply(&mut live, &second, Some(&first), Semantics::Builtin);
        assert_eq!(live["metadata"]["labels"], json!({"a": "1", "other": "kept"}));
        assert_eq!(live["data"], json!({"k": "v2"}));
    }

    #[test]
    fn apply_merges_associative_lists_by_key() {
        let mut live =
            json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}});
        let config = json!({"spec": {"containers": [{"name": "b", "image": "2"}]}});
        apply(&mut live, &config, None, Semantics::Builtin);
        assert_eq!(
            live["spec"]["containers"],
            json!([{"name": "a", "image": "1"}, {"name": "b", "image": "2"}])
        );
        let schema = json!({"properties": {"spec": {"properties": {"items": {
            "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"]}}}}});
        let mut live = json!({"spec": {"items": [{"id": 1, "v": "a"}]}});
        apply(
            &mut live,
            &json!({"spec": {"items": [{"id": 2, "v": "b"}]}}),
            None,
            Semantics::Schema(Some(&schema)),
        );
        assert_eq!(
            live["spec"]["items"],
            json!([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}])
        );
    }
}
