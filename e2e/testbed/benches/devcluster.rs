//! Throughput of the dev cluster (the API server stand-in), so it never becomes the bottleneck
//! of the operator's benchmarks: creates per second (one client, then eight concurrent ones),
//! the latency from a create to its event on 10 concurrent watches, and a large LIST.
//!
//! Run with `cargo bench --bench devcluster`; figures go to stdout.

use std::time::{Duration, Instant};

use ec2_kubelet_testbed::devcluster::{DevCluster, DevClusterOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

const SEQUENTIAL: usize = 2_000;
const CONCURRENT_CLIENTS: usize = 8;
const CONCURRENT: usize = 4_000;
const WATCHERS: usize = 10;
const FAN_OUT_CREATES: usize = 500;

fn config_map(name: &str, sent_micros: u128) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"bench/sent-micros": sent_micros.to_string()}},
        "data": {"key": "value"},
    }))
    .expect("a config map")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let options = DevClusterOptions {
        scheduler: false,
        ..DevClusterOptions::default()
    };
    let cluster = DevCluster::start(options).await.expect("start the dev cluster");
    let client = cluster.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in ["sequential", "concurrent", "fanout"] {
        let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    let origin = Instant::now();
    println!(
        "dev cluster benchmark ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "sequential");
    let started = Instant::now();
    for i in 0..SEQUENTIAL {
        maps.create(&PostParams::default(), &config_map(&format!("cm-{i}"), 0))
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "creates, 1 client:            {SEQUENTIAL} in {:.2} s = {:.0} creates/s",
        elapsed.as_secs_f64(),
        SEQUENTIAL as f64 / elapsed.as_secs_f64()
    );

    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENT_CLIENTS {
        let maps: Api<ConfigMap> = Api::namespaced(cluster.client(), "concurrent");
        tasks.push(tokio::spawn(async move {
            for i in 0..CONCURRENT / CONCURRENT_CLIENTS {
                let name = format!("cm-{worker}-{i}");
                maps.create(&PostParams::default(), &config_map(&name, 0))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "creates, {CONCURRENT_CLIENTS} clients:           {CONCURRENT} in {:.2} s = {:.0} creates/s",
        elapsed.as_secs_f64(),
        CONCURRENT as f64 / elapsed.as_secs_f64()
    );

    let fanout: Api<ConfigMap> = Api::namespaced(client.clone(), "fanout");
    let rv = fanout
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let stream = fanout.watch(&WatchParams::default(), &rv).await.unwrap();
        watchers.push(tokio::spawn(async move {
            let mut stream = stream.boxed();
            let mut latencies = Vec::with_capacity(FAN_OUT_CREATES);
            while latencies.len() < FAN_OUT_CREATES {
                if let Some(WatchEvent::Added(object)) = stream.try_next().await.unwrap() {
                    let sent: u128 = object.metadata.annotations.unwrap()["bench/sent-micros"]
                        .parse()
                        .unwrap();
                    let now = origin.elapsed().as_micros();
                    latencies.push(Duration::from_micros((now - sent) as u64));
                }
            }
            latencies
        }));
    }
    for i in 0..FAN_OUT_CREATES {
        let sent = origin.elapsed().as_micros();
        fanout
            .create(&PostParams::default(), &config_map(&format!("cm-{i}"), sent))
            .await
            .unwrap();
    }
    let mut latencies = Vec::new();
    for watcher in watchers {
        latencies.extend(watcher.await.unwrap());
    }
    latencies.sort();
    println!(
        "watch fan-out, {WATCHERS} watchers:    {} events, create->event p50 {}, p99 {}, max {}",
        latencies.len(),
        millis(percentile(&latencies, 0.5)),
        millis(percentile(&latencies, 0.99)),
        millis(*latencies.last().unwrap())
    );

    let all: Api<ConfigMap> = Api::all(client.clone());
    let started = Instant::now();
    let listed = all.list(&ListParams::default()).await.unwrap().items.len();
    println!(
        "list across namespaces:       {listed} config maps in {}",
        millis(started.elapsed())
    );
}
