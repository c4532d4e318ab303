//! `GET pods/<name>/log`: forwarded to the kubelet endpoint of the pod's node
//! (`status.daemonEndpoints.kubeletEndpoint.Port`) at `/containerLogs/<ns>/<pod>/<container>`,
//! as the real API server does, streaming the answer back (so `kubectl logs -f` follows).

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

pub async fn proxy(
    state: &Arc<State>,
    pod: &Value,
    raw_query: &str,
    query: &HashMap<String, String>,
) -> Result<hyper::Response<Body>, ApiError> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let container = container_name(pod, query)?;
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
    let node = state.store.get(&nodes, "v1", None, node_name)?;
    let (host, port) = kubelet_address(state, &node)?;
    let forwarded: Vec<&str> = raw_query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("container="))
        .collect();
    let mut path = format!("/containerLogs/{namespace}/{name}/{container}");
    if !forwarded.is_empty() {
        path = format!("{path}?{}", forwarded.join("&"));
    }
    let unreachable =
        |e: &dyn std::fmt::Display| ApiError::internal(format!("Get \"http://{host}:{port}{path}\": {e}"));
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(connection);
    let request = Request::get(&path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| unreachable(&e))?;
    let response = sender.send_request(request).await.map_err(|e| unreachable(&e))?;
    Ok(proxied(response))
}
