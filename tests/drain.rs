//! Scale-down drains actively, as `kubectl drain` and Karpenter do: the node is cordoned and its
//! pods are evicted through the Eviction API, which honours PodDisruptionBudgets; an eviction
//! refused with 429 is asked again until the budget allows it. On the real control plane: its
//! API server enforces the budgets and its disruption controller keeps their status.

mod common;

use std::time::Duration;

use common::cluster::Flavour;
use ec2_kubelet::cloud::Compute;
use ec2_kubelet::crd::{Ec2NodePool, InstancePhase};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_evicts_the_nodes_pods_and_waits_for_their_disruption_budget() {
    let cluster = common::operator_cluster_on(Flavour::Real, Default::default(), &[]).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (local, _instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::lifecycle_config();
    // The drain never ends by its timeout here: only by evictions.
    config.sync.drain_timeout_seconds = 600;
    let replica = common::Replica::start(&cluster, config, local.clone(), "replica-a");
    common::create_general_template(&client).await;
    common::create_pool(
        &client,
        "drain",
        json!({"nodes": 2, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    let second = common::eventually(60, "two Ready nodes", || async {
        let listed = nodes.list(&Default::default()).await.ok()?;
        let ready: Vec<Node> = listed
            .items
            .into_iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .collect();
        (ready.len() == 2).then(|| {
            ready
                .into_iter()
                .find(|n| n.labels().get("ec2-kubelet.io/node-index").map(String::as_str) == Some("1"))
        })?
    })
    .await
    .name_any();

    // Two guarded pods on the node that goes, and a budget that lets none of them go.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for name in ["guarded-a", "guarded-b"] {
        let pod = common::virtual_pod(
            name,
            Some("drain"),
            &["sleep", "3600"],
            json!({"metadata": {"labels": {"app": "guarded"}}, "spec": {"nodeName": second}}),
        );
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }
    for name in ["guarded-a", "guarded-b"] {
        common::phase_of(&pods, name, "Running").await;
    }
    let budgets: Api<PodDisruptionBudget> = Api::default_namespaced(client.clone());
    let budget = serde_json::from_value(json!({"metadata": {"name": "guarded"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "guarded"}}}}))
    .unwrap();
    budgets.create(&PostParams::default(), &budget).await.unwrap();
    common::eventually(60, "the budget counted by the disruption controller", || async {
        let status = budgets.get("guarded").await.ok()?.status?;
        (status.current_healthy == 2 && status.disruptions_allowed == 0).then_some(())
    })
    .await;

    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    pools
        .patch(
            "drain",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": 1}})),
        )
        .await
        .unwrap();
    // Refused by the API server (429), told in an event, asked again; the pods run on.
    common::wait_event(&client, "drain", "EvictionRefused", |m| {
        m.contains(&second) && m.contains("default/guarded-a") && m.contains("disruption budget")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in ["guarded-a", "guarded-b"] {
        let pod = pods.get(name).await.unwrap();
        assert!(pod.metadata.deletion_timestamp.is_none(), "{name} was evicted");
    }
    let node = nodes.get(&second).await.unwrap();
    assert_eq!(node.spec.unwrap().unschedulable, Some(true), "cordoned");

    // The budget allows one disruption: exactly one pod goes, the other waits.
    budgets
        .patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
        )
        .await
        .unwrap();
    common::wait_event(&client, "drain", "EvictedPods", |m| m.contains(&second)).await;
    let remaining = common::eventually(60, "one guarded pod evicted and released", || async {
        let listed = pods.list(&Default::default()).await.ok()?;
        let names: Vec<String> = listed.items.iter().map(|p| p.name_any()).collect();
        (names.len() == 1).then(|| names[0].clone())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pods.get(&remaining)
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none(),
        "the budget holds the last one"
    );

    // The budget goes: the last pod is evicted, the node and its ENI removed, nothing leaks.
    budgets.delete("guarded", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the node removed", || async {
        nodes.get_opt(&second).await.ok()?.is_none().then_some(())
    })
    .await;
    common::no_pods_left(&pods, 30).await;
    common::eventually(
        30,
        "every pod instance terminated and its record gone",
        || async {
            let records = common::all_records(&client).await;
            let running = records
                .iter()
                .filter(|r| r.phase() == Some(InstancePhase::Running))
                .count();
            let instances = local
                .describe_instances(&ec2_kubelet::cloud::InstanceFilter::Cluster)
                .await
                .ok()?;
            (running == 0 && instances.iter().all(|i| !i.state.is_alive())).then_some(())
        },
    )
    .await;
    let events = common::events_of(&client, "drain").await;
    assert!(
        !events.iter().any(|(reason, _)| reason == "DrainTimeout"),
        "{events:?}"
    );
    replica.stop().await;
}
