//! A minimal OpenAPI v3 publication: one document per group-version listing each resource's
//! operations (kubectl checks there that the server validates fields itself, `fieldValidation`)
//! and, for custom resources, their schemas (`kubectl explain`).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Map, Value, json};

use super::registry::{Registry, ResourceType};

fn group_version_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn by_group_version(registry: &Registry) -> BTreeMap<String, Vec<(&ResourceType, String)>> {
    let mut out: BTreeMap<String, Vec<(&ResourceType, String)>> = BTreeMap::new();
    for rt in registry.types() {
        for version in &rt.versions {
            out.entry(group_version_path(&rt.group, version))
                .or_default()
                .push((rt, version.clone()));
        }
    }
    out
}

/// `GET /openapi/v3`: the documents, each under a URL whose hash changes with its content.
pub fn root(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (path, types) in by_group_version(registry) {
        let mut hasher = DefaultHasher::new();
        for (rt, version) in &types {
            (
                &rt.resource,
                version,
                rt.schemas.get(version).map(|s| s.to_string()),
            )
                .hash(&mut hasher);
        }
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={:016X}", hasher.finish())}),
        );
    }
    json!({"paths": paths})
}

const PARAMETERS: &[&str] = &["dryRun", "fieldManager", "fieldValidation", "force"];

/// `GET /openapi/v3/<api/v1 | apis/group/version>`.
pub fn group_version(registry: &Registry, rest: &[&str]) -> Option<Value> {
    let path = rest.join("/");
    let groups = by_group_version(registry);
    let types = groups.get(&path)?;
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for (rt, version) in types {
        let gvk = json!({"group": rt.group, "version": version, "kind": rt.kind});
        let parameters: Vec<Value> = PARAMETERS
            .iter()
            .map(|name| json!({"name": name, "in": "query", "schema": {"type": "string"}, "uniqueItems": true}))
            .collect();
        let scope = if rt.namespaced {
            "namespaces/{namespace}/"
        } else {
            ""
        };
        let item = format!("/{path}/{scope}{}/{{name}}", rt.resource);
        let operation = |action: &str| {
            json!({
                "operationId": format!("{action}{}", rt.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
            })
        };
        paths.insert(
            item,
            json!({"get": operation("get"), "put": operation("put"), "patch": operation("patch"),
                "delete": operation("delete")}),
        );
        if let Some(schema) = rt.schemas.get(version) {
            let mut schema = schema.clone();
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            let reversed: Vec<&str> = rt.group.split('.').rev().collect();
            schemas.insert(format!("{}.{version}.{}", reversed.join("."), rt.kind), schema);
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
