//! Validation of objects against a CRD's OpenAPI v3 structural schema, the way the Kubernetes
//! API server does it: nulls in non-nullable fields are dropped, defaults applied, unknown
//! fields pruned (and reported), then types, formats, ranges, patterns, enums and CEL
//! `x-kubernetes-validations` rules are checked. Errors carry the field path and read like the
//! API server's (`spec.nodes: Invalid value: -1: spec.nodes in body should be greater than or
//! equal to 0`).
//!
//! Used by the dev cluster (422 responses), `ec2-kubelet validate` and the sample tests.

pub mod manifests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use regex::Regex;
use serde_json::{Map, Value};

/// One invalid field, formatted as the API server formats `field.Error`.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.subnetIds[0]`.
    pub path: String,
    pub kind: FieldErrorKind,
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldErrorKind {
    /// A required field is missing.
    Required,
    /// The value breaks a rule; `detail` says which.
    Invalid { value: Value, detail: String },
    /// The value is not one of the allowed values.
    NotSupported { value: Value, allowed: Vec<Value> },
    /// A string or list is too long.
    TooLong { max: u64 },
    /// A list or map has too many entries.
    TooMany { actual: usize, max: u64 },
    /// The field is not in the schema (only reported in strict mode; the server prunes it).
    Unknown,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = &self.path;
        match &self.kind {
            FieldErrorKind::Required => write!(f, "{path}: Required value"),
            FieldErrorKind::Invalid { value, detail } => {
                write!(f, "{path}: Invalid value: {}: {detail}", short_value(value))
            }
            FieldErrorKind::NotSupported { value, allowed } => {
                let allowed: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
                write!(
                    f,
                    "{path}: Unsupported value: {}: supported values: {}",
                    value,
                    allowed.join(", ")
                )
            }
            FieldErrorKind::TooLong { max } => {
                write!(f, "{path}: Too long: may not be more than {max} bytes")
            }
            FieldErrorKind::TooMany { actual, max } => {
                write!(f, "{path}: Too many: {actual}: must have at most {max} items")
            }
            FieldErrorKind::Unknown => write!(f, "{path}: unknown field \"{path}\""),
        }
    }
}

/// Values print like the API server prints them: scalars as JSON, objects and lists by type.
fn short_value(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

/// The outcome of admitting an object: the object as it would be stored, or every field error.
#[derive(Debug)]
pub struct Admitted {
    /// The object after dropping nulls, defaulting and pruning.
    pub object: Value,
    /// Paths of unknown fields that were pruned (the API server returns them as warnings).
    pub pruned: Vec<String>,
}

/// Joins field errors into the message of a 422 `Invalid` status.
pub fn invalid_message(kind: &str, name: &str, errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let body = if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    };
    format!("{kind} \"{name}\" is invalid: {body}")
}

/// The `openAPIV3Schema` of the storage (or first served) version of a CRD, as JSON.
pub fn crd_schema(crd: &CustomResourceDefinition, version: &str) -> Option<Value> {
    let version = crd.spec.versions.iter().find(|v| v.name == version)?;
    let schema = version.schema.as_ref()?.open_api_v3_schema.as_ref()?;
    serde_json::to_value(schema).ok()
}

/// Admits `object` against `schema`, as the API server does on create and update (`old` is the
/// stored object on update, for CEL transition rules). `metadata`, `apiVersion` and `kind` are
/// the server's business and are not pruned.
pub fn admit(schema: &Value, object: Value, old: Option<&Value>) -> Result<Admitted, Vec<FieldError>> {
    let (object, pruned, errors) = check(schema, object, old);
    if errors.is_empty() {
        Ok(Admitted { object, pruned })
    } else {
        Err(errors)
    }
}

/// Like [`admit`], but unknown fields are errors too, as `kubectl apply --validate=strict` makes them.
pub fn admit_strict(schema: &Value, object: Value) -> Result<Value, Vec<FieldError>> {
    let (object, pruned, mut errors) = check(schema, object, None);
    errors.extend(pruned.into_iter().map(|path| FieldError {
        path,
        kind: FieldErrorKind::Unknown,
    }));
    if errors.is_empty() {
        Ok(object)
    } else {
        Err(errors)
    }
}

/// Drops nulls, defaults, prunes, then validates: the object as stored, the pruned paths and
/// the field errors (CEL rules run only on a structurally valid object, as on the server).
fn check(schema: &Value, mut object: Value, old: Option<&Value>) -> (Value, Vec<String>, Vec<FieldError>) {
    drop_nulls(schema, &mut object);
    apply_defaults(schema, &mut object);
    let mut pruned = Vec::new();
    prune(schema, &mut object, "", &mut pruned, true);
    let mut errors = Vec::new();
    validate_value(schema, &object, "", &mut errors, true);
    if errors.is_empty() {
        errors.extend(validate_cel(schema, &object, old));
    }
    (object, pruned, errors)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn is_true(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// The schema of a map's values, when the schema describes a map.
fn additional_properties(schema: &Value) -> Option<&Value> {
    schema.get("additionalProperties").filter(|v| v.is_object())
}

/// Drops `null` where the schema does not allow it (the API server prunes those before defaulting).
fn drop_nulls(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let props = properties(schema);
            let extra = additional_properties(schema);
            map.retain(|key, child| {
                let child_schema = props.and_then(|p| p.get(key)).or(extra);
                match (child, child_schema) {
                    (Value::Null, Some(s)) => is_true(s, "nullable"),
                    _ => true,
                }
            });
            for (key, child) in map.iter_mut() {
                if let Some(s) = props.and_then(|p| p.get(key)).or(extra) {
                    drop_nulls(s, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    drop_nulls(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// Fills in `default`s of absent properties, depth first, as structural defaulting does.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = properties(schema) {
                for (key, child_schema) in props {
                    if !map.contains_key(key)
                        && let Some(default) = child_schema.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                }
                for (key, child) in map.iter_mut() {
                    if let Some(child_schema) = props.get(key) {
                        apply_defaults(child_schema, child);
                    }
                }
            } else if let Some(extra) = additional_properties(schema) {
                for child in map.values_mut() {
                    apply_defaults(extra, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// Removes fields the schema does not know, recording their paths.
fn prune(schema: &Value, value: &mut Value, path: &str, pruned: &mut Vec<String>, root: bool) {
    let preserve = is_true(schema, "x-kubernetes-preserve-unknown-fields");
    match value {
        Value::Object(map) => {
            let props = properties(schema);
            let extra = additional_properties(schema);
            if props.is_some() || extra.is_some() || !preserve {
                let unknown: Vec<String> = map
                    .keys()
                    .filter(|k| {
                        let server_owned = root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
                        !server_owned
                            && props.is_none_or(|p| !p.contains_key(k.as_str()))
                            && extra.is_none()
                            && !preserve
                    })
                    .cloned()
                    .collect();
                for key in unknown {
                    map.remove(&key);
                    pruned.push(join(path, &key));
                }
            }
            for (key, child) in map.iter_mut() {
                if root && key == "metadata" {
                    continue;
                }
                if let Some(child_schema) = props.and_then(|p| p.get(key)).or(extra) {
                    prune(child_schema, child, &join(path, key), pruned, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &format!("{path}[{i}]"), pruned, false);
                }
            }
        }
        _ => {}
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "number" => value.is_number(),
        "integer" => type_name(value) == "integer" || value.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => type_name(value) == other,
    }
}

fn invalid(path: &str, value: &Value, detail: String) -> FieldError {
    FieldError {
        path: path.to_string(),
        kind: FieldErrorKind::Invalid {
            value: value.clone(),
            detail,
        },
    }
}

/// Compiled `pattern`s, shared by every validation (schemas repeat few distinct patterns).
fn pattern_matches(pattern: &str, text: &str) -> Result<bool, String> {
    static CACHE: Mutex<Option<HashMap<String, Regex>>> = Mutex::new(None);
    let mut guard = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(re) = cache.get(pattern) {
        return Ok(re.is_match(text));
    }
    let re = Regex::new(pattern).map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
    let matched = re.is_match(text);
    cache.insert(pattern.to_string(), re);
    Ok(matched)
}

fn validate_value(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>, root: bool) {
    let display_path = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if !is_true(schema, "nullable") {
            errors.push(invalid(
                display_path,
                value,
                format!(
                    "{display_path} in body must be of type {}: \"null\"",
                    schema.get("type").and_then(Value::as_str).unwrap_or("object")
                ),
            ));
        }
        return;
    }
    let int_or_string = is_true(schema, "x-kubernetes-int-or-string");
    if int_or_string {
        if !(value.is_string() || type_matches("integer", value)) {
            errors.push(invalid(
                display_path,
                value,
                format!(
                    "{display_path} in body must be of type integer,string: \"{}\"",
                    type_name(value)
                ),
            ));
            return;
        }
    } else if let Some(expected) = schema.get("type").and_then(Value::as_str)
        && !type_matches(expected, value)
    {
        errors.push(invalid(
            display_path,
            value,
            format!(
                "{display_path} in body must be of type {expected}: \"{}\"",
                type_name(value)
            ),
        ));
        return;
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(FieldError {
            path: display_path.into(),
            kind: FieldErrorKind::NotSupported {
                value: value.clone(),
                allowed: allowed.clone(),
            },
        });
    }

    match value {
        Value::Number(_) => validate_number(schema, value, display_path, errors),
        Value::String(text) => validate_string(schema, value, text, display_path, errors),
        Value::Array(items) => {
            validate_array(schema, value, items, path, display_path, errors);
        }
        Value::Object(map) => validate_object(schema, value, map, path, display_path, errors, root),
        _ => {}
    }

    for combinator in ["allOf", "anyOf", "oneOf"] {
        let Some(branches) = schema.get(combinator).and_then(Value::as_array) else {
            continue;
        };
        let results: Vec<Vec<FieldError>> = branches
            .iter()
            .map(|branch| {
                let mut branch_errors = Vec::new();
                validate_value(branch, value, path, &mut branch_errors, root);
                branch_errors
            })
            .collect();
        let passing = results.iter().filter(|r| r.is_empty()).count();
        match combinator {
            "allOf" => errors.extend(results.into_iter().flatten()),
            "anyOf" if passing == 0 => errors.push(invalid(
                display_path,
                value,
                format!("{display_path} in body must match at least one schema in anyOf"),
            )),
            "oneOf" if passing != 1 => errors.push(invalid(
                display_path,
                value,
                format!("{display_path} in body must match exactly one schema in oneOf"),
            )),
            _ => {}
        }
    }
    if let Some(not) = schema.get("not") {
        let mut not_errors = Vec::new();
        validate_value(not, value, path, &mut not_errors, root);
        if not_errors.is_empty() {
            errors.push(invalid(
                display_path,
                value,
                format!("{display_path} in body must not match the schema in not"),
            ));
        }
    }
}

fn validate_number(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(n) = value.as_f64() else { return };
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    let exclusive = |key: &str| is_true(schema, key);
    if let Some(min) = number("minimum") {
        if exclusive("exclusiveMinimum") && n <= min {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body should be greater than {}", fmt_num(min)),
            ));
        } else if n < min {
            errors.push(invalid(
                path,
                value,
                format!(
                    "{path} in body should be greater than or equal to {}",
                    fmt_num(min)
                ),
            ));
        }
    }
    if let Some(max) = number("maximum") {
        if exclusive("exclusiveMaximum") && n >= max {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body should be less than {}", fmt_num(max)),
            ));
        } else if n > max {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body should be less than or equal to {}", fmt_num(max)),
            ));
        }
    }
    if let Some(factor) = number("multipleOf")
        && factor != 0.0
        && (n / factor).fract() != 0.0
    {
        errors.push(invalid(
            path,
            value,
            format!("{path} in body should be a multiple of {}", fmt_num(factor)),
        ));
    }
    match schema.get("format").and_then(Value::as_str) {
        Some("int32") if n < i32::MIN as f64 || n > i32::MAX as f64 => errors.push(invalid(
            path,
            value,
            format!("{path} in body must be of type int32"),
        )),
        Some("uint16") | Some("uint32") | Some("uint64") | Some("uint8") if n < 0.0 => errors.push(invalid(
            path,
            value,
            format!("{path} in body should be greater than or equal to 0"),
        )),
        _ => {}
    }
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

fn validate_string(schema: &Value, value: &Value, text: &str, path: &str, errors: &mut Vec<FieldError>) {
    let chars = text.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        errors.push(FieldError {
            path: path.into(),
            kind: FieldErrorKind::TooLong { max },
        });
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        errors.push(invalid(
            path,
            value,
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match pattern_matches(pattern, text) {
            Ok(true) => {}
            Ok(false) => errors.push(invalid(
                path,
                value,
                format!("{path} in body should match '{pattern}'"),
            )),
            Err(detail) => errors.push(invalid(path, value, detail)),
        }
    }
    if let Some(format) = schema.get("format").and_then(Value::as_str) {
        let ok = match format {
            "date-time" => text.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "byte" => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(text).is_ok()
            }
            _ => true,
        };
        if !ok {
            errors.push(invalid(
                path,
                value,
                format!("{path} in body must be of type {format}: \"{text}\""),
            ));
        }
    }
}

fn validate_array(
    schema: &Value,
    value: &Value,
    items: &[Value],
    path: &str,
    display_path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && items.len() as u64 > max
    {
        errors.push(FieldError {
            path: display_path.into(),
            kind: FieldErrorKind::TooMany {
                actual: items.len(),
                max,
            },
        });
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        errors.push(invalid(
            display_path,
            value,
            format!("{display_path} in body should have at least {min} items"),
        ));
    }
    let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
    if is_true(schema, "uniqueItems") || list_type == Some("set") {
        for (i, item) in items.iter().enumerate() {
            if items[..i].contains(item) {
                errors.push(FieldError {
                    path: format!("{path}[{i}]"),
                    kind: FieldErrorKind::Invalid {
                        value: item.clone(),
                        detail: "Duplicate value".into(),
                    },
                });
            }
        }
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate_value(item_schema, item, &format!("{path}[{i}]"), errors, false);
        }
    }
}

fn validate_object(
    schema: &Value,
    value: &Value,
    map: &Map<String, Value>,
    path: &str,
    display_path: &str,
    errors: &mut Vec<FieldError>,
    root: bool,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(key) {
                errors.push(FieldError {
                    path: join(path, key),
                    kind: FieldErrorKind::Required,
                });
            }
        }
    }
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && map.len() as u64 > max
    {
        errors.push(FieldError {
            path: display_path.into(),
            kind: FieldErrorKind::TooMany {
                actual: map.len(),
                max,
            },
        });
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
        && (map.len() as u64) < min
    {
        errors.push(invalid(
            display_path,
            value,
            format!("{display_path} in body should have at least {min} properties"),
        ));
    }
    let props = properties(schema);
    let extra = additional_properties(schema);
    for (key, child) in map {
        if root && matches!(key.as_str(), "metadata" | "apiVersion" | "kind") {
            continue;
        }
        if let Some(child_schema) = props.and_then(|p| p.get(key)).or(extra) {
            validate_value(child_schema, child, &join(path, key), errors, false);
        }
    }
}

/// Whether `schema` or anything below it carries `x-kubernetes-validations` rules.
fn has_cel_rules(schema: &Value) -> bool {
    schema.get("x-kubernetes-validations").is_some()
        || properties(schema).is_some_and(|props| props.values().any(has_cel_rules))
        || schema.get("items").is_some_and(has_cel_rules)
        || additional_properties(schema).is_some_and(has_cel_rules)
}

/// Evaluates the schema's `x-kubernetes-validations` CEL rules (kube-cel, the Kubernetes CEL
/// libraries). A rule failure is reported at the path of the object that carries the rule.
///
/// Like the API server, only the parts of the object that rules are written on are turned
/// into CEL values: a pool whose status holds thousands of bindings costs no more to admit
/// than one without, since the rules live in its spec.
fn validate_cel(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    validate_cel_at(schema, object, old, "", object, &mut errors);
    errors
}

/// [`validate_cel`] for the value at `prefix`: descends through plain properties to the
/// nearest schemas whose subtree has rules below items or maps, or rules of their own.
fn validate_cel_at(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    prefix: &str,
    root: &Value,
    errors: &mut Vec<FieldError>,
) {
    if !has_cel_rules(schema) {
        return;
    }
    let rules_below_properties_only = schema.get("x-kubernetes-validations").is_none()
        && !schema.get("items").is_some_and(has_cel_rules)
        && !additional_properties(schema).is_some_and(has_cel_rules);
    if rules_below_properties_only {
        if let (Some(props), Some(fields)) = (properties(schema), value.as_object()) {
            for (key, child_schema) in props {
                if let Some(child) = fields.get(key) {
                    let child_old = old.and_then(|o| o.get(key));
                    validate_cel_at(child_schema, child, child_old, &join(prefix, key), root, errors);
                }
            }
        }
        return;
    }
    thread_local! {
        static CEL: kube::core::cel::Validator = kube::core::cel::Validator::new();
    }
    let Err(failures) = CEL.with(|cel| cel.validate(schema, value, old)) else {
        return;
    };
    errors.extend(failures.into_vec().into_iter().map(|failure| {
        let path = match (prefix.is_empty(), failure.field_path.is_empty()) {
            (_, true) => prefix.to_string(),
            (true, false) => failure.field_path.clone(),
            (false, false) if failure.field_path.starts_with('[') => {
                format!("{prefix}{}", failure.field_path)
            }
            (false, false) => format!("{prefix}.{}", failure.field_path),
        };
        let value = cel_path_value(root, &path);
        let path = if path.is_empty() {
            "<root>".to_string()
        } else {
            path
        };
        FieldError {
            path,
            kind: FieldErrorKind::Invalid {
                value,
                detail: failure.message.clone(),
            },
        }
    }));
}

/// The value at a dotted path (with `[i]` indexes), for error messages.
fn cel_path_value(object: &Value, path: &str) -> Value {
    let mut current = object;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        let (key, index) = match segment.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        current = match current.get(key) {
            Some(next) => next,
            None => return Value::String("object".into()),
        };
        if let Some(i) = index {
            current = match current.get(i) {
                Some(next) => next,
                None => return Value::String("object".into()),
            };
        }
    }
    current.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["nodes"],
                    "x-kubernetes-validations": [{"rule": "self.nodes <= self.max", "message": "nodes must not exceed max"}],
                    "properties": {
                        "nodes": {"type": "integer", "format": "int32", "minimum": 0},
                        "max": {"type": "integer", "default": 10},
                        "name": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$", "nullable": true},
                        "effect": {"type": "string", "enum": ["NoSchedule", "NoExecute"]},
                        "ids": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "cpu": {"x-kubernetes-int-or-string": true},
                        "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                }
            }
        })
    }

    fn errors_of(object: Value) -> Vec<String> {
        match admit(&schema(), object, None) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn valid_object_is_defaulted_and_pruned() {
        let admitted = admit(
            &schema(),
            json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a", "junk": 1},
                   "spec": {"nodes": 2, "extra": true, "raw": {"anything": [1]}, "labels": {"a": "b"}, "cpu": "500m"}}),
            None,
        )
        .expect("valid");
        assert_eq!(admitted.object["spec"]["max"], 10, "default applied");
        assert_eq!(admitted.pruned, vec!["spec.extra".to_string()]);
        assert_eq!(
            admitted.object["spec"]["raw"]["anything"],
            json!([1]),
            "preserved"
        );
        assert_eq!(admitted.object["metadata"]["junk"], 1, "metadata is the server's");
    }

    #[test]
    fn errors_read_like_the_api_server() {
        assert_eq!(errors_of(json!({"spec": {}})), ["spec.nodes: Required value"]);
        assert_eq!(
            errors_of(json!({"spec": {"nodes": -1}})),
            ["spec.nodes: Invalid value: -1: spec.nodes in body should be greater than or equal to 0"]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": "two"}})),
            ["spec.nodes: Invalid value: \"two\": spec.nodes in body must be of type integer: \"string\""]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "name": "ABC"}})),
            ["spec.name: Invalid value: \"ABC\": spec.name in body should match '^[a-z]+$'"]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "name": "abcdefg"}})),
            ["spec.name: Too long: may not be more than 5 bytes"]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "effect": "Bad"}})),
            ["spec.effect: Unsupported value: \"Bad\": supported values: \"NoSchedule\", \"NoExecute\""]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "ids": ["a", "b", "c"]}})),
            ["spec.ids: Too many: 3: must have at most 2 items"]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "labels": {"a": 1}}})),
            ["spec.labels.a: Invalid value: 1: spec.labels.a in body must be of type string: \"integer\""]
        );
        assert_eq!(
            errors_of(json!({"spec": {"nodes": 1, "cpu": true}})),
            ["spec.cpu: Invalid value: true: spec.cpu in body must be of type integer,string: \"boolean\""]
        );
    }

    #[test]
    fn cel_rules_run_after_defaulting() {
        assert_eq!(errors_of(json!({"spec": {"nodes": 10}})), Vec::<String>::new());
        let errors = errors_of(json!({"spec": {"nodes": 11}}));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("spec: Invalid value"), "{errors:?}");
        assert!(errors[0].ends_with("nodes must not exceed max"), "{errors:?}");
    }

    #[test]
    fn cel_rules_below_items_and_transition_rules_keep_their_paths() {
        let schema = json!({"type": "object", "properties": {
            "status": {"type": "object", "additionalProperties": {"type": "string"}},
            "spec": {"type": "object", "properties": {
                "ports": {"type": "array", "items": {"type": "integer",
                    "x-kubernetes-validations": [{"rule": "self > 0", "message": "ports are positive"}]}},
                "zone": {"type": "string",
                    "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "zone is immutable"}]},
            }},
        }});
        let errors = admit(
            &schema,
            json!({"spec": {"ports": [80, 0]}, "status": {"a": "b"}}),
            None,
        )
        .unwrap_err();
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors, ["spec.ports[1]: Invalid value: 0: ports are positive"]);
        let old = json!({"spec": {"zone": "a"}});
        let errors = admit(&schema, json!({"spec": {"zone": "b"}}), Some(&old)).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.zone: Invalid value: \"b\": zone is immutable"
        );
        assert!(admit(&schema, json!({"spec": {"zone": "a"}}), Some(&old)).is_ok());
    }

    #[test]
    fn null_in_nullable_field_is_kept_and_elsewhere_dropped() {
        let admitted = admit(
            &schema(),
            json!({"spec": {"nodes": 1, "name": null, "max": null}}),
            None,
        )
        .unwrap();
        assert!(admitted.object["spec"]["name"].is_null());
        assert_eq!(admitted.object["spec"]["max"], 10, "null dropped then defaulted");
    }

    #[test]
    fn strict_mode_reports_unknown_fields() {
        let errors = admit_strict(&schema(), json!({"spec": {"nodes": 1, "nodez": 2}})).unwrap_err();
        assert_eq!(errors[0].to_string(), "spec.nodez: unknown field \"spec.nodez\"");
    }

    #[test]
    fn invalid_message_joins_like_status_details() {
        let errors = admit(&schema(), json!({"spec": {"nodes": -1, "effect": "x"}}), None).unwrap_err();
        let message = invalid_message("Ec2NodePool.ec2-kubelet.io", "p", &errors);
        assert!(
            message.starts_with("Ec2NodePool.ec2-kubelet.io \"p\" is invalid: [spec."),
            "{message}"
        );
        assert!(message.contains(", spec.nodes: Invalid value: -1"), "{message}");
        assert!(message.ends_with(']'), "{message}");
    }
}
