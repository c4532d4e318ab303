//! Pod lifecycle: a pod bound to a virtual node becomes its own instance (`local` backend: an
//! agent process on loopback), runs, reports status, and is cleaned up on deletion.

mod common;

use std::sync::Arc;

use common::TestCluster;
use ec2_kubelet::cloud::local::{LocalCompute, LocalOptions};
use ec2_kubelet::cloud::{Compute, InstanceFilter};
use ec2_kubelet::config::OperatorConfig;
use ec2_kubelet::crd::Ec2NodePool;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const NAMESPACE: &str = common::OPERATOR_NAMESPACE;

struct Env {
    cluster: TestCluster,
    config: OperatorConfig,
    replica: Option<common::Replica>,
    local_dir: std::path::PathBuf,
    client: Client,
    compute: Arc<LocalCompute>,
    _instances: common::LocalInstances,
    _dir: tempfile::TempDir,
}

/// A dev cluster (with its scheduler), the operator on the local backend, a template and a
/// one-node pool.
async fn start() -> Env {
    start_with(|_| {}, |local| local).await
}

/// `start`, with the operator's config adjusted and its cloud wrapped (fault injection).
async fn start_with(
    tweak: impl FnOnce(&mut OperatorConfig),
    wrap: impl FnOnce(Arc<dyn Compute>) -> Arc<dyn Compute>,
) -> Env {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::lifecycle_config();
    tweak(&mut config);
    let operator_compute = wrap(compute.clone());
    let replica = common::Replica::start(&cluster, config.clone(), operator_compute, "replica-a");

    common::create_template(
        &client,
        "general",
        json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro", "t3.medium", "m5.xlarge"],
            "instanceType": "t3.micro", "agentPort": common::free_port()}),
    )
    .await;
    common::create_pool(
        &client,
        "pods",
        json!({"nodes": 1, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
    Env {
        cluster,
        config,
        replica: Some(replica),
        local_dir: dir.path().join("local"),
        client,
        _instances: instances,
        compute,
        _dir: dir,
    }
}

/// `start_with`, the operator's cloud wrapped in a [`common::FlakyCompute`] that `arm` sets up;
/// returns it too, for the faults it counts.
async fn start_flaky(
    tweak: impl FnOnce(&mut OperatorConfig),
    arm: impl FnOnce(&common::FlakyCompute) + Send + 'static,
) -> (Env, Arc<common::FlakyCompute>) {
    let flaky: Arc<std::sync::OnceLock<Arc<common::FlakyCompute>>> = Arc::default();
    let cell = flaky.clone();
    let env = start_with(tweak, move |local| {
        let wrapped = Arc::new(common::FlakyCompute::new(local));
        arm(&wrapped);
        let _ = cell.set(wrapped.clone());
        wrapped
    })
    .await;
    let flaky = flaky.get().unwrap().clone();
    (env, flaky)
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

/// Creates a long-running pod and waits until it is Running.
async fn run_sleeper(pods: &Api<Pod>, name: &str) -> Pod {
    pods.create(
        &PostParams::default(),
        &pod(name, "sleep 3600", "Always", json!({})),
    )
    .await
    .unwrap();
    common::phase_of(pods, name, "Running").await
}

/// Waits until the pod object is gone (released by the operator).
async fn wait_gone(pods: &Api<Pod>, name: &str) {
    common::eventually(60, &format!("pod {name} released"), || {
        let pods = pods.clone();
        let name = name.to_string();
        async move { pods.get_opt(&name).await.ok()?.is_none().then_some(()) }
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
    let record = common::record_of(&env.client, &running.uid().unwrap())
        .await
        .expect("the pod's Ec2Instance record");
    assert_eq!(
        record.metadata.name, running.metadata.uid,
        "named by the pod's UID"
    );
    assert_eq!(record.instance_id(), Some(instance.instance_id.as_str()));
    assert_eq!(record.phase(), Some(ec2_kubelet::crd::InstancePhase::Running));
    assert_eq!(record.spec.pool, "pods");
    assert_eq!(record.spec.pod.as_ref().unwrap().name, "web");
    assert_eq!(
        record.finalizers(),
        [ec2_kubelet::crd::INSTANCE_FINALIZER.to_string()]
    );
    let container = &status.container_statuses.unwrap()[0];
    assert!(container.ready && container.state.as_ref().unwrap().running.is_some());
    // The scheduler's event and ours (recorded before the pod was handed to its agent).
    for reason in ["Scheduled", "LaunchedInstance"] {
        common::wait_event(&env.client, "web", reason, |_| true).await;
    }

    pods.delete("web", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "web").await;
    assert!(
        live_instances(&env.compute).await.is_empty(),
        "the instance is terminated"
    );
    assert!(
        common::all_records(&env.client).await.is_empty(),
        "the record is gone"
    );

    // What /metrics says about that lifecycle.
    let replica = env.replica.take().unwrap();
    let server = ec2_kubelet::metrics::serve_metrics("127.0.0.1:0", replica.metrics.clone())
        .await
        .unwrap();
    let (status, text) = common::http_get(server.address, "/metrics").await;
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert_eq!(
        value(r#"ec2_kubelet_cloud_calls_total{action="RunInstances",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"ec2_kubelet_cloud_calls_total{action="TerminateInstances",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"ec2_kubelet_pod_launch_duration_seconds_count{pool="pods"}"#),
        1.0
    );
    assert!(value(r#"ec2_kubelet_pod_launch_duration_seconds_sum{pool="pods"}"#) > 0.0);
    assert!(value(r#"ec2_kubelet_reconciles_total{controller="pool"}"#) >= 1.0);
    assert_eq!(value(r#"ec2_kubelet_nodes_ready{pool="pods"}"#), 1.0);
    assert!(value("ec2_kubelet_pod_status_writes_total") >= 1.0);
    assert!(
        !text.contains("ec2_kubelet_cloud_throttled_total{"),
        "nothing was throttled"
    );
    server.shutdown().await;
    replica.stop().await;
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

    common::phase_of(&pods, "ok", "Succeeded").await;
    let broken = common::phase_of(&pods, "broken", "Failed").await;
    let terminated = broken.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 1);
    let bad = common::phase_of(&pods, "bad", "Failed").await;
    let status = bad.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InvalidLaunchSettings"));
    assert!(
        status
            .message
            .unwrap()
            .starts_with("ec2-kubelet.io/instance-type: m5.24xlarge is not allowed by the template"),
    );
    // What a user sees in `kubectl describe pod`: the reason, the annotation and the event.
    let described = common::kubectl(&env.cluster, &["describe", "pod", "bad"]).await;
    for expected in [
        "Status:           Failed",
        "Reason:           InvalidLaunchSettings",
        "Warning  InvalidLaunchSettings",
        "ec2-kubelet.io/instance-type: m5.24xlarge",
    ] {
        assert!(
            described.contains(expected),
            "{expected:?} missing from:\n{described}"
        );
    }
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_instances_are_terminated_and_other_clusters_are_never_touched() {
    let mut env = start().await;
    let other = Arc::new(
        LocalCompute::new(LocalOptions {
            cluster: "other".into(),
            dir: env.local_dir.clone(),
            agent_binary: ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent"),
            imds_endpoint: None,
        })
        .unwrap(),
    );
    let _other_instances = common::LocalInstances(other.clone());
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
    // The event follows the termination the test saw.
    common::wait_event(&env.client, "pods", "OrphanInstancesTerminated", |m| {
        m.contains(&ghost.instance_id)
    })
    .await;
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_operator_comes_back_to_the_same_instance_and_still_cleans_up() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    run_sleeper(&pods, "steady").await;
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
    common::phase_of(&pods, "steady", "Running").await;
    let after = live_instances(&env.compute).await;
    assert_eq!(
        after.iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
        before.iter().map(|i| &i.instance_id).collect::<Vec<_>>(),
        "nothing launched twice"
    );
    pods.delete("steady", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "steady").await;
    assert!(live_instances(&env.compute).await.is_empty(), "nothing leaks");
    env.replica.take().unwrap().stop().await;
}

/// Reasons and messages of the events about an object.
/// Every instance ever launched for a pod UID, terminated ones included.
async fn launched_for(compute: &LocalCompute, uid: &str) -> Vec<ec2_kubelet::cloud::Instance> {
    compute
        .describe_instances(&InstanceFilter::Cluster)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.tag(ec2_kubelet::crd::tags::POD_UID) == Some(uid))
        .collect()
}

/// Replaces the (dead) replica with a new one once the old one's leases expire.
fn restart(env: &mut Env, identity: &str) {
    if let Some(replica) = env.replica.take() {
        replica.kill();
    }
    let compute: Arc<dyn Compute> = env.compute.clone();
    env.replica = Some(common::Replica::start(
        &env.cluster,
        env.config.clone(),
        compute,
        identity,
    ));
}

/// Creates a sleeper pod `name` with fault point `point` armed for it, waits until its launch
/// stops there, and kills the replica: a crash at exactly that step. Returns the pod's UID.
async fn crash_at(env: &mut Env, point: &str, name: &str) -> String {
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    let reached = ec2_kubelet::faults::arm(point, &format!("default/{name}"));
    let created = pods
        .create(
            &PostParams::default(),
            &pod(name, "sleep 3600", "Always", json!({})),
        )
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), reached)
        .await
        .expect("the launch reaches the fault point")
        .unwrap();
    env.replica.take().unwrap().kill();
    created.uid().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_launch_and_record_and_between_terminate_and_release_leak_nothing() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());

    // 1. The operator dies right after RunInstances returned, before the record has the
    //    instance.
    let uid = crash_at(&mut env, ec2_kubelet::faults::POD_LAUNCHED, "crashy").await;
    let record = common::record_of(&env.client, &uid)
        .await
        .expect("the record was written first");
    assert_eq!(
        record.status, None,
        "the crash came before the record had the instance"
    );
    assert_eq!(launched_for(&env.compute, &uid).await.len(), 1);

    restart(&mut env, "replica-b");
    common::phase_of(&pods, "crashy", "Running").await;
    let instances = launched_for(&env.compute, &uid).await;
    assert_eq!(instances.len(), 1, "launched exactly once: {instances:?}");
    let record = common::record_of(&env.client, &uid).await.unwrap();
    assert_eq!(record.instance_id(), Some(instances[0].instance_id.as_str()));

    // 2. The operator dies right after TerminateInstances, before the record goes and the pod
    //    is released.
    let terminated = ec2_kubelet::faults::arm(ec2_kubelet::faults::POD_TERMINATED, "default/crashy");
    pods.delete("crashy", &DeleteParams::default()).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), terminated)
        .await
        .expect("the deletion reaches the fault point")
        .unwrap();
    env.replica.take().unwrap().kill();
    assert!(live_instances(&env.compute).await.is_empty());
    let stuck = pods.get("crashy").await.unwrap();
    assert!(
        stuck.metadata.deletion_timestamp.is_some(),
        "the pod is still Terminating"
    );

    restart(&mut env, "replica-c");
    wait_gone(&pods, "crashy").await;
    assert!(
        common::record_of(&env.client, &uid).await.is_none(),
        "the record is gone"
    );
    assert_eq!(
        launched_for(&env.compute, &uid).await.len(),
        1,
        "nothing launched after the restarts"
    );
    assert!(live_instances(&env.compute).await.is_empty(), "nothing leaks");
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_cut_short_before_the_instance_booted_is_completed_not_repeated() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    // The operator dies inside the launch: the instance is recorded, its agent not started.
    let uid = crash_at(&mut env, ec2_kubelet::faults::LOCAL_INSTANCE_RECORDED, "halfway").await;
    let interrupted = launched_for(&env.compute, &uid).await;
    assert_eq!(interrupted.len(), 1);
    assert!(!interrupted[0].state.is_alive(), "{interrupted:?}");

    // The next replica's retry completes that launch: the same instance, booted.
    restart(&mut env, "replica-b");
    let running = common::phase_of(&pods, "halfway", "Running").await;
    let instances = launched_for(&env.compute, &uid).await;
    assert_eq!(instances.len(), 1, "launched exactly once: {instances:?}");
    assert_eq!(instances[0].instance_id, interrupted[0].instance_id);
    assert_eq!(
        common::instance_of(&env.client, &running).await,
        interrupted[0].instance_id
    );

    // The operator dies a moment later in the launch: the agent runs, the record has no pid
    // yet. The agent wrote its own pid before it ran, so the instance is alive and adopted.
    let uid = crash_at(&mut env, ec2_kubelet::faults::LOCAL_AGENT_STARTED, "later").await;
    let booted = launched_for(&env.compute, &uid).await;
    assert_eq!(booted.len(), 1);
    assert!(booted[0].state.is_alive(), "{booted:?}");
    restart(&mut env, "replica-c");
    common::phase_of(&pods, "later", "Running").await;
    let instances = launched_for(&env.compute, &uid).await;
    assert_eq!(instances.len(), 1, "launched exactly once: {instances:?}");
    assert_eq!(instances[0].instance_id, booted[0].instance_id);
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_makes_its_pod_unready_then_lost_and_a_vanished_instance_fails_its_pod() {
    let mut env = start_with(
        |config| {
            config.sync.agent_unreachable_seconds = 1;
            config.sync.agent_lost_seconds = 6;
        },
        |local| local,
    )
    .await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    for name in ["frozen", "vanished"] {
        pods.create(
            &PostParams::default(),
            &pod(name, "sleep 3600", "Always", json!({})),
        )
        .await
        .unwrap();
    }
    let frozen = common::phase_of(&pods, "frozen", "Running").await;
    let vanished = common::phase_of(&pods, "vanished", "Running").await;
    let frozen_id = common::instance_of(&env.client, &frozen).await;
    let vanished_id = common::instance_of(&env.client, &vanished).await;

    // Freeze one agent (the process lives, it answers nothing): Ready=False, then InstanceLost.
    let record: Value = serde_json::from_slice(
        &std::fs::read(env.local_dir.join("instances").join(format!("{frozen_id}.json"))).unwrap(),
    )
    .unwrap();
    let pid = record["agent_pid"].as_i64().unwrap() as i32;
    // SAFETY: stopping the agent process this test's cloud started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    common::eventually(30, "frozen to turn Ready=False (AgentUnreachable)", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("frozen").await.ok()?;
            let conditions = pod.status?.conditions?;
            conditions
                .iter()
                .any(|c| {
                    c.type_ == "Ready"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("AgentUnreachable")
                })
                .then_some(())
        }
    })
    .await;
    let lost = common::phase_of(&pods, "frozen", "Failed").await;
    assert_eq!(lost.status.unwrap().reason.as_deref(), Some("InstanceLost"));

    // Terminate the other pod's instance behind the operator's back: InstanceLost at once.
    env.compute
        .terminate_instances(std::slice::from_ref(&vanished_id))
        .await
        .unwrap();
    let lost = common::phase_of(&pods, "vanished", "Failed").await;
    let status = lost.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InstanceLost"));
    assert!(
        status.message.as_deref().unwrap().contains(&vanished_id),
        "{status:?}"
    );
    let ready = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");

    // Neither instance is left running (each is terminated after its pod's status says
    // InstanceLost), and neither pod is relaunched.
    common::eventually(30, "both lost instances terminated", || {
        let compute = env.compute.clone();
        async move { live_instances(&compute).await.is_empty().then_some(()) }
    })
    .await;
    for name in ["frozen", "vanished"] {
        let reasons: Vec<String> = common::events_of(&env.client, name)
            .await
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert!(reasons.iter().any(|r| r == "InstanceLost"), "{name}: {reasons:?}");
        assert_eq!(
            reasons.iter().filter(|r| *r == "LaunchedInstance").count(),
            1,
            "{name}: {reasons:?}"
        );
    }
    let reasons: Vec<String> = common::events_of(&env.client, "frozen")
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(reasons.iter().any(|r| r == "AgentUnreachable"), "{reasons:?}");
    // Deleting the failed pods releases them.
    for name in ["frozen", "vanished"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    common::no_pods_left(&pods, 60).await;
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_reaches_running_fails_its_pod_once_and_is_terminated() {
    let (mut env, flaky) = start_flaky(
        |config| {
            config.sync.agent_unreachable_seconds = 2;
            config.sync.agent_lost_seconds = 5;
        },
        |flaky| flaky.never_running.store(1, std::sync::atomic::Ordering::SeqCst),
    )
    .await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    pods.create(
        &PostParams::default(),
        &pod("stuck", "sleep 3600", "Always", json!({})),
    )
    .await
    .unwrap();
    let failed = common::phase_of(&pods, "stuck", "Failed").await;
    let status = failed.status.clone().unwrap();
    assert_eq!(status.reason.as_deref(), Some("InstanceLost"));
    let stuck = flaky.stuck.lock().unwrap()[0].clone();
    let message = status.message.unwrap();
    assert!(
        message.contains(&format!(
            "instance {} never reached running: still pending after 5 s",
            stuck.instance_id
        )),
        "{message}"
    );
    common::eventually(30, "the pending instance terminated", || {
        let flaky = flaky.clone();
        async move {
            (flaky.stuck.lock().unwrap()[0].state == ec2_kubelet::cloud::InstanceState::Terminated)
                .then_some(())
        }
    })
    .await;
    let events = common::events_of(&env.client, "stuck").await;
    let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "LaunchedInstance").count(),
        1,
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "InstanceLost" && m.contains("never reached running")),
        "{events:?}"
    );
    // Failed is final: the pod is not relaunched; its controller would replace it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(flaky.launch_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(live_instances(&env.compute).await.is_empty());
    pods.delete("stuck", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "stuck").await;
    env.replica.take().unwrap().stop().await;
}

/// A container's state in the pod's status, by name.
fn container_state(pod: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)?
        .state
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_agent_connection_resumes_the_status_stream_without_relaunching_anything() {
    let (mut env, flaky) = start_flaky(
        |_| {},
        |flaky| {
            flaky
                .relay_agents
                .store(true, std::sync::atomic::Ordering::SeqCst)
        },
    )
    .await;
    let marker = env.local_dir.join("side-may-exit");
    let mut spec = pod("cut", "sleep 3600", "Never", json!({}));
    let side: k8s_openapi::api::core::v1::Container = serde_json::from_value(json!({
        "name": "side", "image": "local/shell",
        "command": ["/bin/sh", "-c", format!("while [ ! -e {} ]; do sleep 0.2; done; exit 3", marker.display())],
    }))
    .unwrap();
    spec.spec.as_mut().unwrap().containers.push(side);
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    pods.create(&PostParams::default(), &spec).await.unwrap();
    let running = common::eventually(60, "both containers running", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("cut").await.ok()?;
            let both = ["main", "side"]
                .iter()
                .all(|c| container_state(&pod, c).is_some_and(|s| s.running.is_some()));
            both.then_some(pod)
        }
    })
    .await;
    let started = |pod: &Pod| container_state(pod, "main").and_then(|s| s.running?.started_at);
    let main_started = started(&running).expect("main's start time");
    let instance = common::instance_of(&env.client, &running).await;

    // Cut the network between the operator and the agent, then let a container exit: the
    // exit reaches the pod's status through the stream the operator opens again.
    let cut = flaky.relays.lock().unwrap()[&instance].cut();
    assert!(cut >= 1, "the operator's connection to the agent was open");
    std::fs::write(&marker, b"").unwrap();
    let exited = common::eventually(30, "side's exit in the pod's status", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("cut").await.ok()?;
            let terminated = container_state(&pod, "side")?.terminated?;
            (terminated.exit_code == 3).then_some(pod)
        }
    })
    .await;
    assert!(
        flaky.relays.lock().unwrap()[&instance].open() >= 1,
        "the operator reconnected"
    );
    // The other container ran on untouched; nothing was launched or handed over twice.
    assert_eq!(started(&exited), Some(main_started));
    let main = exited
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "main")
        .unwrap()
        .clone();
    assert_eq!(main.restart_count, 0);
    assert_eq!(exited.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(flaky.launch_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(live_instances(&env.compute).await.len(), 1);
    let events = common::events_of(&env.client, "cut").await;
    assert_eq!(
        events.iter().filter(|(r, _)| r == "LaunchedInstance").count(),
        1,
        "{events:?}"
    );
    let pool = ec2_kubelet::metrics::PoolLabels { pool: "pods".into() };
    let metrics = &env.replica.as_ref().unwrap().metrics;
    assert!(
        metrics.agent_reconnects.get_or_create(&pool).get() >= 1,
        "the reconnect is counted"
    );
    pods.delete("cut", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "cut").await;
    assert!(live_instances(&env.compute).await.is_empty());
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_types_follow_annotation_template_and_requests_and_survive_capacity_and_throttling() {
    let (mut env, flaky) = start_flaky(
        |_| {},
        |flaky| {
            flaky.no_capacity.lock().unwrap().push("t3.medium".into());
            flaky
                .throttle_launches
                .store(2, std::sync::atomic::Ordering::SeqCst);
        },
    )
    .await;
    common::create_template(
        &env.client,
        "compute",
        json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["c5.xlarge"],
            "agentPort": common::free_port()}),
    )
    .await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    let cases = [
        // 1500m / 3Gi fits t3.medium first, but EC2 has no capacity for it: the next that fits.
        ("sized", json!({}), "m5.xlarge"),
        (
            "annotated",
            json!({"ec2-kubelet.io/instance-type": "m5.xlarge"}),
            "m5.xlarge",
        ),
        (
            "templated",
            json!({"ec2-kubelet.io/template": "compute"}),
            "c5.xlarge",
        ),
    ];
    for (name, annotations, _) in &cases {
        pods.create(
            &PostParams::default(),
            &pod(name, "sleep 3600", "Always", annotations.clone()),
        )
        .await
        .unwrap();
    }
    for (name, _, expected) in &cases {
        let running = common::phase_of(&pods, name, "Running").await;
        let id = common::instance_of(&env.client, &running).await;
        let instance = env
            .compute
            .describe_instances(&InstanceFilter::Ids(vec![id]))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(&instance.instance_type, expected, "{name}");
    }
    let events = common::events_of(&env.client, "sized").await;
    assert!(
        events
            .iter()
            .any(|(reason, message)| reason == "InsufficientInstanceCapacity"
                && message.contains("no capacity for t3.medium; trying m5.xlarge")),
        "{events:?}"
    );
    // Two throttled launches were retried behind the pool's gate; one instance per pod.
    let calls = flaky.launch_calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        calls,
        3 + 2 + 1,
        "3 pods, 2 throttled retries, 1 capacity fallback"
    );
    let pool = ec2_kubelet::metrics::PoolLabels { pool: "pods".into() };
    let metrics = &env.replica.as_ref().unwrap().metrics;
    assert_eq!(
        metrics.throttled.get_or_create(&pool).get(),
        2,
        "throttling is counted"
    );
    assert_eq!(live_instances(&env.compute).await.len(), 3);
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_backend_runs_a_pod_against_the_ec2_emulator() {
    let cloud = common::MotoCloud::start("10.11").await;
    let (cluster, client, aws) = (&cloud.cluster, cloud.client.clone(), cloud.aws.clone());
    let (network, image_id, agents) = (&cloud.network, &cloud.image_id, &cloud.agents);
    let replica = common::Replica::start(cluster, common::lifecycle_config(), aws.clone(), "replica-a");
    common::create_template(
        &client,
        "general",
        json!({"imageId": image_id, "instanceTypes": ["t3.micro", "t3.medium", "m5.xlarge"]}),
    )
    .await;
    common::create_pool(
        &client,
        "pods",
        json!({"nodes": 1, "subnetIds": [network.subnet_id], "securityGroupIds": [network.group_id],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;

    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let created = pods
        .create(
            &PostParams::default(),
            &pod("cloud", "echo hello from EC2; sleep 3600", "Always", json!({})),
        )
        .await
        .unwrap();
    let running = common::phase_of(&pods, "cloud", "Running").await;
    let status = running.status.clone().unwrap();
    let id = common::instance_of(&client, &running).await;
    let instance = aws
        .describe_instances(&InstanceFilter::Ids(vec![id.clone()]))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(instance.instance_type, "t3.medium", "sized from the requests");
    assert_eq!(
        instance.tag(ec2_kubelet::crd::tags::POD_UID),
        created.uid().as_deref()
    );
    let pod_ip = status.pod_ip.clone().unwrap();
    assert!(
        pod_ip.starts_with("10.11.1."),
        "the instance's private IP: {pod_ip}"
    );
    assert_eq!(Some(pod_ip.clone()), instance.private_ip);
    assert!(status.host_ip.as_deref().unwrap().starts_with("10.11.1."));
    assert_eq!(agents.lock().unwrap().len(), 1, "one agent, for the one instance");

    // What a user sees: the node and the IP.
    let node = running.spec.as_ref().unwrap().node_name.clone().unwrap();
    let wide = common::kubectl(cluster, &["get", "pod", "cloud", "-o", "wide", "--no-headers"]).await;
    let columns: Vec<&str> = wide.split_whitespace().collect();
    assert_eq!(columns[0], "cloud", "{wide}");
    assert_eq!(columns[2], "Running", "{wide}");
    assert!(columns.contains(&pod_ip.as_str()), "{wide}");
    assert!(columns.contains(&node.as_str()), "{wide}");

    pods.delete("cloud", &DeleteParams::default()).await.unwrap();
    wait_gone(&pods, "cloud").await;
    let after = aws
        .describe_instances(&InstanceFilter::Ids(vec![id]))
        .await
        .unwrap();
    assert!(after.iter().all(|i| !i.state.is_alive()), "{after:?}");
    assert_eq!(aws.calls.get("RunInstances"), 1);
    assert_eq!(aws.calls.get("TerminateInstances"), 1);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_are_coalesced_per_pod_within_the_window() {
    use ec2_kubelet::pod::writer::StatusWriter;
    let cluster = common::operator_cluster(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut created = Vec::new();
    for name in ["a", "b"] {
        created.push(
            pods.create(&PostParams::default(), &pod(name, "true", "Always", json!({})))
                .await
                .unwrap(),
        );
    }
    let writes = prometheus_client::metrics::counter::Counter::<u64>::default();
    // The writer goes through the fault proxy, which records every request it makes.
    cluster.proxy().record();
    let writer_client = kube::Client::try_from(cluster.operator_config()).unwrap();
    let (writer, handle) = StatusWriter::start(
        writer_client,
        std::time::Duration::from_millis(300),
        writes.clone(),
    );
    // Ten reports for "a" and two for "b" within the window: one write each, the last wins.
    for n in 0..10 {
        writer.send(
            &created[0],
            json!({"message": format!("report {n}"), "phase": "Running"}),
        );
    }
    writer.send(&created[1], json!({"message": "first"}));
    writer.send(&created[1], json!({"reason": "Kept"}));
    drop(writer);
    handle.await.unwrap();

    let a = pods.get("a").await.unwrap();
    let b = pods.get("b").await.unwrap();
    let status_a = a.status.clone().unwrap();
    assert_eq!(status_a.message.as_deref(), Some("report 9"));
    assert_eq!(status_a.phase.as_deref(), Some("Running"));
    let status_b = b.status.clone().unwrap();
    assert_eq!(status_b.message.as_deref(), Some("first"), "merged, not replaced");
    assert_eq!(status_b.reason.as_deref(), Some("Kept"));
    let written: Vec<(String, String, u16)> = cluster
        .proxy()
        .exchanges()
        .into_iter()
        .map(|e| (e.verb, e.resource, e.status))
        .collect();
    let status_patch = ("patch".to_string(), "pods/status".to_string(), 200);
    assert_eq!(
        written,
        vec![status_patch.clone(), status_patch],
        "one write per pod"
    );
    assert_eq!(writes.get(), 2, "the writes metric counts them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_pool_releases_its_pods_and_terminates_their_instances() {
    let mut env = start().await;
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    run_sleeper(&pods, "tenant").await;
    assert_eq!(live_instances(&env.compute).await.len(), 1);
    Api::<Ec2NodePool>::all(env.client.clone())
        .delete("pods", &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(60, "the pool, its node and its pod gone", || {
        let (client, pods) = (env.client.clone(), pods.clone());
        async move {
            let pool_gone = Api::<Ec2NodePool>::all(client)
                .get_opt("pods")
                .await
                .ok()?
                .is_none();
            let pod_gone = pods.get_opt("tenant").await.ok()?.is_none();
            (pool_gone && pod_gone).then_some(())
        }
    })
    .await;
    assert!(
        live_instances(&env.compute).await.is_empty(),
        "no instance outlives its pool"
    );
    env.replica.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_while_the_watch_was_down_is_cleaned_up_after_the_relist() {
    // Orphan collection far away: only the pod loop itself can clean up in time.
    let mut env = start_with(|config| config.sync.orphan_grace_seconds = 3600, |local| local).await;
    // The operator reaches the API server through a relay the test can take down.
    if let Some(replica) = env.replica.take() {
        replica.stop().await;
    }
    let relay = common::relay::Relay::start(env.cluster.operator_address().to_string());
    let mut through_relay = env.cluster.operator_config();
    through_relay.cluster_url = format!("http://{}", relay.address).parse().unwrap();
    let compute: Arc<dyn Compute> = env.compute.clone();
    env.replica = Some(common::Replica::start_with(
        through_relay,
        env.config.clone(),
        compute,
        "replica-b",
    ));
    let pods: Api<Pod> = Api::default_namespaced(env.client.clone());
    let running = run_sleeper(&pods, "gap").await;
    let uid = running.uid().unwrap();
    assert_eq!(live_instances(&env.compute).await.len(), 1);

    // The network drops; meanwhile the pod is deleted outright (grace 0: the object goes at
    // once). When the network is back, every watch of the operator's is answered 410 Gone, so
    // the pod watch must re-list, and the re-list no longer returns the pod.
    relay.set_down(true);
    pods.delete("gap", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("gap").await.unwrap().is_none());
    env.cluster
        .set_faults(ec2_kubelet_testbed::devcluster::faults::FaultOptions {
            watch_rate: Some(1.0),
            kinds: vec![ec2_kubelet_testbed::devcluster::faults::Fault::Gone],
            user_agent: Some(ec2_kubelet::operator::USER_AGENT.into()),
            ..Default::default()
        });
    relay.set_down(false);
    common::eventually(30, "the deleted pod's instance terminated", || {
        let compute = env.compute.clone();
        async move { live_instances(&compute).await.is_empty().then_some(()) }
    })
    .await;
    common::eventually(30, "the deleted pod's record removed", || {
        let (client, uid) = (env.client.clone(), uid.clone());
        async move { common::record_of(&client, &uid).await.is_none().then_some(()) }
    })
    .await;
    assert!(env.cluster.injected_faults().get("gone").is_some_and(|n| *n > 0));
    env.cluster.set_faults(Default::default());
    env.replica.take().unwrap().stop().await;
}
