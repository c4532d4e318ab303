//! The dev cluster driven by the real `kubectl` and `helm` (installed by `e2e/tools.sh`), the
//! way a user drives a cluster.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ec2_kubelet_testbed::devcluster::{DevCluster, DevClusterOptions};

/// A dev cluster on its own runtime, with a kubeconfig and private kubectl/helm state.
struct Fixture {
    cluster: DevCluster,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn start(scheduler: bool) -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let options = DevClusterOptions {
            scheduler,
            ..DevClusterOptions::default()
        };
        let cluster = runtime
            .block_on(DevCluster::start(options))
            .expect("start the dev cluster");
        let dir = tempfile::tempdir().expect("temp dir");
        cluster
            .write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("write kubeconfig");
        Fixture {
            cluster,
            runtime,
            dir,
        }
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut command = Command::new(common::tool(&format!("bin/{tool}")));
        let home = self.dir.path();
        command
            .args(args)
            .current_dir(common::repo_root())
            .env("KUBECONFIG", home.join("kubeconfig"))
            .env("KUBECACHEDIR", home.join("kube-cache"))
            .env("HOME", home)
            .env("HELM_CACHE_HOME", home.join("helm/cache"))
            .env("HELM_CONFIG_HOME", home.join("helm/config"))
            .env("HELM_DATA_HOME", home.join("helm/data"));
        command
    }

    /// Runs the tool and returns its stdout; fails the test with stderr if it fails.
    fn run(&self, tool: &str, args: &[&str]) -> String {
        let output = self.output(tool, args, None);
        assert!(
            output.status.success(),
            "{tool} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn output(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self.command(tool, args);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn tool");
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(stdin.unwrap_or_default().as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("wait for tool")
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.run("kubectl", args)
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> String {
        let output = self.output("kubectl", args, Some(stdin));
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// A stand-in kubelet API on a loopback port: answers `/containerLogs/...` with one line per
/// request (for `kubectl logs`, through the dev cluster's log proxy).
fn fake_kubelet() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let tls = ec2_kubelet::kubelet::tls::server_config(None, None, None).expect("kubelet certificate");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // Kubelets serve HTTPS (the proxy does not verify the certificate).
            let Ok(connection) = rustls::ServerConnection::new(tls.clone()) else {
                continue;
            };
            let mut stream = rustls::StreamOwned::new(connection, stream);
            let mut reader = BufReader::new(&mut stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            drop(reader);
            let body = format!("hello from the kubelet at {path}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    });
    port
}

fn virtual_node(port: u16) -> String {
    format!(
        r#"{{"apiVersion": "v1", "kind": "Node",
  "metadata": {{"name": "ip-127-0-0-1.default", "labels": {{"type": "virtual-kubelet", "kubernetes.io/role": "agent"}}}},
  "spec": {{"taints": [{{"key": "virtual-kubelet.io/provider", "value": "ec2", "effect": "NoSchedule"}}]}},
  "status": {{"conditions": [{{"type": "Ready", "status": "True"}}],
    "allocatable": {{"pods": "110"}}, "addresses": [{{"type": "InternalIP", "address": "127.0.0.1"}}],
    "daemonEndpoints": {{"kubeletEndpoint": {{"Port": {port}}}}},
    "nodeInfo": {{"kubeletVersion": "v1.34.0-ec2-kubelet"}}}}}}"#
    )
}

fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn kubectl_applies_gets_describes_logs_and_deletes() {
    let fixture = Fixture::start(true);
    let created = fixture.kubectl(&["apply", "-f", "crds/"]);
    assert_eq!(
        lines_with(&created, " created").len(),
        ec2_kubelet::crd::crds().len(),
        "{created}"
    );
    fixture.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/ec2nodepools.ec2-kubelet.io",
        "crd/ec2podtemplates.ec2-kubelet.io",
        "--timeout=30s",
    ]);
    let applied = fixture.kubectl(&["apply", "-f", "crds/", "-f", "config/samples/"]);
    assert!(
        applied.contains("ec2nodepool.ec2-kubelet.io/default created"),
        "{applied}"
    );
    assert!(
        applied.contains("ec2podtemplate.ec2-kubelet.io/general created"),
        "{applied}"
    );
    assert!(applied.contains("pod/hello created"), "{applied}");

    // Applying the same files again changes nothing: not one write reaches the store.
    let before = fixture.cluster.store().current_rv();
    let again = fixture.kubectl(&["apply", "-f", "crds/", "-f", "config/samples/"]);
    assert_eq!(
        fixture.cluster.store().current_rv(),
        before,
        "second apply wrote:\n{again}"
    );
    for kind in ["customresourcedefinition", "ec2nodepool", "ec2podtemplate"] {
        for line in lines_with(&again, kind) {
            assert!(line.ends_with("unchanged"), "{line}");
        }
    }

    let resources = fixture.kubectl(&["api-resources", "--api-group=ec2-kubelet.io"]);
    assert!(
        lines_with(&resources, "ec2nodepools")[0].contains("ecnp"),
        "{resources}"
    );
    let pools = fixture.kubectl(&["get", "ecnp"]);
    let header: Vec<&str> = pools.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "NODES", "READY", "PODS", "WARM", "AGE"]);
    let row: Vec<&str> = pools.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["default", "2"]);
    let templates = fixture.kubectl(&["get", "ecpt", "general"]);
    assert!(templates.starts_with("NAME"), "{templates}");
    assert!(
        templates.contains("IMAGE") && templates.contains("TYPES"),
        "{templates}"
    );
    assert!(templates.contains("t3.micro"), "{templates}");
    let described = fixture.kubectl(&["describe", "ecnp", "default"]);
    assert!(
        described.contains("Ec2NodePool") && described.contains("subnet-0a1b2c3d4e5f60718"),
        "{described}"
    );

    // A Ready virtual node: the scheduler binds the sample pods; logs come through the proxy.
    let port = fake_kubelet();
    fixture.kubectl_stdin(&["create", "-f", "-"], &virtual_node(port));
    fixture.kubectl(&[
        "wait",
        "--for=condition=PodScheduled",
        "pod/hello",
        "--timeout=30s",
    ]);
    let pods = fixture.kubectl(&["get", "pods", "-o", "wide"]);
    assert!(
        lines_with(&pods, "hello")[0].contains("ip-127-0-0-1.default"),
        "{pods}"
    );
    let nodes = fixture.kubectl(&["get", "nodes"]);
    assert!(
        lines_with(&nodes, "ip-127-0-0-1.default")[0].contains("Ready"),
        "{nodes}"
    );
    let logs = fixture.kubectl(&["logs", "hello", "--tail=3"]);
    assert!(
        logs.starts_with("hello from the kubelet at /containerLogs/default/hello/hello"),
        "{logs}"
    );
    assert!(logs.contains("tailLines=3"), "{logs}");
    let described = fixture.kubectl(&["describe", "pod", "hello"]);
    assert!(
        described.contains("Successfully assigned default/hello to ip-127-0-0-1.default"),
        "{described}"
    );

    // Deleting a bound pod leaves it Terminating until its kubelet confirms.
    fixture.kubectl(&["delete", "pod", "hello", "--wait=false"]);
    let terminating = fixture.kubectl(&["get", "pod", "hello"]);
    assert!(terminating.contains("Terminating"), "{terminating}");
    let deleted = fixture.kubectl(&["delete", "-f", "config/samples/pool.yaml"]);
    assert!(deleted.contains("deleted"), "{deleted}");
    let gone = fixture.output("kubectl", &["get", "ecnp", "default"], None);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    drop(fixture.runtime);
}

fn release_secrets(fixture: &Fixture, namespace: &str) -> Vec<String> {
    fixture
        .kubectl(&[
            "get",
            "secrets",
            "-n",
            namespace,
            "-l",
            "owner=helm",
            "-o",
            "name",
        ])
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn helm_installs_upgrades_and_uninstalls_the_chart() {
    let fixture = Fixture::start(false);
    let chart: PathBuf = common::repo_root().join("charts/ec2-kubelet");
    let chart = chart.to_str().unwrap();
    let installed = fixture.run(
        "helm",
        &[
            "install",
            "demo",
            chart,
            "-n",
            "ec2-kubelet",
            "--create-namespace",
            "--set",
            "agentTls.enrollUrl=https://enroll.example.internal:8443",
        ],
    );
    // (No --wait: the dev cluster runs no controllers that would roll the Deployment out.)
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let config = fixture.kubectl(&["get", "configmap", "-n", "ec2-kubelet", "-o", "name"]);
    assert!(config.contains("configmap/demo-ec2-kubelet"), "{config}");
    let objects = fixture.kubectl(&[
        "get",
        "deployment,service,serviceaccount,poddisruptionbudget,role,rolebinding",
        "-n",
        "ec2-kubelet",
        "-o",
        "name",
    ]);
    for expected in [
        "deployment.apps/demo-ec2-kubelet",
        "service/demo-ec2-kubelet",
        "serviceaccount/demo-ec2-kubelet",
        "poddisruptionbudget.policy/demo-ec2-kubelet",
        "role.rbac.authorization.k8s.io/demo-ec2-kubelet-leases",
        "rolebinding.rbac.authorization.k8s.io/demo-ec2-kubelet-leases",
    ] {
        assert!(objects.contains(expected), "{expected} missing: {objects}");
    }
    let cluster_role = fixture.kubectl(&["get", "clusterrole", "demo-ec2-kubelet", "-o", "name"]);
    assert!(cluster_role.contains("demo-ec2-kubelet"), "{cluster_role}");
    let node_leases = fixture.kubectl(&["get", "role", "-n", "kube-node-lease", "-o", "name"]);
    assert!(node_leases.contains("demo-ec2-kubelet-leases"), "{node_leases}");
    let crds = fixture.kubectl(&["get", "crds", "-o", "name"]);
    assert_eq!(
        lines_with(&crds, "ec2-kubelet.io").len(),
        ec2_kubelet::crd::crds().len(),
        "helm installs the chart's crds/: {crds}"
    );
    assert_eq!(release_secrets(&fixture, "ec2-kubelet").len(), 1);

    fixture.run(
        "helm",
        &[
            "upgrade",
            "demo",
            chart,
            "-n",
            "ec2-kubelet",
            "--reuse-values",
            "--set",
            "logFormat=json",
        ],
    );
    let history = fixture.run("helm", &["history", "demo", "-n", "ec2-kubelet"]);
    assert_eq!(lines_with(&history, "superseded").len(), 1, "{history}");
    assert_eq!(lines_with(&history, "deployed").len(), 1, "{history}");
    let listed = fixture.run("helm", &["list", "-n", "ec2-kubelet"]);
    assert!(listed.contains("demo"), "{listed}");

    let uninstalled = fixture.run("helm", &["uninstall", "demo", "-n", "ec2-kubelet"]);
    assert!(uninstalled.contains("uninstalled"), "{uninstalled}");
    let config = fixture.kubectl(&["get", "configmap", "-n", "ec2-kubelet", "-o", "name"]);
    assert!(!config.contains("demo-ec2-kubelet"), "{config}");
    assert!(release_secrets(&fixture, "ec2-kubelet").is_empty());
    assert!(Path::new(chart).exists());
}
