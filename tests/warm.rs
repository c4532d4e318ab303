//! Warm pools: instances kept booted for a pool's pods (`spec.warmPool`), claimed by matching
//! pods without a launch, refilled in the background, replaced and recycled, re-adopted after
//! a restart, and never claimed twice (`local`, `sim` and `aws`-against-moto backends).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ec2_kubelet::cloud::{Compute, InstanceFilter, LaunchRequest};
use ec2_kubelet::crd::{Ec2Instance, Ec2NodePool, InstancePhase, tags};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const IMAGE: &str = "ami-0123456789abcdef0";

/// The template of these tests (t3.micro unless a pod asks otherwise) and a one-node pool
/// keeping `warm` warm instances of it.
async fn template_and_pool(client: &Client, subnet: &str, group: &str, image: &str, warm: serde_json::Value) {
    common::create_template(
        client,
        "general",
        json!({"imageId": image, "instanceTypes": ["t3.micro", "t3.medium"], "instanceType": "t3.micro",
            "agentPort": common::free_port()}),
    )
    .await;
    common::create_pool(
        client,
        "warm",
        json!({"nodes": 1, "subnetIds": [subnet], "securityGroupIds": [group],
            "templateRef": {"namespace": "default", "name": "general"}, "warmPool": warm}),
    )
    .await;
}

/// The pool's warm records no pod has claimed, by name.
async fn warm_records(client: &Client) -> BTreeMap<String, Ec2Instance> {
    common::all_records(client)
        .await
        .into_iter()
        .filter(|r| r.spec.pool == "warm" && r.spec.pod.is_none() && r.metadata.deletion_timestamp.is_none())
        .map(|r| (r.name_any(), r))
        .collect()
}

/// Waits until the pool has exactly `size` warm instances, all Ready in their records (and
/// the pool says so in `warmReady`), and returns their instance ids.
async fn ready_warm(pools: &Api<Ec2NodePool>, size: usize) -> BTreeSet<String> {
    let client = pools.clone().into_client();
    common::eventually(90, &format!("{size} Ready warm instances"), || {
        let client = client.clone();
        async move {
            let pool = pools.get("warm").await.ok()?;
            let status = pool.status.as_ref()?;
            let warm = warm_records(&client).await;
            let all_ready = warm.values().all(|r| r.phase() == Some(InstancePhase::Ready));
            let counted = status.warm_ready == size as i32 && status.warm_launching == 0;
            (warm.len() == size && all_ready && counted).then(|| {
                warm.values()
                    .filter_map(|r| r.instance_id().map(String::from))
                    .collect()
            })
        }
    })
    .await
}

async fn alive(compute: &dyn Compute, id: &str) -> bool {
    compute
        .describe_instances(&InstanceFilter::Ids(vec![id.to_string()]))
        .await
        .unwrap()
        .iter()
        .any(|i| i.state.is_alive())
}

/// The instance the pod's record names.
async fn instance_of(client: &Client, pod: &Pod) -> String {
    let record = common::record_of(client, &pod.uid().unwrap())
        .await
        .expect("a record");
    record.instance_id().expect("an instance").to_string()
}

async fn create_pod(pods: &Api<Pod>, name: &str, extra: serde_json::Value) -> Pod {
    pods.create(
        &PostParams::default(),
        &common::virtual_pod(name, Some("warm"), &["sleep", "3600"], extra),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_keeps_instances_ready_serves_matching_pods_and_refills() {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (local, _instances) = common::local_compute(&dir.path().join("local"));
    let cloud = Arc::new(common::FlakyCompute::new(local.clone()));
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), cloud.clone(), "replica-a");
    template_and_pool(&client, "subnet-0a", "sg-0a", IMAGE, json!({"size": 3})).await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());

    // Three instances booted and Ready, tagged as warm instances of the pool.
    let first = ready_warm(&pools, 3).await;
    assert_eq!(cloud.launch_calls.load(Ordering::SeqCst), 3);
    for id in &first {
        let instance = local
            .describe_instances(&InstanceFilter::Ids(vec![id.clone()]))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(instance.tag(tags::WARM), Some("true"), "{instance:?}");
        assert_eq!(instance.tag(tags::POOL), Some("warm"), "{instance:?}");
        assert_eq!(instance.instance_type, "t3.micro");
    }
    let table = common::kubectl(&cluster, &["get", "ec2nodepools"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let column = header.iter().position(|h| *h == "WARM").expect("a WARM column");
    assert_eq!(row[column], "3", "{table}");

    // Three matching pods take them: no launch for them, one claim event each.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut created = Vec::new();
    for name in ["hot-1", "hot-2", "hot-3"] {
        created.push(create_pod(&pods, name, json!({})).await);
    }
    let mut served = BTreeSet::new();
    for pod in &created {
        let name = pod.name_any();
        let running = common::phase_of(&pods, &name, "Running").await;
        let id = instance_of(&client, &running).await;
        assert!(first.contains(&id), "{name} runs on {id}, not a warm instance");
        let events = common::events_of(&client, &name).await;
        assert!(
            events
                .iter()
                .any(|(reason, message)| reason == "ClaimedWarmInstance" && message.contains(&id)),
            "{events:?}"
        );
        assert!(
            !events.iter().any(|(reason, _)| reason == "LaunchedInstance"),
            "{events:?}"
        );
        // The instance now belongs to the pod: re-tagged, out of the warm set.
        let instance = local
            .describe_instances(&InstanceFilter::Ids(vec![id.clone()]))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(instance.tag(tags::POD_UID), pod.uid().as_deref());
        assert_eq!(instance.tag(tags::WARM), Some("false"));
        served.insert(id);
    }
    assert_eq!(served, first, "each warm instance served exactly one pod");

    // The pool refills: three new warm instances, the only launches since.
    let second = ready_warm(&pools, 3).await;
    assert!(second.is_disjoint(&first), "{second:?} {first:?}");
    assert_eq!(cloud.launch_calls.load(Ordering::SeqCst), 6, "3 warm + 3 refills");

    // A pod whose settings match no warm instance launches cold.
    create_pod(
        &pods,
        "cold",
        json!({"metadata": {"annotations": {"ec2-kubelet.io/instance-type": "t3.medium"}}}),
    )
    .await;
    let cold = common::phase_of(&pods, "cold", "Running").await;
    let id = instance_of(&client, &cold).await;
    assert!(!first.contains(&id) && !second.contains(&id));
    let events = common::events_of(&client, "cold").await;
    assert!(
        events
            .iter()
            .any(|(reason, message)| reason == "LaunchedInstance" && message.contains(&id)),
        "{events:?}"
    );
    assert_eq!(cloud.launch_calls.load(Ordering::SeqCst), 7);
    assert_eq!(ready_warm(&pools, 3).await, second, "the warm set is untouched");

    let labels = ec2_kubelet::metrics::PoolLabels { pool: "warm".into() };
    assert_eq!(replica.metrics.warm_hits.get_or_create(&labels).get(), 3);
    assert_eq!(replica.metrics.warm_misses.get_or_create(&labels).get(), 1);
    let exposition = replica.metrics.encode();
    assert!(
        exposition.contains(r#"ec2_kubelet_warm_instances{pool="warm",phase="Ready"} 3"#),
        "{exposition}"
    );
    assert!(exposition.contains("ec2_kubelet_warm_refill_duration_seconds_count{pool=\"warm\"} 6"));

    // Scale-down terminates the extra warm instances.
    pools
        .patch(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"warmPool": {"size": 1}}})),
        )
        .await
        .unwrap();
    let kept = ready_warm(&pools, 1).await;
    for id in second.difference(&kept) {
        common::eventually(30, &format!("{id} terminated"), || async {
            (!alive(local.as_ref(), id).await).then_some(())
        })
        .await;
    }

    // Deleting the pool terminates its pods' instances and its warm instances.
    pools.delete("warm", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pool to be gone", || async {
        pools.get_opt("warm").await.unwrap().is_none().then_some(())
    })
    .await;
    let left = common::live_instance_ids(local.as_ref()).await;
    assert!(left.is_empty(), "instances left after the pool went: {left:?}");
    replica.stop().await;
}

/// The pid of a `local` instance's agent, from the backend's record of it.
fn agent_pid(local_dir: &std::path::Path, id: &str) -> i32 {
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(local_dir.join("instances").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    record["agent_pid"].as_i64().unwrap() as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_whose_agent_goes_silent_or_that_ages_out_is_replaced() {
    let cluster = common::operator_cluster(false).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let local_dir = dir.path().join("local");
    let (local, _instances) = common::local_compute(&local_dir);
    let mut config = common::lifecycle_config();
    config.sync.agent_lost_seconds = 4;
    let replica = common::Replica::start(&cluster, config, local.clone(), "replica-a");
    template_and_pool(&client, "subnet-0a", "sg-0a", IMAGE, json!({"size": 1})).await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());

    // A frozen agent (the instance still runs) is given up on and replaced.
    let frozen = ready_warm(&pools, 1).await.pop_first().unwrap();
    let pid = agent_pid(&local_dir, &frozen);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let replacement = common::eventually(60, "a replacement warm instance", || async {
        let ids = ready_warm(&pools, 1).await;
        (!ids.contains(&frozen)).then(|| ids.into_iter().next().unwrap())
    })
    .await;
    assert!(
        !alive(local.as_ref(), &frozen).await,
        "the silent one is terminated"
    );

    // maxAge recycles: the instance is replaced once it is older.
    pools
        .patch(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"warmPool": {"maxAge": "4s"}}})),
        )
        .await
        .unwrap();
    let recycled = common::eventually(60, "the warm instance recycled", || async {
        let ids = ready_warm(&pools, 1).await;
        (!ids.contains(&replacement)).then(|| ids.into_iter().next().unwrap())
    })
    .await;
    assert_ne!(recycled, frozen);
    common::eventually(30, "the aged one terminated", || async {
        (!alive(local.as_ref(), &replacement).await).then_some(())
    })
    .await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_finds_warm_instances_by_record_and_tag_and_launches_none_twice() {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (local, _instances) = common::local_compute(&dir.path().join("local"));
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), local.clone(), "replica-a");
    template_and_pool(&client, "subnet-0a", "sg-0a", IMAGE, json!({"size": 2})).await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    let before = ready_warm(&pools, 2).await;

    // A crash, and one of the two was launched but its record never learned it (the crash
    // came between RunInstances and the record's status): only its tags know it.
    replica.kill();
    let records: Api<Ec2Instance> = Api::all(client.clone());
    let unrecorded = before.first().unwrap().clone();
    let (name, _) = warm_records(&client)
        .await
        .into_iter()
        .find(|(_, r)| r.instance_id() == Some(unrecorded.as_str()))
        .unwrap();
    let forget = json!({"status": {"phase": null, "instanceId": null, "instanceType": null,
        "privateIp": null, "launchTime": null, "readyTime": null, "conditions": null}});
    records
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&forget))
        .await
        .unwrap();
    assert_eq!(records.get(&name).await.unwrap().instance_id(), None);

    let cloud = Arc::new(common::FlakyCompute::new(local.clone()));
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), cloud.clone(), "replica-b");
    let after = ready_warm(&pools, 2).await;
    assert_eq!(after, before, "both found again");
    assert_eq!(
        cloud.launch_calls.load(Ordering::SeqCst),
        0,
        "nothing launched again"
    );

    // A pod takes one of them; the pool launches exactly one to refill.
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    create_pod(&pods, "after-restart", json!({})).await;
    let running = common::phase_of(&pods, "after-restart", "Running").await;
    assert!(before.contains(&instance_of(&client, &running).await));
    let refilled = ready_warm(&pools, 2).await;
    assert_eq!(refilled.intersection(&before).count(), 1);
    assert_eq!(cloud.launch_calls.load(Ordering::SeqCst), 1);
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_the_last_warm_instance_never_both_get_it() {
    use ec2_kubelet_testbed::sim::{SimCloud, SimOptions};
    let cluster = common::operator_cluster(false).await;
    let admin = cluster.client();
    let sim = SimCloud::start(SimOptions {
        cluster: "test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let compute: Arc<dyn Compute> = Arc::new(sim.compute());
    common::create_pool(
        &admin,
        "warm",
        json!({"nodes": 0, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"], "warmPool": {"size": 1}}),
    )
    .await;
    // Two replicas: each its own client and context.
    let replicas: Vec<Arc<ec2_kubelet::runtime::Context>> = ["replica-a", "replica-b"]
        .iter()
        .map(|name| {
            let client = ec2_kubelet::operator::client(cluster.client_config()).unwrap();
            Arc::new(ec2_kubelet::runtime::Context::new(
                client,
                compute.clone(),
                common::lifecycle_config(),
                name,
            ))
        })
        .collect();
    let request = |uid: &str| LaunchRequest {
        pod_uid: uid.into(),
        pool: "warm".into(),
        node: "node-1".into(),
        namespace: "default".into(),
        name: uid.into(),
        instance_type: "t3.micro".into(),
        image_id: IMAGE.into(),
        subnet_id: "subnet-0a".into(),
        security_group_ids: vec!["sg-0a".into()],
        agent_port: 10350,
        ..Default::default()
    };

    // Each replica follows the records, as the operator does.
    let _watches: Vec<_> = replicas
        .iter()
        .map(|ctx| {
            let ctx = ctx.clone();
            ec2_kubelet::task::AbortOnDrop(tokio::spawn(
                async move { ctx.records.run(ctx.client.clone()).await },
            ))
        })
        .collect();
    let records: Api<Ec2Instance> = Api::all(admin.clone());
    const ROUNDS: usize = 20;
    let mut winners = [0usize; 2];
    for round in 0..ROUNDS {
        let name = format!("warm-token-{round}");
        let mut warm_request = request(&name);
        warm_request.tags.insert(tags::WARM.into(), "true".into());
        warm_request.tags.insert(tags::RECORD.into(), name.clone());
        let spec = ec2_kubelet::runtime::records::spec_of_request(&warm_request, None);
        let record = ec2_kubelet::runtime::records::new_record(&name, spec, "");
        records.create(&PostParams::default(), &record).await.unwrap();
        let instance = compute.launch_instance(&warm_request).await.unwrap();
        let status = json!({"status": {"phase": "Ready", "instanceId": instance.instance_id,
            "instanceType": "t3.micro", "launchTime": "2026-11-23T00:00:00Z",
            "readyTime": "2026-11-23T00:00:01Z"}});
        records
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        // Both replicas have seen it Ready: they race on the same resourceVersion.
        for ctx in &replicas {
            common::eventually(10, "the replica sees the warm record", || {
                let (ctx, name) = (ctx.clone(), name.clone());
                async move {
                    ctx.records
                        .get(&name)
                        .filter(|r| r.phase() == Some(ec2_kubelet::crd::InstancePhase::Ready))
                        .map(|_| ())
                }
            })
            .await;
        }
        let claims = replicas.iter().enumerate().map(|(i, ctx)| {
            let (ctx, request) = (ctx.clone(), request(&format!("pod-{round}-{i}")));
            tokio::spawn(async move { ec2_kubelet::warm::claim(&ctx, &request, &[]).await.unwrap() })
        });
        let outcomes: Vec<_> = futures::future::join_all(claims)
            .await
            .into_iter()
            .map(|joined| joined.unwrap())
            .collect();
        let won: Vec<usize> = (0..2).filter(|i| outcomes[*i].is_some()).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one claim wins");
        let winner = won[0];
        winners[winner] += 1;
        assert_eq!(
            outcomes[winner].as_ref().unwrap().instance.instance_id,
            instance.instance_id
        );
        // The record names the winner's pod, and only the winner's.
        let claimed = records.get(&name).await.unwrap();
        let pod = claimed.spec.pod.as_ref().expect("claimed");
        assert_eq!(pod.uid, format!("pod-{round}-{winner}"), "round {round}");
        assert_eq!(claimed.spec.node, "node-1");
        assert_eq!(
            claimed.labels().get(ec2_kubelet::crd::labels::POD_UID),
            Some(&pod.uid)
        );
        assert_eq!(claimed.labels()[ec2_kubelet::crd::labels::WARM], "false");
        let loser = format!("pod-{round}-{}", 1 - winner);
        let selector = format!("{}={loser}", ec2_kubelet::crd::labels::POD_UID);
        let theirs = records
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap();
        assert!(theirs.items.is_empty(), "round {round}: the loser has no record");
        let tagged = compute
            .describe_instances(&InstanceFilter::Ids(vec![instance.instance_id.clone()]))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            tagged.tag(tags::POD_UID),
            Some(format!("pod-{round}-{winner}").as_str())
        );
    }
    let hits: u64 = replicas
        .iter()
        .map(|ctx| {
            ctx.metrics
                .warm_hits
                .get_or_create(&ec2_kubelet::metrics::PoolLabels { pool: "warm".into() })
                .get()
        })
        .sum();
    assert_eq!(hits, ROUNDS as u64);
    println!("claims won per replica over {ROUNDS} races: {winners:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_backend_keeps_a_warm_pool_against_the_ec2_emulator() {
    let cloud = common::MotoCloud::start("10.12").await;
    let (cluster, client, aws) = (&cloud.cluster, cloud.client.clone(), cloud.aws.clone());
    let (network, image_id, ec2) = (&cloud.network, &cloud.image_id, &cloud.ec2);
    let replica = common::Replica::start(cluster, common::lifecycle_config(), aws.clone(), "replica-a");
    template_and_pool(
        &client,
        &network.subnet_id,
        &network.group_id,
        image_id,
        json!({"size": 2}),
    )
    .await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    let first = ready_warm(&pools, 2).await;
    assert_eq!(aws.calls.get("RunInstances"), 2);

    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let created = create_pod(&pods, "from-warm", json!({})).await;
    let running = common::phase_of(&pods, "from-warm", "Running").await;
    let id = instance_of(&client, &running).await;
    assert!(first.contains(&id), "{id} is not one of {first:?}");
    assert_eq!(
        running.status.as_ref().unwrap().pod_ip,
        private_ip(&aws, &id).await
    );
    // The claimed instance carries its pod's tags in EC2 now.
    let described = ec2.describe_instances().instance_ids(&id).send().await.unwrap();
    let instance_tags: BTreeMap<String, String> = described.reservations()[0].instances()[0]
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect();
    assert_eq!(instance_tags.get(tags::POD_UID), created.uid().as_ref());
    assert_eq!(instance_tags.get(tags::WARM).map(String::as_str), Some("false"));
    assert!(aws.calls.get("CreateTags") >= 1);

    // One refill; no RunInstances for the pod itself.
    let refilled = ready_warm(&pools, 2).await;
    assert_eq!(refilled.intersection(&first).count(), 1);
    assert_eq!(
        aws.calls.get("RunInstances"),
        3,
        "2 warm + 1 refill, none for the pod"
    );

    pods.delete("from-warm", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pod's instance terminated", || async {
        (!alive(aws.as_ref(), &id).await).then_some(())
    })
    .await;
    replica.stop().await;
}

/// The private IP EC2 reports for an instance.
async fn private_ip(compute: &ec2_kubelet::cloud::aws::AwsCompute, id: &str) -> Option<String> {
    compute
        .describe_instances(&InstanceFilter::Ids(vec![id.to_string()]))
        .await
        .unwrap()
        .remove(0)
        .private_ip
}
