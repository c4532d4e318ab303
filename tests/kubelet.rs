//! The kubelet API of the virtual nodes, end to end: the real kubectl against the dev cluster,
//! whose kubelet proxy reaches the operator's kubelet API over HTTPS, which asks the pod's
//! agent (`local` backend: a real agent process on loopback).

mod common;

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

/// A GET over TLS (any certificate) with the given `Host`, as the API server and metrics-server
/// reach a kubelet.
async fn https_get(address: std::net::SocketAddr, host: &str, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(ec2_kubelet::kubelet::tls::insecure_client_config());
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
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

    // /stats/summary for the node the request is addressed to, and /healthz.
    let node = running.spec.as_ref().unwrap().node_name.clone().unwrap();
    let host_ip = running.status.as_ref().unwrap().host_ip.clone().unwrap();
    let host = format!("{host_ip}:{}", kubelet.address.port());
    let (status, body) = https_get(kubelet.address, &host, "/stats/summary").await;
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
    let (status, body) = https_get(kubelet.address, "10.255.255.1:10250", "/stats/summary").await;
    assert_eq!(status, 404, "no node has that address: {body}");
    assert_eq!(
        https_get(kubelet.address, &host, "/healthz").await,
        (200, "ok".into())
    );

    replica.stop().await;
    kubelet.shutdown().await;
}
