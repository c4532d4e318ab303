//! The dev cluster's fidelity, measured: the same requests go to the dev cluster and to the
//! real control plane (kube-apiserver v1.34 from `e2e/control-plane`), and what each answers is
//! compared.
//!
//! 1. `requests_answered_alike`: scripted API requests (create, update with a stale
//!    resourceVersion, the four patch types, server-side apply and its conflicts, list paging,
//!    watch resume and 410, 422 causes, finalizers, graceful deletion, selectors, dry runs)
//!    and kubectl commands. Each case reduces both answers to what a client acts on (status
//!    code, reason, the fields named in causes, the resulting fields); the cases whose answers
//!    differ must be exactly the documented ones in [`KNOWN`] (also in docs/dev-cluster.md): a
//!    new difference fails, and so does a known one that went away (update the list).
//! 2. `the_operators_lifecycle_is_answered_alike`: the operator runs one pool, a pod and the
//!    teardown on each server, its requests recorded by the fault proxy; none may be refused
//!    on either (400, 403, 413, 415, 422), and the kinds of request it made are reported.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;

use common::TestCluster;
use common::cluster::Flavour;
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// The cases whose answers differ between the dev cluster and the real API server, and why
/// that is left so: the operator depends on none of it (docs/dev-cluster.md has the table).
const KNOWN: &[(&str, &str)] = &[
    (
        "custom resource schema (422 causes)",
        "the dev cluster runs CEL rules only on an object that passed the schema, so it names fewer fields at once",
    ),
    (
        "strict field validation",
        "fieldValidation applies to custom resources only; built-in kinds keep unknown fields silently",
    ),
    (
        "server-side apply",
        "no field ownership: no conflict between managers, no managedFields",
    ),
    ("managedFields of a create", "no managedFields"),
    (
        "list paging",
        "remainingItemCount is also given with a label selector (the real server omits it then)",
    ),
    (
        "watch from an expired resourceVersion",
        "the real server's watch cache replays from an old version etcd has compacted; the dev cluster answers 410 past its history",
    ),
    (
        "status subresource",
        "a pod's /status write cannot change its labels (the real server lets it)",
    ),
    (
        "field and label selectors",
        "a malformed label selector such as a===b is accepted",
    ),
    (
        "objects over the size limits",
        "a ConfigMap's 1 MiB data limit is not checked (etcd's 1.5 MiB limit is, as on the real server)",
    ),
    (
        "namespace deletion",
        "an empty namespace goes at once (no namespace controller), so a create in it is a 404, not a 403",
    ),
    (
        "access reviews",
        "no SelfSubjectAccessReview (no authentication at all)",
    ),
    (
        "kubectl commands",
        "kubectl create <built-in> sends protobuf (415), auth can-i needs access reviews, explain needs the built-in OpenAPI, apply --server-side sees no conflict",
    ),
];

const NS: &str = "fidelity";

/// A test cluster, its client and its namespace for the cases.
struct Ctx {
    cluster: TestCluster,
    client: kube::Client,
}

type Case = for<'a> fn(&'a Ctx) -> Pin<Box<dyn Future<Output = Value> + Send + 'a>>;

/// A raw request: the status code and the body (JSON, or the text as a string).
async fn call(ctx: &Ctx, method: &str, path: &str, content_type: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Accept", "application/json");
    if body.is_some() {
        request = request.header("Content-Type", content_type);
    }
    let bytes = body.map(|b| serde_json::to_vec(&b).unwrap()).unwrap_or_default();
    let response = ctx
        .client
        .send(request.body(kube::client::Body::from(bytes)).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// `call` for a GET, a DELETE without options, a JSON POST.
async fn get(ctx: &Ctx, path: &str) -> (u16, Value) {
    call(ctx, "GET", path, JSON, None).await
}

async fn delete(ctx: &Ctx, path: &str) -> (u16, Value) {
    call(ctx, "DELETE", path, JSON, None).await
}

async fn post(ctx: &Ctx, path: &str, body: Option<Value>) -> (u16, Value) {
    call(ctx, "POST", path, JSON, body).await
}

async fn patch(ctx: &Ctx, path: &str, content_type: &str, body: Value) -> (u16, Value) {
    call(ctx, "PATCH", path, content_type, Some(body)).await
}

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";
const APPLY: &str = "application/apply-patch+yaml";

/// What a client acts on in an answer: the code, and for a failure its reason and the fields
/// its causes name.
fn outcome(answer: &(u16, Value)) -> Value {
    let (code, body) = answer;
    if *code < 400 {
        return json!({"code": code});
    }
    let mut fields: Vec<&str> = body["details"]["causes"]
        .as_array()
        .map(|causes| causes.iter().filter_map(|c| c["field"].as_str()).collect())
        .unwrap_or_default();
    fields.sort();
    fields.dedup();
    json!({"code": code, "reason": body["reason"], "fields": fields})
}

fn configmaps(name: &str) -> String {
    match name {
        "" => format!("/api/v1/namespaces/{NS}/configmaps"),
        name => format!("/api/v1/namespaces/{NS}/configmaps/{name}"),
    }
}

fn configmap(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"case": name}}, "data": data})
}

fn pods(name: &str) -> String {
    match name {
        "" => format!("/api/v1/namespaces/{NS}/pods"),
        name => format!("/api/v1/namespaces/{NS}/pods/{name}"),
    }
}

fn pod(name: &str, node: Option<&str>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "local/shell"}],
            "tolerations": [{"operator": "Exists"}],
            "nodeSelector": {"fidelity": "nowhere"}}});
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

async fn create_and_duplicate(ctx: &Ctx) -> Value {
    let first = post(ctx, &configmaps(""), Some(configmap("dup", json!({"k": "v"})))).await;
    let second = post(ctx, &configmaps(""), Some(configmap("dup", json!({"k": "v"})))).await;
    json!([outcome(&first), first.1["data"], outcome(&second)])
}

async fn create_with_resource_version(ctx: &Ctx) -> Value {
    let mut object = configmap("with-rv", json!({}));
    object["metadata"]["resourceVersion"] = json!("12345");
    outcome(&post(ctx, &configmaps(""), Some(object)).await)
}

async fn update_stale_and_unconditional(ctx: &Ctx) -> Value {
    let (_, created) = post(ctx, &configmaps(""), Some(configmap("stale", json!({"k": "1"})))).await;
    let mut fresh = created.clone();
    fresh["data"]["k"] = json!("2");
    let first = call(ctx, "PUT", &configmaps("stale"), JSON, Some(fresh)).await;
    let mut stale = created.clone();
    stale["data"]["k"] = json!("3");
    let second = call(ctx, "PUT", &configmaps("stale"), JSON, Some(stale)).await;
    let mut unconditional = created;
    unconditional["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    unconditional["data"]["k"] = json!("4");
    let third = call(ctx, "PUT", &configmaps("stale"), JSON, Some(unconditional)).await;
    json!([
        outcome(&first),
        outcome(&second),
        outcome(&third),
        third.1["data"]
    ])
}

async fn invalid_pod(ctx: &Ctx) -> Value {
    let object =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "empty"}, "spec": {"containers": []}});
    outcome(&post(ctx, &pods(""), Some(object)).await)
}

async fn invalid_name(ctx: &Ctx) -> Value {
    outcome(&post(ctx, &configmaps(""), Some(configmap("Bad_Name", json!({})))).await)
}

async fn custom_resource_schema(ctx: &Ctx) -> Value {
    let pool = json!({"apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool",
        "metadata": {"name": "bad-pool"}, "spec": {"nodes": -1, "subnetIds": [], "securityGroupIds": ["sg-1"]}});
    outcome(
        &call(
            ctx,
            "POST",
            "/apis/ec2-kubelet.io/v1alpha1/ec2nodepools",
            JSON,
            Some(pool),
        )
        .await,
    )
}

async fn strict_field_validation(ctx: &Ctx) -> Value {
    let mut object = configmap("strict", json!({}));
    object["spec"] = json!({"unknown": true});
    let strict = call(
        ctx,
        "POST",
        &format!("{}?fieldValidation=Strict", configmaps("")),
        JSON,
        Some(object.clone()),
    )
    .await;
    let ignored = call(
        ctx,
        "POST",
        &format!("{}?fieldValidation=Ignore", configmaps("")),
        JSON,
        Some(object),
    )
    .await;
    json!([outcome(&strict), outcome(&ignored)])
}

async fn patches(ctx: &Ctx) -> Value {
    post(
        ctx,
        &configmaps(""),
        Some(configmap("patched", json!({"a": "1"}))),
    )
    .await;
    // Merge, JSON (an add, then a failing test), strategic: each answer, then the result.
    let mut answers = Vec::new();
    for (content_type, body) in [
        (
            MERGE,
            json!({"metadata": {"labels": {"m": "x"}}, "data": {"a": null, "b": "2"}}),
        ),
        (
            JSON_PATCH,
            json!([{"op": "add", "path": "/data/c", "value": "3"}]),
        ),
        (
            JSON_PATCH,
            json!([{"op": "test", "path": "/data/b", "value": "nope"}]),
        ),
        (STRATEGIC, json!({"data": {"d": "4"}})),
    ] {
        answers.push(patch(ctx, &configmaps("patched"), content_type, body).await);
    }
    let last = &answers[answers.len() - 1].1;
    let mut seen: Vec<Value> = answers.iter().map(outcome).collect();
    seen.extend([last["data"].clone(), last["metadata"]["labels"].clone()]);
    json!(seen)
}

async fn strategic_merge_of_node_conditions(ctx: &Ctx) -> Value {
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "fidelity-node"}});
    call(ctx, "POST", "/api/v1/nodes", JSON, Some(node)).await;
    let condition = |type_: &str, status: &str| {
        json!({"type": type_, "status": status, "reason": "Test", "message": "test",
            "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"})
    };
    let status = "/api/v1/nodes/fidelity-node/status";
    let first = patch(
        ctx,
        status,
        STRATEGIC,
        json!({"status": {"conditions": [condition("Ready", "True"), condition("MemoryPressure", "False")],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}),
    )
    .await;
    let second = patch(
        ctx,
        status,
        STRATEGIC,
        json!({"status": {"conditions": [condition("Ready", "False")],
            "addresses": [{"type": "Hostname", "address": "fidelity-node"}]}}),
    )
    .await;
    let conditions: BTreeMap<String, String> = second.1["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or("").into(),
                c["status"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let addresses: BTreeSet<String> = second.1["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a["type"].as_str().unwrap_or("").to_string())
        .collect();
    delete(ctx, "/api/v1/nodes/fidelity-node").await;
    json!([outcome(&first), outcome(&second), conditions, addresses])
}

async fn server_side_apply(ctx: &Ctx) -> Value {
    let applied = |value: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"k": value}});
    let path = |manager: &str, force: bool| {
        format!("{}?fieldManager={manager}&force={force}", configmaps("applied"))
    };
    let first = patch(ctx, &path("alice", false), APPLY, applied("a")).await;
    let conflict = patch(ctx, &path("bob", false), APPLY, applied("b")).await;
    let forced = patch(ctx, &path("bob", true), APPLY, applied("b")).await;
    let managers: BTreeSet<String> = forced.1["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{}/{}",
                m["manager"].as_str().unwrap_or(""),
                m["operation"].as_str().unwrap_or("")
            )
        })
        .collect();
    json!([
        outcome(&first),
        outcome(&conflict),
        outcome(&forced),
        forced.1["data"],
        managers
    ])
}

async fn managed_fields_of_updates(ctx: &Ctx) -> Value {
    let (_, created) = call(
        ctx,
        "POST",
        &format!("{}?fieldManager=creator", configmaps("")),
        JSON,
        Some(configmap("managed", json!({"k": "v"}))),
    )
    .await;
    let managers: Vec<String> = created["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{}/{}",
                m["manager"].as_str().unwrap_or(""),
                m["operation"].as_str().unwrap_or("")
            )
        })
        .collect();
    json!(managers)
}

async fn list_paging(ctx: &Ctx) -> Value {
    for i in 0..5 {
        let mut object = configmap(&format!("page-{i}"), json!({}));
        object["metadata"]["labels"] = json!({"paging": "yes"});
        post(ctx, &configmaps(""), Some(object)).await;
    }
    let mut pages = Vec::new();
    let mut names = Vec::new();
    let mut next = String::new();
    loop {
        let path = format!("{}?labelSelector=paging%3Dyes&limit=2{next}", configmaps(""));
        let (code, page) = get(ctx, &path).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        pages.push(
            json!({"code": code, "items": items.len(), "remaining": page["metadata"]["remainingItemCount"]}),
        );
        names.extend(
            items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap_or("").to_string()),
        );
        match page["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
            Some(token) => next = format!("&continue={token}"),
            None => break,
        }
        if pages.len() > 5 {
            break;
        }
    }
    let bad = get(ctx, &format!("{}?limit=2&continue=garbage", configmaps(""))).await;
    json!([pages, names, outcome(&bad)])
}

/// The events of a watch that ends after `timeoutSeconds=2`: type and name (or code).
async fn watch_events(ctx: &Ctx, query: &str) -> Vec<String> {
    let path = format!("{}?watch=true&timeoutSeconds=2&{query}", configmaps(""));
    let (_, body) = get(ctx, &path).await;
    let text = match body {
        Value::String(text) => text,
        other => other.to_string(),
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|event| {
            let object = &event["object"];
            match event["type"].as_str().unwrap_or("") {
                "ERROR" => format!("ERROR {}", object["code"]),
                "BOOKMARK" => "BOOKMARK".to_string(),
                kind => format!("{kind} {}", object["metadata"]["name"].as_str().unwrap_or("")),
            }
        })
        .collect()
}

async fn watch_resume(ctx: &Ctx) -> Value {
    let (_, list) = get(ctx, &format!("{}?labelSelector=watch%3Dyes", configmaps(""))).await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("")
        .to_string();
    for name in ["watched-1", "watched-2"] {
        let mut object = configmap(name, json!({}));
        object["metadata"]["labels"] = json!({"watch": "yes"});
        post(ctx, &configmaps(""), Some(object)).await;
    }
    delete(ctx, &configmaps("watched-1")).await;
    let resumed = watch_events(ctx, &format!("labelSelector=watch%3Dyes&resourceVersion={rv}")).await;
    json!(resumed)
}

async fn watch_expired(ctx: &Ctx) -> Value {
    // The dev cluster keeps a short history here (see `observe`): resourceVersion 1 is long
    // gone from it.
    json!(watch_events(ctx, "labelSelector=case&resourceVersion=1").await)
}

async fn delete_preconditions(ctx: &Ctx) -> Value {
    post(ctx, &configmaps(""), Some(configmap("precondition", json!({})))).await;
    let options = json!({"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}});
    let refused = call(ctx, "DELETE", &configmaps("precondition"), JSON, Some(options)).await;
    let missing = delete(ctx, &configmaps("never-was")).await;
    json!([outcome(&refused), outcome(&missing)])
}

async fn finalizers(ctx: &Ctx) -> Value {
    let mut object = configmap("finalized", json!({}));
    object["metadata"]["finalizers"] = json!(["fidelity/hold"]);
    post(ctx, &configmaps(""), Some(object)).await;
    let deleted = delete(ctx, &configmaps("finalized")).await;
    let (held_code, held) = get(ctx, &configmaps("finalized")).await;
    let released = patch(
        ctx,
        &configmaps("finalized"),
        MERGE,
        json!({"metadata": {"finalizers": null}}),
    )
    .await;
    let gone = get(ctx, &configmaps("finalized")).await;
    json!([
        outcome(&deleted),
        held_code,
        held["metadata"]["deletionTimestamp"].is_string(),
        outcome(&released),
        outcome(&gone)
    ])
}

async fn graceful_pod_deletion(ctx: &Ctx) -> Value {
    post(ctx, &pods(""), Some(pod("bound", Some("fidelity-absent")))).await;
    post(ctx, &pods(""), Some(pod("unbound", None))).await;
    let bound = delete(ctx, &pods("bound")).await;
    let (still_code, still) = get(ctx, &pods("bound")).await;
    let unbound = delete(ctx, &pods("unbound")).await;
    let unbound_after = get(ctx, &pods("unbound")).await;
    let grace0 = call(
        ctx,
        "DELETE",
        &pods("bound"),
        JSON,
        Some(json!({"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})),
    )
    .await;
    let bound_after = get(ctx, &pods("bound")).await;
    json!([
        outcome(&bound),
        still_code,
        still["metadata"]["deletionGracePeriodSeconds"],
        outcome(&unbound),
        outcome(&unbound_after),
        outcome(&grace0),
        outcome(&bound_after)
    ])
}

async fn pod_defaults(ctx: &Ctx) -> Value {
    let mut object = pod("defaults", None);
    object["spec"]["containers"][0]["resources"] =
        json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "100m", "memory": "64Mi"}});
    let (code, created) = post(ctx, &pods(""), Some(object)).await;
    let spec = &created["spec"];
    let tolerations = spec["tolerations"].as_array().map(|t| t.len());
    json!({"code": code, "qosClass": created["status"]["qosClass"], "restartPolicy": spec["restartPolicy"],
        "dnsPolicy": spec["dnsPolicy"], "schedulerName": spec["schedulerName"],
        "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"],
        "enableServiceLinks": spec["enableServiceLinks"], "priority": spec["priority"],
        "phase": created["status"]["phase"], "tolerations": tolerations,
        "imagePullPolicy": spec["containers"][0]["imagePullPolicy"],
        "terminationMessagePolicy": spec["containers"][0]["terminationMessagePolicy"],
        "serviceAccountName": spec["serviceAccountName"]})
}

async fn status_subresource(ctx: &Ctx) -> Value {
    let (_, created) = post(ctx, &pods(""), Some(pod("status", Some("fidelity-absent")))).await;
    let mut update = created.clone();
    update["metadata"]["labels"] = json!({"from": "status"});
    update["spec"]["activeDeadlineSeconds"] = json!(30);
    update["status"]["message"] = json!("written through status");
    let (code, updated) = call(
        ctx,
        "PUT",
        &format!("{}/status", pods("status")),
        JSON,
        Some(update),
    )
    .await;
    let mut main = updated.clone();
    main["status"]["message"] = json!("written through the main resource");
    let (main_code, after_main) = call(ctx, "PUT", &pods("status"), JSON, Some(main)).await;
    json!([
        code,
        updated["metadata"]["labels"],
        updated["spec"]["activeDeadlineSeconds"],
        updated["status"]["message"],
        main_code,
        after_main["status"]["message"]
    ])
}

async fn selectors(ctx: &Ctx) -> Value {
    post(ctx, &pods(""), Some(pod("selected", Some("fidelity-node-a")))).await;
    let by_node = get(
        ctx,
        &format!("{}?fieldSelector=spec.nodeName%3Dfidelity-node-a", pods("")),
    )
    .await;
    let unsupported = get(ctx, &format!("{}?fieldSelector=spec.hostname%3Dx", pods(""))).await;
    let set_based = get(
        ctx,
        &format!("{}?labelSelector=case+in+(dup,stale)", configmaps("")),
    )
    .await;
    let bad_label = get(ctx, &format!("{}?labelSelector=a%3D%3D%3Db", configmaps(""))).await;
    let names = |list: &Value| -> Vec<String> {
        let mut names: Vec<String> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        names.sort();
        names
    };
    json!([
        outcome(&by_node),
        names(&by_node.1),
        outcome(&unsupported),
        outcome(&set_based),
        names(&set_based.1),
        outcome(&bad_label)
    ])
}

async fn generate_name_and_dry_run(ctx: &Ctx) -> Value {
    let object = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}});
    let (code, created) = post(ctx, &configmaps(""), Some(object)).await;
    let name = created["metadata"]["name"].as_str().unwrap_or("");
    let dry = call(
        ctx,
        "POST",
        &format!("{}?dryRun=All", configmaps("")),
        JSON,
        Some(configmap("dry", json!({}))),
    )
    .await;
    let after = get(ctx, &configmaps("dry")).await;
    json!([
        code,
        name.starts_with("gen-") && name.len() == 9,
        outcome(&dry),
        dry.1["metadata"]["name"],
        outcome(&after)
    ])
}

async fn leases(ctx: &Ctx) -> Value {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases");
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lock"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 3, "renewTime": "2026-01-01T00:00:00.000000Z"}});
    let (_, created) = call(ctx, "POST", &path, JSON, Some(lease)).await;
    let mut renewed = created.clone();
    renewed["spec"]["holderIdentity"] = json!("b");
    let first = call(ctx, "PUT", &format!("{path}/lock"), JSON, Some(renewed)).await;
    let mut stale = created;
    stale["spec"]["holderIdentity"] = json!("c");
    let second = call(ctx, "PUT", &format!("{path}/lock"), JSON, Some(stale)).await;
    json!([outcome(&first), first.1["spec"]["renewTime"], outcome(&second)])
}

async fn events(ctx: &Ctx) -> Value {
    let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "core.1"},
        "involvedObject": {"kind": "ConfigMap", "name": "dup", "namespace": NS},
        "reason": "Tested", "message": "core", "type": "Normal", "count": 1,
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
        "source": {"component": "fidelity"}});
    let created = call(
        ctx,
        "POST",
        &format!("/api/v1/namespaces/{NS}/events"),
        JSON,
        Some(core),
    )
    .await;
    let listed = get(
        ctx,
        &format!("/api/v1/namespaces/{NS}/events?fieldSelector=involvedObject.name%3Ddup"),
    )
    .await;
    let through_events_api = get(ctx, &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")).await;
    // Only this case's event: the real scheduler records its own about the cases' pods.
    let reasons: Vec<Value> = through_events_api.1["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["name"] == "dup")
        .map(|e| e["reason"].clone())
        .collect();
    json!([
        outcome(&created),
        listed.1["items"].as_array().map(|i| i.len()),
        outcome(&through_events_api),
        reasons
    ])
}

async fn large_objects(ctx: &Ctx) -> Value {
    let big = "x".repeat(1024 * 1024 + 1);
    let too_big_configmap = post(ctx, &configmaps(""), Some(configmap("big", json!({"k": big})))).await;
    // A pool's status with 18,000 bindings (about 1.8 MB): past etcd's 1.5 MiB, within the
    // API server's 3 MiB request limit. What a pool's binding write meets at that size.
    let pools = "/apis/ec2-kubelet.io/v1alpha1/ec2nodepools";
    let pool = json!({"apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": "big"},
        "spec": {"nodes": 0, "subnetIds": ["subnet-1"], "securityGroupIds": ["sg-1"]}});
    call(ctx, "POST", pools, JSON, Some(pool)).await;
    let mut bindings = serde_json::Map::new();
    for node in 0..12 {
        let pods: serde_json::Map<String, Value> = (0..1500)
            .map(|i| {
                let n = node * 1500 + i;
                (
                    format!("00000000-0000-0000-0000-{n:012}"),
                    json!({"name": format!("pod-{n}"), "namespace": "default", "phase": "Launching"}),
                )
            })
            .collect();
        bindings.insert(format!("big-{node}"), Value::Object(pods));
    }
    let bindings = json!({"status": {"bindings": bindings}});
    let too_big_status = patch(ctx, &format!("{pools}/big/status"), MERGE, bindings).await;
    let message = too_big_status.1["message"].as_str().unwrap_or("").to_string();
    delete(ctx, &format!("{pools}/big")).await;
    json!([outcome(&too_big_configmap), too_big_status.0, message])
}

async fn protected_namespaces(ctx: &Ctx) -> Value {
    let default = delete(ctx, "/api/v1/namespaces/default").await;
    let system = delete(ctx, "/api/v1/namespaces/kube-system").await;
    json!([outcome(&default), outcome(&system)])
}

async fn namespace_deletion(ctx: &Ctx) -> Value {
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "doomed"}});
    post(ctx, "/api/v1/namespaces", Some(namespace)).await;
    let deleted = delete(ctx, "/api/v1/namespaces/doomed").await;
    let create_inside = call(
        ctx,
        "POST",
        "/api/v1/namespaces/doomed/configmaps",
        JSON,
        Some(configmap("late", json!({}))),
    )
    .await;
    json!([
        outcome(&deleted),
        deleted.1["status"]["phase"],
        outcome(&create_inside)
    ])
}

async fn access_reviews(ctx: &Ctx) -> Value {
    let review = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "create", "resource": "pods", "namespace": NS}}});
    let answer = call(
        ctx,
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        JSON,
        Some(review),
    )
    .await;
    json!([outcome(&answer), answer.1["status"]["allowed"]])
}

/// kubectl's exit code and first line of output (stdout, else stderr), with the
/// server-specific parts of error lines cut.
async fn kubectl(ctx: &Ctx, args: &[&str], stdin: Option<&str>) -> Value {
    let output = common::kubectl_output(&ctx.cluster, args, stdin).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let first = stdout
        .lines()
        .next()
        .or_else(|| stderr.lines().next())
        .unwrap_or("")
        .to_string();
    json!([output.status.code(), first])
}

async fn kubectl_commands(ctx: &Ctx) -> Value {
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied-by-kubectl\n  namespace: {NS}\ndata:\n  k: v\n"
    );
    let changed = manifest.replace("k: v", "k: w");
    json!({
        "create deployment": kubectl(ctx, &["-n", NS, "create", "deployment", "web", "--image=local/shell"], None).await,
        "create configmap": kubectl(ctx, &["-n", NS, "create", "configmap", "by-kubectl", "--from-literal=a=b"], None).await,
        "apply": kubectl(ctx, &["apply", "-f", "-"], Some(&manifest)).await,
        "apply again": kubectl(ctx, &["apply", "-f", "-"], Some(&manifest)).await,
        "apply changed": kubectl(ctx, &["apply", "-f", "-"], Some(&changed)).await,
        "apply server-side": kubectl(ctx, &["apply", "--server-side", "--field-manager=other", "-f", "-"], Some(&manifest)).await,
        "patch strategic": kubectl(ctx, &["-n", NS, "patch", "configmap", "by-kubectl", "-p", "{\"data\":{\"c\":\"d\"}}"], None).await,
        "label": kubectl(ctx, &["-n", NS, "label", "configmap", "by-kubectl", "x=y"], None).await,
        "get": kubectl(ctx, &["-n", NS, "get", "configmap", "by-kubectl", "-o", "jsonpath={.data}"], None).await,
        "explain pod": kubectl(ctx, &["explain", "pod.spec.nodeName"], None).await,
        "auth can-i": kubectl(ctx, &["auth", "can-i", "create", "pods"], None).await,
        "api-resources": kubectl(ctx, &["api-resources", "--api-group=ec2-kubelet.io", "-o", "name"], None).await,
        "delete": kubectl(ctx, &["-n", NS, "delete", "configmap", "by-kubectl"], None).await,
    })
}

/// Every case, in order (later cases may rely on objects of earlier ones).
fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("create and duplicate", |c| Box::pin(create_and_duplicate(c))),
        ("create with resourceVersion", |c| {
            Box::pin(create_with_resource_version(c))
        }),
        ("update stale and unconditional", |c| {
            Box::pin(update_stale_and_unconditional(c))
        }),
        ("invalid pod (422 causes)", |c| Box::pin(invalid_pod(c))),
        ("invalid name (422 causes)", |c| Box::pin(invalid_name(c))),
        ("custom resource schema (422 causes)", |c| {
            Box::pin(custom_resource_schema(c))
        }),
        ("strict field validation", |c| {
            Box::pin(strict_field_validation(c))
        }),
        ("merge, JSON and strategic patches", |c| Box::pin(patches(c))),
        ("strategic merge of node conditions", |c| {
            Box::pin(strategic_merge_of_node_conditions(c))
        }),
        ("server-side apply", |c| Box::pin(server_side_apply(c))),
        ("managedFields of a create", |c| {
            Box::pin(managed_fields_of_updates(c))
        }),
        ("list paging", |c| Box::pin(list_paging(c))),
        ("watch resume", |c| Box::pin(watch_resume(c))),
        ("watch from an expired resourceVersion", |c| {
            Box::pin(watch_expired(c))
        }),
        ("delete preconditions", |c| Box::pin(delete_preconditions(c))),
        ("finalizers", |c| Box::pin(finalizers(c))),
        ("graceful pod deletion", |c| Box::pin(graceful_pod_deletion(c))),
        ("pod defaults", |c| Box::pin(pod_defaults(c))),
        ("status subresource", |c| Box::pin(status_subresource(c))),
        ("field and label selectors", |c| Box::pin(selectors(c))),
        ("generateName and dry run", |c| {
            Box::pin(generate_name_and_dry_run(c))
        }),
        ("leases", |c| Box::pin(leases(c))),
        ("events", |c| Box::pin(events(c))),
        ("objects over the size limits", |c| Box::pin(large_objects(c))),
        ("protected namespaces", |c| Box::pin(protected_namespaces(c))),
        ("namespace deletion", |c| Box::pin(namespace_deletion(c))),
        ("access reviews", |c| Box::pin(access_reviews(c))),
        ("kubectl commands", |c| Box::pin(kubectl_commands(c))),
    ]
}

/// Runs every case on a fresh cluster of `flavour`.
async fn observe(flavour: Flavour) -> Vec<(&'static str, Value)> {
    // A short watch history on the dev cluster (16 changes); the real API server's etcd is
    // compacted every second.
    let options = ec2_kubelet_testbed::devcluster::DevClusterOptions {
        history: 16,
        ..Default::default()
    };
    let cluster = common::operator_cluster_on(
        flavour,
        options,
        &["--apiserver-arg=--etcd-compaction-interval=1s"],
    )
    .await;
    let client = cluster.client();
    let ctx = Ctx { cluster, client };
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    let (code, _) = call(&ctx, "POST", "/api/v1/namespaces", JSON, Some(namespace)).await;
    assert_eq!(code, 201, "create the namespace");
    let mut seen = Vec::new();
    for (name, case) in cases() {
        seen.push((name, case(&ctx).await));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_alike() {
    let dev = observe(Flavour::Dev).await;
    let real = observe(Flavour::Real).await;
    let mut differing = BTreeSet::new();
    let mut report = String::new();
    for ((name, dev), (_, real)) in dev.iter().zip(&real) {
        if dev == real {
            report.push_str(&format!("same     {name}\n"));
        } else {
            differing.insert(*name);
            report.push_str(&format!("DIFFERS  {name}\n  dev:  {dev}\n  real: {real}\n"));
        }
    }
    let same = dev.len() - differing.len();
    println!("fidelity: {same} of {} cases answered alike\n{report}", dev.len());
    let known: BTreeSet<&str> = KNOWN.iter().map(|(name, _)| *name).collect();
    let new: Vec<_> = differing.difference(&known).collect();
    let gone: Vec<_> = known.difference(&differing).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "differences not documented: {new:?}; documented ones now answered alike: {gone:?}\n{report}"
    );
}

/// Answers that mean a server will not take a request as sent: the operator must never get one.
const REFUSALS: [u16; 5] = [400, 403, 413, 415, 422];

/// The operator's requests through one lifecycle on a fresh cluster of `flavour`: a one-node
/// pool, a pod Running on its instance, the pod deleted, the pool deleted.
async fn lifecycle(flavour: Flavour) -> Vec<ec2_kubelet_testbed::devcluster::proxy::Exchange> {
    use ec2_kubelet::crd::Ec2NodePool;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{Api, ListParams};
    let cluster = common::operator_cluster_on(flavour, Default::default(), &[]).await;
    cluster.proxy().record();
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, _instances) = common::local_compute(&dir.path().join("local"));
    let replica = common::Replica::start(&cluster, common::lifecycle_config(), compute, "replica-a");
    common::local_template_and_pool(&client, "life", 1).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod = common::virtual_pod("life", Some("life"), &["sleep", "3600"], json!({}));
    pods.create(&Default::default(), &pod).await.unwrap();
    common::phase_of(&pods, "life", "Running").await;
    pods.delete("life", &Default::default()).await.unwrap();
    common::no_pods_left(&pods, 60).await;
    Api::<Ec2NodePool>::all(client.clone())
        .delete("life", &Default::default())
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    common::eventually(60, "the pool's nodes gone", || {
        let nodes = nodes.clone();
        async move {
            let selector = format!("{}=life", ec2_kubelet::crd::labels::POOL);
            let listed = nodes.list(&ListParams::default().labels(&selector)).await.ok()?;
            listed.items.is_empty().then_some(())
        }
    })
    .await;
    replica.stop().await;
    cluster
        .proxy()
        .exchanges()
        .into_iter()
        .filter(|e| e.user_agent == ec2_kubelet::operator::USER_AGENT)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_lifecycle_is_answered_alike() {
    let dev = lifecycle(Flavour::Dev).await;
    let real = lifecycle(Flavour::Real).await;
    // (verb, resource) -> the status codes it got.
    let answers = |exchanges: &[ec2_kubelet_testbed::devcluster::proxy::Exchange]| {
        let mut answers: BTreeMap<(String, String), BTreeSet<u16>> = BTreeMap::new();
        for exchange in exchanges {
            answers
                .entry((exchange.verb.clone(), exchange.resource.clone()))
                .or_default()
                .insert(exchange.status);
        }
        answers
    };
    let (on_dev, on_real) = (answers(&dev), answers(&real));
    let mut report = String::new();
    for key in on_dev.keys().chain(on_real.keys()).collect::<BTreeSet<_>>() {
        let (d, r) = (on_dev.get(key), on_real.get(key));
        let mark = if d == r { "same   " } else { "differs" };
        report.push_str(&format!("{mark} {} {}: dev {d:?}, real {r:?}\n", key.0, key.1));
    }
    println!(
        "fidelity: the operator's lifecycle made {} requests on the dev cluster and {} on the real API server\n{report}",
        dev.len(),
        real.len()
    );
    assert!(!dev.is_empty() && !real.is_empty(), "requests were recorded");
    for (server, exchanges) in [("dev cluster", &dev), ("real API server", &real)] {
        // A JSON patch's failed `test` operation is a 422 too: the finalizer helper's
        // compare-and-swap losing a race (the operator retries it as a conflict).
        let refused: Vec<_> = exchanges
            .iter()
            .filter(|e| REFUSALS.contains(&e.status))
            .filter(|e| !(e.status == 422 && e.content_type == JSON_PATCH))
            .collect();
        assert!(
            refused.is_empty(),
            "the {server} refused the operator: {refused:?}\n{report}"
        );
    }
    // What a lifecycle needs reached both servers: the same kinds of request, each answered
    // with success at least once.
    let succeeded = |answers: &BTreeMap<(String, String), BTreeSet<u16>>| -> BTreeSet<(String, String)> {
        answers
            .iter()
            .filter(|(_, codes)| codes.iter().any(|c| *c < 300))
            .map(|(key, _)| key.clone())
            .collect()
    };
    let (dev_ok, real_ok) = (succeeded(&on_dev), succeeded(&on_real));
    let only_real: BTreeSet<(&str, &str)> = real_ok
        .difference(&dev_ok)
        .map(|(verb, resource)| (verb.as_str(), resource.as_str()))
        .collect();
    let only_dev: BTreeSet<(&str, &str)> = dev_ok
        .difference(&real_ok)
        .map(|(verb, resource)| (verb.as_str(), resource.as_str()))
        .collect();
    let known: BTreeSet<(&str, &str)> = KNOWN_IN_LIFECYCLE
        .iter()
        .map(|(verb, resource, _)| (*verb, *resource))
        .collect();
    let racy = |kind: &(&str, &str)| {
        !RACY_IN_LIFECYCLE
            .iter()
            .any(|(verb, resource, _)| kind == &(*verb, *resource))
    };
    let only_real: BTreeSet<(&str, &str)> = only_real.into_iter().filter(racy).collect();
    let only_dev: BTreeSet<(&str, &str)> = only_dev.into_iter().filter(racy).collect();
    assert!(
        only_real == known && only_dev.is_empty(),
        "succeeded on the real API server only: {only_real:?} (documented: {known:?}); on the dev cluster only: {only_dev:?}\n{report}"
    );
}

/// The requests of the operator's lifecycle that only the real API server sees, and why.
const KNOWN_IN_LIFECYCLE: &[(&str, &str, &str)] = &[
    (
        "create",
        "serviceaccounts/token",
        "the real ServiceAccount admission plugin gives every pod a projected kube-api-access volume, whose token the operator requests for the pod; the dev cluster adds no such volume",
    ),
    (
        "get",
        "configmaps",
        "the same volume's kube-root-ca.crt, read from the pod's namespace",
    ),
];

/// Requests whose success depends on who wins a race, on either server.
const RACY_IN_LIFECYCLE: &[(&str, &str, &str)] = &[(
    "delete",
    "leases",
    "a deleted pool's Nodes are owned by it, so the garbage collector removes them too: whether the operator's own cleanup of their leases finds them first depends on who comes first",
)];
