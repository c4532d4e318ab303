//! The Helm chart, checked with the real helm from `e2e/tools.sh`.

mod common;

use std::process::Command;

use ec2_kubelet::config::OperatorConfig;
use serde::Deserialize;

fn helm(args: &[&str]) -> std::process::Output {
    Command::new(common::tool("bin/helm"))
        .args(args)
        .current_dir(common::repo_root())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("ec2-kubelet-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("ec2-kubelet-helm-config"),
        )
        .output()
        .expect("run helm")
}

/// Where instances enroll, as a user of the `aws` backend sets it.
const ENROLL_URL: &str = "agentTls.enrollUrl=https://enroll.platform.internal:8443";

#[test]
fn chart_lints() {
    let output = helm(&["lint", "--strict", "charts/ec2-kubelet", "--set", ENROLL_URL]);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn rendered_config_map_is_a_valid_operator_config() {
    let output = helm(&[
        "template",
        "demo",
        "charts/ec2-kubelet",
        "--namespace",
        "platform",
        "--include-crds",
        "--set",
        "config.region=eu-central-1",
        "--set",
        ENROLL_URL,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let kinds: Vec<&str> = documents.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(),
        3,
        "{kinds:?}"
    );
    let config_map = documents
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    let operator_yaml = config_map["data"]["operator.yaml"]
        .as_str()
        .expect("operator.yaml key");
    let config = OperatorConfig::from_yaml(operator_yaml).unwrap_or_else(|e| panic!("{e}\n{operator_yaml}"));
    assert_eq!(config.region, "eu-central-1");
    assert_eq!(config.namespace, "platform");
    assert_eq!(
        config.agent_tls.enroll_url.as_deref(),
        Some("https://enroll.platform.internal:8443")
    );
    assert_eq!(config.server.enroll_address, "0.0.0.0:8443");
    assert_eq!(
        config.server.kubelet_auth,
        ec2_kubelet::config::KubeletAuthConfig::default(),
        "the chart's kubeletAuth values are the operator's defaults"
    );
    let enroll = documents
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "demo-ec2-kubelet-enroll")
        .expect("the enrollment Service");
    assert_eq!(enroll["spec"]["ports"][0]["targetPort"], "enroll");
    assert_eq!(
        enroll["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"],
        "internal"
    );

    // Without the URL, the aws backend's agents could not enroll: refused at install time.
    let output = helm(&["template", "demo", "charts/ec2-kubelet"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("agentTls.enrollUrl is required"), "{stderr}");
}

/// (API group, resource, verb) triples a rule grants.
fn granted(rules: &serde_yaml::Value) -> std::collections::BTreeSet<(String, String, String)> {
    let mut triples = std::collections::BTreeSet::new();
    for rule in rules.as_sequence().into_iter().flatten() {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    triples.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    triples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_grants_exactly_what_the_operator_uses() {
    use ec2_kubelet::crd::Ec2NodePool;
    use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use serde_json::json;
    use std::collections::BTreeSet;

    // 1. The RBAC objects the chart renders for the operator's namespace.
    let namespace = common::OPERATOR_NAMESPACE;
    let output = helm(&[
        "template",
        "demo",
        "charts/ec2-kubelet",
        "--namespace",
        namespace,
        "--set",
        ENROLL_URL,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let cluster_wide: BTreeSet<_> = documents
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .flat_map(|d| granted(&d["rules"]))
        .collect();
    let mut per_namespace: std::collections::BTreeMap<String, BTreeSet<_>> = Default::default();
    for role in documents.iter().filter(|d| d["kind"] == "Role") {
        let ns = role["metadata"]["namespace"].as_str().unwrap().to_string();
        per_namespace
            .entry(ns)
            .or_default()
            .extend(granted(&role["rules"]));
    }

    // 2. A whole lifecycle, with the dev cluster recording every request.
    let cluster = common::operator_cluster_with(ec2_kubelet_testbed::devcluster::DevClusterOptions {
        audit: true,
        ..Default::default()
    })
    .await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, _instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::fast_config();
    config.server.kubelet_address = format!("127.0.0.1:{}", common::free_port());
    let replica = common::Replica::start(&cluster, config.clone(), compute.clone(), "replica-a");
    let operator_client = ec2_kubelet::operator::client(cluster.operator_config()).unwrap();
    let (ctx, _enrollment) = ec2_kubelet::operator::context(operator_client, compute, config, "kubelet")
        .await
        .unwrap();
    let kubelet = ec2_kubelet::operator::start_kubelet(ctx).await.unwrap();
    common::local_template_and_pool(&client, "rbac", 2).await;
    let pools: Api<Ec2NodePool> = Api::all(client.clone());
    let config_map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"greeting": "hi"}}))
            .unwrap();
    Api::<ConfigMap>::default_namespaced(client.clone())
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "token"}, "stringData": {"value": "s3cret"}}))
            .unwrap();
    Api::<Secret>::default_namespaced(client.clone())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "rbac"},
        "spec": {
            "nodeSelector": {"type": "virtual-kubelet"},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
            "containers": [{"name": "main", "image": "local/shell",
                "command": ["/bin/sh", "-c", "echo $GREETING-$TOKEN; sleep 3600"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "value"}}}]}],
        },
    }))
    .unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod).await.unwrap();
    common::phase_of(&pods, "rbac", "Running").await;
    common::eventually(60, "the pod's logs through the kubelet API", || async {
        let logs = common::kubectl_output(&cluster, &["logs", "rbac"], None).await;
        (String::from_utf8_lossy(&logs.stdout) == "hi-s3cret\n").then_some(())
    })
    .await;
    // metrics-server's scrape: a bearer token, checked with a TokenReview.
    let token = cluster
        .dev("its token issuer")
        .auth()
        .issue_token("scraper", &["system:masters"]);
    let running = pods.get("rbac").await.unwrap();
    let host_ip = running.status.unwrap().host_ip.unwrap();
    let host = format!("{host_ip}:{}", kubelet.address.port());
    let scraped = common::kubelet_get(
        kubelet.address,
        &host,
        "/stats/summary",
        common::As::Token(&token),
    )
    .await;
    assert_eq!(scraped.map(|(status, _)| status), Ok(200));
    pods.delete("rbac", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pod released", || async {
        pods.get_opt("rbac").await.ok()?.is_none().then_some(())
    })
    .await;
    pools
        .patch(
            "rbac",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": 1}})),
        )
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    common::eventually(60, "one node left", || async {
        (nodes.list(&Default::default()).await.ok()?.items.len() == 1).then_some(())
    })
    .await;
    pools.delete("rbac", &DeleteParams::default()).await.unwrap();
    common::eventually(60, "the pool gone", || async {
        pools.get_opt("rbac").await.ok()?.is_none().then_some(())
    })
    .await;
    replica.stop().await;
    kubelet.shutdown().await;

    // 3. Every request the operator made is granted, and every grant was used.
    let used: BTreeSet<_> = cluster
        .dev("its request audit")
        .audit()
        .into_iter()
        .filter(|r| r.user_agent == ec2_kubelet::operator::USER_AGENT)
        .map(|r| (r.namespace, (r.group, r.resource, r.verb)))
        .collect();
    assert!(used.len() > 10, "the operator's requests were recorded: {used:?}");
    let denied: Vec<_> = used
        .iter()
        .filter(|(ns, triple)| {
            !cluster_wide.contains(triple)
                && !ns
                    .as_ref()
                    .is_some_and(|ns| per_namespace.get(ns).is_some_and(|g| g.contains(triple)))
        })
        .collect();
    assert!(denied.is_empty(), "the chart does not grant: {denied:#?}");
    let used_triples: BTreeSet<_> = used.iter().map(|(_, t)| t.clone()).collect();
    // Granted for paths this lifecycle does not take: the event recorder patches an event only
    // when the same event repeats (its series count), and no event repeats here; the dev
    // cluster adds no kube-api-access volume to pods, so no service-account token is requested
    // (make e2e exercises both grants on the real control plane, as the chart's ServiceAccount).
    // Nor has it a CSR signer: the tests' operators serve self-signed certificates, and make
    // e2e requests, approves and stores serving certificates as the chart's ServiceAccount
    // (`approve` on the signer is checked by the API server's admission, not requested).
    let not_exercised = [
        ("events.k8s.io", "events", "patch"),
        // Evictions are asked for only while a node with running pods drains: this lifecycle
        // deletes its pod first (tests/pools.rs and tests/drain.rs evict).
        ("", "pods/eviction", "create"),
        ("", "serviceaccounts/token", "create"),
        ("certificates.k8s.io", "certificatesigningrequests", "create"),
        ("certificates.k8s.io", "certificatesigningrequests", "get"),
        (
            "certificates.k8s.io",
            "certificatesigningrequests/approval",
            "patch",
        ),
        ("certificates.k8s.io", "signers", "approve"),
        ("", "secrets", "list"),
        ("", "secrets", "watch"),
        ("", "secrets", "patch"),
    ];
    let unused: Vec<_> = cluster_wide
        .iter()
        .chain(per_namespace.values().flatten())
        .filter(|t| !used_triples.contains(*t))
        .filter(|(g, r, v)| !not_exercised.contains(&(g.as_str(), r.as_str(), v.as_str())))
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
}

#[test]
fn rendered_deployment_is_hardened_probed_and_wired_to_its_config() {
    let output = helm(&[
        "template",
        "demo",
        "charts/ec2-kubelet",
        "--namespace",
        "platform",
        "--set",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/ec2-kubelet",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "kubeletTls.secretName=kubelet-serving",
        "--set",
        ENROLL_URL,
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect();
    let find = |kind: &str| {
        documents
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in:\n{text}"))
    };
    let deployment = find("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["args"][0], "run");
    assert_eq!(pod["serviceAccountName"], "demo-ec2-kubelet");
    assert_eq!(
        find("ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/ec2-kubelet"
    );
    assert_eq!(find("ServiceMonitor")["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(find("PodDisruptionBudget")["spec"]["maxUnavailable"], 1);
    // The config the operator reads names the ports the container opens, and the TLS files
    // the Secret volume provides.
    let operator_yaml = find("ConfigMap")["data"]["operator.yaml"].as_str().unwrap();
    let config = OperatorConfig::from_yaml(operator_yaml).unwrap_or_else(|e| panic!("{e}\n{operator_yaml}"));
    assert_eq!(config.server.kubelet_address, "0.0.0.0:10250");
    assert_eq!(config.server.health_address, "0.0.0.0:8080");
    assert_eq!(
        config.server.kubelet_tls_cert_file.as_deref(),
        Some(std::path::Path::new("/etc/ec2-kubelet/tls/tls.crt"))
    );
    let ports: Vec<i64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert_eq!(ports, [9090, 8080, 10250, 8443]);
    let mounts = serde_yaml::to_string(&container["volumeMounts"]).unwrap();
    assert!(mounts.contains("/etc/ec2-kubelet/tls"), "{mounts}");
}
