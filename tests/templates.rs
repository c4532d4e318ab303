//! The template controller: templates checked against EC2 (the real aws-sdk-ec2 against moto),
//! a reason per invalid field, templates kept while pods use them, and pods refusing invalid
//! templates (dev cluster, `local` backend).

mod common;

use std::sync::Arc;

use ec2_kubelet::cloud::aws::AwsCompute;
use ec2_kubelet::crd::{Ec2NodePool, Ec2PodTemplate};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

/// The template's Ready condition once the controller has looked at it: (status, reason, message).
async fn ready(client: &Client, name: &str) -> (String, String, String) {
    let templates: Api<Ec2PodTemplate> = Api::namespaced(client.clone(), "default");
    common::eventually(30, &format!("template {name} checked"), || {
        let templates = templates.clone();
        async move {
            let template = templates.get(name).await.ok()?;
            let condition = template
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            Some((condition.status, condition.reason, condition.message))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_checked_against_ec2_with_a_reason_per_invalid_field() {
    let moto = common::Moto::start();
    let ec2 = moto.ec2_client();
    let network = moto.network("10.12").await;
    let images = ec2.describe_images().owners("amazon").send().await.unwrap();
    let x86: Vec<_> = images
        .images()
        .iter()
        .filter(|i| i.architecture().map(|a| a.as_str()) == Some("x86_64"))
        .collect();
    let image_id = x86[0].image_id().unwrap().to_string();
    // The selector case: every x86_64 image of amazon whose name starts like the first one's.
    let prefix: String = x86[0].name().unwrap().chars().take(6).collect();
    let newest = x86
        .iter()
        .filter(|i| i.name().unwrap_or_default().starts_with(&prefix))
        .max_by(|a, b| {
            (
                a.creation_date().unwrap_or_default(),
                std::cmp::Reverse(a.image_id()),
            )
                .cmp(&(
                    b.creation_date().unwrap_or_default(),
                    std::cmp::Reverse(b.image_id()),
                ))
        })
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    let aws = Arc::new(AwsCompute::from_client(ec2, "test", None));
    let cluster = common::operator_cluster(false).await;
    let client = cluster.client();
    let replica = common::Replica::start(&cluster, common::fast_config(), aws, "replica-a");

    let valid = json!({"imageId": image_id, "instanceTypes": ["t3.micro", "t3.medium"],
        "subnetIds": [network.subnet_id], "securityGroupIds": [network.group_id]});
    common::create_template(&client, "valid", valid.clone()).await;
    common::create_template(
        &client,
        "selected",
        json!({"imageSelector": {"owners": ["amazon"], "name": format!("{prefix}*"), "architecture": "amd64"},
            "instanceTypes": ["t3.micro"]}),
    )
    .await;
    let mut invalid = Vec::new();
    for (name, change, reason, field) in [
        (
            "no-image",
            json!({"imageId": "ami-0123456789abcdef0"}),
            "ImageNotFound",
            "spec.imageId",
        ),
        (
            "no-subnet",
            json!({"subnetIds": [network.subnet_id, "subnet-0123456789abcdef0"]}),
            "SubnetNotFound",
            "spec.subnetIds[1]",
        ),
        (
            "no-group",
            json!({"securityGroupIds": ["sg-0123456789abcdef0"]}),
            "SecurityGroupNotFound",
            "spec.securityGroupIds[0]",
        ),
        (
            "no-type",
            json!({"instanceTypes": ["t3.micro", "zz9.huge"]}),
            "InstanceTypeNotOffered",
            "spec.instanceTypes[1]",
        ),
    ] {
        let mut spec = valid.clone();
        json_patch::merge(&mut spec, &change);
        common::create_template(&client, name, spec).await;
        invalid.push((name, reason, field));
    }

    assert_eq!(ready(&client, "valid").await.0, "True");
    let templates: Api<Ec2PodTemplate> = Api::namespaced(client.clone(), "default");
    let status = templates.get("valid").await.unwrap().status.unwrap();
    assert_eq!(status.resolved_image_id.as_deref(), Some(image_id.as_str()));
    assert_eq!(status.architecture.as_deref(), Some("x86_64"));
    assert_eq!(status.available_instance_types, ["t3.micro", "t3.medium"]);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(ready(&client, "selected").await.0, "True");
    let status = templates.get("selected").await.unwrap().status.unwrap();
    assert_eq!(
        status.resolved_image_id.as_deref(),
        Some(newest.as_str()),
        "the newest image matching the selector"
    );
    for (name, reason, field) in invalid {
        let (status, got_reason, message) = ready(&client, name).await;
        assert_eq!(
            (status.as_str(), got_reason.as_str()),
            ("False", reason),
            "{name}: {message}"
        );
        assert!(message.starts_with(&format!("{field}: ")), "{name}: {message}");
        // The event follows the status the test saw.
        common::wait_event(&client, name, reason, |note| {
            note.starts_with(&format!("{field}: "))
        })
        .await;
    }
    // What `kubectl get ecpt` shows.
    let listed = common::kubectl(&cluster, &["get", "ecpt", "valid", "no-image", "--no-headers"]).await;
    let valid_row = listed.lines().find(|l| l.starts_with("valid")).unwrap();
    assert!(
        valid_row.contains(&image_id) && valid_row.contains("True"),
        "{listed}"
    );
    let broken_row = listed.lines().find(|l| l.starts_with("no-image")).unwrap();
    assert!(broken_row.contains("False"), "{listed}");
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_in_use_is_kept_and_an_invalid_one_fails_its_pods() {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, _instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::fast_config();
    config.sync.pool_resync_seconds = 2;
    let replica = common::Replica::start(&cluster, config, compute, "replica-a");
    common::create_template(
        &client,
        "general",
        json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro"], "agentPort": common::free_port()}),
    )
    .await;
    common::create_template(
        &client,
        "broken",
        json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["zz9.huge"]}),
    )
    .await;
    assert_eq!(ready(&client, "general").await.0, "True");
    assert_eq!(ready(&client, "broken").await.1, "InstanceTypeNotOffered");
    common::create_pool(
        &client,
        "pods",
        json!({"nodes": 1, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
    // Pools say whether their template is usable.
    for (name, template) in [("misled-pool", "broken"), ("orphan-pool", "missing")] {
        let pool: Ec2NodePool = serde_json::from_value(json!({
            "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": name},
            "spec": {"nodes": 0, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
                "templateRef": {"namespace": "default", "name": template}},
        }))
        .unwrap();
        Api::<Ec2NodePool>::all(client.clone())
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
    }
    let template_ready = |pool: &'static str| {
        let pools: Api<Ec2NodePool> = Api::all(client.clone());
        async move {
            common::eventually(30, &format!("{pool}'s TemplateReady"), || {
                let pools = pools.clone();
                async move {
                    let pool = pools.get(pool).await.ok()?;
                    let condition = pool
                        .status?
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == "TemplateReady" && c.status != "Unknown")?;
                    Some((condition.status, condition.reason, condition.message))
                }
            })
            .await
        }
    };
    assert_eq!(template_ready("pods").await.1, "TemplateValid");
    let (status, reason, message) = template_ready("misled-pool").await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "TemplateInvalid"));
    assert!(message.contains("InstanceTypeNotOffered"), "{message}");
    assert_eq!(template_ready("orphan-pool").await.1, "TemplateNotFound");

    let pod = |name: &str, annotations: Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "nodeSelector": {"type": "virtual-kubelet"},
                "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
                "containers": [{"name": "main", "image": "local/shell", "command": ["sleep", "3600"]}],
            },
        }))
        .unwrap()
    };
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("user", json!({})))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("misled", json!({"ec2-kubelet.io/template": "broken"})),
    )
    .await
    .unwrap();
    let phase = |name: &'static str, phase: &'static str| {
        let pods = pods.clone();
        async move {
            common::eventually(60, &format!("{name} {phase}"), || {
                let pods = pods.clone();
                async move {
                    let pod = pods.get(name).await.ok()?;
                    (pod.status.as_ref()?.phase.as_deref() == Some(phase)).then_some(pod)
                }
            })
            .await
        }
    };
    phase("user", "Running").await;
    let misled = phase("misled", "Failed").await.status.unwrap();
    assert_eq!(misled.reason.as_deref(), Some("InvalidLaunchSettings"));
    assert!(
        misled
            .message
            .as_deref()
            .unwrap()
            .contains("Ec2PodTemplate default/broken is invalid (InstanceTypeNotOffered)"),
        "{misled:?}"
    );

    // Deleting the template while `user` runs on its pool: kept, and the condition says why.
    let templates: Api<Ec2PodTemplate> = Api::namespaced(client.clone(), "default");
    templates
        .delete("general", &DeleteParams::default())
        .await
        .unwrap();
    let (status, reason, message) = common::eventually(30, "the InUse condition", || {
        let templates = templates.clone();
        async move {
            let template = templates.get("general").await.ok()?;
            let condition = template
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.reason == "InUse")?;
            Some((condition.status, condition.reason, condition.message))
        }
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InUse"));
    assert!(message.contains("default/user"), "{message}");
    assert!(
        templates
            .get("general")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    pods.delete("user", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the template released once its pod is gone", || {
        let templates = templates.clone();
        async move { templates.get_opt("general").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(
        pods.get_opt("user").await.unwrap().is_none(),
        "the pod went first"
    );
    let _ = pods.delete("misled", &DeleteParams::default()).await;
    replica.stop().await;
}

/// A stand-in instance metadata service (IMDSv2) on loopback: 404 for the spot
/// instance-action until `armed`, then a termination notice.
async fn fake_imds(armed: Arc<std::sync::atomic::AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let armed = armed.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let armed = armed.load(std::sync::atomic::Ordering::SeqCst);
                        async move {
                            let token_ok = request
                                .headers()
                                .get("X-aws-ec2-metadata-token")
                                .is_some_and(|t| t == "imds-token");
                            let (status, body) = match (request.method().as_str(), request.uri().path()) {
                                ("PUT", "/latest/api/token") => (200, "imds-token".to_string()),
                                ("GET", "/latest/meta-data/spot/instance-action") if !token_ok => {
                                    (401, String::new())
                                }
                                ("GET", "/latest/meta-data/spot/instance-action") if armed => (
                                    200,
                                    r#"{"action": "terminate", "time": "2026-11-23T02:00:00Z"}"#.to_string(),
                                ),
                                _ => (404, String::new()),
                            };
                            let mut response = hyper::Response::new(http_body_util::Full::new(
                                hyper::body::Bytes::from(body),
                            ));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_fails_its_pod_and_a_darwin_pool_has_darwin_nodes() {
    use ec2_kubelet::cloud::local::{LocalCompute, LocalOptions};
    use k8s_openapi::api::core::v1::Node;
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let imds = fake_imds(armed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let compute = Arc::new(
        LocalCompute::new(LocalOptions {
            cluster: "test".into(),
            dir: dir.path().join("local"),
            agent_binary: ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent"),
            imds_endpoint: Some(imds),
        })
        .unwrap(),
    );
    let _instances = common::LocalInstances(compute.clone());
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let replica = common::Replica::start(&cluster, common::fast_config(), compute.clone(), "replica-a");
    common::create_template(
        &client,
        "spot",
        json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro"], "spot": true,
            "agentPort": common::free_port()}),
    )
    .await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    for (name, extra) in [
        ("spotty", json!({})),
        ("macs", json!({"os": "darwin", "arch": "arm64"})),
    ] {
        let mut spec = json!({"nodes": 1, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "spot"}});
        json_patch::merge(&mut spec, &extra);
        let pool: Ec2NodePool = serde_json::from_value(json!({
            "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }

    // The darwin pool's node says so, for nodeSelectors such as kubernetes.io/os: darwin.
    let nodes: Api<Node> = Api::all(client.clone());
    let mac = common::eventually(30, "the darwin node", || {
        let nodes = nodes.clone();
        async move {
            let listed = nodes
                .list(&ListParams::default().labels("ec2-kubelet.io/pool=macs"))
                .await
                .ok()?;
            // Registration comes first, the status (nodeInfo) with the next write. A real API
            // server defaults an empty nodeInfo at registration: wait for the operator's.
            listed.items.into_iter().find(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.node_info.as_ref())
                    .is_some_and(|info| !info.kubelet_version.is_empty())
            })
        }
    })
    .await;
    let labels = mac.metadata.labels.clone().unwrap();
    assert_eq!(labels["kubernetes.io/os"], "darwin");
    assert_eq!(labels["kubernetes.io/arch"], "arm64");
    assert_eq!(mac.status.unwrap().node_info.unwrap().operating_system, "darwin");
    // The `spot` template launches x86_64 Linux images: a pod on the darwin/arm64 pool refuses it.
    let misfit = common::virtual_pod("misfit", Some("macs"), &["true"], json!({}));
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &misfit).await.unwrap();
    let refused = common::phase_of(&pods, "misfit", "Failed").await.status.unwrap();
    assert_eq!(refused.reason.as_deref(), Some("InvalidLaunchSettings"));
    assert!(
        refused
            .message
            .as_deref()
            .unwrap()
            .contains("launches x86_64 images, but the pool's nodes are darwin/arm64"),
        "{refused:?}"
    );

    // A pod on the spot pool runs, then EC2 announces the reclaim.
    let pod = common::virtual_pod("bargain", Some("spotty"), &["sleep", "3600"], json!({}));
    pods.create(&PostParams::default(), &pod).await.unwrap();
    common::phase_of(&pods, "bargain", "Running").await;
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = common::eventually(30, "bargain Failed with SpotInterrupted", || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("bargain").await.ok()?;
            (pod.status.as_ref()?.reason.as_deref() == Some("SpotInterrupted")).then_some(pod)
        }
    })
    .await;
    let status = failed.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("2026-11-23T02:00:00Z"),
        "{status:?}"
    );
    let conditions = status.conditions.unwrap();
    let disruption = conditions.iter().find(|c| c.type_ == "DisruptionTarget").unwrap();
    assert_eq!(
        (disruption.status.as_str(), disruption.reason.as_deref()),
        ("True", Some("SpotInterrupted"))
    );
    let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
    // The event follows the status the test saw.
    common::wait_event(&client, "bargain", "SpotInterrupted", |_| true).await;
    common::eventually(30, "the reclaimed instance terminated", || {
        let compute = compute.clone();
        async move {
            use ec2_kubelet::cloud::{Compute, InstanceFilter};
            let instances = compute
                .describe_instances(&InstanceFilter::Pool("spotty".into()))
                .await
                .ok()?;
            instances.iter().all(|i| !i.state.is_alive()).then_some(())
        }
    })
    .await;
    replica.stop().await;
}
