//! The Helm chart, checked with the real helm from `e2e/tools.sh`.

mod common;

use std::process::Command;

use ec2_kubelet::config::OperatorConfig;
use serde::Deserialize;

fn helm(args: &[&str]) -> std::process::Output {
    Command::new(common::tool("bin/helm"))
        .args(args)
        .current_dir(common::repo_root())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("ec2-kubelet-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("ec2-kubelet-helm-config"),
        )
        .output()
        .expect("run helm")
}

#[test]
fn chart_lints() {
    let output = helm(&["lint", "--strict", "charts/ec2-kubelet"]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rendered_config_map_is_a_valid_operator_config() {
    let output = helm(&[
        "template",
        "demo",
        "charts/ec2-kubelet",
        "--namespace",
        "platform",
        "--include-crds",
        "--set",
        "config.region=eu-central-1",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let kinds: Vec<&str> = documents.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(),
        2,
        "{kinds:?}"
    );
    let config_map = documents
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let operator_yaml = config_map["data"]["operator.yaml"]
        .as_str()
        .expect("operator.yaml key");
    let config = OperatorConfig::from_yaml(operator_yaml).unwrap_or_else(|e| panic!("{e}\n{operator_yaml}"));
    assert_eq!(config.region, "eu-central-1");
    assert_eq!(config.namespace, "platform");
}
