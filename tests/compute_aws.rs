//! The `aws` compute backend through the real aws-sdk-ec2 against moto on loopback.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ec2_kubelet::cloud::aws::AwsCompute;
use ec2_kubelet::cloud::{Compute, EniRequest, Error, InstanceFilter, InstanceState, LaunchRequest};
use ec2_kubelet::crd::{TagMap, tags};

struct World {
    _moto: common::Moto,
    compute: AwsCompute,
    /// Agent addresses by private IP: what the test maps the emulator's instances to.
    overrides: Arc<RwLock<BTreeMap<String, String>>>,
    subnet_id: String,
    group_id: String,
    image_id: String,
}

async fn world() -> World {
    let moto = common::Moto::start();
    let ec2 = moto.ec2_client();
    let common::Network {
        subnet_id, group_id, ..
    } = moto.network("10.7").await;
    let images = ec2.describe_images().owners("amazon").send().await.unwrap();
    let image_id = images
        .images()
        .iter()
        .find_map(|i| i.image_id())
        .unwrap()
        .to_string();
    let overrides: Arc<RwLock<BTreeMap<String, String>>> = Arc::default();
    let map = overrides.clone();
    let resolver = Arc::new(move |instance: &ec2_kubelet::cloud::Instance, _port: u16| {
        let ip = instance.private_ip.as_ref()?;
        map.read().unwrap().get(ip).cloned()
    });
    let compute = AwsCompute::from_client(ec2, "test", Some(resolver));
    World {
        _moto: moto,
        compute,
        overrides,
        subnet_id,
        group_id,
        image_id,
    }
}

fn launch(world: &World, uid: &str) -> LaunchRequest {
    LaunchRequest {
        pod_uid: uid.into(),
        pool: "p1".into(),
        node: "ip-10-7-1-4.p1".into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        instance_type: "t3.micro".into(),
        image_id: world.image_id.clone(),
        subnet_id: world.subnet_id.clone(),
        security_group_ids: vec![world.group_id.clone()],
        user_data: Some("#!/bin/sh\necho hi\n".into()),
        agent_port: 8484,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enis_are_created_found_by_tag_and_deleted() {
    let w = world().await;
    let request = |index| EniRequest {
        pool: "p1".into(),
        index,
        subnet_id: w.subnet_id.clone(),
        security_group_ids: vec![w.group_id.clone()],
        tags: TagMap::from([("team".to_string(), "a".to_string())]),
    };
    let first = w.compute.ensure_eni(&request(0)).await.unwrap();
    assert_eq!(w.compute.calls.get("CreateNetworkInterface"), 1);
    let again = w.compute.ensure_eni(&request(0)).await.unwrap();
    assert_eq!(again.eni_id, first.eni_id, "found by tags, not created twice");
    assert_eq!(w.compute.calls.get("CreateNetworkInterface"), 1);
    assert!(first.private_ip.starts_with("10.7.1."), "{}", first.private_ip);
    assert_eq!((first.pool.as_str(), first.index), ("p1", 0));
    assert_eq!(first.tags["team"], "a");
    assert_eq!(first.tags[tags::CLUSTER], "test");
    w.compute.ensure_eni(&request(1)).await.unwrap();

    let enis = w.compute.describe_enis("p1").await.unwrap();
    assert_eq!(enis.iter().map(|e| e.index).collect::<Vec<_>>(), [0, 1]);
    assert!(w.compute.describe_enis("p2").await.unwrap().is_empty());
    w.compute.delete_eni(&first.eni_id).await.unwrap();
    w.compute
        .delete_eni(&first.eni_id)
        .await
        .expect("deleting a deleted ENI is not an error");
    assert_eq!(w.compute.describe_enis("p1").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_are_idempotent_per_pod_and_describes_are_batched() {
    let w = world().await;
    let first = w.compute.launch_instance(&launch(&w, "uid-0")).await.unwrap();
    assert_eq!(first.tag(tags::POD_UID), Some("uid-0"));
    assert_eq!(first.tag(tags::POD), Some("default/pod-uid-0"));
    assert_eq!(first.instance_type, "t3.micro");
    // moto ignores ClientToken: the tag look-up is what keeps this from launching twice.
    let again = w.compute.launch_instance(&launch(&w, "uid-0")).await.unwrap();
    assert_eq!(again.instance_id, first.instance_id);
    assert_eq!(w.compute.calls.get("RunInstances"), 1);

    for i in 1..5 {
        w.compute
            .launch_instance(&launch(&w, &format!("uid-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(w.compute.calls.get("RunInstances"), 5);
    let before = w.compute.calls.get("DescribeInstances");
    let pool = w
        .compute
        .describe_instances(&InstanceFilter::Pool("p1".into()))
        .await
        .unwrap();
    assert_eq!(pool.len(), 5);
    assert_eq!(
        w.compute.calls.get("DescribeInstances") - before,
        1,
        "one call for the whole pool"
    );
    let ids: Vec<String> = pool.iter().map(|i| i.instance_id.clone()).collect();
    let before = w.compute.calls.get("DescribeInstances");
    let by_id = w
        .compute
        .describe_instances(&InstanceFilter::Ids(ids.clone()))
        .await
        .unwrap();
    assert_eq!(by_id.len(), 5);
    assert_eq!(
        w.compute.calls.get("DescribeInstances") - before,
        1,
        "one call for many ids"
    );

    w.compute.terminate_instances(&ids).await.unwrap();
    assert_eq!(w.compute.calls.get("TerminateInstances"), 1);
    let after = w
        .compute
        .describe_instances(&InstanceFilter::Ids(ids))
        .await
        .unwrap();
    assert!(
        after.iter().all(|i| i.state == InstanceState::Terminated),
        "{after:?}"
    );
    // After termination, the same pod gets a new instance.
    let replacement = w.compute.launch_instance(&launch(&w, "uid-0")).await.unwrap();
    assert_ne!(replacement.instance_id, first.instance_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified_and_endpoints_can_be_overridden() {
    let w = world().await;
    // moto accepts unknown AMIs and instance types (src/cloud/aws.rs unit-tests those codes);
    // it does check subnets.
    let mut bad_subnet = launch(&w, "uid-bad-subnet");
    bad_subnet.subnet_id = "subnet-00000000".into();
    let error = w.compute.launch_instance(&bad_subnet).await.unwrap_err();
    assert!(matches!(error, Error::SubnetNotFound { .. }), "{error:?}");
    assert!(!error.is_retryable());

    let types = w
        .compute
        .instance_types(&["t3.micro".into(), "m5.xlarge".into(), "no.such".into()])
        .await
        .unwrap();
    assert_eq!(types.len(), 2, "{types:?}");
    assert_eq!(
        (types[0].name.as_str(), types[0].vcpus, types[0].memory_mib),
        ("t3.micro", 2, 1024)
    );
    let calls = w.compute.calls.get("DescribeInstanceTypes");
    w.compute.instance_types(&["t3.micro".into()]).await.unwrap();
    assert_eq!(
        w.compute.calls.get("DescribeInstanceTypes"),
        calls,
        "served from the cache"
    );

    // The emulator's private IPs are never dialled: the override maps them to loopback.
    let instance = w.compute.launch_instance(&launch(&w, "uid-ep")).await.unwrap();
    let ip = instance.private_ip.clone().unwrap();
    assert_eq!(
        w.compute.agent_endpoint(&instance, 8484).unwrap(),
        format!("http://{ip}:8484")
    );
    w.overrides.write().unwrap().insert(ip, "127.0.0.1:40123".into());
    assert_eq!(
        w.compute.agent_endpoint(&instance, 8484).unwrap(),
        "http://127.0.0.1:40123"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_iam_policy_allows_exactly_the_actions_the_backend_sends() {
    let w = world().await;
    // Every operation of the backend once.
    let eni = w
        .compute
        .ensure_eni(&EniRequest {
            pool: "p1".into(),
            index: 0,
            subnet_id: w.subnet_id.clone(),
            security_group_ids: vec![w.group_id.clone()],
            tags: TagMap::new(),
        })
        .await
        .unwrap();
    w.compute.describe_enis("p1").await.unwrap();
    w.compute.instance_types(&["t3.micro".into()]).await.unwrap();
    let instance = w.compute.launch_instance(&launch(&w, "uid-iam")).await.unwrap();
    // A warm instance's claim re-tags it.
    let claimed = TagMap::from([(
        ec2_kubelet::crd::tags::POD_UID.to_string(),
        "uid-claimed".to_string(),
    )]);
    w.compute
        .tag_instance(&instance.instance_id, &claimed)
        .await
        .unwrap();
    let described = w
        .compute
        .describe_instances(&InstanceFilter::Pool("p1".into()))
        .await
        .unwrap();
    let retagged = described
        .iter()
        .find(|i| i.instance_id == instance.instance_id)
        .unwrap();
    assert_eq!(retagged.tag(ec2_kubelet::crd::tags::POD_UID), Some("uid-claimed"));
    w.compute
        .terminate_instances(std::slice::from_ref(&instance.instance_id))
        .await
        .unwrap();
    w.compute.delete_eni(&eni.eni_id).await.unwrap();
    // What the template controller checks.
    w.compute
        .describe_images(&ec2_kubelet::cloud::ImageQuery::Ids(vec![w.image_id.clone()]))
        .await
        .unwrap();
    w.compute
        .existing_subnets(std::slice::from_ref(&w.subnet_id))
        .await
        .unwrap();
    w.compute
        .existing_security_groups(std::slice::from_ref(&w.group_id))
        .await
        .unwrap();
    let sent: Vec<String> = w
        .compute
        .calls
        .actions()
        .iter()
        .map(|a| format!("ec2:{a}"))
        .collect();

    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("config/iam-policy.json")).unwrap(),
    )
    .unwrap();
    let mut allowed = std::collections::BTreeSet::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        match &statement["Action"] {
            serde_json::Value::String(action) => {
                allowed.insert(action.clone());
            }
            actions => allowed.extend(
                actions
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string()),
            ),
        }
    }
    for action in &sent {
        assert!(
            allowed.contains(action),
            "{action} is sent but config/iam-policy.json does not allow it"
        );
    }
    // Allowed and never sent: only what EC2 checks on the side (roles passed with an instance
    // profile). CreateTags is sent (the re-tag of a claimed warm instance) and also checked on
    // the side (tags written by RunInstances and CreateNetworkInterface).
    assert!(sent.contains(&"ec2:CreateTags".to_string()), "{sent:?}");
    let implicit = ["iam:PassRole"];
    let unused: Vec<&String> = allowed
        .iter()
        .filter(|a| !sent.contains(a) && !implicit.contains(&a.as_str()))
        .collect();
    assert!(
        unused.is_empty(),
        "allowed but never sent: {unused:?} (sent: {sent:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_launches_spot_capacity_and_placement_is_accepted() {
    let w = world().await;
    let request = LaunchRequest {
        spot: true,
        placement: Some(ec2_kubelet::crd::Placement {
            tenancy: ec2_kubelet::crd::Tenancy::Dedicated,
            ..Default::default()
        }),
        ..launch(&w, "uid-placed")
    };
    let instance = w.compute.launch_instance(&request).await.unwrap();
    let described = w
        ._moto
        .ec2_client()
        .describe_instances()
        .instance_ids(&instance.instance_id)
        .send()
        .await
        .unwrap();
    let raw = &described.reservations()[0].instances()[0];
    // (The emulator keeps no tenancy; the placement's mapping is unit-tested in src/cloud/aws.rs.)
    assert_eq!(raw.instance_lifecycle().map(|l| l.as_str()), Some("spot"));
}
