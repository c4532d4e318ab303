//! Pod lifecycle: a pod bound to a virtual node becomes its own instance (`local` backend: an
//! agent process on loopback), runs, reports status, and is cleaned up on deletion.

mod common;

use std::sync::Arc;

use ec2_kubelet::cloud::local::{LocalCompute, LocalOptions};
use ec2_kubelet::cloud::{Compute, InstanceFilter};
use ec2_kubelet::config::OperatorConfig;
use ec2_kubelet::crd::{Ec2NodePool, Ec2PodTemplate};
use ec2_kubelet::devcluster::DevCluster;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const NAMESPACE: &str = common::OPERATOR_NAMESPACE;

/// Terminates every local instance when the test ends, even when it fails.
struct Instances(Arc<LocalCompute>);

impl Drop for Instances {
    fn drop(&mut self) {
        let compute = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(instances) = compute.describe_instances(&InstanceFilter::Cluster).await {
                    let ids: Vec<String> = instances.into_iter().map(|i| i.instance_id).collect();
                    let _ = compute.terminate_instances(&ids).await;
                }
            });
        })
        .join();
    }
}

struct Env {
    cluster: DevCluster,
    config: OperatorConfig,
    replica: Option<common::Replica>,
    local_dir: std::path::PathBuf,
    client: Client,
    compute: Arc<LocalCompute>,
    _instances: Instances,
    _dir: tempfile::TempDir,
}

/// A dev cluster (with its scheduler), the operator on the local backend, a template and a
/// one-node pool.
async fn start() -> Env {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let compute = Arc::new(
        LocalCompute::new(LocalOptions {
            cluster: "test".into(),
            dir: dir.path().join("local"),
            agent_binary: env!("CARGO_BIN_EXE_ec2-kubelet-agent").into(),
        })
        .unwrap(),
    );
    let mut config = OperatorConfig {
        cluster_name: "test".into(),
        namespace: NAMESPACE.into(),
        ..OperatorConfig::default()
    };
    config.lease.duration_seconds = 3;
    config.lease.renew_interval_seconds = 1;
    config.sync.node_status_seconds = 2;
    config.sync.agent_lost_seconds = 30;
    config.sync.pool_resync_seconds = 2;
    config.sync.orphan_grace_seconds = 1;
    let replica = common::Replica::start(&cluster, config.clone(), compute.clone(), "replica-a");

    let template: Ec2PodTemplate = serde_json::from_value(json!({
        "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2PodTemplate",
        "metadata": {"name": "general", "namespace": "default"},
        "spec": {"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro", "t3.medium", "m5.xlarge"],
            "instanceType": "t3.micro", "agentPort": common::free_port()},
    }))
    .unwrap();
    Api::<Ec2PodTemplate>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &template)
        .await
        .unwrap();
    let pool: Ec2NodePool = serde_json::from_value(json!({
        "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": "pods"},
        "spec": {"nodes": 1, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}},
    }))
    .unwrap();
    Api::<Ec2NodePool>::all(client.clone())
        .create(&PostParams::default(), &pool)
        .await
        .unwrap();
    Env {
        cluster,
        config,
        replica: Some(replica),
        local_dir: dir.path().join("local"),
        client,
        _instances: Instances(compute.clone()),
        compute,
        _dir: dir,
    }
}

fn pod(name: &str, script: &str, restart_policy: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "restartPolicy": restart_policy,
            "nodeSelector": {"type": "virtual-kubelet"},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
            "containers": [{"name": "main", "image": "local/shell", "command": ["/bin/sh", "-c", script],
                "resources": {"requests": {"cpu": "1500m", "memory": "3Gi"}}}],
        },
    }))
    .unwrap()
}

async fn phase_of(pods: &Api<Pod>, name: &str, phase: &str) -> Pod {
    common::eventually(60, &format!("pod {name} to be {phase}"), || {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.ok()?;
            (pod.status.as_ref()?.phase.as_deref() == Some(phase)).then_some(pod)
        }
    })
    .await
}

async fn live_instances(compute: &LocalCompute) -> Vec<ec2_kubelet::cloud::Instance> {
    compute
        .describe_instances(&InstanceFilter::Cluster)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state.is_alive())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_on_its_own_right_sized_instance_and_is_cleaned_up_on_delete() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    pods.create(
        &PostParams::default(),
        &pod("web", "echo hello; sleep 3600", "Always", json!({})),
    )
    .await
    .unwrap();
    let running = common::eventually(60, "pod web Running and Ready", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("web").await.ok()?;
            let status = pod.status.clone()?;
            let ready = status
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (status.phase.as_deref() == Some("Running") && ready).then_some(pod)
        }
    })
    .await;
    let status = running.status.clone().unwrap();
    let instances = live_instances(&env.compute).await;
    assert_eq!(instances.len(), 1);
    let instance = &instances[0];
    assert_eq!(
        instance.instance_type, "t3.medium",
        "the smallest allowed type with 1500m CPU and 3Gi"
    );
    assert_eq!(status.pod_ip, instance.private_ip);
    assert!(
        status.host_ip.as_deref().unwrap().starts_with("127.0."),
        "hostIP is the node ENI"
    );
    assert_eq!(
        running.annotations()["ec2-kubelet.io/instance-id"],
        instance.instance_id
    );
    let container = &status.container_statuses.unwrap()[0];
    assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
    let pool = Api::<Ec2NodePool>::all(env.client.clone())
        .get("pods")
        .await
        .unwrap();
    let bindings = pool.status.unwrap().bindings;
    let binding = bindings
        .values()
        .flat_map(|b| b.values())
        .next()
        .expect("a binding");
    assert_eq!(
        binding.instance_id.as_deref(),
        Some(instance.instance_id.as_str())
    );
    let events: Api<Event> = Api::default_namespaced(env.client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.name=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Scheduled", "Launching", "Launched", "AgentReady", "Started"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} missing from {reasons:?}"
        );
    }

    pods.delete("web", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pod object gone", || {
        let pods = pods.clone();
        async move { pods.get_opt("web").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(
        live_instances(&env.compute).await.is_empty(),
        "the instance is terminated"
    );
    let pool = Api::<Ec2NodePool>::all(env.client.clone())
        .get("pods")
        .await
        .unwrap();
    assert!(
        pool.status.unwrap().bindings.values().all(|b| b.is_empty()),
        "the binding is gone"
    );
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_end_succeeded_or_failed_and_bad_annotations_fail_only_their_pod() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    pods.create(&PostParams::default(), &pod("ok", "exit 0", "Never", json!({})))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("broken", "exit 1", "Never", json!({})),
    )
    .await
    .unwrap();
    let bad = json!({"ec2-kubelet.io/instance-type": "m5.24xlarge"});
    pods.create(&PostParams::default(), &pod("bad", "sleep 1", "Never", bad))
        .await
        .unwrap();

    phase_of(&pods, "ok", "Succeeded").await;
    let broken = phase_of(&pods, "broken", "Failed").await;
    let terminated = broken.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 1);
    let bad = phase_of(&pods, "bad", "Failed").await;
    let status = bad.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InvalidLaunchSettings"));
    assert!(
        status
            .message
            .unwrap()
            .starts_with("ec2-kubelet.io/instance-type: m5.24xlarge is not allowed by the template"),
    );
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_instances_are_terminated_and_other_clusters_are_never_touched() {
    let mut env = start().await;
    let other = Arc::new(
        LocalCompute::new(LocalOptions {
            cluster: "other".into(),
            dir: env.local_dir.clone(),
            agent_binary: env!("CARGO_BIN_EXE_ec2-kubelet-agent").into(),
        })
        .unwrap(),
    );
    let _other_instances = Instances(other.clone());
    let request = |uid: &str| ec2_kubelet::cloud::LaunchRequest {
        pod_uid: uid.into(),
        pool: "pods".into(),
        node: "ip-127-0-0-1.pods".into(),
        namespace: "default".into(),
        name: uid.into(),
        instance_type: "t3.micro".into(),
        image_id: "ami-0123456789abcdef0".into(),
        subnet_id: "subnet-0a".into(),
        agent_port: common::free_port(),
        ..Default::default()
    };
    // Ours, for a pod that does not exist; and another cluster's, in a pool of the same name.
    let ghost = env.compute.launch_instance(&request("ghost")).await.unwrap();
    let foreign = other.launch_instance(&request("foreign")).await.unwrap();
    common::eventually(60, "the orphan instance terminated", || {
        let compute = env.compute.clone();
        let id = ghost.instance_id.clone();
        async move {
            let found = compute
                .describe_instances(&InstanceFilter::Ids(vec![id]))
                .await
                .ok()?;
            found.iter().all(|i| !i.state.is_alive()).then_some(())
        }
    })
    .await;
    let theirs = other
        .describe_instances(&InstanceFilter::Ids(vec![foreign.instance_id.clone()]))
        .await
        .unwrap();
    assert!(
        theirs[0].state.is_alive(),
        "an instance without our cluster tag is never touched"
    );
    let events: Api<Event> = Api::all(env.client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.name=pods"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "OrphanInstancesTerminated"),
        "{reasons:?}"
    );
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_operator_comes_back_to_the_same_instance_and_still_cleans_up() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    pods.create(
        &PostParams::default(),
        &pod("steady", "sleep 3600", "Always", json!({})),
    )
    .await
    .unwrap();
    phase_of(&pods, "steady", "Running").await;
    let before = live_instances(&env.compute).await;
    assert_eq!(before.len(), 1);

    // Crash the operator: its leases stay held until they expire, then a new replica takes over.
    env.replica.take().unwrap().kill();
    let compute: Arc<dyn Compute> = env.compute.clone();
    env.replica = Some(common::Replica::start(
        &env.cluster,
        env.config.clone(),
        compute,
        "replica-b",
    ));
    let ownership: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), NAMESPACE);
    common::eventually(30, "the new replica to own the node", || {
        let ownership = ownership.clone();
        async move {
            let leases = ownership.list(&ListParams::default()).await.ok()?;
            let node_lease = leases.items.iter().find(|l| l.name_any().starts_with("ip-"))?;
            (node_lease.spec.as_ref()?.holder_identity.as_deref() == Some("replica-b")).then_some(())
        }
    })
    .await;
    // It re-attaches to the running pod: still exactly one instance, the same one.
    phase_of(&pods, "steady", "Running").await;
    let after = live_instances(&env.compute).await;
    assert_eq!(
        after.iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
        before.iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
        "nothing launched twice"
    );
    pods.delete("steady", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pod gone", || {
        let pods = pods.clone();
        async move { pods.get_opt("steady").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(live_instances(&env.compute).await.is_empty(), "nothing leaks");
    env.replica.take().unwrap().stop().await;
}
