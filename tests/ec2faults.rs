//! EC2 faults through the real aws-sdk-ec2: the operator's EC2 client (with its own retries and
//! timeouts, `aws::tune`) talks to the EC2 emulator through a proxy that answers chosen
//! actions with 500 and 503 errors, with silence, or by losing the answer to a request EC2
//! carried out. Each fault must end the way a user expects: the pod runs on exactly one
//! instance, its events say what happened, and nothing is left running after deletion.
//! (Throttling and capacity errors are in tests/pods.rs, where the pool's gate counts them.)

mod common;

use common::ec2_faults::Ec2Fault;
use ec2_kubelet::cloud::aws::AwsCompute;
use ec2_kubelet::cloud::{Compute, InstanceFilter};
use ec2_kubelet::config::Ec2ClientConfig;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

/// The live instances tagged with the pod's UID, as EC2 itself (not the proxy) lists them.
async fn instances_of(ec2: &AwsCompute, pod: &Pod) -> Vec<String> {
    let uid = pod.uid().unwrap();
    ec2.describe_instances(&InstanceFilter::Pool("pods".into()))
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state.is_alive() && i.tag(ec2_kubelet::crd::tags::POD_UID) == Some(uid.as_str()))
        .map(|i| i.instance_id)
        .collect()
}

fn count(events: &[(String, String)], reason: &str) -> usize {
    events.iter().filter(|(r, _)| r == reason).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_errors_timeouts_and_lost_answers_end_with_one_instance_per_pod() {
    let settings = Ec2ClientConfig {
        attempt_timeout_seconds: 2,
        operation_timeout_seconds: 8,
        max_attempts: 3,
    };
    let cloud = common::MotoCloud::start_behind_proxy("10.12", &settings).await;
    let proxy = cloud.proxy.as_ref().unwrap();
    let direct = AwsCompute::from_client(cloud.ec2.clone(), "test", None);
    let client = cloud.client.clone();
    let replica = common::Replica::start(
        &cloud.cluster,
        common::lifecycle_config(),
        cloud.aws.clone(),
        "replica-a",
    );
    common::create_template(
        &client,
        "general",
        json!({"imageId": cloud.image_id, "instanceTypes": ["t3.micro", "t3.medium"]}),
    )
    .await;
    common::create_pool(
        &client,
        "pods",
        json!({"nodes": 1, "subnetIds": [cloud.network.subnet_id], "securityGroupIds": [cloud.network.group_id],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let create = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let pod = common::virtual_pod(name, Some("pods"), &["sleep", "3600"], json!({}));
            pods.create(&PostParams::default(), &pod).await.unwrap()
        }
    };

    // 5xx: the SDK's three attempts of the first launch get 500, 500, 503; the pod worker
    // says so in an event and backs off; its next launch gets a 503, then gets through.
    proxy.fail("RunInstances", Ec2Fault::ServerError, 2);
    proxy.fail("RunInstances", Ec2Fault::Unavailable, 2);
    create("five-hundred").await;
    let running = common::phase_of(&pods, "five-hundred", "Running").await;
    assert_eq!(proxy.injected("RunInstances").len(), 4);
    assert_eq!(proxy.seen("RunInstances"), 5, "three attempts, then two");
    let events = common::events_of(&client, "five-hundred").await;
    assert!(
        events.iter().any(|(reason, message)| reason == "FailedLaunch"
            && message.contains("EC2 unavailable during RunInstances")
            && message.contains("retrying with backoff")),
        "{events:?}"
    );
    assert_eq!(count(&events, "LaunchedInstance"), 1, "{events:?}");
    assert_eq!(instances_of(&direct, &running).await.len(), 1);

    // Silence: three attempts that never get an answer each time out (2 s), the request fails
    // within its 8 s, the worker says so and retries; one instance in the end.
    let before = proxy.seen("RunInstances");
    proxy.fail("RunInstances", Ec2Fault::Hang, 3);
    create("silent").await;
    let running = common::phase_of(&pods, "silent", "Running").await;
    assert_eq!(proxy.injected("RunInstances").len(), 7);
    assert!(
        proxy.seen("RunInstances") - before >= 4,
        "the held attempts, then one answered"
    );
    let events = common::events_of(&client, "silent").await;
    assert!(
        events
            .iter()
            .any(|(reason, message)| reason == "FailedLaunch" && message.contains("Timeout")),
        "{events:?}"
    );
    assert_eq!(count(&events, "LaunchedInstance"), 1, "{events:?}");
    assert_eq!(instances_of(&direct, &running).await.len(), 1);

    // A lost answer: EC2 launched the instance but the answer never came; the SDK's retry
    // launches a second one (EC2 folds such a retry into the first by its ClientToken; the
    // emulator does not). The pod runs on the one it was told about, and the pool controller
    // terminates the other.
    proxy.fail("RunInstances", Ec2Fault::LoseReply, 1);
    create("lost-answer").await;
    let running = common::phase_of(&pods, "lost-answer", "Running").await;
    assert_eq!(proxy.injected("RunInstances").len(), 8);
    let recorded = common::instance_of(&client, &running).await;
    common::eventually(60, "the duplicate instance terminated", || {
        let (direct, running, recorded) = (&direct, &running, &recorded);
        async move { (instances_of(direct, running).await == [recorded.clone()]).then_some(()) }
    })
    .await;
    // The event follows the termination the test saw.
    common::wait_event(&client, "pods", "DuplicateInstancesTerminated", |message| {
        message.contains("launched again for a pod that runs on another") && !message.contains(&recorded)
    })
    .await;
    let still = pods.get("lost-answer").await.unwrap();
    assert_eq!(still.status.unwrap().phase.as_deref(), Some("Running"));

    // Deleting through a failing TerminateInstances: the pods stay Terminating until EC2
    // answers, then go, and nothing is left running.
    proxy.fail("TerminateInstances", Ec2Fault::ServerError, 4);
    for name in ["five-hundred", "silent", "lost-answer"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    common::no_pods_left(&pods, 90).await;
    assert_eq!(proxy.injected("TerminateInstances").len(), 4);
    let alive: Vec<_> = direct
        .describe_instances(&InstanceFilter::Pool("pods".into()))
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state.is_alive())
        .collect();
    assert!(alive.is_empty(), "left running: {alive:?}");
    println!(
        "ec2 faults: RunInstances seen {} times ({:?} injected), TerminateInstances seen {} ({} injected); 3 pods, 3 instances kept, 1 duplicate terminated, 0 left running",
        proxy.seen("RunInstances"),
        proxy.injected("RunInstances"),
        proxy.seen("TerminateInstances"),
        proxy.injected("TerminateInstances").len()
    );
    replica.stop().await;
}
