//! Label and field selectors with the API server's syntax and semantics.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
pub enum Requirement {
    Exists(String),
    DoesNotExist(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Gt(key, n) => labels
                .get(key)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Requirement::Lt(key, n) => labels
                .get(key)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }

    /// A `matchExpressions` entry (`{key, operator, values}`) of a label or node selector.
    pub fn from_expression(expression: &Value) -> Result<Requirement, String> {
        let key = expression["key"].as_str().ok_or("key is required")?.to_string();
        let values: Vec<String> = expression["values"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let number = || -> Result<i64, String> {
            values
                .first()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{key}: Gt and Lt need one integer value"))
        };
        Ok(match expression["operator"].as_str().unwrap_or_default() {
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::DoesNotExist(key),
            "Gt" => Requirement::Gt(key.clone(), number()?),
            "Lt" => Requirement::Lt(key.clone(), number()?),
            other => return Err(format!("{other:?} is not a valid operator")),
        })
    }
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    /// Whether the object's `metadata.labels` satisfy the selector.
    pub fn matches_object(&self, object: &Value) -> bool {
        self.0.is_empty() || self.matches(&labels_of(object))
    }
}

/// `metadata.labels` as a map.
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    string_map(&object["metadata"]["labels"])
}

/// A JSON object of strings as a map (non-strings are skipped).
pub fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
}

fn parse_set(rest: &str, original: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{original}', expected: '(' ... ')'"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(valid_key(key.trim())?));
    }
    for (op, is_in) in [(" notin ", false), (" in ", true)] {
        if let Some(index) = part.find(op) {
            let key = valid_key(part[..index].trim())?;
            let values = parse_set(&part[index + op.len()..], part)?;
            return Ok(if is_in {
                Requirement::In(key, values)
            } else {
                Requirement::NotIn(key, values)
            });
        }
    }
    for (op, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some(index) = part.find(op) {
            let key = valid_key(part[..index].trim())?;
            let value = part[index + op.len()..].trim().to_string();
            return match kind {
                0 => Ok(Requirement::NotIn(key, vec![value])),
                1 => Ok(Requirement::In(key, vec![value])),
                _ => {
                    let n: i64 = value.parse().map_err(|_| {
                        format!("for 'Gt', 'Lt' operators, the value must be an integer: {part}")
                    })?;
                    Ok(if kind == 2 {
                        Requirement::Gt(key, n)
                    } else {
                        Requirement::Lt(key, n)
                    })
                }
            };
        }
    }
    Ok(Requirement::Exists(valid_key(part)?))
}

fn valid_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(key.to_string())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key \"{key}\""
        ))
    }
}

/// One term of a field selector.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldTerm {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed `fieldSelector`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

impl FieldSelector {
    /// Parses and checks each field against the fields the type supports, as the server does
    /// (`field label not supported: spec.foo`).
    pub fn parse(text: &str, supported: &[String]) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for part in split_unescaped(text, ',') {
            if part.trim().is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            let field = field.trim().to_string();
            let known =
                field == "metadata.name" || field == "metadata.namespace" || supported.contains(&field);
            if !known {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push(FieldTerm {
                field,
                value: unescape(value.trim()),
                equal,
            });
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|term| (field_value(object, &term.field) == term.value) == term.equal)
    }

    /// The value the selector requires for `field`, if it pins one (used to narrow scans).
    pub fn required(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|t| t.equal && t.field == field)
            .map(|t| t.value.as_str())
    }
}

fn split_unescaped(text: &str, separator: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push('\\');
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in value.chars() {
        if escaped || c != '\\' {
            out.push(c);
            escaped = false;
        } else {
            escaped = true;
        }
    }
    out
}

/// The string value of a field as field selectors see it: missing is "", booleans print as
/// `true`/`false`. `source` of an Event is its `source.component`. Borrowed where it can be: a
/// field-selected list evaluates it once per stored object.
pub fn field_value<'a>(object: &'a Value, field: &str) -> Cow<'a, str> {
    let path = if field == "source" {
        "source.component"
    } else {
        field
    };
    let mut current = object;
    for part in path.split('.') {
        current = &current[part];
    }
    match current {
        Value::String(s) => Cow::Borrowed(s),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Number(n) => Cow::Owned(n.to_string()),
        Value::Null if field == "spec.unschedulable" => Cow::Borrowed("false"),
        _ => Cow::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_syntax() {
        let s = LabelSelector::parse("app=web,tier!=db,env in (prod, staging),!legacy,owner").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "prod"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "dev"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("env", "prod"),
            ("owner", "x"),
            ("legacy", "1")
        ])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        let s = LabelSelector::parse("env notin (dev),size>3").unwrap();
        assert!(s.matches(&labels(&[("size", "4")])));
        assert!(!s.matches(&labels(&[("size", "2")])));
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn field_selector_checks_supported_fields() {
        let supported = vec!["spec.nodeName".to_string(), "spec.unschedulable".to_string()];
        let s = FieldSelector::parse("spec.nodeName=n1,metadata.name!=b", &supported).unwrap();
        assert!(s.matches(&json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}})));
        assert!(!s.matches(&json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n1"}})));
        let err = FieldSelector::parse("spec.foo=1", &supported).unwrap_err();
        assert_eq!(err, "field label not supported: spec.foo");
        let s = FieldSelector::parse("spec.unschedulable=false", &supported).unwrap();
        assert!(s.matches(&json!({"spec": {}})));
        assert_eq!(s.required("spec.unschedulable"), Some("false"));
    }
}
