//! Checks YAML manifests of ec2-kubelet kinds against the generated CRD schemas, strictly
//! (unknown fields are errors), as `ec2-kubelet validate` and the sample tests do.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{FieldError, admit_strict, crd_schema, invalid_message};
use crate::crd::{GROUP, VERSION, crds};

/// What happened to one YAML document.
#[derive(Debug)]
pub struct DocumentReport {
    pub file: PathBuf,
    /// Position of the document in its file (0-based).
    pub index: usize,
    pub kind: String,
    pub name: String,
    pub outcome: Outcome,
}

#[derive(Debug)]
pub enum Outcome {
    /// Valid against its CRD schema.
    Valid,
    /// Not an ec2-kubelet kind; left to the API server.
    NotOurs,
    /// Invalid: the message reads like the API server's 422.
    Invalid(String),
}

impl DocumentReport {
    pub fn is_invalid(&self) -> bool {
        matches!(self.outcome, Outcome::Invalid(_))
    }
}

impl std::fmt::Display for DocumentReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = format!(
            "{}[{}] {}/{}",
            self.file.display(),
            self.index,
            self.kind,
            self.name
        );
        match &self.outcome {
            Outcome::Valid => write!(f, "valid      {what}"),
            Outcome::NotOurs => write!(f, "unchecked  {what} (not an {GROUP} kind)"),
            Outcome::Invalid(message) => write!(f, "INVALID    {what}: {message}"),
        }
    }
}

/// Expands paths: a directory stands for its `*.yaml`/`*.yml` files, sorted.
pub fn manifest_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            inner.sort();
            files.extend(inner);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Validates every document of every file.
pub fn validate_files(paths: &[PathBuf]) -> std::io::Result<Vec<DocumentReport>> {
    let mut reports = Vec::new();
    for file in manifest_files(paths)? {
        let text = std::fs::read_to_string(&file)?;
        reports.extend(validate_text(&file, &text));
    }
    Ok(reports)
}

/// Validates every document of a multi-document YAML text.
pub fn validate_text(file: &Path, text: &str) -> Vec<DocumentReport> {
    let schemas: Vec<(String, Value)> = crds()
        .iter()
        .filter_map(|crd| Some((crd.spec.names.kind.clone(), crd_schema(crd, VERSION)?)))
        .collect();
    let mut reports = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let report = |kind: String, name: String, outcome| DocumentReport {
            file: file.to_path_buf(),
            index,
            kind,
            name,
            outcome,
        };
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                reports.push(report(
                    "?".into(),
                    "?".into(),
                    Outcome::Invalid(format!("not YAML: {e}")),
                ));
                continue;
            }
        };
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let Some((group, version)) = api_version.split_once('/') else {
            reports.push(report(kind, name, Outcome::NotOurs));
            continue;
        };
        if group != GROUP {
            reports.push(report(kind, name, Outcome::NotOurs));
            continue;
        }
        let outcome = match schemas.iter().find(|(k, _)| *k == kind) {
            None => Outcome::Invalid(format!("no kind {kind:?} in group {GROUP}")),
            Some(_) if version != VERSION => Outcome::Invalid(format!(
                "apiVersion {api_version:?}: this operator serves {GROUP}/{VERSION}"
            )),
            Some(_) if name == "?" => Outcome::Invalid("metadata.name: Required value".into()),
            Some((_, schema)) => match admit_strict(schema, value.clone()) {
                Ok(_) => Outcome::Valid,
                Err(errors) => Outcome::Invalid(invalid_message(&format!("{kind}.{GROUP}"), &name, &errors)),
            },
        };
        reports.push(report(kind, name, outcome));
    }
    reports
}

/// The field errors of one object of an ec2-kubelet kind (for tests that build objects in code).
pub fn object_errors(kind: &str, object: Value) -> Vec<FieldError> {
    let schema = crds()
        .iter()
        .find(|crd| crd.spec.names.kind == kind)
        .and_then(|crd| crd_schema(crd, VERSION));
    match schema {
        Some(schema) => admit_strict(&schema, object).err().unwrap_or_default(),
        None => vec![FieldError {
            path: "kind".into(),
            kind: super::FieldErrorKind::NotSupported {
                value: Value::String(kind.into()),
                allowed: crds()
                    .iter()
                    .map(|c| Value::String(c.spec.names.kind.clone()))
                    .collect(),
            },
        }],
    }
}
