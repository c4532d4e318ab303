//! `ec2-kubelet demo`: the main job on the embedded default, with no AWS account and no
//! cluster. A dev cluster, the operator on the `local` backend, and the sample templates and
//! pool and pods from `config/samples/`; prints the virtual nodes once they are Ready and the
//! pods once each runs on its own instance.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::config::OperatorConfig;
use crate::crd::Ec2NodePool;
use crate::devcluster::{DevCluster, DevClusterOptions};

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

/// A running demo: the dev cluster, the operator and its compute backend.
pub struct Demo {
    pub cluster: DevCluster,
    stop: watch::Sender<bool>,
    operator: tokio::task::JoinHandle<()>,
    kubelet: crate::kubelet::KubeletServer,
    compute: Arc<dyn crate::cloud::Compute>,
}

impl Demo {
    /// Stops the operator and terminates every local instance (their agent processes).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.operator.await;
        self.kubelet.shutdown().await;
        if let Ok(instances) = self
            .compute
            .describe_instances(&crate::cloud::InstanceFilter::Cluster)
            .await
        {
            let ids: Vec<String> = instances.into_iter().map(|i| i.instance_id).collect();
            let _ = self.compute.terminate_instances(&ids).await;
        }
        self.cluster.shutdown();
    }
}

/// Runs the demo until the sample pool is Ready and the sample pods run on their own
/// instances, printing both; the caller decides how long it lives.
pub async fn start(options: &DemoOptions) -> Result<Demo, String> {
    let cluster_options = DevClusterOptions {
        address: options.listen,
        ..DevClusterOptions::default()
    };
    let cluster = DevCluster::start(cluster_options)
        .await
        .map_err(|e| format!("starting the dev cluster on {}: {e}", options.listen))?;
    let client = cluster.client();
    let store = cluster.store();
    for definition in crate::crd::crds() {
        let object = serde_json::to_value(&definition).map_err(|e| e.to_string())?;
        store
            .create_builtin("apiextensions.k8s.io", "customresourcedefinitions", None, object)
            .map_err(|e| e.message)?;
    }
    let mut config = OperatorConfig {
        local: crate::config::LocalConfig {
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
    // Agents enroll on loopback.
    config.server.enroll_address = "127.0.0.1:0".into();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::from_value(json!({"metadata": {"name": config.namespace}})).map_err(|e| e.to_string())?;
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .write_kubeconfig(&options.kubeconfig)
        .map_err(|e| format!("writing {}: {e}", options.kubeconfig.display()))?;
    println!(
        "dev cluster:  {} (kubeconfig {})",
        cluster.url(),
        options.kubeconfig.display()
    );

    let compute = crate::operator::compute(&config).await?;
    let (ctx, _enrollment) = crate::operator::context(
        client.clone(),
        compute.clone(),
        config,
        &crate::operator::identity(),
    )
    .await?;
    let kubelet = crate::operator::start_kubelet(ctx.clone()).await?;
    let (stop, stopped) = watch::channel(false);
    let operator = tokio::spawn(crate::operator::run(ctx, stopped));
    println!("operator:     running (compute backend: local)");
    println!(
        "kubelet API:  https://{} (kubectl logs and exec)",
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
    let pool = pools.get("default").await.map_err(|e| e.to_string())?;
    let bindings = pool.status.map(|s| s.bindings).unwrap_or_default();
    println!();
    println!(
        "{:<10} {:<8} {:<24} {:<22} {:<10} POD IP",
        "POD", "STATUS", "NODE", "INSTANCE", "TYPE"
    );
    for pod in &running {
        let uid = pod.uid().unwrap_or_default();
        let binding = bindings.values().find_map(|b| b.get(&uid));
        let status = pod.status.clone().unwrap_or_default();
        println!(
            "{:<10} {:<8} {:<24} {:<22} {:<10} {}",
            pod.name_any(),
            status.phase.unwrap_or_default(),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            binding.and_then(|b| b.instance_id.clone()).unwrap_or_default(),
            binding.and_then(|b| b.instance_type.clone()).unwrap_or_default(),
            status.pod_ip.unwrap_or_default(),
        );
    }
    Ok(Demo {
        cluster,
        stop,
        operator,
        kubelet,
        compute,
    })
}
