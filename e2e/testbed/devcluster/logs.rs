//! The kubelet proxy, as the real API server has it: `pods/<name>/log` goes to the kubelet
//! endpoint of the pod's node (`status.daemonEndpoints.kubeletEndpoint.Port`) at
//! `/containerLogs/<ns>/<pod>/<container>`, streamed back (so `kubectl logs -f` follows), and
//! `pods/<name>/exec` and `attach` go to `/exec/...` and `/attach/...`, the WebSocket upgrade
//! passed through byte for byte. Kubelets are reached over HTTPS without verifying their
//! certificates (an API server without `--kubelet-certificate-authority`), with `Host` set to
//! the node's InternalIP so a kubelet serving many nodes knows which one is meant.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::error::ApiError;
use super::server::{Body, State, proxied};

/// The container a log request is for: the `container` parameter, or the only container.
fn container_name(pod: &Value, query: &HashMap<String, String>) -> Result<String, ApiError> {
    if let Some(container) = query.get("container").filter(|c| !c.is_empty()) {
        return Ok(container.clone());
    }
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    match containers.as_slice() {
        [only] => Ok(only.to_string()),
        _ => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// Where the kubelet of `node` listens: the configured kubelet host (the dev cluster's
/// default, since every node of a dev cluster is served from this machine) or the node's
/// InternalIP, and the node's kubelet endpoint port.
pub fn kubelet_address(state: &State, node: &Value) -> Result<(String, u16), ApiError> {
    let name = node["metadata"]["name"].as_str().unwrap_or_default();
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .filter(|p| *p > 0 && *p <= u16::MAX as u64)
        .ok_or_else(|| ApiError::bad_request(format!("node {name} does not publish a kubelet endpoint")))?;
    let host = match &state.options.kubelet_host {
        Some(host) => host.clone(),
        None => node["status"]["addresses"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
            .and_then(|a| a["address"].as_str())
            .map(String::from)
            .ok_or_else(|| ApiError::bad_request(format!("node {name} has no InternalIP address")))?,
    };
    Ok((host, port as u16))
}

/// A TLS connection to the kubelet of `node`, and the `Host` to send it.
async fn dial(
    state: &State,
    node: &Value,
) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String), ApiError> {
    let (host, port) = kubelet_address(state, node)?;
    let internal_ip = node["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .unwrap_or(host.as_str())
        .to_string();
    let unreachable =
        |e: &dyn std::fmt::Display| ApiError::internal(format!("dialing the kubelet at {host}:{port}: {e}"));
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| unreachable(&e))?;
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| unreachable(&e))?;
    let connector = tokio_rustls::TlsConnector::from(state.auth.kubelet_client());
    let tls = connector.connect(name, tcp).await.map_err(|e| unreachable(&e))?;
    Ok((tls, format!("{internal_ip}:{port}")))
}

/// The pod's node object, or 400 for a pod not yet bound.
fn pod_node(state: &State, pod: &Value) -> Result<Value, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let node_name = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node_name.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let registry = state.store.registry();
    let nodes = registry
        .find("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("nodes are not registered"))?;
    state.store.get(&nodes, "v1", None, node_name)
}

/// `/<kind>/<ns>/<pod>/<container>?<query without container>`.
fn kubelet_path(kind: &str, pod: &Value, container: &str, raw_query: &str) -> String {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let forwarded: Vec<&str> = raw_query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("container="))
        .collect();
    let path = format!("/{kind}/{namespace}/{name}/{container}");
    if forwarded.is_empty() {
        path
    } else {
        format!("{path}?{}", forwarded.join("&"))
    }
}

pub async fn proxy(
    state: &Arc<State>,
    pod: &Value,
    raw_query: &str,
    query: &HashMap<String, String>,
) -> Result<hyper::Response<Body>, ApiError> {
    let container = container_name(pod, query)?;
    let node = pod_node(state, pod)?;
    let path = kubelet_path("containerLogs", pod, &container, raw_query);
    let (stream, host) = dial(state, &node).await?;
    let failed = |e: &dyn std::fmt::Display| ApiError::internal(format!("Get \"https://{host}{path}\": {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection);
    let request = Request::get(&path)
        .header(hyper::header::HOST, &host)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| failed(&e))?;
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    check_kubelet_answer(response, pod).await
}

/// What the API server makes of a kubelet's failed log answer (its `ResponseChecker`): a 400's
/// text becomes a `BadRequest` with that message, a 500's an `InternalError`; any other failure
/// a generic answer for `pods/log`.
async fn check_kubelet_answer(
    response: hyper::Response<hyper::body::Incoming>,
    pod: &Value,
) -> Result<hyper::Response<Body>, ApiError> {
    let status = response.status();
    if status.is_success() {
        return Ok(proxied(response));
    }
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).into_owned();
    Err(match status.as_u16() {
        400 => ApiError::bad_request(text),
        500 => ApiError::internal(text),
        404 => ApiError::not_found(
            "",
            "pods/log",
            pod["metadata"]["name"].as_str().unwrap_or_default(),
        ),
        code => ApiError::internal(format!("the kubelet answered {code}: {text}")),
    })
}

/// `pods/<name>/exec` and `attach`: the client's WebSocket upgrade is sent on to the kubelet;
/// once the kubelet switches protocols, bytes flow both ways untouched until either side ends.
pub async fn proxy_upgrade(
    state: &Arc<State>,
    pod: &Value,
    kind: &str,
    request: Request<hyper::body::Incoming>,
    query: &HashMap<String, String>,
) -> Result<hyper::Response<Body>, ApiError> {
    let container = container_name(pod, query)?;
    let node = pod_node(state, pod)?;
    let path = kubelet_path(kind, pod, &container, request.uri().query().unwrap_or_default());
    let (stream, host) = dial(state, &node).await?;
    let failed = |e: &dyn std::fmt::Display| {
        ApiError::internal(format!("{} \"https://{host}{path}\": {e}", request.method()))
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(&e))?;
    tokio::spawn(connection.with_upgrades());
    let mut forwarded = Request::builder()
        .method(request.method())
        .uri(&path)
        .header(hyper::header::HOST, &host);
    for (name, value) in request.headers() {
        let name_str = name.as_str();
        if name_str.starts_with("sec-websocket-")
            || matches!(name_str, "upgrade" | "connection" | "x-stream-protocol-version")
        {
            forwarded = forwarded.header(name, value);
        }
    }
    let forwarded = forwarded
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| failed(&e))?;
    let mut response = sender.send_request(forwarded).await.map_err(|e| failed(&e))?;
    if response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(proxied(response));
    }
    let mut answer = hyper::Response::new(super::server::empty());
    *answer.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = response.headers().clone();
    let kubelet_side = hyper::upgrade::on(&mut response);
    let client_side = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match tokio::try_join!(client_side, kubelet_side) {
            Ok((client, kubelet)) => {
                let (mut client, mut kubelet) = (TokioIo::new(client), TokioIo::new(kubelet));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut kubelet).await;
            }
            Err(error) => tracing::debug!(%error, "exec proxy upgrade"),
        }
    });
    Ok(answer)
}
