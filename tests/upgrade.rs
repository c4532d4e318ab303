//! The upgrade from an operator that kept its bindings and warm instances in the pool's status
//! (`status.bindings`, `status.warm`): this version moves them into `Ec2Instance` records and
//! clears them, with no pod relaunched and no instance orphaned.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ec2_kubelet::crd::{Ec2Instance, Ec2NodePool, InstancePhase};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const IMAGE: &str = "ami-0123456789abcdef0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_and_warm_instances_in_the_pool_status_become_records_and_nothing_relaunches() {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (local, _instances) = common::local_compute(&dir.path().join("local"));
    common::create_general_template(&client).await;
    common::create_pool(
        &client,
        "up",
        json!({"nodes": 1, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}, "warmPool": {"size": 1}}),
    )
    .await;
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), local.clone(), "replica-a");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    // The warm instance first, so the pod launches cold and both kinds exist.
    let records: Api<Ec2Instance> = Api::all(client.clone());
    let warm = common::eventually(60, "a Ready warm instance", || async {
        common::all_records(&client)
            .await
            .into_iter()
            .find(|r| r.spec.pod.is_none() && r.phase() == Some(InstancePhase::Ready))
    })
    .await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    // A pod whose settings the warm instance does not match (another type): launched cold.
    let pod = common::virtual_pod(
        "old",
        Some("up"),
        &["sleep", "3600"],
        json!({"metadata": {"annotations": {"ec2-kubelet.io/instance-type": "t3.small"}}}),
    );
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = common::phase_of(&pods, "old", "Running").await;
    let uid = running.uid().unwrap();
    let record = common::record_of(&client, &uid).await.unwrap();
    let pod_instance = record.instance_id().unwrap().to_string();
    let warm_instance = warm.instance_id().unwrap().to_string();
    replica.kill();

    // What the previous version left: no records, the bindings and the warm set in the pool's
    // status, the instance's id on the pod.
    for record in common::all_records(&client).await {
        let unfinalize = json!({"metadata": {"finalizers": null}});
        records
            .patch(
                &record.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&unfinalize),
            )
            .await
            .unwrap();
        records
            .delete(&record.name_any(), &Default::default())
            .await
            .unwrap();
    }
    let node = running.spec.as_ref().unwrap().node_name.clone().unwrap();
    let old_status = json!({"status": {
        "bindings": {node.as_str(): {uid.as_str(): {"namespace": "default", "name": "old",
            "instanceId": pod_instance, "instanceType": "t3.small", "privateIp": "127.0.0.1",
            "phase": "Running", "launchTime": "2026-11-30T00:00:00Z"}}},
        "warm": {warm_instance.as_str(): {"instanceType": "t3.micro", "imageId": IMAGE,
            "subnetId": "subnet-0a", "securityGroupIds": ["sg-0a"],
            "agentPort": warm.spec.agent_port, "state": "Ready",
            "launchTime": "2026-11-30T00:00:00Z", "readyTime": "2026-11-30T00:00:01Z"}},
    }});
    pools
        .patch_status("up", &PatchParams::default(), &Patch::Merge(&old_status))
        .await
        .unwrap();
    let annotate = json!({"metadata": {"annotations": {"ec2-kubelet.io/instance-id": pod_instance}}});
    pods.patch("old", &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    assert!(common::all_records(&client).await.is_empty());

    // This version starts: records appear, the status forgets the bindings, nothing launches.
    let cloud = Arc::new(common::FlakyCompute::new(local.clone()));
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), cloud.clone(), "replica-b");
    common::eventually(60, "the bindings moved into records", || async {
        let pool = pools.get("up").await.ok()?;
        let status = pool.status.as_ref()?;
        (status.bindings.is_empty() && status.warm.is_empty()).then_some(())
    })
    .await;
    let moved = common::record_of(&client, &uid).await.expect("the pod's record");
    assert_eq!(moved.name_any(), uid, "named by the pod's UID");
    assert_eq!(moved.instance_id(), Some(pod_instance.as_str()));
    assert_eq!(moved.spec.node, node);
    let warm_record = common::eventually(30, "the warm instance's record", || async {
        common::all_records(&client)
            .await
            .into_iter()
            .find(|r| r.instance_id() == Some(warm_instance.as_str()))
    })
    .await;
    assert_eq!(
        warm_record.name_any(),
        format!("warm-up-{warm_instance}"),
        "{warm_record:?}"
    );
    assert!(warm_record.spec.pod.is_none());
    let events = common::events_of(&client, "up").await;
    assert!(
        events.iter().any(|(reason, message)| reason == "MovedToRecords"
            && message.contains("1 pod binding(s) and 1 warm instance(s)")),
        "{events:?}"
    );
    // The pool's counts follow from the records.
    common::eventually(10, "warmReady 1 from the records", || async {
        let pool = pools.get("up").await.ok()?;
        (pool.status?.warm_ready == 1).then_some(())
    })
    .await;

    // The pod still runs where it ran, and a second look finds the same.
    let still = common::phase_of(&pods, "old", "Running").await;
    assert_eq!(still.uid().as_deref(), Some(uid.as_str()));
    common::eventually(30, "the pod's record Running", || async {
        let record = common::record_of(&client, &uid).await?;
        (record.phase() == Some(InstancePhase::Running)).then_some(())
    })
    .await;
    let mut expected = vec![pod_instance.clone(), warm_instance.clone()];
    expected.sort();
    assert_eq!(
        common::live_instance_ids(local.as_ref()).await,
        expected,
        "no instance orphaned or added"
    );
    assert_eq!(cloud.launch_calls.load(Ordering::SeqCst), 0, "nothing relaunched");
    // And the moved warm instance serves a matching pod.
    let hot = common::virtual_pod("hot", Some("up"), &["sleep", "3600"], json!({}));
    pods.create(&PostParams::default(), &hot).await.unwrap();
    let hot = common::phase_of(&pods, "hot", "Running").await;
    let record = common::record_of(&client, &hot.uid().unwrap()).await.unwrap();
    assert_eq!(record.instance_id(), Some(warm_instance.as_str()));
    replica.stop().await;
}
