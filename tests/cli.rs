//! The `ec2-kubelet` binary as a user runs it: config checking, manifest validation, the dev cluster.

mod common;

use std::process::{Command, Output};

fn ec2_kubelet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ec2-kubelet"))
        .args(args)
        .current_dir(common::repo_root())
        .output()
        .expect("run ec2-kubelet")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let output = ec2_kubelet(&[
        "config",
        "--config",
        "config/operator.yaml",
        "--region",
        "eu-west-3",
        "--compute",
        "aws",
        "--agent-enroll-url",
        "https://enroll.example.internal:8443",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        serde_yaml::from_slice::<serde_yaml::Value>(&output.stdout).unwrap()["agentTls"]["enrollUrl"],
        "https://enroll.example.internal:8443"
    );
    let effective: serde_yaml::Value = serde_yaml::from_slice(&output.stdout).unwrap();
    assert_eq!(effective["region"], "eu-west-3");
    assert_eq!(effective["compute"], "aws");
    assert_eq!(
        effective["clusterName"], "ec2-kubelet",
        "unset flags keep the file's values"
    );
}

#[test]
fn bad_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("lease:\n  durationSeconds: 5\n", "lease.durationSeconds"),
        ("sync:\n  nodeStatusSecs: 5\n", "unknown field `nodeStatusSecs`"),
        ("compute: gcp\n", "unknown variant `gcp`"),
    ];
    for (yaml, field) in cases {
        let path = dir.path().join("operator.yaml");
        std::fs::write(&path, yaml).unwrap();
        let output = ec2_kubelet(&["config", "--config", path.to_str().unwrap()]);
        assert!(!output.status.success(), "{yaml} was accepted");
        assert!(
            stderr(&output).contains(field),
            "{yaml}: stderr {:?} does not name {field}",
            stderr(&output)
        );
    }
    let output = ec2_kubelet(&["config", "--cluster-name", "Not_Valid"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("clusterName"), "{}", stderr(&output));
    let output = ec2_kubelet(&["config", "--config", "/nonexistent/operator.yaml"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/nonexistent/operator.yaml"));
}

#[test]
fn validate_passes_the_samples_and_fails_a_bad_pool_with_its_fields() {
    let output = ec2_kubelet(&["validate", "-f", "config/samples"]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: ec2-kubelet.io/v1alpha1\nkind: Ec2NodePool\nmetadata: {name: bad}\nspec:\n  nodes: -2\n  subnetIds: [subnet-01]\n  nodeTaintz: []\n",
    )
    .unwrap();
    let output = ec2_kubelet(&["validate", "-f", bad.to_str().unwrap()]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("spec.nodes: Invalid value: -2"), "{stdout}");
    assert!(stdout.contains("spec.nodeTaintz: unknown field"), "{stdout}");
}

#[test]
fn crdgen_stdout_matches_the_files() {
    let output = ec2_kubelet(&["crdgen", "--stdout"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for crd in ec2_kubelet::crd::crds() {
        assert!(stdout.contains(&ec2_kubelet::crd::crd_yaml(&crd).unwrap()));
    }
}

/// Kills the child on drop, so a failing assertion never leaves a dev cluster running.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dev_prints_how_to_point_kubectl_at_it_and_serves_our_crds() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(ec2_kubelet_testbed::binaries::binary("ec2-kubelet-dev"))
        .args(["cluster", "--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ec2-kubelet-dev cluster");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("Stop with");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(
        text.starts_with("ec2-kubelet dev cluster listening on http://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "{text}"
    );
    let output = Command::new(common::tool("bin/kubectl"))
        .args(["get", "crds", "-o", "name"])
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBECACHEDIR", dir.path().join("cache"))
        .output()
        .expect("run kubectl");
    assert!(output.status.success(), "{}", stderr(&output));
    let crds = String::from_utf8_lossy(&output.stdout);
    assert!(crds.contains("ec2nodepools.ec2-kubelet.io"), "{crds}");
    assert!(crds.contains("ec2podtemplates.ec2-kubelet.io"), "{crds}");
    drop(running);
}

#[test]
fn demo_brings_the_sample_pool_up_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let output = Command::new(ec2_kubelet_testbed::binaries::binary("ec2-kubelet-dev"))
        .args([
            "demo",
            "--once",
            "--listen",
            "127.0.0.1:0",
            "--kubelet-listen",
            "127.0.0.1:0",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .current_dir(common::repo_root())
        .output()
        .expect("run ec2-kubelet-dev demo");
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("applied:      Ec2NodePool/default"), "{text}");
    assert!(text.contains("Ec2NodePool default: 2/2 nodes Ready"), "{text}");
    let ready_rows = text
        .lines()
        .filter(|l| l.starts_with("ip-127-0-0-") && l.contains(" Ready "))
        .count();
    assert_eq!(ready_rows, 2, "{text}");
    // Every sample pod runs on its own instance, sized from its requests or annotation.
    let pod = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(pod("hello")[1], "Running");
    assert_eq!(pod("hello")[4], "t3.micro", "the instance-type annotation");
    assert_eq!(
        pod("worker-0")[4],
        "t3.medium",
        "the smallest allowed type with 2 CPU and 4Gi"
    );
    assert!(pod("worker-1")[3].starts_with("i-"));
    assert!(
        pod("worker-1")[5].starts_with("127.1."),
        "the pod IP is its instance's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_health_readiness_metrics_and_the_kubelet_api() {
    let cluster = common::operator_cluster(false).await;
    let dir = tempfile::tempdir().unwrap();
    let files = common::RunFiles::new(&cluster, dir.path(), "cli", "");
    let mut operator = files.spawn("warn", None);
    let health = files.health;
    common::eventually(60, "/readyz to answer 200", || async move {
        let connected = tokio::net::TcpStream::connect(health).await.is_ok();
        if !connected {
            return None;
        }
        (common::http_get(health, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(common::http_get(health, "/healthz").await, (200, "ok\n".into()));
    let metrics = files.metrics;
    let (status, text) = common::http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert!(text.contains("ec2_kubelet_pod_status_writes_total 0"), "{text}");
    // The kubelet API speaks TLS on its port.
    let kubelet = files.kubelet;
    let tcp = tokio::net::TcpStream::connect(kubelet).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ec2_kubelet::kubelet::tls::insecure_client_config());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    assert!(connector.connect(name, tcp).await.is_ok(), "a TLS handshake");

    // Readiness follows the API server.
    cluster.dev("shuts its API server down").shutdown();
    common::eventually(30, "/readyz to fail without the API server", || async move {
        (common::http_get(health, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    operator.kill().await.unwrap();
}

#[test]
fn the_crd_docs_carry_the_generated_reference() {
    let output = ec2_kubelet(&["crdgen", "--reference"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let generated = String::from_utf8_lossy(&output.stdout);
    let docs = std::fs::read_to_string(common::repo_root().join("docs/crds.md")).unwrap();
    let start = docs
        .find(ec2_kubelet::crd::reference::START)
        .expect("docs/crds.md has the reference's start marker");
    let end = docs
        .find(ec2_kubelet::crd::reference::END)
        .expect("and its end marker")
        + ec2_kubelet::crd::reference::END.len()
        + 1;
    assert!(
        docs[start..end] == *generated,
        "docs/crds.md's CRD reference is stale: run `cargo run -- crdgen --reference` and paste it between the markers"
    );
}
