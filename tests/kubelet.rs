//! The kubelet API of the virtual nodes, end to end: the real kubectl against the dev cluster,
//! whose kubelet proxy reaches the operator's kubelet API over HTTPS, which asks the pod's
//! agent (`local` backend: a real agent process on loopback).

mod common;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

/// A ClusterRole granting `get` on `nodes/<subresource>`, bound to `user`.
async fn grant_node_subresource(client: &kube::Client, user: &str, subresource: &str) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let name = format!("{user}-{subresource}");
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": [format!("nodes/{subresource}")], "verbs": ["get"]}],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_exec_and_stats_reach_the_pods_agent_through_the_kubelet_api() {
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, _instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::fast_config();
    config.server.kubelet_address = format!("127.0.0.1:{}", common::free_port());
    let replica = common::Replica::start(&cluster, config.clone(), compute.clone(), "replica-a");
    let (ctx, _enrollment) =
        ec2_kubelet::operator::context(client.clone(), compute.clone(), config, "kubelet-test")
            .await
            .unwrap();
    let kubelet = ec2_kubelet::operator::start_kubelet(ctx).await.unwrap();

    common::local_template_and_pool(&client, "pods", 1).await;
    let pod = common::virtual_pod(
        "talker",
        None,
        &[
            "/bin/sh",
            "-c",
            "echo line-1; echo line-2; echo line-3; sleep 3600",
        ],
        json!({}),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = common::phase_of(&pods, "talker", "Running").await;

    // kubectl logs, whole and tailed.
    let logs = common::eventually(30, "three log lines", || async {
        let logs = common::kubectl(&cluster, &["logs", "talker"]).await;
        logs.contains("line-3").then_some(logs)
    })
    .await;
    assert_eq!(logs, "line-1\nline-2\nline-3\n");
    assert_eq!(
        common::kubectl(&cluster, &["logs", "talker", "--tail=1"]).await,
        "line-3\n"
    );

    // A pod that failed before it had an instance: kubectl logs says why, not NotFound.
    let bad = common::virtual_pod(
        "bad",
        None,
        &["true"],
        json!({"metadata": {"annotations": {"ec2-kubelet.io/instance-type": "m5.24xlarge"}}}),
    );
    pods.create(&PostParams::default(), &bad).await.unwrap();
    common::phase_of(&pods, "bad", "Failed").await;
    let output = common::kubectl_output(&cluster, &["logs", "bad"], None).await;
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.starts_with(
            "Error from server (BadRequest): pod default/bad has no instance: InvalidLaunchSettings: "
        ),
        "{said}"
    );

    // kubectl exec: stdout and stderr apart, and the exit code.
    let output = common::kubectl_output(
        &cluster,
        &[
            "exec",
            "talker",
            "--",
            "sh",
            "-c",
            "echo out; echo oops >&2; exit 3",
        ],
        None,
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("oops"),
        "{output:?}"
    );
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    // kubectl exec -i: standard input reaches the command, and its end ends `cat`.
    let output = common::kubectl_output(
        &cluster,
        &["exec", "-i", "talker", "--", "cat"],
        Some("hello stdin\n"),
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello stdin\n");
    // A container that does not exist is an error kubectl shows.
    let output =
        common::kubectl_output(&cluster, &["exec", "talker", "-c", "nope", "--", "true"], None).await;
    assert!(!output.status.success());

    // kubectl attach: the container's output from the moment of attaching, until it ends.
    let ticker = common::virtual_pod(
        "ticker",
        None,
        &[
            "/bin/sh",
            "-c",
            "sleep 2; for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.5; done",
        ],
        json!({"spec": {"restartPolicy": "Never"}}),
    );
    pods.create(&PostParams::default(), &ticker).await.unwrap();
    common::phase_of(&pods, "ticker", "Running").await;
    let attached = common::kubectl_output(&cluster, &["attach", "ticker"], None).await;
    let out = String::from_utf8_lossy(&attached.stdout);
    assert!(attached.status.success(), "{attached:?}");
    assert!(
        out.contains("tick-6"),
        "attach follows the output to the end: {out}"
    );

    // /stats/summary for the node the request is addressed to, by a caller RBAC lets read
    // nodes/stats (a bearer token, checked with a TokenReview), as metrics-server scrapes it.
    let auth = cluster.dev("its kubelet-caller identities").auth();
    grant_node_subresource(&client, "metrics-server", "stats").await;
    let metrics_token = auth.issue_token("metrics-server", &[]);
    let node = running.spec.as_ref().unwrap().node_name.clone().unwrap();
    let host_ip = running.status.as_ref().unwrap().host_ip.clone().unwrap();
    let host = format!("{host_ip}:{}", kubelet.address.port());
    let address = kubelet.address;
    let (status, body) = common::kubelet_get(
        address,
        &host,
        "/stats/summary",
        common::As::Token(&metrics_token),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let summary: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(summary["node"]["nodeName"], node.as_str());
    let stats = &summary["pods"][0];
    assert_eq!(stats["podRef"]["name"], "talker");
    assert_eq!(stats["containers"][0]["name"], "main");
    assert!(
        stats["containers"][0]["memory"]["workingSetBytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(stats["cpu"]["time"].is_string());
    // /metrics/resource, what metrics-server scrapes (it needs nodes/metrics): the container's
    // usage with the time its agent sampled it.
    grant_node_subresource(&client, "metrics-server", "metrics").await;
    let (status, body) = common::kubelet_get(
        address,
        &host,
        "/metrics/resource",
        common::As::Token(&metrics_token),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let memory = body
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "container_memory_working_set_bytes{container=\"main\",namespace=\"default\",pod=\"talker\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no working set for talker's container in\n{body}"));
    let (bytes, sampled_ms) = memory.split_once(' ').unwrap();
    assert!(bytes.parse::<f64>().unwrap() > 0.0, "{memory}");
    assert!(sampled_ms.parse::<i64>().unwrap() > 1_700_000_000_000, "{memory}");
    assert!(body.contains("\nnode_cpu_usage_seconds_total "), "{body}");
    let (status, body) = common::kubelet_get(
        kubelet.address,
        &format!("10.255.255.1:{}", kubelet.address.port()),
        "/stats/summary",
        common::As::Token(&metrics_token),
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "no node has that address: {body}");

    // Nobody else gets in.
    let logs_path = "/containerLogs/default/talker/main";
    let (status, body) = common::kubelet_get(address, &host, logs_path, common::As::Token(&metrics_token))
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (
            403,
            "Forbidden (user=metrics-server, verb=get, resource=nodes, subresource=proxy)"
        ),
        "nodes/stats does not grant nodes/proxy"
    );
    for path in [
        logs_path,
        "/stats/summary",
        "/healthz",
        "/exec/default/talker/main",
    ] {
        let (status, body) = common::kubelet_get(address, &host, path, common::As::Anonymous)
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (401, "Unauthorized"), "anonymous {path}");
        let (status, _) = common::kubelet_get(address, &host, path, common::As::Token("dev.forged-token"))
            .await
            .unwrap();
        assert_eq!(status, 401, "a token the cluster did not issue, {path}");
    }
    let nobody = auth.issue_certificate("nobody", None).unwrap();
    let (status, body) =
        common::kubelet_get(address, &host, "/stats/summary", common::As::Certificate(&nobody))
            .await
            .unwrap();
    assert_eq!(
        status, 403,
        "a certificate of the cluster CA, but no RBAC grant: {body}"
    );
    // A certificate from another CA does not complete the handshake (or the request).
    let foreign = ec2_kubelet_testbed::devcluster::auth::ClusterAuth::generate()
        .unwrap()
        .issue_certificate("kube-apiserver-kubelet-client", Some("system:masters"))
        .unwrap();
    let refused = common::kubelet_get(address, &host, logs_path, common::As::Certificate(&foreign)).await;
    assert!(
        refused.is_err(),
        "a foreign CA's certificate is refused: {refused:?}"
    );
    // A cluster-CA certificate in system:masters (what the API server presents) is served.
    let admin = auth.issue_certificate("admin", Some("system:masters")).unwrap();
    let (status, body) = common::kubelet_get(address, &host, logs_path, common::As::Certificate(&admin))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "line-1\nline-2\nline-3\n"));
    // Port-forward over WebSocket (`v4.channel.k8s.io`, the ports in the query), as a client that
    // dials the kubelet itself does it: a request reaches the HTTP server the pod runs on its
    // instance, and a port nobody listens on is an error on the port's error channel.
    let served = common::free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/portforward.py");
    let server = common::virtual_pod(
        "server",
        None,
        &["/bin/sh", "-c", &format!("exec python3 {script} serve {served}")],
        json!({}),
    );
    pods.create(&PostParams::default(), &server).await.unwrap();
    common::phase_of(&pods, "server", "Running").await;
    common::eventually(30, "the pod's server listening", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", served)).await.ok()
    })
    .await;
    let request = "GET /through-the-kubelet HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n";
    let channels = websocket_port_forward(address, &host, "server", served, &admin, request.as_bytes()).await;
    let port_bytes = served.to_le_bytes().to_vec();
    assert_eq!(
        &channels[0][..2],
        port_bytes.as_slice(),
        "the data channel starts with the port"
    );
    assert_eq!(
        channels[1], port_bytes,
        "the error channel has the port and nothing else"
    );
    let answer = String::from_utf8_lossy(&channels[0][2..]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("served /through-the-kubelet\n"), "{answer}");
    let closed = common::free_port();
    let channels = websocket_port_forward(address, &host, "server", closed, &admin, b"hello").await;
    let error = String::from_utf8_lossy(&channels[1][2..]);
    assert!(
        error.starts_with(&format!(
            "error forwarding port {closed} to pod default/server, uid "
        )) && error.ends_with(&format!(
            "dial tcp localhost:{closed}: connect: connection refused"
        )),
        "{error}"
    );
    assert_eq!(
        channels[0],
        closed.to_le_bytes().to_vec(),
        "no data from a closed port"
    );

    assert_eq!(
        common::kubelet_get(address, &host, "/healthz", common::As::Token(&metrics_token))
            .await
            .unwrap(),
        (200, "ok".into())
    );

    replica.stop().await;
    kubelet.shutdown().await;
}

/// One port-forward session over WebSocket to `port` of `pod` (default namespace), with a
/// client certificate: sends `request` on the data channel, then reads until the kubelet closes
/// the session; returns what each channel (data, error) carried.
async fn websocket_port_forward(
    address: std::net::SocketAddr,
    host: &str,
    pod: &str,
    port: u16,
    caller: &ec2_kubelet_testbed::devcluster::auth::ClientCertificate,
    request: &[u8],
) -> [Vec<u8>; 2] {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls =
        ec2_kubelet::kubelet::tls::insecure_client_config_with_identity(&caller.cert_pem, &caller.key_pem)
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let mut upgrade = format!("wss://{host}/portForward/default/{pod}?port={port}")
        .into_client_request()
        .unwrap();
    upgrade
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::client_async(upgrade, tls).await.unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "v4.channel.k8s.io"
    );
    let mut channels = [Vec::new(), Vec::new()];
    let mut data = vec![0u8];
    data.extend_from_slice(request);
    socket.send(Message::binary(data)).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(message) = socket.next().await {
            match message.unwrap() {
                Message::Binary(bytes) => channels[usize::from(bytes[0])].extend_from_slice(&bytes[1..]),
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the kubelet ends the session when the port closes its side");
    channels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_completes_its_tls_handshake_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let cluster = common::operator_cluster(false).await;
    let dir = tempfile::tempdir().unwrap();
    let (compute, _instances) = common::local_compute(&dir.path().join("local"));
    let mut config = common::fast_config();
    config.server.kubelet_address = format!("127.0.0.1:{}", common::free_port());
    let (ctx, _enrollment) =
        ec2_kubelet::operator::context(cluster.client(), compute, config, "kubelet-test")
            .await
            .unwrap();
    let kubelet = ec2_kubelet::operator::start_kubelet(ctx).await.unwrap();
    // A client that connects and says nothing would hold its connection (and a task) forever.
    let mut silent = tokio::net::TcpStream::connect(kubelet.address).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the kubelet API hangs up on a client that never completes its handshake: {read:?}"
    );
    kubelet.shutdown().await;
}
