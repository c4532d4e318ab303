//! Bad input, field by field: every field of the spec of both CRDs gets an invalid value, and
//! the dev cluster — validating against the CRD's schema as a real API server does — must
//! answer `422 Invalid` naming that field. The fields come from the generated CRDs themselves,
//! so a new field cannot go untested. Each field gets a value of the wrong type, and each
//! constraint the schema declares (enum, pattern, minimum, maximum, lengths, item counts) gets
//! a value that breaks it.
//!
//! What a schema cannot say (a template that does not exist, an image EC2 does not know, an
//! annotation that names a type the template forbids) becomes a condition and an event naming
//! the field: `tests/pools.rs`, `tests/templates.rs`, `tests/pods.rs`, and the table of every
//! annotation in `src/launch/settings.rs`.

mod common;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

/// A step into an object: a property, the first item of a list, or a key of a map.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Item,
    MapKey,
}

fn display(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Key(key) if text.is_empty() => text.push_str(key),
            Step::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Step::Item => text.push_str("[0]"),
            Step::MapKey => text.push_str(".some-key"),
        }
    }
    text
}

/// Every field under `schema` (depth first), with its schema.
fn fields(schema: &Value, path: Vec<Step>, out: &mut Vec<(Vec<Step>, Value)>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (key, child) in properties {
            let mut child_path = path.clone();
            child_path.push(Step::Key(key.clone()));
            out.push((child_path.clone(), child.clone()));
            fields(child, child_path, out);
        }
    }
    if schema["items"].is_object() {
        let mut item_path = path.clone();
        item_path.push(Step::Item);
        fields(&schema["items"], item_path, out);
    }
    if schema["additionalProperties"].is_object() {
        let mut value_path = path.clone();
        value_path.push(Step::MapKey);
        out.push((value_path.clone(), schema["additionalProperties"].clone()));
        fields(&schema["additionalProperties"], value_path, out);
    }
}

/// A value of the wrong type for `schema`; `None` for a field that takes anything.
fn wrong_type(schema: &Value) -> Option<Value> {
    if schema["x-kubernetes-int-or-string"] == true {
        return Some(json!(true));
    }
    match schema["type"].as_str()? {
        "string" => Some(json!(12345)),
        "integer" | "number" => Some(json!("twelve")),
        "boolean" => Some(json!("maybe")),
        "array" => Some(json!("not-a-list")),
        "object" => Some(json!("not-an-object")),
        _ => None,
    }
}

/// Values breaking each constraint `schema` declares, with the constraint's name.
fn broken_constraints(schema: &Value) -> Vec<(&'static str, Value)> {
    let mut broken = Vec::new();
    if schema["enum"].is_array() {
        broken.push(("enum", json!("no-such-value")));
    }
    if let Some(pattern) = schema["pattern"].as_str() {
        let regex = regex::Regex::new(pattern).unwrap();
        let bad = ["!", "UPPER CASE with spaces", "-", "ä"]
            .into_iter()
            .find(|candidate| !regex.is_match(candidate))
            .unwrap_or_else(|| panic!("no candidate breaks the pattern {pattern}"));
        broken.push(("pattern", json!(bad)));
    }
    if let Some(minimum) = schema["minimum"].as_f64() {
        broken.push(("minimum", json!(minimum as i64 - 1)));
    }
    if let Some(maximum) = schema["maximum"].as_f64() {
        broken.push(("maximum", json!(maximum as i64 + 1)));
    }
    if let Some(max) = schema["maxLength"].as_u64() {
        broken.push(("maxLength", json!("a".repeat(max as usize + 1))));
    }
    if schema["minLength"].as_u64().is_some_and(|min| min > 0) {
        broken.push(("minLength", json!("")));
    }
    if schema["minItems"].as_u64().is_some_and(|min| min > 0) {
        broken.push(("minItems", json!([])));
    }
    if let Some(max) = schema["maxItems"].as_u64() {
        broken.push(("maxItems", json!(vec![Value::Null; max as usize + 1])));
    }
    broken
}

/// `object` with `value` at `path`, creating what is missing on the way.
fn with_value(object: &Value, path: &[Step], value: Value) -> Value {
    fn set(target: &mut Value, path: &[Step], value: Value) {
        let Some((step, rest)) = path.split_first() else {
            *target = value;
            return;
        };
        match step {
            Step::Key(_) | Step::MapKey if target.is_object() || target.is_null() => {
                if target.is_null() {
                    *target = json!({});
                }
                let key = match step {
                    Step::Key(key) => key.as_str(),
                    _ => "some-key",
                };
                let map = target.as_object_mut().unwrap();
                set(map.entry(key).or_insert(Value::Null), rest, value);
            }
            Step::Item => {
                if target.as_array().is_none_or(|a| a.is_empty()) {
                    *target = json!([null]);
                }
                set(&mut target.as_array_mut().unwrap()[0], rest, value);
            }
            _ => {
                *target = json!({});
                set(target, path, value);
            }
        }
    }
    let mut object = object.clone();
    set(&mut object, path, value);
    object
}

fn sample(file: &str, kind: &str) -> Value {
    let text = std::fs::read_to_string(common::repo_root().join("config/samples").join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::from_value::<Value>(serde::Deserialize::deserialize(d).unwrap()).unwrap())
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("config/samples/{file} has a {kind}"))
}

#[tokio::test]
async fn every_crd_field_with_an_invalid_value_is_refused_naming_the_field() {
    let cluster = common::operator_cluster(false).await;
    let client = cluster.client();
    let mut covered = Vec::new();
    for (kind, base) in [
        ("Ec2NodePool", sample("pool.yaml", "Ec2NodePool")),
        ("Ec2PodTemplate", sample("template.yaml", "Ec2PodTemplate")),
    ] {
        let crd = ec2_kubelet::crd::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap();
        let schema = ec2_kubelet::schema::crd_schema(&crd, ec2_kubelet::crd::VERSION).unwrap();
        let gvk = GroupVersionKind::gvk(&crd.spec.group, ec2_kubelet::crd::VERSION, kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural);
        let api: Api<DynamicObject> = if crd.spec.scope == "Namespaced" {
            Api::namespaced_with(client.clone(), "default", &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        // The base object is valid: what follows is refused for the field alone.
        let mut valid = base.clone();
        valid["metadata"] = json!({"name": "valid", "namespace": "default"});
        let object: DynamicObject = serde_json::from_value(valid).unwrap();
        api.create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("the {kind} sample is valid: {e}"));

        let mut spec_fields = Vec::new();
        fields(
            &schema["properties"]["spec"],
            vec![Step::Key("spec".into())],
            &mut spec_fields,
        );
        assert!(spec_fields.len() > 10, "{kind}: {} fields", spec_fields.len());
        for (i, (path, field_schema)) in spec_fields.iter().enumerate() {
            let name = display(path);
            let mut cases: Vec<(&str, Value)> = wrong_type(field_schema)
                .map(|v| ("type", v))
                .into_iter()
                .collect();
            cases.extend(broken_constraints(field_schema));
            assert!(
                !cases.is_empty(),
                "{kind} {name}: no invalid value for {field_schema}"
            );
            for (j, (what, value)) in cases.into_iter().enumerate() {
                let mut object = with_value(&base, path, value.clone());
                object["metadata"] = json!({"name": format!("bad-{i}-{j}"), "namespace": "default"});
                let object: DynamicObject = serde_json::from_value(object).unwrap();
                let error = match api.create(&PostParams::default(), &object).await {
                    Err(kube::Error::Api(status)) => status,
                    other => panic!("{kind} {name} = {value} ({what}): accepted: {other:?}"),
                };
                assert_eq!(error.code, 422, "{kind} {name} = {value} ({what}): {error:?}");
                assert!(
                    error.message.contains(&name),
                    "{kind} {name} = {value} ({what}): the message names another field: {}",
                    error.message
                );
                covered.push(format!("{kind} {name} ({what})"));
            }
        }
    }
    println!("{} invalid values refused, each naming its field:", covered.len());
    for case in &covered {
        println!("  {case}");
    }
}
