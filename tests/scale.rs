//! One pool of many pods on the real control plane: a Deployment of 200 replicas scheduled by
//! kube-scheduler onto one pool, each pod on its own (simulated) instance with its own
//! `Ec2Instance` record, while the pool object stays small and its counts follow. The
//! benchmark runs the same shape at 10,000 pods on the dev cluster (docs/performance.md).

mod common;

use std::sync::Arc;

use common::cluster::Flavour;
use ec2_kubelet::cloud::Compute;
use ec2_kubelet::crd::{Ec2NodePool, InstancePhase};
use ec2_kubelet_testbed::sim::{SimCloud, SimOptions};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const PODS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_of_200_in_one_pool_gets_200_records_and_a_small_pool() {
    let cluster = common::operator_cluster_on(Flavour::Real, Default::default(), &[]).await;
    let client = cluster.client();
    let sim = SimCloud::start(SimOptions {
        cluster: "test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let compute: Arc<dyn Compute> = Arc::new(sim.compute());
    // The simulated agents serve plain gRPC, as in the benchmark.
    let mut config = common::lifecycle_config();
    config.agent_tls.mode = ec2_kubelet::config::AgentTlsMode::Disabled;
    let replica = common::Replica::start(&cluster, config, compute, "replica-a");
    common::create_general_template(&client).await;
    common::create_pool(
        &client,
        "big",
        json!({"nodes": 4, "maxPodsPerNode": 100, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    common::eventually(90, "4 Ready nodes", || async {
        (pools.get("big").await.ok()?.status?.ready_nodes == 4).then_some(())
    })
    .await;

    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let deployment = serde_json::from_value(json!({
        "metadata": {"name": "many"},
        "spec": {
            "replicas": PODS,
            "selector": {"matchLabels": {"app": "many"}},
            "template": {
                "metadata": {"labels": {"app": "many"}},
                "spec": {
                    "nodeSelector": {"ec2-kubelet.io/pool": "big"},
                    "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
                    "containers": [{"name": "main", "image": "local/shell", "command": ["sleep", "3600"]}],
                },
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    common::eventually(240, &format!("{PODS} pods Running"), || async {
        let listed = pods.list(&Default::default()).await.ok()?;
        let running = listed
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        (running == PODS).then_some(())
    })
    .await;

    // One record per pod, each naming its own instance, Running.
    let records = common::all_records(&client).await;
    let running: Vec<&str> = records
        .iter()
        .filter(|r| r.phase() == Some(InstancePhase::Running))
        .filter_map(|r| r.instance_id())
        .collect();
    assert_eq!(running.len(), PODS, "one Running record per pod");
    let distinct: std::collections::BTreeSet<&&str> = running.iter().collect();
    assert_eq!(distinct.len(), PODS, "each on its own instance");
    assert_eq!(sim.live_pod_uids().len(), PODS);
    // The pool counts them within seconds, and stays a few KiB however many pods it runs.
    let pool = common::eventually(30, "PODS 200 in the pool's status", || async {
        let pool = pools.get("big").await.ok()?;
        (pool.status.as_ref()?.pods == PODS as i32).then_some(pool)
    })
    .await;
    let size = serde_json::to_vec(&pool).unwrap().len();
    assert!(size < 8 * 1024, "the pool object is {size} bytes");
    let table = common::kubectl(
        &cluster,
        &["get", "ec2instances", "-l", "ec2-kubelet.io/pool=big"],
    )
    .await;
    assert_eq!(table.lines().count(), PODS + 1, "{table}");

    // Scaled to zero: every pod goes, and with it every instance and record.
    deployments
        .patch(
            "many",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    common::no_pods_left(&pods, 240).await;
    common::eventually(60, "no record and no instance left", || async {
        let left = common::all_records(&client).await.len();
        (left == 0 && sim.live_pod_uids().is_empty()).then_some(())
    })
    .await;
    replica.stop().await;
}
