//! Decoding of the Kubernetes protobuf encoding (`application/vnd.kubernetes.protobuf`) for
//! the kinds clients write that way to our stand-in: client-go's generated clientsets send
//! built-in objects as protobuf, and helm stores its releases in Secrets (or ConfigMaps)
//! through one. Responses stay JSON, which those clients accept.

use base64::Engine;
use serde_json::{Map, Value, json};

/// The `k8s\0` prefix of the protobuf envelope (`runtime.Unknown`).
const MAGIC: &[u8] = b"k8s\0";

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// The fields of one message, in order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = key >> 3;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => {
                buf = buf.get(8..).ok_or("truncated fixed64")?;
                continue;
            }
            2 => {
                let len = varint(&mut buf)? as usize;
                let bytes = buf.get(..len).ok_or("truncated bytes")?;
                buf = &buf[len..];
                Field::Bytes(bytes)
            }
            5 => {
                buf = buf.get(4..).ok_or("truncated fixed32")?;
                continue;
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((number, field));
    }
    Ok(out)
}

fn text(bytes: &[u8]) -> Value {
    json!(String::from_utf8_lossy(bytes))
}

/// A `map<string, string>` (or bytes, base64-encoded as JSON does) entry into `map`.
fn map_entry(bytes: &[u8], map: &mut Map<String, Value>, binary: bool) -> Result<(), String> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (number, field) in fields(bytes)? {
        if let Field::Bytes(b) = field {
            match number {
                1 => key = String::from_utf8_lossy(b).into_owned(),
                2 if binary => value = json!(base64::engine::general_purpose::STANDARD.encode(b)),
                2 => value = text(b),
                _ => {}
            }
        }
    }
    map.insert(key, value);
    Ok(())
}

fn time(bytes: &[u8]) -> Result<Value, String> {
    let mut seconds = 0i64;
    for (number, field) in fields(bytes)? {
        if let (1, Field::Varint(v)) = (number, field) {
            seconds = v as i64;
        }
    }
    let at = jiff::Timestamp::from_second(seconds).map_err(|e| e.to_string())?;
    Ok(json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn owner_reference(bytes: &[u8]) -> Result<Value, String> {
    let mut owner = Map::new();
    for (number, field) in fields(bytes)? {
        let (name, value) = match (number, field) {
            (1, Field::Bytes(b)) => ("kind", text(b)),
            (3, Field::Bytes(b)) => ("name", text(b)),
            (4, Field::Bytes(b)) => ("uid", text(b)),
            (5, Field::Bytes(b)) => ("apiVersion", text(b)),
            (6, Field::Varint(v)) => ("controller", json!(v != 0)),
            (7, Field::Varint(v)) => ("blockOwnerDeletion", json!(v != 0)),
            _ => continue,
        };
        owner.insert(name.into(), value);
    }
    Ok(Value::Object(owner))
}

fn object_meta(bytes: &[u8]) -> Result<Value, String> {
    let mut meta = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut finalizers = Vec::new();
    let mut owners = Vec::new();
    for (number, field) in fields(bytes)? {
        match (number, field) {
            (1, Field::Bytes(b)) => drop(meta.insert("name".into(), text(b))),
            (2, Field::Bytes(b)) => drop(meta.insert("generateName".into(), text(b))),
            (3, Field::Bytes(b)) => drop(meta.insert("namespace".into(), text(b))),
            (5, Field::Bytes(b)) => drop(meta.insert("uid".into(), text(b))),
            (6, Field::Bytes(b)) => drop(meta.insert("resourceVersion".into(), text(b))),
            (7, Field::Varint(v)) => drop(meta.insert("generation".into(), json!(v as i64))),
            (8, Field::Bytes(b)) => drop(meta.insert("creationTimestamp".into(), time(b)?)),
            (11, Field::Bytes(b)) => map_entry(b, &mut labels, false)?,
            (12, Field::Bytes(b)) => map_entry(b, &mut annotations, false)?,
            (13, Field::Bytes(b)) => owners.push(owner_reference(b)?),
            (14, Field::Bytes(b)) => finalizers.push(text(b)),
            _ => {}
        }
    }
    meta.retain(|_, v| v.as_str() != Some(""));
    if !labels.is_empty() {
        meta.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        meta.insert("finalizers".into(), json!(finalizers));
    }
    if !owners.is_empty() {
        meta.insert("ownerReferences".into(), json!(owners));
    }
    Ok(Value::Object(meta))
}

/// Secret: metadata=1, data=2 (bytes), type=3, stringData=4, immutable=5.
/// ConfigMap: metadata=1, data=2 (string), binaryData=3, immutable=4.
fn body(kind: &str, bytes: &[u8]) -> Result<Value, String> {
    let mut object = Map::new();
    let mut data = Map::new();
    let mut second = Map::new();
    for (number, field) in fields(bytes)? {
        match (kind, number, field) {
            (_, 1, Field::Bytes(b)) => drop(object.insert("metadata".into(), object_meta(b)?)),
            ("Secret", 2, Field::Bytes(b)) => map_entry(b, &mut data, true)?,
            ("Secret", 3, Field::Bytes(b)) => drop(object.insert("type".into(), text(b))),
            ("Secret", 4, Field::Bytes(b)) => map_entry(b, &mut second, false)?,
            ("Secret", 5, Field::Varint(v)) => drop(object.insert("immutable".into(), json!(v != 0))),
            ("ConfigMap", 2, Field::Bytes(b)) => map_entry(b, &mut data, false)?,
            ("ConfigMap", 3, Field::Bytes(b)) => map_entry(b, &mut second, true)?,
            ("ConfigMap", 4, Field::Varint(v)) => drop(object.insert("immutable".into(), json!(v != 0))),
            _ => {}
        }
    }
    if !data.is_empty() {
        object.insert("data".into(), Value::Object(data));
    }
    if !second.is_empty() {
        let name = if kind == "Secret" {
            "stringData"
        } else {
            "binaryData"
        };
        object.insert(name.into(), Value::Object(second));
    }
    Ok(Value::Object(object))
}

/// DeleteOptions: gracePeriodSeconds=1, preconditions=2 {uid=1, resourceVersion=2},
/// orphanDependents=3, propagationPolicy=4, dryRun=5.
fn delete_options(bytes: &[u8]) -> Result<Value, String> {
    let mut options = Map::new();
    let mut dry_run = Vec::new();
    for (number, field) in fields(bytes)? {
        match (number, field) {
            (1, Field::Varint(v)) => drop(options.insert("gracePeriodSeconds".into(), json!(v as i64))),
            (2, Field::Bytes(b)) => {
                let mut preconditions = Map::new();
                for (n, f) in fields(b)? {
                    match (n, f) {
                        (1, Field::Bytes(v)) => drop(preconditions.insert("uid".into(), text(v))),
                        (2, Field::Bytes(v)) => drop(preconditions.insert("resourceVersion".into(), text(v))),
                        _ => {}
                    }
                }
                options.insert("preconditions".into(), Value::Object(preconditions));
            }
            (3, Field::Varint(v)) => drop(options.insert("orphanDependents".into(), json!(v != 0))),
            (4, Field::Bytes(b)) => drop(options.insert("propagationPolicy".into(), text(b))),
            (5, Field::Bytes(b)) => dry_run.push(text(b)),
            _ => {}
        }
    }
    if !dry_run.is_empty() {
        options.insert("dryRun".into(), json!(dry_run));
    }
    Ok(Value::Object(options))
}

/// Decodes a protobuf-encoded object into its JSON form. Only Secrets and ConfigMaps are
/// understood; anything else is an error (the caller answers 415).
pub fn decode(bytes: &[u8]) -> Result<Value, String> {
    let envelope = bytes
        .strip_prefix(MAGIC)
        .ok_or("missing the k8s protobuf prefix")?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (number, field) in fields(envelope)? {
        match (number, field) {
            (1, Field::Bytes(type_meta)) => {
                for (n, f) in fields(type_meta)? {
                    if let Field::Bytes(b) = f {
                        match n {
                            1 => api_version = String::from_utf8_lossy(b).into_owned(),
                            2 => kind = String::from_utf8_lossy(b).into_owned(),
                            _ => {}
                        }
                    }
                }
            }
            (2, Field::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let mut object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Secret" | "ConfigMap") => body(&kind, raw)?,
        (_, "DeleteOptions") => delete_options(raw)?,
        _ => {
            return Err(format!(
                "protobuf is only accepted for v1 Secret, ConfigMap and DeleteOptions (got {api_version} {kind})"
            ));
        }
    };
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_helm_release_secret() {
        let label = [bytes_field(1, b"owner"), bytes_field(2, b"helm")].concat();
        let meta = [
            bytes_field(1, b"sh.helm.release.v1.demo.v1"),
            bytes_field(3, b"apps"),
            bytes_field(11, &label),
        ]
        .concat();
        let data = [bytes_field(1, b"release"), bytes_field(2, b"\x01\x02")].concat();
        let secret = [
            bytes_field(1, &meta),
            bytes_field(2, &data),
            bytes_field(3, b"helm.sh/release.v1"),
        ]
        .concat();
        let type_meta = [bytes_field(1, b"v1"), bytes_field(2, b"Secret")].concat();
        let envelope = [
            MAGIC.to_vec(),
            bytes_field(1, &type_meta),
            bytes_field(2, &secret),
        ]
        .concat();
        let object = decode(&envelope).unwrap();
        assert_eq!(object["kind"], "Secret");
        assert_eq!(object["metadata"]["name"], "sh.helm.release.v1.demo.v1");
        assert_eq!(object["metadata"]["namespace"], "apps");
        assert_eq!(object["metadata"]["labels"]["owner"], "helm");
        assert_eq!(object["data"]["release"], "AQI=");
        assert_eq!(object["type"], "helm.sh/release.v1");
        let pod = [
            MAGIC.to_vec(),
            bytes_field(1, &[bytes_field(1, b"v1"), bytes_field(2, b"Pod")].concat()),
        ]
        .concat();
        assert!(decode(&pod).is_err());
    }
}
