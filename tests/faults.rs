//! Kubernetes faults: the real operator binary against a dev cluster that answers a share of
//! the operator's requests with 500s, 429s, 409 conflicts, 410 Gone watches, dropped watches
//! and slow responses (the test's own client is spared, for a reliable view). A workload of
//! creates and deletes runs; the operator must converge to the same invariants as after the
//! crash loop, with the faults still on.
//!
//! `EC2_KUBELET_FAULT_RATE` sets the share (default 0.1); `EC2_KUBELET_FAULT_PODS` the number
//! of pods (default 12), for a longer soak.

mod common;

use std::time::{Duration, Instant};

use ec2_kubelet_testbed::devcluster::faults::{Fault, FaultOptions};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// Every node of the pool is Ready.
async fn nodes_ready(client: &kube::Client, pool: &str, expected: usize) -> Result<(), String> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={pool}", ec2_kubelet::crd::labels::POOL)))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let ready = nodes
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    if ready == expected && nodes.len() == expected {
        Ok(())
    } else {
        Err(format!("{ready} of {} nodes Ready, want {expected}", nodes.len()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_converges_through_api_server_faults() {
    let rate: f64 = common::env_or("EC2_KUBELET_FAULT_RATE", 0.1);
    let total: u32 = common::env_or("EC2_KUBELET_FAULT_PODS", 12);
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let run = common::BinaryRun::prepare(&cluster, "flaky").await;

    cluster.set_faults(FaultOptions {
        rate,
        watch_rate: Some(0.5),
        kinds: Fault::ALL.to_vec(),
        user_agent: Some(ec2_kubelet::operator::USER_AGENT.to_string()),
        slow_max: Duration::from_millis(300),
        ..Default::default()
    });
    let started = Instant::now();
    let mut operator = run.spawn();

    // The workload: pods created in bursts, a third of them deleted again while the others
    // are being launched.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut deleted = 0;
    for i in 0..total {
        let pod = common::virtual_pod(&format!("f-{i}"), Some("flaky"), &["sleep", "3600"], json!({}));
        pods.create(&PostParams::default(), &pod).await.unwrap();
        if i % 3 == 2 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            pods.delete(&format!("f-{}", i - 1), &DeleteParams::default())
                .await
                .unwrap();
            deleted += 1;
        }
    }

    // Converged with the faults still on, and after every kind of fault has struck at least
    // once (watches keep reconnecting, leases keep renewing: the rarer ones come in time).
    let deadline = Instant::now() + Duration::from_secs(150);
    let (live, launches) = loop {
        let missing: Vec<&str> = Fault::ALL
            .iter()
            .map(|f| f.name())
            .filter(|name| !cluster.injected_faults().contains_key(name))
            .collect();
        let why = match common::check_invariants(&client, &run.compute, "flaky").await {
            Ok(_) if !missing.is_empty() => format!("not yet injected: {missing:?}"),
            Ok(counts) if counts.0 == (total - deleted) as usize => {
                match nodes_ready(&client, "flaky", 2).await {
                    Ok(()) => break counts,
                    Err(why) => why,
                }
            }
            Ok((live, _)) => format!("{live} pods left, want {}", total - deleted),
            Err(why) => why,
        };
        assert!(
            Instant::now() < deadline,
            "not converged through the faults: {why}\ninjected: {:?}\noperator log:\n{}",
            cluster.injected_faults(),
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let injected = cluster.injected_faults();
    println!(
        "api-server faults: converged in {:.0} s at rate {rate} (watches 0.5); {total} pods created, {deleted} deleted, {live} Running, {launches} launched; injected {injected:?}",
        started.elapsed().as_secs_f64()
    );
    // Every running pod's status came through the faults too.
    for pod in pods.list(&Default::default()).await.unwrap() {
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "pod {} is not Ready", pod.name_any());
    }
    operator.start_kill().unwrap();
    let _ = operator.wait().await;
}
