//! Translation between stored objects and the API versions that serve them. Core and
//! `events.k8s.io/v1` events share one storage (as in the real server), so an event recorded
//! by the operator through `events.k8s.io` shows up in `kubectl describe` (core events).

use serde_json::{Map, Value, json};

use super::registry::{Codec, ResourceType};

/// Field renames between `events.k8s.io/v1` (left) and core/v1 (right).
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

fn rename(object: Value, from_left: bool) -> Value {
    let Value::Object(map) = object else {
        return object;
    };
    let mut out = Map::new();
    for (key, value) in map {
        let renamed = EVENT_FIELDS
            .iter()
            .find(|(left, right)| if from_left { left == &key } else { right == &key })
            .map(|(left, right)| if from_left { *right } else { *left })
            .unwrap_or(&key)
            .to_string();
        out.insert(renamed, value);
    }
    Value::Object(out)
}

/// The object as the API type serves it in `version`.
pub fn to_api(rt: &ResourceType, version: &str, stored: &Value) -> Value {
    let mut object = match rt.codec {
        Codec::Identity => stored.clone(),
        Codec::EventsV1 => rename(stored.clone(), false),
    };
    if let Value::Object(map) = &mut object {
        map.insert("apiVersion".into(), json!(rt.api_version(version)));
        map.insert("kind".into(), json!(rt.kind));
    }
    object
}

/// The object as it is stored (storage version, core field names).
pub fn to_storage(rt: &ResourceType, object: Value) -> Value {
    let mut object = match rt.codec {
        Codec::Identity => object,
        Codec::EventsV1 => rename(object, true),
    };
    if let Value::Object(map) = &mut object {
        let api_version = match rt.codec {
            Codec::Identity => rt.api_version(rt.preferred_version()),
            Codec::EventsV1 => "v1".to_string(),
        };
        map.insert("apiVersion".into(), json!(api_version));
        map.insert("kind".into(), json!(rt.kind));
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcluster::registry::Registry;

    #[test]
    fn events_v1_round_trip_through_core_storage() {
        let registry = Registry::with_builtins();
        let v1 = registry.find("events.k8s.io", "v1", "events").unwrap();
        let core = registry.find("", "v1", "events").unwrap();
        let event = json!({"metadata": {"name": "e"}, "regarding": {"kind": "Pod", "name": "p"}, "note": "hello",
            "reportingController": "ec2-kubelet", "reason": "LaunchedInstance"});
        let stored = to_storage(&v1, event);
        assert_eq!(stored["involvedObject"]["name"], "p");
        assert_eq!(stored["message"], "hello");
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(to_api(&core, "v1", &stored)["reportingComponent"], "ec2-kubelet");
        let back = to_api(&v1, "v1", &stored);
        assert_eq!(back["note"], "hello");
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }
}
