//! The architecture, checked: what each crate of the workspace may depend on (read from
//! Cargo.lock, so a dependency that comes back through another crate is caught too).

mod common;

use std::collections::{BTreeMap, BTreeSet};

/// Cargo.lock as package name -> the names of its dependencies (every version of a name merged:
/// the question is whether a crate is reachable at all).
fn lock_graph() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(common::repo_root().join("Cargo.lock")).expect("read Cargo.lock");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let mut name = None;
        let mut dependencies = BTreeSet::new();
        let mut in_dependencies = false;
        for line in block.lines() {
            let line = line.trim();
            if let Some(value) = line.strip_prefix("name = ") {
                name = Some(value.trim_matches('"').to_string());
            } else if line.starts_with("dependencies = [") {
                in_dependencies = true;
            } else if in_dependencies && line == "]" {
                in_dependencies = false;
            } else if in_dependencies {
                let entry = line.trim_end_matches(',').trim_matches('"');
                let dependency = entry.split(' ').next().unwrap_or_default();
                dependencies.insert(dependency.to_string());
            }
        }
        let name = name.expect("every [[package]] has a name");
        graph.entry(name).or_default().extend(dependencies);
    }
    graph
}

/// Every package reachable from `root`, with the path that reaches it.
fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeMap<String, Vec<String>> {
    let mut paths = BTreeMap::from([(root.to_string(), vec![root.to_string()])]);
    let mut queue = vec![root.to_string()];
    while let Some(package) = queue.pop() {
        let path = paths[&package].clone();
        for dependency in graph.get(&package).into_iter().flatten() {
            if !paths.contains_key(dependency) {
                let mut next = path.clone();
                next.push(dependency.clone());
                paths.insert(dependency.clone(), next);
                queue.push(dependency.clone());
            }
        }
    }
    paths
}

fn heavy(package: &str) -> bool {
    package == "kube"
        || package.starts_with("kube-")
        || package == "k8s-openapi"
        || package == "aws-config"
        || package.starts_with("aws-sdk-")
}

#[test]
fn the_agent_and_the_protocol_depend_on_neither_kube_nor_the_aws_sdk() {
    let graph = lock_graph();
    let agent = reachable(&graph, "ec2-kubelet-agent");
    assert!(agent.contains_key("ec2-kubelet-protocol"), "{agent:?}");
    for root in ["ec2-kubelet-agent", "ec2-kubelet-protocol"] {
        let offending: Vec<String> = reachable(&graph, root)
            .into_iter()
            .filter(|(package, _)| heavy(package))
            .map(|(_, path)| path.join(" -> "))
            .collect();
        assert!(offending.is_empty(), "{root} reaches {offending:#?}");
    }
    // The operator does (sanity: the check above looks at a graph that has them).
    let operator = reachable(&graph, "ec2-kubelet");
    assert!(operator.contains_key("kube") && operator.contains_key("aws-sdk-ec2"));
}

#[test]
fn nothing_shipped_depends_on_the_test_bed() {
    let graph = lock_graph();
    // Cargo.lock merges dev-dependencies in, so the shipped crates are read from their manifests.
    for manifest in ["Cargo.toml", "src/agent/Cargo.toml", "proto/Cargo.toml"] {
        let text = std::fs::read_to_string(common::repo_root().join(manifest)).unwrap();
        let normal = text
            .split("\n[")
            .filter(|section| {
                section.starts_with("dependencies]") || section.starts_with("build-dependencies]")
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !normal.contains("ec2-kubelet-testbed"),
            "{manifest}: the test bed is a dev-dependency at most"
        );
    }
    // And the test bed is where the dev cluster's own dependencies stop.
    let agent = reachable(&graph, "ec2-kubelet-agent");
    assert!(!agent.contains_key("ec2-kubelet-testbed"), "{agent:?}");
    assert!(!agent.contains_key("jsonpath-rust"), "{agent:?}");
}
