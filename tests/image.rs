//! The images (Dockerfile), checked without a container engine: hadolint passes; the build
//! context that .dockerignore leaves is a workspace Cargo can load; every `cargo build` in the
//! Dockerfile names a real package and binary; the operator image runs as the chart expects
//! (non-root uid, entrypoint, ports); and the chart, the Makefile and the workspace agree on the
//! image's name and tag.

mod common;

use std::path::Path;
use std::process::Command;

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::repo_root().join("Dockerfile")).unwrap();
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    joined.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    joined
        .into_iter()
        .map(|line| {
            let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
            (keyword.to_uppercase(), rest.trim().to_string())
        })
        .collect()
}

/// The instructions of stage `name` (`FROM ... AS name`).
fn stage(all: &[(String, String)], name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut found = Vec::new();
    for (keyword, rest) in all {
        if keyword == "FROM" {
            inside = rest.to_lowercase().ends_with(&format!(" as {name}"));
            continue;
        }
        if inside {
            found.push((keyword.clone(), rest.clone()));
        }
    }
    assert!(!found.is_empty(), "no stage {name} in the Dockerfile");
    found
}

fn value_of(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key))
        .map(|value| value.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("{key} not found"))
}

#[test]
fn hadolint_passes() {
    let output = Command::new(common::tool("venv/bin/hadolint"))
        .arg("Dockerfile")
        .current_dir(common::repo_root())
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_build_context_is_a_workspace_cargo_loads_and_the_builds_name_real_binaries() {
    let root = common::repo_root();
    let all = instructions();
    // The context: what .dockerignore lets through ("*" then "!path" entries).
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let mut patterns = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(patterns.next(), Some("*"), "the context starts from nothing");
    let allowed: Vec<String> = patterns
        .map(|p| {
            p.strip_prefix('!')
                .expect("only re-inclusions after *")
                .trim_end_matches('/')
                .to_string()
        })
        .collect();
    // Every COPY from the context is let through, and exists.
    let build = stage(&all, "build");
    let mut copied = Vec::new();
    for (keyword, rest) in &build {
        if keyword == "COPY" && !rest.starts_with("--from") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(root.join(source).exists(), "COPY {source}: no such path");
                assert!(
                    allowed.iter().any(|a| a == source),
                    "COPY {source}: excluded by .dockerignore"
                );
                copied.push(source.to_string());
            }
        }
    }
    // That context alone loads as the workspace, offline and with the lock file as is.
    let context = tempfile::tempdir().unwrap();
    for source in &copied {
        copy(&root.join(source), &context.path().join(source));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--locked",
            "--offline",
        ])
        .current_dir(context.path())
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let binaries: Vec<(String, String)> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|package| {
            let name = package["name"].as_str().unwrap().to_string();
            package["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(move |t| (name.clone(), t["name"].as_str().unwrap().to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    // Every `cargo build -p P --bin B` builds a binary P has, and the images get both products.
    let run = build
        .iter()
        .find(|(k, _)| k == "RUN")
        .expect("a RUN in the build stage")
        .1
        .clone();
    let mut built = Vec::new();
    for command in run.split("&&").filter(|c| c.contains("cargo build")) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let after = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1].to_string();
        let (package, binary) = (after("-p"), after("--bin"));
        assert!(
            words.contains(&"--locked") && words.contains(&"--release"),
            "{command}"
        );
        assert!(
            binaries.contains(&(package.clone(), binary.clone())),
            "{command}: no binary {binary} in package {package} ({binaries:?})"
        );
        built.push(binary);
    }
    assert_eq!(built, ["ec2-kubelet", "ec2-kubelet-agent"]);
    assert!(
        !binaries.iter().any(|(p, _)| p == "ec2-kubelet-testbed") || copied.contains(&"e2e/testbed".into())
    );
}

fn copy(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

#[test]
fn the_operator_image_runs_as_the_chart_expects_and_is_the_default_target() {
    let root = common::repo_root();
    let all = instructions();
    let last_from = all.iter().rev().find(|(k, _)| k == "FROM").unwrap();
    assert!(
        last_from.1.ends_with("AS operator"),
        "the default (last) stage is the operator: {last_from:?}"
    );
    let operator = stage(&all, "operator");
    let find = |keyword: &str| {
        operator
            .iter()
            .find(|(k, _)| k == keyword)
            .unwrap_or_else(|| panic!("no {keyword} in the operator stage"))
            .1
            .clone()
    };
    let values = std::fs::read_to_string(root.join("charts/ec2-kubelet/values.yaml")).unwrap();
    // The user: numeric (runAsNonRoot can verify it), not root, the chart's runAsUser.
    let user = find("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|uid| uid != 0), "USER {user}");
    assert_eq!(uid, value_of(&values, "runAsUser:"));
    // The entrypoint is the binary the stage copies in; the chart passes `run` and the config.
    let entrypoint: Vec<String> = serde_json::from_str(&find("ENTRYPOINT")).unwrap();
    let copy = find("COPY");
    assert!(
        copy.starts_with("--from=build ") && copy.ends_with(&entrypoint[0]),
        "{copy} / {entrypoint:?}"
    );
    let deployment =
        std::fs::read_to_string(root.join("charts/ec2-kubelet/templates/deployment.yaml")).unwrap();
    assert!(deployment.contains(r#"args: ["run", "--config", "/etc/ec2-kubelet/operator.yaml"]"#));
    // Every port the chart opens is exposed.
    let exposed: Vec<String> = find("EXPOSE").split_whitespace().map(String::from).collect();
    for port in ["metrics:", "health:", "kubelet:", "enroll:"] {
        let port = value_of(&values, port);
        assert!(exposed.contains(&port), "port {port} not in EXPOSE {exposed:?}");
    }
    // The base images are pinned by tag; the builder's Rust is the workspace's rust-version.
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let rust = value_of(&manifest, "rust-version =");
    assert!(
        all.contains(&("ARG".into(), format!("RUST_VERSION={rust}"))),
        "{all:?}"
    );
}

#[test]
fn the_chart_the_makefile_and_the_workspace_agree_on_the_image() {
    let root = common::repo_root();
    let values = std::fs::read_to_string(root.join("charts/ec2-kubelet/values.yaml")).unwrap();
    let chart = std::fs::read_to_string(root.join("charts/ec2-kubelet/Chart.yaml")).unwrap();
    let makefile = std::fs::read_to_string(root.join("Makefile")).unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let repository = value_of(&values, "repository:");
    assert_eq!(value_of(&makefile, "IMAGE ?="), repository);
    assert!(
        makefile.contains("docker build -t $(IMAGE):$(VERSION) ."),
        "{makefile}"
    );
    // The chart's default tag is its appVersion: the version the workspace builds.
    assert_eq!(value_of(&values, "tag:"), "");
    assert_eq!(value_of(&chart, "appVersion:"), value_of(&manifest, "version ="));
}
