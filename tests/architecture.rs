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

/// A crate's top-level modules (`<dir>/<name>.rs` or `<dir>/<name>/mod.rs`, but not its
/// `roots`: lib.rs, main.rs, build.rs) and the modules each one imports, read from its non-test
/// code: `crate::<name>` paths, `use crate::{a, b}` groups and `super::` paths that climb out of
/// the module.
fn module_graph(dir: &str, roots: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let src = common::repo_root().join(dir);
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let is_module = if path.is_dir() {
            path.join("mod.rs").exists()
        } else {
            !roots.contains(&name.as_str()) && path.extension().is_some_and(|e| e == "rs")
        };
        if is_module {
            modules.insert(name, path);
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, path) in &modules {
        let mut files = Vec::new();
        collect_rust_files(path, 0, &mut files);
        let mut imports = BTreeSet::new();
        for (file, depth) in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for import in crate_imports(&non_test_code(&text), depth) {
                if import != *name && names.contains(&import) {
                    imports.insert(import);
                }
            }
        }
        graph.insert(name.clone(), imports);
    }
    graph
}

/// The Rust files of a module with their depth below `src/` (`mod.rs` counts as its folder).
fn collect_rust_files(path: &std::path::Path, depth: usize, files: &mut Vec<(std::path::PathBuf, usize)>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            let child = entry.unwrap().path();
            let child_depth = if child.file_name().is_some_and(|n| n == "mod.rs") {
                depth
            } else {
                depth + 1
            };
            collect_rust_files(&child, child_depth, files);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        files.push((path.to_path_buf(), depth));
    }
}

/// The code before the file's `#[cfg(test)]` module (tests may reach anywhere), without comments.
fn non_test_code(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The crate-level module names a file's code refers to. A file at `depth` (0 for `src/x.rs`
/// and `src/x/mod.rs`, 1 for `src/x/y.rs`, ...) reaches the crate root with `depth + 1`
/// `super::`s.
fn crate_imports(code: &str, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let prefixes = ["crate::".to_string(), "super::".repeat(depth + 1)];
    for prefix in prefixes {
        let mut rest = code;
        while let Some(at) = rest.find(&prefix) {
            let preceded_by_ident = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + prefix.len()..];
            if preceded_by_ident {
                continue;
            }
            if prefix != "crate::" && rest.starts_with("super::") {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let head = item.trim().split("::").next().unwrap_or_default();
                    found.insert(head.trim().to_string());
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                found.insert(rest[..end].to_string());
            }
        }
    }
    found
}

/// A cycle in `graph`, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// Fails naming the cycle, if `graph` has one.
fn assert_acyclic(crate_name: &str, graph: &BTreeMap<String, BTreeSet<String>>) {
    // The reader sees what was found, so a wrong parse shows.
    for (module, imports) in graph {
        println!("{crate_name}: {module} -> {imports:?}");
    }
    if let Some(cycle) = find_cycle(graph) {
        panic!(
            "{crate_name}: a cycle between top-level modules: {}. Move what both need one layer down (docs/architecture.md)",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_operators_modules_import_downward_only() {
    let graph = module_graph("src", &["lib"]);
    assert!(
        graph["operator"].contains("controller") && graph["pod"].contains("runtime"),
        "{graph:#?}"
    );
    assert!(
        graph["crd"].is_empty(),
        "the custom resources import nothing of ours: {:?}",
        graph["crd"]
    );
    assert_acyclic("ec2-kubelet", &graph);
}

#[test]
fn the_agent_the_protocol_and_the_test_bed_have_no_cycles_either() {
    let agent = module_graph("src/agent", &["lib", "main"]);
    assert!(agent["server"].contains("runtime"), "{agent:#?}");
    assert_acyclic("ec2-kubelet-agent", &agent);
    let protocol = module_graph("proto", &["lib", "build"]);
    assert!(protocol["pki"].contains("util"), "{protocol:#?}");
    assert_acyclic("ec2-kubelet-protocol", &protocol);
    let testbed = module_graph("e2e/testbed", &["lib", "main", "bench"]);
    assert!(testbed["demo"].contains("devcluster"), "{testbed:#?}");
    assert_acyclic("ec2-kubelet-testbed", &testbed);
}

#[test]
fn the_cycle_check_finds_a_cycle_and_the_parser_sees_groups_and_super() {
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    // In src/pod/lifecycle.rs (depth 1): super::super is the crate root, super is the pod module.
    let code = "use crate::{cloud::Compute, crd};\nlet x = super::super::warm::claim();\nuse super::spec;\nfoo_crate::bar;";
    assert_eq!(
        crate_imports(code, 1),
        BTreeSet::from(["cloud".to_string(), "crd".to_string(), "warm".to_string()])
    );
    // In src/pod/mod.rs or src/warm.rs (depth 0): super is the crate root.
    assert_eq!(
        crate_imports("use super::cloud;", 0),
        BTreeSet::from(["cloud".to_string()])
    );
    assert_eq!(
        non_test_code("a // crate::x\n#[cfg(test)]\nmod tests { crate::y }"),
        "a "
    );
}
