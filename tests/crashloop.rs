//! The crash loop: a workload of pod creates and deletes runs while the operator process is
//! SIGKILLed at random moments and started again, over and over. At the end, with one last
//! operator left to converge, nothing may be lost, leaked or launched twice:
//! - every live pod is Running on exactly one live instance, with exactly one `Ec2Instance`
//!   record, which names that instance;
//! - every record names a pod that exists;
//! - no live instance without a pod, and no pod with more than one instance ever launched;
//! - no pod stuck Terminating.
//!
//! Bounded in CI (`EC2_KUBELET_CRASHLOOP_KILLS`, default 8); set it higher for a soak, e.g. 200.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use rand::Rng;
use serde_json::json;

struct Figures {
    kills: u32,
    created: u32,
    /// Pods whose deletion was asked for (by name).
    deleted: BTreeSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_operators_lose_nothing_leak_nothing_and_launch_nothing_twice() {
    let kills: u32 = common::env_or("EC2_KUBELET_CRASHLOOP_KILLS", 8);
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    // The test's own view of the local cloud is the same records the operators write.
    let run = common::BinaryRun::prepare(&cluster, "crash").await;

    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut figures = Figures {
        kills: 0,
        created: 0,
        deleted: BTreeSet::new(),
    };
    let mut operator = run.spawn();
    let mut next = 0u32;
    let mut rng = rand::rng();
    let started = Instant::now();
    while figures.kills < kills {
        // The operator lives a random while, during which the workload goes on: a burst of
        // creates, and deletes of random pods.
        let life = Duration::from_millis(rng.random_range(300..4000));
        let until = Instant::now() + life;
        while Instant::now() < until {
            for _ in 0..rng.random_range(1..4) {
                let name = format!("w-{next}");
                next += 1;
                let pod = common::virtual_pod(&name, Some("crash"), &["sleep", "3600"], json!({}));
                if pods.create(&PostParams::default(), &pod).await.is_ok() {
                    figures.created += 1;
                }
            }
            let live: Vec<String> = pods
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect();
            // About as many deletes as creates once a few pods run: the workload churns
            // instead of growing.
            if live.len() > 6 {
                for _ in 0..rng.random_range(1..4) {
                    let victim = &live[rng.random_range(0..live.len())];
                    if pods.delete(victim, &DeleteParams::default()).await.is_ok() {
                        figures.deleted.insert(victim.clone());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        }
        operator.start_kill().unwrap();
        let _ = operator.wait().await;
        figures.kills += 1;
        operator = run.spawn();
    }

    // The last operator converges; the invariants hold.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (live_pods, launches) = loop {
        let why = match common::check_invariants(&client, &run.compute, "crash").await {
            Ok(counts) => break counts,
            Err(why) => why,
        };
        assert!(
            Instant::now() < deadline,
            "not converged after the crash loop: {why}\noperator log:\n{}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "crash loop: {} SIGKILLs survived in {:.0} s; {} pods created, {} deleted, {} live; {} instances launched (one per pod, none twice); leaks found: 0",
        figures.kills,
        started.elapsed().as_secs_f64(),
        figures.created,
        figures.deleted.len(),
        live_pods,
        launches,
    );
    operator.start_kill().unwrap();
    let _ = operator.wait().await;
}
