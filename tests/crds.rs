//! `crds/` matches the Rust types, every sample validates against the generated schemas, and
//! the real kubectl reads the CRD set.

mod common;

use ec2_kubelet::crd;
use ec2_kubelet::schema::manifests::{Outcome, object_errors, validate_files};
use serde_json::json;

/// Every generated CRD is in `dir` exactly as crdgen writes it, and `dir` holds `extra` other files.
fn assert_crd_files_current(dir: &std::path::Path, extra: usize) {
    for generated in crd::crds() {
        let path = dir.join(crd::crd_file_name(&generated));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == crd::crd_yaml(&generated).unwrap(),
            "{} is stale: run `cargo run -- crdgen`",
            path.display()
        );
    }
    let files = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(
        files,
        crd::crds().len() + extra,
        "{} holds a file crdgen does not write",
        dir.display()
    );
}

#[test]
fn crds_directory_is_not_stale() {
    let dir = common::repo_root().join("crds");
    assert_crd_files_current(&dir, 0);
    assert_crd_files_current(&common::repo_root().join("charts/ec2-kubelet/crds"), 0);
}

#[test]
fn every_sample_of_our_kinds_validates_and_each_kind_has_one() {
    let reports = validate_files(&[common::repo_root().join("config/samples")]).expect("read samples");
    let invalid: Vec<String> = reports
        .iter()
        .filter(|r| r.is_invalid())
        .map(ToString::to_string)
        .collect();
    assert!(invalid.is_empty(), "invalid samples:\n{}", invalid.join("\n"));
    for kind in ["Ec2NodePool", "Ec2PodTemplate"] {
        assert!(
            reports
                .iter()
                .any(|r| r.kind == kind && matches!(r.outcome, Outcome::Valid)),
            "config/samples has no valid {kind}"
        );
    }
}

fn pool(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": "p"}, "spec": spec})
}

fn template(spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2PodTemplate",
           "metadata": {"name": "t", "namespace": "default"}, "spec": spec})
}

fn first_error(kind: &str, object: serde_json::Value) -> String {
    object_errors(kind, object)
        .first()
        .map(ToString::to_string)
        .unwrap_or_default()
}

#[test]
fn schema_rejects_bad_pools_naming_the_field() {
    let cases = [
        (
            json!({"nodes": -1, "subnetIds": ["subnet-01"]}),
            "spec.nodes: Invalid value: -1",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["vpc-01"]}),
            "spec.subnetIds[0]: Invalid value: \"vpc-01\"",
        ),
        (
            json!({"nodes": 1}),
            "one of spec.subnetIds or spec.subnetSelector is required",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "securityGroupIds": ["default"]}),
            "spec.securityGroupIds[0]",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "nodeTaints": [{"key": "a", "effect": "Never"}]}),
            "spec.nodeTaints[0].effect: Unsupported value: \"Never\"",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "maxPodsPerNode": 0}),
            "spec.maxPodsPerNode",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "os": "plan9"}),
            "spec.os: Unsupported value",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "agent": {"port": 70000}}),
            "spec.agent.port",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "tags": {"aws:x": "y"}}),
            "are reserved",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "warmPool": {"size": 1, "maxAge": "1 day"}}),
            "spec.warmPool.maxAge",
        ),
        (
            json!({"nodes": 1, "subnetIds": ["subnet-01"], "nodez": 1}),
            "spec.nodez: unknown field",
        ),
    ];
    for (spec, expected) in cases {
        let error = first_error("Ec2NodePool", pool(spec.clone()));
        assert!(
            error.contains(expected),
            "{spec}: expected {expected:?}, got {error:?}"
        );
    }
    assert_eq!(
        object_errors(
            "Ec2NodePool",
            pool(json!({"nodes": 3, "subnetSelector": {"tier": "private"}}))
        ),
        []
    );
}

#[test]
fn schema_rejects_bad_templates_naming_the_field() {
    let cases = [
        (json!({}), "exactly one of spec.imageId or spec.imageSelector"),
        (
            json!({"imageId": "ami-0123456789abcdef0", "imageSelector": {"owners": ["self"]}}),
            "exactly one of",
        ),
        (
            json!({"imageId": "img-1"}),
            "spec.imageId: Invalid value: \"img-1\"",
        ),
        (
            json!({"imageId": "ami-0123456789abcdef0", "instanceType": "huge"}),
            "spec.instanceType",
        ),
        (
            json!({"imageId": "ami-0123456789abcdef0", "instanceType": "t3.large", "instanceTypes": ["t3.micro"]}),
            "spec.instanceType must be one of spec.instanceTypes",
        ),
        (
            json!({"imageSelector": {}}),
            "imageSelector needs at least one of owners, name or tags",
        ),
        (
            json!({"imageSelector": {"owners": ["someone"]}}),
            "spec.imageSelector.owners[0]",
        ),
        (
            json!({"imageId": "ami-0123456789abcdef0", "blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"volumeType": "ssd"}}]}),
            "spec.blockDeviceMappings[0].ebs.volumeType: Unsupported value",
        ),
        (
            json!({"imageId": "ami-0123456789abcdef0", "spot": "yes"}),
            "spec.spot: Invalid value: \"yes\"",
        ),
        (
            json!({"imageId": "ami-0123456789abcdef0", "agentPort": 0}),
            "spec.agentPort",
        ),
    ];
    for (spec, expected) in cases {
        let error = first_error("Ec2PodTemplate", template(spec.clone()));
        assert!(
            error.contains(expected),
            "{spec}: expected {expected:?}, got {error:?}"
        );
    }
}
