//! The `sim` compute backend and the benchmark binary: the simulator behaves like EC2 (boot
//! latency, token buckets, capacity errors, idempotent launches) and its agents speak the real
//! protocol; the bench runs the real operator end to end at a small size and reports exact
//! call counts. No figure here is a timing assertion: benchmarks print those.

use std::time::Duration;

use ec2_kubelet::agent_client::{Connections, for_instance};
use ec2_kubelet::cloud::{Compute, Error, LaunchRequest};
use ec2_kubelet_protocol::v1::{
    ContainerSpec, LaunchPodRequest, PingRequest, PodSpec, WatchPodStatusRequest,
};
use ec2_kubelet_testbed::sim::{Bucket, RateLimits, SimCloud, SimOptions};
use futures::StreamExt;

fn request(uid: &str) -> LaunchRequest {
    LaunchRequest {
        pod_uid: uid.into(),
        pool: "p".into(),
        node: "n".into(),
        namespace: "default".into(),
        name: uid.into(),
        instance_type: "t3.micro".into(),
        image_id: "ami-1".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_simulator_boots_throttles_and_launches_once_per_pod() {
    let tight = Bucket {
        capacity: 2.0,
        refill_per_second: 0.0,
    };
    let cloud = SimCloud::start(SimOptions {
        boot_latency: Duration::from_millis(300),
        limits: RateLimits {
            run_instances: tight,
            ..RateLimits::default()
        },
        agent_servers: 2,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let compute = cloud.compute();
    let first = compute.launch_instance(&request("a")).await.unwrap();
    // The same pod again: its live instance, not a second one (the ClientToken).
    let again = compute.launch_instance(&request("a")).await.unwrap();
    assert_eq!(first.instance_id, again.instance_id);
    // The bucket of two is empty now: EC2 answers RequestLimitExceeded.
    let throttled = compute.launch_instance(&request("b")).await.unwrap_err();
    assert!(matches!(throttled, Error::Throttled { .. }), "{throttled:?}");
    let counters = cloud.counters();
    assert_eq!(counters.of("RunInstances"), 3);
    assert_eq!(counters.throttled["RunInstances"], 1);
    assert_eq!(counters.instances_launched, 1);
    assert_eq!(counters.duplicate_launches, 0);

    // The agent answers only once the instance has booted, for the instance named in the call.
    let endpoint = compute.agent_endpoint(&first, 0).unwrap();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    let connections = Connections::default();
    let channel = connections
        .connect(&endpoint, &first.instance_id, Duration::from_secs(2))
        .await
        .unwrap();
    let mut agent = for_instance(channel.clone(), &first.instance_id);
    let booting = agent.ping(PingRequest {}).await.unwrap_err();
    assert_eq!(booting.code(), tonic::Code::Unavailable);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pong = agent.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(pong.agent_instance_id, first.instance_id);
    let mut stranger = for_instance(channel, "i-00000000000000bad");
    assert_eq!(
        stranger.ping(PingRequest {}).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );

    // A launched pod runs and streams its status; terminating the instance ends the stream.
    let spec = PodSpec {
        uid: "a".into(),
        namespace: "default".into(),
        name: "a".into(),
        containers: vec![ContainerSpec {
            name: "main".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let launched = agent
        .launch_pod(LaunchPodRequest { pod: Some(spec) })
        .await
        .unwrap()
        .into_inner();
    assert!(!launched.already_known);
    let mut stream = agent
        .watch_pod_status(WatchPodStatusRequest { pod_uid: "a".into() })
        .await
        .unwrap()
        .into_inner();
    let status = stream.next().await.unwrap().unwrap();
    assert_eq!(status.containers.len(), 1);
    assert!(status.containers[0].ready);
    assert!(cloud.timeline("a").agent_running.is_some());
    compute
        .terminate_instances(std::slice::from_ref(&first.instance_id))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(ended.is_none(), "the status stream ends with the instance");
    assert_eq!(cloud.counters().instances_running, 0);

    // Capacity errors at the configured rate.
    let scarce = SimCloud::start(SimOptions {
        capacity_error_rate: 1.0,
        agent_servers: 1,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let error = scarce.compute().launch_instance(&request("c")).await.unwrap_err();
    assert!(matches!(error, Error::InsufficientCapacity { .. }), "{error:?}");
    assert_eq!(scarce.counters().capacity_errors, 1);
}

#[test]
fn the_bench_runs_the_operator_and_counts_exactly_one_launch_and_termination_per_pod() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let output = std::process::Command::new(ec2_kubelet_testbed::binaries::binary("ec2-kubelet-bench"))
        .args([
            "--scenario",
            "burst,ceiling,warm",
            "--pods",
            "30",
            "--nodes",
            "3",
            "--warm-pods",
            "3",
            "--boot-seconds",
            "2",
            "--timeout-seconds",
            "120",
        ])
        .arg("--results")
        .arg(&results)
        .output()
        .expect("run the bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("bound -> RunInstances sent"), "{stdout}");
    assert!(stdout.contains("dev cluster writes/s"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&results)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one JSON line per scenario");
    let burst = &lines[0]["figures"];
    assert_eq!(lines[0]["scenario"], "burst");
    assert_eq!(burst["ec2_calls"]["RunInstances"], 30, "{burst}");
    assert_eq!(burst["ec2_calls"]["TerminateInstances"], 30, "{burst}");
    assert_eq!(burst["duplicate_launches"], 0);
    assert_eq!(burst["bound_to_run_instances"]["count"], 30);
    assert_eq!(burst["agent_running_to_pod_running"]["count"], 30);
    // Every write of a pod lifecycle is counted: its deletion at least.
    assert_eq!(burst["k8s_writes"]["delete pods"], 30, "{burst}");
    assert!(
        lines[1]["figures"]["devcluster_writes_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Warm vs cold: the warm pods were served without a launch, the cold ones each launched.
    assert!(stdout.contains("served warm (ClaimedWarmInstance)"), "{stdout}");
    let warm = &lines[2]["figures"];
    assert_eq!(lines[2]["scenario"], "warm");
    assert_eq!(warm["run_instances_for_warm_pods"], 0, "{warm}");
    assert_eq!(warm["run_instances_for_cold_pods"], 3, "{warm}");
    assert_eq!(warm["warm_to_running"]["count"], 3, "{warm}");
    assert_eq!(warm["cold_to_running"]["count"], 3, "{warm}");
}
