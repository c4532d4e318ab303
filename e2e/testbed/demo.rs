//! `ec2-kubelet-dev demo`: the main job on the embedded default, with no AWS account and no
//! cluster. A cluster on loopback (the real control plane of `e2e/control-plane` when its binary
//! is given, else the dev cluster), the operator on the `local` backend, and the sample
//! templates and pool and pods from `config/samples/`; prints the virtual nodes once they are
//! Ready and the pods once each runs on its own instance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::devcluster::{DevCluster, DevClusterOptions};
use ec2_kubelet::config::OperatorConfig;
use ec2_kubelet::crd::Ec2NodePool;

/// How to run the demo.
pub struct DemoOptions {
    pub listen: std::net::SocketAddr,
    pub kubeconfig: PathBuf,
    /// Where the sample manifests are (`config/samples`).
    pub samples: PathBuf,
    /// Where the local backend keeps its records (a fresh directory per run).
    pub state_dir: PathBuf,
    /// The kubelet API of the virtual nodes (`kubectl logs` and `exec` go there).
    pub kubelet: std::net::SocketAddr,
    /// The real control plane's binary (`e2e/control-plane`, built into
    /// `.tools/bin/control-plane`); `None`: the dev cluster.
    pub control_plane: Option<PathBuf>,
}

/// The real control plane (`e2e/control-plane`): etcd, kube-apiserver,
/// kube-controller-manager and kube-scheduler, as a child process on loopback.
pub struct ControlPlane {
    child: tokio::process::Child,
    pub url: String,
}

impl ControlPlane {
    /// Starts it on `listen`'s port with its state under `dir`, writes the admin kubeconfig to
    /// `kubeconfig`, and waits until it says it is ready (printing its progress).
    pub async fn start(
        binary: &Path,
        dir: &Path,
        listen: std::net::SocketAddr,
        kubeconfig: &Path,
    ) -> Result<Self, String> {
        use tokio::io::AsyncBufReadExt;
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--dir")
            .arg(dir)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg(format!("--port={}", listen.port()))
            .stdout(std::process::Stdio::piped())
            // Ctrl-C reaches the demo only: it stops the operator first, the cluster last.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it makes the control plane stop (and clean up)
        // when the demo dies without stopping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            format!(
                "starting the control plane {}: {e} (make tools builds it)",
                binary.display()
            )
        })?;
        let stdout = child.stdout.take().ok_or("the control plane's output")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(180), async {
            while let Ok(Some(line)) = lines.next_line().await {
                println!("{line}");
                if let Some(rest) = line.strip_prefix("control-plane: ready") {
                    let url = rest
                        .split_whitespace()
                        .find(|w| w.starts_with("https://"))
                        .unwrap_or_default();
                    return Some(url.trim_end_matches(',').to_string());
                }
            }
            None
        })
        .await;
        match ready {
            Ok(Some(url)) => {
                // Its later output (it stops on SIGTERM) goes on being shown.
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        println!("{line}");
                    }
                });
                Ok(ControlPlane { child, url })
            }
            Ok(None) => {
                Err("the control plane exited before it was ready (its logs are in its --dir)".into())
            }
            Err(_) => Err("the control plane was not ready in 180 s".into()),
        }
    }

    /// SIGTERM, then waits for it to stop and remove its state.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling the child process this value owns.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// The cluster the demo runs on.
pub enum Cluster {
    Dev(DevCluster),
    Real(ControlPlane),
}

impl Cluster {
    pub fn url(&self) -> String {
        match self {
            Cluster::Dev(cluster) => cluster.url(),
            Cluster::Real(control_plane) => control_plane.url.clone(),
        }
    }

    async fn shutdown(self) {
        match self {
            Cluster::Dev(cluster) => cluster.shutdown(),
            Cluster::Real(control_plane) => control_plane.stop().await,
        }
    }
}

/// Installs the project's CRDs on a real API server and waits until they are served.
async fn install_crds(client: &Client) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for definition in ec2_kubelet::crd::crds() {
        let name = definition.name_any();
        api.create(&PostParams::default(), &definition)
            .await
            .map_err(|e| format!("creating the CRD {name}: {e}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let crd = api.get(&name).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
            if established {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("the CRD {name} was not Established in 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Creates every document of a YAML file (any kind the cluster serves), as `kubectl create -f`.
async fn create_all(client: &Client, path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut created = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::to_value(
            serde_yaml::Value::deserialize(document).map_err(|e| format!("{}: {e}", path.display()))?,
        )
        .map_err(|e| e.to_string())?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject =
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", path.display()))?;
        let types = object
            .types
            .clone()
            .ok_or_else(|| format!("{}: a document without kind", path.display()))?;
        let (group, version) = types
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", &types.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &types.kind);
        let plural = format!("{}s", types.kind.to_lowercase());
        let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> = match object.namespace() {
            Some(namespace) => Api::namespaced_with(client.clone(), &namespace, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.create(&PostParams::default(), &object)
            .await
            .map_err(|e| format!("creating {} {}: {e}", types.kind, object.name_any()))?;
        created.push(format!("{}/{}", types.kind, object.name_any()));
    }
    Ok(created)
}

/// A running demo: the cluster, the operator and its compute backend.
pub struct Demo {
    pub cluster: Cluster,
    stop: watch::Sender<bool>,
    operator: tokio::task::JoinHandle<()>,
    /// Serves agent enrollment for as long as the demo runs: pods created after the demo
    /// started (a Deployment, a scale-up) need their instances enrolled too.
    enrollment: Option<ec2_kubelet::enrollment::EnrollmentServer>,
    kubelet: ec2_kubelet::kubelet::KubeletServer,
    compute: Arc<dyn ec2_kubelet::cloud::Compute>,
}

impl Demo {
    /// Stops the operator and terminates every local instance (their agent processes).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.operator.await;
        drop(self.enrollment);
        self.kubelet.shutdown().await;
        if let Ok(instances) = self
            .compute
            .describe_instances(&ec2_kubelet::cloud::InstanceFilter::Cluster)
            .await
        {
            let ids: Vec<String> = instances.into_iter().map(|i| i.instance_id).collect();
            let _ = self.compute.terminate_instances(&ids).await;
        }
        self.cluster.shutdown().await;
    }
}

/// Runs the demo until the sample pool is Ready and the sample pods run on their own
/// instances, printing both; the caller decides how long it lives.
pub async fn start(options: &DemoOptions) -> Result<Demo, String> {
    let (cluster, client) = match &options.control_plane {
        Some(binary) => {
            let dir = options.state_dir.join("control-plane");
            let control_plane =
                ControlPlane::start(binary, &dir, options.listen, &options.kubeconfig).await?;
            let kubeconfig =
                kube::config::Kubeconfig::read_from(&options.kubeconfig).map_err(|e| e.to_string())?;
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let client = ec2_kubelet::operator::client(config).map_err(|e| e.to_string())?;
            install_crds(&client).await?;
            (Cluster::Real(control_plane), client)
        }
        None => {
            let cluster_options = DevClusterOptions {
                address: options.listen,
                ..DevClusterOptions::default()
            };
            let cluster = DevCluster::start(cluster_options)
                .await
                .map_err(|e| format!("starting the dev cluster on {}: {e}", options.listen))?;
            let store = cluster.store();
            for definition in ec2_kubelet::crd::crds() {
                let object = serde_json::to_value(&definition).map_err(|e| e.to_string())?;
                store
                    .create_builtin("apiextensions.k8s.io", "customresourcedefinitions", None, object)
                    .map_err(|e| e.message)?;
            }
            cluster
                .write_kubeconfig(&options.kubeconfig)
                .map_err(|e| format!("writing {}: {e}", options.kubeconfig.display()))?;
            let client = cluster.client();
            (Cluster::Dev(cluster), client)
        }
    };
    let mut config = OperatorConfig {
        local: ec2_kubelet::config::LocalConfig {
            state_dir: Some(options.state_dir.clone()),
            agent_binary: None,
            imds_endpoint: None,
        },
        ..OperatorConfig::default()
    };
    // Port 0 picks a free port now: nodes must publish the real one.
    let mut kubelet_address = options.kubelet;
    if kubelet_address.port() == 0 {
        let probe =
            std::net::TcpListener::bind(kubelet_address).map_err(|e| format!("{kubelet_address}: {e}"))?;
        kubelet_address = probe.local_addr().map_err(|e| e.to_string())?;
    }
    config.server.kubelet_address = kubelet_address.to_string();
    // Serving certificates from the cluster's CSR signer on the real control plane; the dev
    // cluster has none.
    if matches!(cluster, Cluster::Dev(_)) {
        config.server.kubelet_serving.mode = ec2_kubelet::config::KubeletServingMode::SelfSigned;
    }
    // Agents enroll on loopback.
    config.server.enroll_address = "127.0.0.1:0".into();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::from_value(json!({"metadata": {"name": config.namespace}})).map_err(|e| e.to_string())?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .map_err(|e| e.to_string())?;
    let kind = match &cluster {
        Cluster::Dev(_) => "dev cluster: ",
        Cluster::Real(_) => "Kubernetes:  ",
    };
    println!(
        "{kind} {} (kubeconfig {})",
        cluster.url(),
        options.kubeconfig.display()
    );

    let compute = ec2_kubelet::operator::compute(&config).await?;
    let (ctx, enrollment) = ec2_kubelet::operator::context(
        client.clone(),
        compute.clone(),
        config,
        &ec2_kubelet::operator::identity(),
    )
    .await?;
    let kubelet = ec2_kubelet::operator::start_kubelet(ctx.clone()).await?;
    let (stop, stopped) = watch::channel(false);
    let operator = tokio::spawn(ec2_kubelet::operator::run(ctx, stopped));
    println!("operator:     running (compute backend: local)");
    println!(
        "kubelet API:  https://{} (kubectl logs, exec and port-forward)",
        kubelet.address
    );

    for file in ["template.yaml", "pool.yaml"] {
        for created in create_all(&client, &options.samples.join(file)).await? {
            println!("applied:      {created}");
        }
    }
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let pool = loop {
        let pool = pools.get("default").await.map_err(|e| e.to_string())?;
        let ready = pool.status.as_ref().map(|s| s.ready_nodes).unwrap_or(0);
        if ready >= pool.spec.nodes {
            break pool;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "pool default has {ready}/{} Ready nodes after 60 s",
                pool.spec.nodes
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = pool.status.clone().unwrap_or_default();
    println!();
    println!(
        "Ec2NodePool default: {}/{} nodes Ready",
        status.ready_nodes, pool.spec.nodes
    );
    let nodes: Api<Node> = Api::all(client.clone());
    let listed = nodes
        .list(&ListParams::default().labels("ec2-kubelet.io/pool=default"))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "{:<28} {:<8} {:<14} {:<24} VERSION",
        "NODE", "STATUS", "INTERNAL-IP", "ENI"
    );
    for node in &listed.items {
        let name = node.name_any();
        let entry = status.nodes.get(&name);
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let version = node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kubelet_version.clone())
            .unwrap_or_default();
        println!(
            "{:<28} {:<8} {:<14} {:<24} {version}",
            name,
            if ready { "Ready" } else { "NotReady" },
            entry.map(|e| e.private_ip.as_str()).unwrap_or(""),
            entry.map(|e| e.eni_id.as_str()).unwrap_or(""),
        );
    }
    println!();
    for file in ["pod.yaml", "pods.yaml"] {
        for created in create_all(&client, &options.samples.join(file)).await? {
            println!("applied:      {created}");
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let running = loop {
        let listed = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let all_running = !listed.items.is_empty()
            && listed
                .items
                .iter()
                .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        if all_running {
            break listed.items;
        }
        if tokio::time::Instant::now() > deadline {
            let phases: Vec<String> = listed
                .items
                .iter()
                .map(|p| {
                    format!(
                        "{}={}",
                        p.name_any(),
                        p.status
                            .as_ref()
                            .and_then(|s| s.phase.clone())
                            .unwrap_or_default()
                    )
                })
                .collect();
            return Err(format!(
                "the sample pods are not Running after 90 s: {}",
                phases.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let records: Api<ec2_kubelet::crd::Ec2Instance> = Api::all(client.clone());
    let records = records
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?
        .items;
    println!();
    println!(
        "{:<10} {:<8} {:<24} {:<22} {:<10} POD IP",
        "POD", "STATUS", "NODE", "INSTANCE", "TYPE"
    );
    for pod in &running {
        let uid = pod.uid().unwrap_or_default();
        let record = records.iter().find(|r| r.pod_uid() == Some(uid.as_str()));
        let record_status = record.and_then(|r| r.status.clone()).unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        println!(
            "{:<10} {:<8} {:<24} {:<22} {:<10} {}",
            pod.name_any(),
            status.phase.unwrap_or_default(),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            record_status.instance_id.unwrap_or_default(),
            record_status.instance_type.unwrap_or_default(),
            status.pod_ip.unwrap_or_default(),
        );
    }
    Ok(Demo {
        cluster,
        stop,
        operator,
        enrollment,
        kubelet,
        compute,
    })
}
