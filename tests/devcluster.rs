//! The dev cluster (API server stand-in) driven through the real `kube` client over HTTP: every
//! semantic the operator, kubectl and helm rely on.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use ec2_kubelet_testbed::devcluster::{DevCluster, DevClusterOptions};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::Status;
use kube::runtime::watcher;
use kube::{Client, Discovery, Resource, ResourceExt};
use serde_json::{Value, json};

async fn start(scheduler: bool) -> DevCluster {
    let options = DevClusterOptions {
        scheduler,
        ..DevClusterOptions::default()
    };
    DevCluster::start(options).await.expect("start the dev cluster")
}

fn api_error(error: kube::Error) -> Box<Status> {
    match error {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ec2_kubelet::crd::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("create CRD");
    }
}

fn pools(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("ec2-kubelet.io", "v1alpha1", "Ec2NodePool");
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, "ec2nodepools"),
    )
}

fn pool(name: &str, nodes: i64) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool",
        "metadata": {"name": name},
        "spec": {"nodes": nodes, "subnetIds": ["subnet-0a1b2c3d4e5f60718"]},
    }))
    .expect("a pool")
}

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"},
    }))
    .expect("a config map")
}

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "spec": {"containers": [{"name": "app", "image": "local/shell"}]},
    }))
    .expect("a pod")
}

fn node(name: &str, ready: bool, labels: Value, taints: Value, kubelet_port: u16) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints},
        "status": {
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            "allocatable": {"pods": "10"},
            "addresses": [{"type": "InternalIP", "address": "10.0.0.9"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        },
    }))
    .expect("a node")
}

async fn bind(client: &Client, namespace: &str, pod: &str, node: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    let _: Value = pods
        .create_subresource("binding", pod, &PostParams::default(), &binding)
        .await
        .expect("bind the pod");
}

#[tokio::test]
async fn discovery_lists_builtins_and_crds_once_created() {
    let cluster = start(false).await;
    let client = cluster.client();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "34"));
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let groups: Vec<String> = discovery.groups().map(|g| g.name().to_string()).collect();
    for group in [
        "",
        "apps",
        "coordination.k8s.io",
        "events.k8s.io",
        "rbac.authorization.k8s.io",
    ] {
        assert!(
            groups.contains(&group.to_string()),
            "{group} missing from {groups:?}"
        );
    }
    assert!(!groups.contains(&"ec2-kubelet.io".to_string()));

    install_crds(&client).await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let group = discovery
        .get("ec2-kubelet.io")
        .expect("the CRD group is discoverable");
    let (resource, capabilities) = group
        .recommended_resources()
        .into_iter()
        .find(|(r, _)| r.kind == "Ec2NodePool")
        .expect("Ec2NodePool is served");
    assert_eq!(resource.plural, "ec2nodepools");
    assert_eq!(capabilities.scope, kube::discovery::Scope::Cluster);
    let subresources: Vec<String> = capabilities
        .subresources
        .iter()
        .map(|(s, _)| s.plural.clone())
        .collect();
    assert!(
        subresources.iter().any(|s| s.ends_with("status")),
        "{subresources:?}"
    );
}

#[tokio::test]
async fn metadata_generation_and_optimistic_concurrency() {
    let cluster = start(false).await;
    let client = cluster.client();
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let created = maps
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap();
    assert!(!created.uid().unwrap_or_default().is_empty());
    assert!(created.metadata.creation_timestamp.is_some());
    let first_rv: u64 = created.resource_version().unwrap().parse().unwrap();

    let mut changed = created.clone();
    changed.data = Some([("k".to_string(), "w".to_string())].into());
    let replaced = maps.replace("a", &PostParams::default(), &changed).await.unwrap();
    let second_rv: u64 = replaced.resource_version().unwrap().parse().unwrap();
    assert!(
        second_rv > first_rv,
        "resourceVersion grows: {first_rv} -> {second_rv}"
    );
    // The first version is stale now.
    let stale = api_error(
        maps.replace("a", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    // A no-op replace keeps the resourceVersion.
    let same = maps
        .replace("a", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(same.resource_version(), replaced.resource_version());
    let duplicate = api_error(
        maps.create(&PostParams::default(), &config_map("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (duplicate.code, duplicate.reason.as_str()),
        (409, "AlreadyExists")
    );

    install_crds(&client).await;
    let pools = pools(&client);
    let created = pools.create(&PostParams::default(), &pool("p", 1)).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let spec = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(spec.metadata.generation, Some(2));
    let status = pools
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyNodes": 2}, "spec": {"nodes": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(
        status.metadata.generation,
        Some(2),
        "status writes do not bump generation"
    );
    assert_eq!(status.data["status"]["readyNodes"], 2);
    assert_eq!(
        status.data["spec"]["nodes"], 3,
        "the status subresource ignores spec"
    );
    let main = pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyNodes": 7}})),
        )
        .await
        .unwrap();
    assert_eq!(
        main.data["status"]["readyNodes"], 2,
        "the main resource ignores status"
    );
}

#[tokio::test]
async fn custom_resources_are_validated_against_the_crd_schema() {
    let cluster = start(false).await;
    let client = cluster.client();
    install_crds(&client).await;
    let pools = pools(&client);
    let error = api_error(
        pools
            .create(&PostParams::default(), &pool("bad", -1))
            .await
            .unwrap_err(),
    );
    assert_eq!((error.code, error.reason.as_str()), (422, "Invalid"));
    assert!(
        error
            .message
            .starts_with("Ec2NodePool.ec2-kubelet.io \"bad\" is invalid: spec.nodes"),
        "{}",
        error.message
    );
    let causes = error.details.expect("details").causes;
    assert_eq!(causes[0].field, "spec.nodes");

    // Unknown fields are pruned (with a warning) unless the client asks for strict validation.
    let mut extra = pool("extra", 1);
    extra.data["spec"]["colour"] = json!("blue");
    let created = pools.create(&PostParams::default(), &extra).await.unwrap();
    assert!(
        created.data["spec"].get("colour").is_none(),
        "unknown field pruned"
    );
    let request = hyper::Request::post("/apis/ec2-kubelet.io/v1alpha1/ec2nodepools?fieldValidation=Strict")
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(&{
                let mut strict = extra.clone();
                strict.metadata.name = Some("strict".into());
                strict.metadata.resource_version = None;
                strict
            })
            .unwrap(),
        )
        .unwrap();
    let error = api_error(client.request::<Value>(request).await.unwrap_err());
    assert_eq!(error.code, 400);
    assert!(
        error.message.contains("unknown field \"spec.colour\""),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn lists_filter_by_label_and_field_selectors_and_page() {
    let cluster = start(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for (i, tier) in ["web", "web", "db", "web", "db"].iter().enumerate() {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), &[("tier", tier)]))
            .await
            .unwrap();
    }
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &node("n1", true, json!({}), json!([]), 1))
        .await
        .unwrap();
    bind(&client, "default", "p1", "n1").await;

    let names =
        |list: kube::core::ObjectList<Pod>| list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>();
    let web = pods
        .list(&ListParams::default().labels("tier=web"))
        .await
        .unwrap();
    assert_eq!(names(web), ["p0", "p1", "p3"]);
    let not_web = pods
        .list(&ListParams::default().labels("tier notin (web)"))
        .await
        .unwrap();
    assert_eq!(names(not_web), ["p2", "p4"]);
    let on_node = pods
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .unwrap();
    assert_eq!(names(on_node), ["p1"]);
    let unbound = pods
        .list(&ListParams::default().fields("spec.nodeName=,metadata.name!=p0"))
        .await
        .unwrap();
    assert_eq!(names(unbound), ["p2", "p3", "p4"]);
    let error = api_error(
        pods.list(&ListParams::default().fields("spec.colour=x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 400);
    assert!(error.message.contains("field label not supported: spec.colour"));

    let first = pods.list(&ListParams::default().limit(2)).await.unwrap();
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let second = pods
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let third_token = second.metadata.continue_.clone().expect("another page");
    let third = pods
        .list(&ListParams::default().limit(2).continue_token(&third_token))
        .await
        .unwrap();
    let mut all = names(first);
    all.extend(names(second));
    all.extend(names(third.clone()));
    assert_eq!(all, ["p0", "p1", "p2", "p3", "p4"]);
    assert!(third.metadata.continue_.as_deref().unwrap_or_default().is_empty());
    let list_rv: u64 = third.metadata.resource_version.unwrap().parse().unwrap();
    assert!(
        list_rv >= 7,
        "the list carries the store's resourceVersion ({list_rv})"
    );
}

/// Names of pods seen in watcher events after the initial list, in order.
fn applied_name(event: &watcher::Event<Pod>) -> Option<String> {
    match event {
        watcher::Event::Apply(pod) => Some(pod.name_any()),
        _ => None,
    }
}

#[tokio::test]
async fn watcher_resumes_from_its_resource_version_without_loss_or_duplicates() {
    let cluster = start(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("before", &[]))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher(pods.clone(), watcher::Config::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if tx.send(event.map_err(|e| e.to_string())).is_err() {
                return;
            }
        }
    });
    let mut inits = 0;
    let mut seen = Vec::new();
    // Drain the initial list.
    loop {
        let event = rx.recv().await.unwrap().unwrap();
        match event {
            watcher::Event::Init => inits += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    let mut created = Vec::new();
    for round in 0..3 {
        pods.create(&PostParams::default(), &pod(&format!("live-{round}"), &[]))
            .await
            .unwrap();
        created.push(format!("live-{round}"));
        // Cut every watch; changes made meanwhile must be replayed from history on resume.
        let interruption = cluster.interrupt_watches().await;
        for i in 0..3 {
            let name = format!("gap-{round}-{i}");
            pods.create(&PostParams::default(), &pod(&name, &[]))
                .await
                .unwrap();
            created.push(name);
        }
        drop(interruption);
    }
    while seen.len() < created.len() {
        let event = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("watch events keep coming")
            .unwrap()
            .expect("no watch error");
        if matches!(event, watcher::Event::Init) {
            inits += 1;
        }
        seen.extend(applied_name(&event));
    }
    assert_eq!(seen, created, "every change exactly once, in order");
    assert_eq!(inits, 1, "resumed from resourceVersion without a relist");
    task.abort();
}

#[tokio::test]
async fn watcher_relists_after_410_gone_when_the_history_window_is_exceeded() {
    let options = DevClusterOptions {
        scheduler: false,
        history: 5,
        ..DevClusterOptions::default()
    };
    let cluster = DevCluster::start(options).await.unwrap();
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let (reader, writer) = kube::runtime::reflector::store::<Pod>();
    let stream = kube::runtime::reflector(writer, watcher(pods.clone(), watcher::Config::default()));
    let inits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = inits.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Ok(watcher::Event::Init) = event {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    reader.wait_until_ready().await.unwrap();
    let interruption = cluster.interrupt_watches().await;
    for i in 0..12 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), &[]))
            .await
            .unwrap();
    }
    drop(interruption);
    common::eventually(20, "the reflector to hold all 12 pods", || {
        let reader = reader.clone();
        async move { (reader.state().len() == 12).then_some(()) }
    })
    .await;
    assert!(
        inits.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "410 made the watcher relist"
    );

    // A raw watch from an expired resourceVersion gets the ERROR event with code 410.
    let mut events = pods.watch(&WatchParams::default(), "1").await.unwrap().boxed();
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Error(error)) => assert_eq!(error.code, 410),
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    task.abort();
}

#[tokio::test]
async fn watches_send_bookmarks_and_end_at_timeout_seconds() {
    let options = DevClusterOptions {
        scheduler: false,
        bookmark_interval: Duration::from_millis(100),
        ..DevClusterOptions::default()
    };
    let cluster = DevCluster::start(options).await.unwrap();
    let maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let created = maps
        .create(&PostParams::default(), &config_map("a", &[("app", "x")]))
        .await
        .unwrap();
    let rv = created.resource_version().unwrap();
    let params = WatchParams::default().timeout(1).labels("app=x");
    let mut stream = maps.watch(&params, &rv).await.unwrap().boxed();
    maps.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    let mut kinds = Vec::new();
    // The server ends the stream after timeoutSeconds; the loop ends with it.
    while let Some(event) = stream.try_next().await.unwrap() {
        kinds.push(match event {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        });
    }
    assert_eq!(
        kinds[0], "DELETED",
        "leaving the label selection is a DELETED event: {kinds:?}"
    );
    assert!(kinds.contains(&"BOOKMARK"), "{kinds:?}");
}

#[tokio::test]
async fn the_four_patch_types() {
    let cluster = start(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut two = pod("p", &[("a", "1")]);
    two.spec
        .as_mut()
        .unwrap()
        .containers
        .push(serde_json::from_value(json!({"name": "side", "image": "x:1"})).unwrap());
    pods.create(&PostParams::default(), &two).await.unwrap();

    // Strategic merge: containers merge by name.
    let patched = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"containers": [{"name": "side", "image": "x:2"}]}})),
        )
        .await
        .unwrap();
    let images: Vec<String> = patched
        .spec
        .unwrap()
        .containers
        .iter()
        .map(|c| c.image.clone().unwrap())
        .collect();
    assert_eq!(images, ["local/shell", "x:2"]);
    // JSON merge patch: null deletes.
    let patched = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": null, "b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.labels().clone(),
        BTreeMap::from([("b".to_string(), "2".to_string())])
    );
    // JSON patch, with a failing test operation refused.
    let ops: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels/c", "value": "3"}])).unwrap();
    let patched = pods
        .patch("p", &PatchParams::default(), &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(patched.labels()["c"], "3");
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/metadata/labels/c", "value": "9"}])).unwrap();
    let error = api_error(
        pods.patch("p", &PatchParams::default(), &Patch::Json::<()>(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 422);
    // Strategic merge is for built-in kinds only.
    install_crds(&client).await;
    let pools = pools(&client);
    pools.create(&PostParams::default(), &pool("p", 1)).await.unwrap();
    let error = api_error(
        pools
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"nodes": 2}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 415);

    // Server-side apply: creates, merges, and drops what the same manager stopped applying.
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let apply = PatchParams::apply("tester").force();
    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1", "b": "2"}});
    maps.patch("ssa", &apply, &Patch::Apply(&first)).await.unwrap();
    maps.patch(
        "ssa",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"other": "kept"}})),
    )
    .await
    .unwrap();
    let second =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "9"}});
    let applied = maps.patch("ssa", &apply, &Patch::Apply(&second)).await.unwrap();
    assert_eq!(
        applied.data.unwrap(),
        BTreeMap::from([
            ("a".to_string(), "9".to_string()),
            ("other".to_string(), "kept".to_string())
        ])
    );
    let error = api_error(
        maps.patch("ssa", &PatchParams::default(), &Patch::Apply(&second))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 400, "apply needs a field manager");
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owner_references_cascade() {
    let cluster = start(false).await;
    let maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let mut held = config_map("held", &[]);
    held.metadata.finalizers = Some(vec!["example.com/cleanup".into()]);
    maps.create(&PostParams::default(), &held).await.unwrap();
    let pending = maps.delete("held", &DeleteParams::default()).await.unwrap();
    let pending = pending.left().expect("kept while a finalizer remains");
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(maps.get_opt("held").await.unwrap().is_some());
    maps.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        maps.get_opt("held").await.unwrap().is_none(),
        "gone once the finalizer is removed"
    );

    let owner = maps
        .create(&PostParams::default(), &config_map("owner", &[]))
        .await
        .unwrap();
    let mut dependent = config_map("dependent", &[]);
    dependent.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()}))
        .unwrap(),
    ]);
    maps.create(&PostParams::default(), &dependent).await.unwrap();
    maps.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(
        maps.get_opt("dependent").await.unwrap().is_none(),
        "garbage collected with its owner"
    );

    let dry = maps
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &config_map("dry", &[]),
        )
        .await
        .unwrap();
    assert_eq!(dry.name_any(), "dry");
    assert!(
        maps.get_opt("dry").await.unwrap().is_none(),
        "dry runs persist nothing"
    );
}

#[tokio::test]
async fn bound_pods_are_deleted_gracefully_until_the_kubelet_confirms() {
    let cluster = start(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node("n1", true, json!({}), json!([]), 1))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("bound", &[]))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("pending", &[]))
        .await
        .unwrap();
    bind(&client, "default", "bound", "n1").await;
    let bound = pods.get("bound").await.unwrap();
    assert_eq!(bound.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    let scheduled = bound.status.unwrap().conditions.unwrap();
    assert!(
        scheduled
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True")
    );
    let again = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound"}, "target": {"name": "n2"}});
    let error = api_error(
        pods.create_subresource::<Value, Value>("binding", "bound", &PostParams::default(), &again)
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 409);

    let deleting = pods
        .delete("bound", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("kept");
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(30));
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert!(
        pods.get_opt("bound").await.unwrap().is_some(),
        "a bound pod waits for its kubelet"
    );
    // The kubelet confirms with a zero grace period.
    pods.delete("bound", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("bound").await.unwrap().is_none());
    // An unscheduled pod goes at once.
    pods.delete("pending", &DeleteParams::default()).await.unwrap();
    assert!(pods.get_opt("pending").await.unwrap().is_none());
}

#[tokio::test]
async fn namespace_deletion_cascades_to_its_contents() {
    let cluster = start(false).await;
    let client = cluster.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
        )
        .await
        .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    maps.create(&PostParams::default(), &config_map("c", &[]))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team");
    pods.create(&PostParams::default(), &pod("p", &[])).await.unwrap();
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node("n1", true, json!({}), json!([]), 1))
        .await
        .unwrap();
    bind(&client, "team", "p", "n1").await;

    namespaces.delete("team", &DeleteParams::default()).await.unwrap();
    let team = namespaces.get("team").await.unwrap();
    assert_eq!(team.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert!(maps.get_opt("c").await.unwrap().is_none());
    let error = api_error(
        maps.create(&PostParams::default(), &config_map("new", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 403);
    assert!(pods.get("p").await.unwrap().metadata.deletion_timestamp.is_some());
    pods.delete("p", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(
        namespaces.get_opt("team").await.unwrap().is_none(),
        "removed once empty"
    );
}

#[tokio::test]
async fn the_scheduler_binds_pods_to_ready_matching_nodes_it_may_use() {
    let cluster = start(true).await;
    let client = cluster.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let taint = json!([{"key": "virtual-kubelet.io/provider", "value": "ec2", "effect": "NoSchedule"}]);
    let labels = json!({"type": "virtual-kubelet"});
    nodes
        .create(
            &PostParams::default(),
            &node("not-ready", false, labels.clone(), taint.clone(), 1),
        )
        .await
        .unwrap();
    nodes
        .create(
            &PostParams::default(),
            &node("other", true, json!({}), json!([]), 1),
        )
        .await
        .unwrap();
    nodes
        .create(&PostParams::default(), &node("virtual", true, labels, taint, 1))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut wanted = pod("wanted", &[]);
    let spec = wanted.spec.as_mut().unwrap();
    spec.node_selector = Some([("type".to_string(), "virtual-kubelet".to_string())].into());
    spec.tolerations = Some(vec![
        serde_json::from_value(json!({"key": "virtual-kubelet.io/provider", "operator": "Exists"})).unwrap(),
    ]);
    pods.create(&PostParams::default(), &wanted).await.unwrap();
    let mut intolerant = pod("intolerant", &[]);
    intolerant.spec.as_mut().unwrap().node_selector =
        Some([("type".to_string(), "virtual-kubelet".to_string())].into());
    pods.create(&PostParams::default(), &intolerant).await.unwrap();

    let node = common::eventually(20, "the pod to be bound", || {
        let pods = pods.clone();
        async move { pods.get("wanted").await.ok()?.spec?.node_name }
    })
    .await;
    assert_eq!(node, "virtual");
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let failed = common::eventually(20, "a FailedScheduling event", || {
        let events = events.clone();
        async move {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=intolerant,reason=FailedScheduling"))
                .await
                .ok()?;
            list.items.into_iter().next()
        }
    })
    .await;
    let message = failed.message.unwrap();
    assert!(message.starts_with("0/3 nodes are available:"), "{message}");
    assert!(
        message.contains("untolerated taint {virtual-kubelet.io/provider: ec2}"),
        "{message}"
    );
    let condition = pods
        .get("intolerant")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .unwrap();
    assert!(condition.iter().any(|c| c.type_ == "PodScheduled"
        && c.status == "False"
        && c.reason.as_deref() == Some("Unschedulable")));
    let scheduled = events
        .list(&ListParams::default().fields("involvedObject.name=wanted"))
        .await
        .unwrap();
    assert_eq!(scheduled.items[0].reason.as_deref(), Some("Scheduled"));
}

#[tokio::test]
async fn events_recorded_through_events_k8s_io_show_up_as_core_events() {
    let cluster = start(false).await;
    let client = cluster.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let created = pods.create(&PostParams::default(), &pod("p", &[])).await.unwrap();
    let recorder = kube::runtime::events::Recorder::new(client.clone(), "ec2-kubelet".into());
    recorder
        .publish(
            &kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Warning,
                reason: "InvalidAnnotation".into(),
                note: Some("ec2-kubelet.io/instance-type: no such type".into()),
                action: "Launch".into(),
                secondary: None,
            },
            &created.object_ref(&()),
        )
        .await
        .unwrap();
    let events: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let list = events
        .list(&ListParams::default().fields("involvedObject.kind=Pod,involvedObject.name=p"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let event = &list.items[0];
    assert_eq!(
        event.message.as_deref(),
        Some("ec2-kubelet.io/instance-type: no such type")
    );
    assert_eq!(event.reporting_component.as_deref(), Some("ec2-kubelet"));
    assert_eq!(event.involved_object.uid, created.uid());
}

/// A one-route HTTP server standing in for a node's kubelet API: answers every request with
/// the path and query it got.
async fn fake_kubelet() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Kubelets serve HTTPS; the proxy does not verify their certificates, as an API server
    // without --kubelet-certificate-authority.
    let tls = ec2_kubelet::kubelet::tls::server_config(None, None, None).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("log line for {}\n", request.uri());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::from(body),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn pod_logs_are_proxied_to_the_node_kubelet_endpoint() {
    let cluster = start(false).await;
    let client = cluster.client();
    let port = fake_kubelet().await;
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &node("n1", true, json!({}), json!([]), port),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("p", &[])).await.unwrap();
    let error = api_error(pods.logs("p", &LogParams::default()).await.unwrap_err());
    assert_eq!(error.code, 400, "an unscheduled pod has no logs yet");
    bind(&client, "default", "p", "n1").await;
    let params = LogParams {
        tail_lines: Some(5),
        ..LogParams::default()
    };
    let text = pods.logs("p", &params).await.unwrap();
    assert_eq!(
        text,
        "log line for /containerLogs/default/p/app?&tailLines=5\n".replace("?&", "?")
    );
}

#[tokio::test]
async fn objects_and_requests_over_the_real_size_limits_are_refused_as_kube_apiserver_does() {
    let cluster = start(false).await;
    let client = cluster.client();
    let config_maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let sized = |name: &str, bytes: usize| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}, "data": {"blob": "x".repeat(bytes)}}))
            .unwrap()
    };
    // Under both limits: stored.
    config_maps
        .create(&PostParams::default(), &sized("small", 1024 * 1024))
        .await
        .unwrap();
    // Over etcd's 1.5 MiB per value (but under 3 MiB): the 500 kube-apiserver passes on.
    match config_maps
        .create(&PostParams::default(), &sized("large", 2 * 1024 * 1024))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 500);
            assert!(
                status.message.contains("etcdserver: request is too large"),
                "{status:?}"
            );
        }
        other => panic!("a 2 MiB object was not refused: {other:?}"),
    }
    // Over the API server's 3 MiB per request: 413 before anything is decoded.
    match config_maps
        .create(&PostParams::default(), &sized("huge", 3 * 1024 * 1024 + 1))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (413, "RequestEntityTooLarge")
            );
            assert_eq!(status.message, "Request entity too large: limit is 3145728");
        }
        other => panic!("a 3 MiB request was not refused: {other:?}"),
    }
    // A patch that would grow a stored object past 1.5 MiB is refused too; it stays as it was.
    let grow = json!({"data": {"more": "y".repeat(700 * 1024)}});
    let refused = config_maps
        .patch("small", &PatchParams::default(), &Patch::Merge(&grow))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("request is too large"), "{refused}");
    let kept = config_maps.get("small").await.unwrap();
    assert!(!kept.data.unwrap().contains_key("more"));
}
