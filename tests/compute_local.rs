//! The `local` compute backend: ENIs and instances that are real agent processes on loopback,
//! recorded so that a new backend (an operator restart) sees the same cloud.

mod common;

use std::time::Duration;

use ec2_kubelet::cloud::local::{LocalCompute, LocalOptions};
use ec2_kubelet::cloud::{Compute, EniRequest, Error, InstanceFilter, InstanceState, LaunchRequest};
use ec2_kubelet::crd::{TagMap, tags};
use ec2_kubelet_protocol::v1::agent_client::AgentClient;
use ec2_kubelet_protocol::v1::{ContainerSpec, LaunchPodRequest, PingRequest, PodSpec};

fn backend(dir: &std::path::Path) -> LocalCompute {
    LocalCompute::new(LocalOptions {
        cluster: "test".into(),
        dir: dir.to_path_buf(),
        agent_binary: ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent"),
        imds_endpoint: None,
    })
    .expect("local backend")
}

/// Pings the agent at `endpoint` until it answers or the deadline passes.
async fn ping(endpoint: &str, deadline: Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < until {
        if let Ok(mut client) = AgentClient::connect(endpoint.to_string()).await
            && let Ok(reply) = client.ping(PingRequest {}).await
        {
            return Some(reply.into_inner().agent_version);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn launch_request(uid: &str) -> LaunchRequest {
    LaunchRequest {
        pod_uid: uid.into(),
        pool: "p1".into(),
        node: "ip-127-0-0-1.p1".into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        instance_type: "t3.micro".into(),
        image_id: "ami-0123456789abcdef0".into(),
        subnet_id: "subnet-0a".into(),
        // A port of its own: the agent listens on the instance's 127.1.x.y address.
        agent_port: common::free_port(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enis_are_idempotent_per_pool_index_and_survive_a_new_backend() {
    let dir = tempfile::tempdir().unwrap();
    let compute = backend(dir.path());
    let request = |index| EniRequest {
        pool: "p1".into(),
        index,
        subnet_id: "subnet-0a".into(),
        security_group_ids: vec!["sg-0a".into()],
        tags: TagMap::new(),
    };
    let first = compute.ensure_eni(&request(0)).await.unwrap();
    let again = compute.ensure_eni(&request(0)).await.unwrap();
    assert_eq!(first, again, "same pool and index -> same ENI");
    let second = compute.ensure_eni(&request(1)).await.unwrap();
    assert_ne!(first.private_ip, second.private_ip);
    assert!(first.private_ip.starts_with("127."), "{}", first.private_ip);
    assert_eq!(first.tags[tags::CLUSTER], "test");
    assert_eq!(first.tags[tags::NODE_INDEX], "0");

    let restarted = backend(dir.path());
    let enis = restarted.describe_enis("p1").await.unwrap();
    assert_eq!(enis.iter().map(|e| e.index).collect::<Vec<_>>(), [0, 1]);
    restarted.delete_eni(&first.eni_id).await.unwrap();
    restarted.delete_eni(&first.eni_id).await.unwrap();
    assert_eq!(restarted.describe_enis("p1").await.unwrap(), [second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_agent_processes_launched_once_per_pod_and_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let compute = backend(dir.path());
    let request = launch_request("uid-1");
    let instance = compute.launch_instance(&request).await.unwrap();
    assert!(instance.instance_id.starts_with("i-"));
    assert_eq!(instance.tag(tags::POD_UID), Some("uid-1"));
    assert_eq!(instance.tag(tags::POD), Some("default/pod-uid-1"));
    let endpoint = compute.agent_endpoint(&instance, request.agent_port).unwrap();
    assert!(endpoint.starts_with("http://127.1."), "{endpoint}");
    assert!(
        ping(&endpoint, Duration::from_secs(20)).await.is_some(),
        "agent answers at {endpoint}"
    );

    // A second launch for the same pod returns the same instance, also from a new backend.
    let again = compute.launch_instance(&request).await.unwrap();
    assert_eq!(again.instance_id, instance.instance_id);
    let restarted = backend(dir.path());
    let again = restarted.launch_instance(&request).await.unwrap();
    assert_eq!(again.instance_id, instance.instance_id);
    let pool = restarted
        .describe_instances(&InstanceFilter::Pool("p1".into()))
        .await
        .unwrap();
    assert_eq!(pool.len(), 1);
    assert_eq!(pool[0].state, InstanceState::Running);

    // A pod on the instance whose shell forks a child: terminating the instance must leave none
    // of its processes.
    let mut client = AgentClient::connect(endpoint.clone()).await.unwrap();
    client
        .launch_pod(LaunchPodRequest {
            pod: Some(PodSpec {
                uid: "uid-1".into(),
                name: "pod-uid-1".into(),
                containers: vec![ContainerSpec {
                    name: "main".into(),
                    command: vec!["/bin/sh".into(), "-c".into(), "sleep 600; echo done".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let pid_file = dir
        .path()
        .join("instances")
        .join(&instance.instance_id)
        .join("state/pods/uid-1/containers/main/0/container.pid");
    let mut group = None;
    for _ in 0..200 {
        group = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if group.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let group = group.expect("the container started");
    // Wait until the shell has forked `sleep`: the child that outlives a killed shim.
    for _ in 0..200 {
        if ec2_kubelet_agent::stats::group_usage(group).processes >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        ec2_kubelet_agent::stats::group_usage(group).processes,
        2,
        "sh and its forked sleep"
    );

    // Terminate: the agent is gone and the instance reports terminated.
    restarted
        .terminate_instances(std::slice::from_ref(&instance.instance_id))
        .await
        .unwrap();
    assert!(
        ping(&endpoint, Duration::from_millis(500)).await.is_none(),
        "agent stopped"
    );
    let mut gone = false;
    for _ in 0..100 {
        // SAFETY: signal 0 only probes for the process group's existence.
        if unsafe { libc::kill(-group, 0) } != 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "no process of the terminated instance's container is left");
    let described = restarted
        .describe_instances(&InstanceFilter::Ids(vec![instance.instance_id.clone()]))
        .await
        .unwrap();
    assert_eq!(described[0].state, InstanceState::Terminated);
    // A launch after termination is a new instance.
    let replacement = restarted.launch_instance(&request).await.unwrap();
    assert_ne!(replacement.instance_id, instance.instance_id);
    restarted
        .terminate_instances(&[replacement.instance_id])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instance_type_is_a_permanent_error_and_the_catalogue_answers() {
    let dir = tempfile::tempdir().unwrap();
    let compute = backend(dir.path());
    let mut request = launch_request("uid-2");
    request.instance_type = "z9.huge".into();
    let error = compute.launch_instance(&request).await.unwrap_err();
    assert_eq!(
        error,
        Error::InstanceTypeNotFound {
            instance_type: "z9.huge".into()
        }
    );
    assert!(!error.is_retryable());
    let types = compute
        .instance_types(&["t3.micro".into(), "g5.xlarge".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(types.len(), 2);
    assert_eq!((types[0].vcpus, types[0].memory_mib), (2, 1024));
    assert_eq!(types[1].gpus, 1);
    assert!(
        compute
            .describe_instances(&InstanceFilter::Cluster)
            .await
            .unwrap()
            .is_empty()
    );
}
