//! The kubelet API of the virtual nodes, served by the operator over HTTPS on
//! `server.kubeletAddress` (the port every virtual node publishes in `daemonEndpoints`). The API
//! server proxies `kubectl logs`, `kubectl exec`/`attach`/`port-forward` and metrics-server's scrapes here, and
//! each request is answered by the pod's agent:
//!
//! | path | agent call |
//! | --- | --- |
//! | `GET /containerLogs/{ns}/{pod}/{container}` | `GetLogs` (follow, tailLines, sinceSeconds, sinceTime, timestamps, previous, limitBytes) |
//! | `GET/POST /exec/{ns}/{pod}/{container}?command=...` | `Exec`, over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) or SPDY/3.1 (`v4.channel.k8s.io`) |
//! | `GET/POST /attach/{ns}/{pod}/{container}` | `Attach` for a container with `tty` or `stdin`; else `GetLogs` with follow (its output) |
//! | `GET/POST /portForward/{ns}/{pod}` | `PortForward` per connection, over SPDY (`portforward.k8s.io`) or WebSocket (`?port=`) |
//! | `GET /stats/summary` | `GetStats` of every pod on the node the request is addressed to |
//! | `GET /metrics/resource` | the same, as the Prometheus resource metrics metrics-server scrapes |
//! | `GET /healthz` | none |
//!
//! Each connection is served with the certificate of the node whose address it was made to
//! ([`serving`]).
//!
//! Every caller is authenticated (client certificate or bearer token) and authorized for
//! `nodes/<subresource>` of the node the request is addressed to (the node whose InternalIP
//! its `Host` names, or the connection reached), as a kubelet does: see [`auth`]. A pod is only
//! served through its own node.

pub mod auth;
mod exec;
mod portforward;
pub mod serving;
mod spdy;
mod stats;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cloud::InstanceFilter;
use crate::crd::{annotations, default_agent_port, labels, tags};
use crate::runtime::Context;
use ec2_kubelet_protocol::v1::GetLogsRequest;

type Body = BoxBody<Bytes, std::io::Error>;
use crate::agent_client::AgentChannel;
use std::time::Duration;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A plain-text answer, as the kubelet gives its errors.
fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(full(message.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error answer: the status and a message for the user.
pub(crate) struct Reply(StatusCode, String);

impl Reply {
    fn not_found(message: impl Into<String>) -> Reply {
        Reply(StatusCode::NOT_FOUND, message.into())
    }
    fn bad_request(message: impl Into<String>) -> Reply {
        Reply(StatusCode::BAD_REQUEST, message.into())
    }
    fn unavailable(message: impl Into<String>) -> Reply {
        Reply(StatusCode::BAD_GATEWAY, message.into())
    }
    /// A pod with no instance to serve it: a 400 naming why, as the kubelet's "container is
    /// waiting to start" (with the pod's reason and message once it failed before launching).
    fn no_instance(pod: &Pod, namespace: &str, name: &str, instance: Option<&str>) -> Reply {
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let reason = status.and_then(|s| s.reason.as_deref()).filter(|r| !r.is_empty());
        let message = status
            .and_then(|s| s.message.as_deref())
            .filter(|m| !m.is_empty());
        let why = match (reason, message) {
            (Some(reason), Some(message)) => format!("{reason}: {message}"),
            (Some(reason), None) => reason.to_string(),
            (None, Some(message)) => message.to_string(),
            (None, None) => format!("the pod is {phase}"),
        };
        let what = match instance {
            Some(id) => format!("pod {namespace}/{name} has no running instance (instance {id} is gone)"),
            None if phase == "Pending" => format!("pod {namespace}/{name} has no instance yet"),
            None => format!("pod {namespace}/{name} has no instance"),
        };
        Reply::bad_request(format!("{what}: {why}"))
    }

    /// Plain text, as the kubelet answers: the API server turns a 400's text into the
    /// `BadRequest` kubectl prints ("Error from server (BadRequest): <text>"); a 404's text it
    /// drops ("the server could not find the requested resource").
    fn into_response(self) -> Response<Body> {
        text(self.0, self.1)
    }
}

/// Query parameters; repeated keys (`command`) keep every value in order.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
    fn number(&self, key: &str) -> Result<Option<i64>, Reply> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| Reply::bad_request(format!("{key}: {v:?} is not an integer")))
            })
            .transpose()
    }
}

/// The addresses a request may be for, in order: the IP of `Host` (the API server and
/// metrics-server dial a node's InternalIP and name it there). When `Host` names a server on
/// another port than the one the request reached (the API server forwards a port-forward upgrade
/// with its own client's `Host`, such as `127.0.0.1:6443`), the IP the connection was made to
/// (`local`) comes first.
fn addressed_ips(host: Option<&str>, local: SocketAddr) -> Vec<String> {
    let host = host.unwrap_or_default();
    let (ip, port) = match host.rsplit_once(':') {
        // A bare IPv6 address has colons and no port; a port follows `]` or an IPv4 or name.
        Some((ip, port)) if !ip.contains(':') || ip.ends_with(']') => (ip, port.parse::<u16>().ok()),
        _ => (host, None),
    };
    let ip = ip.trim_matches(['[', ']']).to_string();
    let connected = local.ip().to_canonical().to_string();
    if ip.is_empty() {
        vec![connected]
    } else if port.is_some_and(|port| port != local.port()) {
        vec![connected, ip]
    } else {
        vec![ip]
    }
}

/// A node's InternalIPs, as the API server and metrics-server dial them.
pub(crate) fn internal_ips(node: &Node) -> Vec<std::net::IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The virtual node the request is addressed to (see [`addressed_ips`]).
async fn addressed_node(
    ctx: &Context,
    request: &Request<Incoming>,
    local: SocketAddr,
) -> Result<Node, Reply> {
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host());
    let ips = addressed_ips(host, local);
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let virtual_nodes = nodes
        .list(&ListParams::default().labels(labels::POOL))
        .await
        .map_err(|e| Reply::unavailable(format!("listing nodes: {e}")))?;
    ips.iter()
        .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
        .find_map(|ip| {
            virtual_nodes
                .items
                .iter()
                .find(|node| internal_ips(node).contains(&ip))
        })
        .cloned()
        .ok_or_else(|| Reply::not_found(format!("no virtual node has the address {:?}", ips[0])))
}

/// The pod (on `node`) and a connection to its instance's agent.
pub(crate) async fn pod_agent(
    ctx: &Context,
    node: &str,
    namespace: &str,
    name: &str,
) -> Result<(Pod, AgentChannel), Reply> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let not_found = || Reply::not_found(format!("pod {namespace}/{name} not found on node {node}"));
    let pod = pods
        .get_opt(name)
        .await
        .map_err(|e| Reply::unavailable(format!("reading pod {namespace}/{name}: {e}")))?
        .filter(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .ok_or_else(not_found)?;
    // The pod's record names its instance (a pod of an operator before records: its annotation).
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let record = match ctx.records.of_pod(&uid) {
        Some(record) => Some(record),
        // Not in this replica's store (yet): asked of the API server.
        None => crate::runtime::records::find_of_pod(&ctx.client, &uid)
            .await
            .map_err(|e| Reply::unavailable(format!("reading the record of {namespace}/{name}: {e}")))?
            .map(std::sync::Arc::new),
    };
    let instance_id = record
        .and_then(|r| r.instance_id().map(String::from))
        .or_else(|| pod.annotations().get(annotations::INSTANCE_ID).cloned())
        .ok_or_else(|| Reply::no_instance(&pod, namespace, name, None))?;
    let instance = ctx
        .compute
        .describe_instances(&InstanceFilter::Ids(vec![instance_id.clone()]))
        .await
        .map_err(|e| Reply::unavailable(format!("describing {instance_id}: {e}")))?
        .into_iter()
        .find(|i| i.state.is_alive())
        .ok_or_else(|| Reply::no_instance(&pod, namespace, name, Some(&instance_id)))?;
    let port = instance
        .tag(tags::AGENT_PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| default_agent_port() as u16);
    let endpoint = ctx
        .compute
        .agent_endpoint(&instance, port)
        .map_err(|e| Reply::unavailable(e.to_string()))?;
    let channel = ctx
        .agents
        .connect(&endpoint, &instance_id, Duration::from_secs(15))
        .await
        .map_err(|e| Reply::unavailable(format!("the agent of {instance_id} at {endpoint}: {e}")))?;
    let agent = crate::agent_client::for_instance(channel, &instance_id);
    Ok((pod, agent))
}

/// `/containerLogs/{ns}/{pod}/{container}`: the agent's log stream as the response body.
async fn container_logs(
    ctx: &Context,
    node: &str,
    path: &[&str],
    query: &Query,
) -> Result<Response<Body>, Reply> {
    let [namespace, name, container] = path else {
        return Err(Reply::bad_request(
            "expected /containerLogs/{namespace}/{pod}/{container}",
        ));
    };
    let since_unix_ms = match query.get("sinceTime") {
        Some(time) => Some(
            time.parse::<jiff::Timestamp>()
                .map_err(|e| Reply::bad_request(format!("sinceTime: {e}")))?
                .as_millisecond(),
        ),
        None => None,
    };
    let (pod, agent) = pod_agent(ctx, node, namespace, name).await?;
    let request = GetLogsRequest {
        pod_uid: pod.uid().unwrap_or_default(),
        container: container.to_string(),
        follow: query.flag("follow"),
        tail_lines: query.number("tailLines")?,
        since_seconds: query.number("sinceSeconds")?,
        since_unix_ms,
        timestamps: query.flag("timestamps"),
        previous: query.flag("previous"),
        limit_bytes: query.number("limitBytes")?,
    };
    log_body(agent, request).await
}

/// Streams `GetLogs` as a response body.
pub(crate) async fn log_body(
    mut agent: AgentChannel,
    request: GetLogsRequest,
) -> Result<Response<Body>, Reply> {
    let stream = agent
        .get_logs(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound | tonic::Code::InvalidArgument => {
                Reply::bad_request(status.message().to_string())
            }
            _ => Reply::unavailable(status.message().to_string()),
        })?
        .into_inner();
    let chunks = stream.map(|chunk| {
        chunk
            .map(|c| Frame::data(Bytes::from(c.data)))
            .map_err(std::io::Error::other)
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

/// Authenticates and authorizes the caller (`certified`: the user its verified client
/// certificate names), then serves the request.
async fn route(
    ctx: Arc<Context>,
    auth: Arc<auth::Authenticator>,
    certified: Option<auth::Caller>,
    local: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Body>, Reply> {
    let caller = auth.authenticate(certified.as_ref(), request.headers()).await?;
    // Names of namespaces, pods and containers are DNS labels: no escaping to undo.
    let path: Vec<String> = request
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = request.method().clone();
    if method == Method::GET && path == ["healthz"] {
        return Ok(text(StatusCode::OK, "ok"));
    }
    let node = addressed_node(&ctx, &request, local).await?;
    let node_name = node.name_any();
    let (verb, subresource) = auth::attributes(&method, request.uri().path());
    auth.authorize(&caller, verb, subresource, &node_name).await?;
    let query = Query::parse(request.uri().query());
    match (method, path.as_slice()) {
        (Method::GET, ["containerLogs", rest @ ..]) => container_logs(&ctx, &node_name, rest, &query).await,
        (Method::GET | Method::POST, ["exec", namespace, name, container]) => {
            let target = exec::Target::new(&node_name, namespace, name, container);
            exec::exec(ctx.clone(), request, target, query).await
        }
        (Method::GET | Method::POST, ["attach", namespace, name, container]) => {
            let target = exec::Target::new(&node_name, namespace, name, container);
            exec::attach(ctx.clone(), request, target, query).await
        }
        (Method::GET | Method::POST, ["portForward", rest @ ..]) => {
            portforward::port_forward(ctx.clone(), request, &node_name, rest, &query).await
        }
        (Method::GET, ["stats", "summary"]) => stats::summary(&ctx, &node).await,
        (Method::GET, ["metrics", "resource"]) => stats::metrics_resource(&ctx, &node).await,
        (_, _) => Err(Reply::not_found(format!(
            "{} is not served by the ec2-kubelet kubelet API",
            request.uri().path()
        ))),
    }
}

/// The kubelet API server, running until `shutdown`.
pub struct KubeletServer {
    pub address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl KubeletServer {
    /// Binds `address` and serves the kubelet API over TLS, each connection with the
    /// certificate of the node whose address it was made to; `follow` (run while the server
    /// runs) keeps `certificates` up to date.
    pub async fn start(
        ctx: Arc<Context>,
        address: &str,
        certificates: Arc<serving::Certificates>,
        follow: Option<impl std::future::Future<Output = ()> + Send + 'static>,
        auth: Arc<auth::Authenticator>,
    ) -> std::io::Result<KubeletServer> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let following = follow.map(tokio::spawn);
        let address = listener.local_addr()?;
        // Handshakes each in their own task and bounded in time, accept errors backed off.
        let mut incoming =
            ec2_kubelet_protocol::pki::tls_incoming_with(listener, move |stream| match stream.local_addr() {
                Ok(local) => certificates.for_address(local.ip()),
                Err(_) => certificates.for_address(std::net::Ipv4Addr::UNSPECIFIED.into()),
            });
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Certificates are followed as long as connections are taken.
            let _following = following.map(crate::task::AbortOnDrop);
            loop {
                let stream = tokio::select! {
                    _ = stopped.changed() => return,
                    stream = incoming.next() => match stream {
                        Some(Ok(stream)) => stream,
                        Some(Err(error)) => { tracing::warn!(%error, "kubelet API connection"); continue }
                        None => return,
                    },
                };
                let (ctx, auth) = (ctx.clone(), auth.clone());
                let Ok(local) = stream.get_ref().0.local_addr() else {
                    continue;
                };
                tokio::spawn(async move {
                    // A presented certificate was verified against the client CA in the handshake.
                    let certified = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(auth::Caller::from_certificate);
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (ctx, auth, certified) = (ctx.clone(), auth.clone(), certified.clone());
                        async move {
                            let path = request.uri().path().to_string();
                            let response = route(ctx, auth, certified, local, request).await.unwrap_or_else(|reply| {
                                tracing::debug!(%path, status = %reply.0, message = %reply.1, "kubelet API request failed");
                                reply.into_response()
                            });
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "kubelet API connection");
                    }
                });
            }
        });
        tracing::info!(%address, "serving the kubelet API");
        Ok(KubeletServer { address, stop, task })
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "bad"}, "status": status})).unwrap()
    }

    #[test]
    fn a_request_is_for_the_node_its_host_names_or_the_address_it_reached() {
        let local: SocketAddr = "127.0.0.2:10250".parse().unwrap();
        assert_eq!(addressed_ips(Some("10.0.1.7:10250"), local), ["10.0.1.7"]);
        assert_eq!(addressed_ips(Some("10.0.1.7"), local), ["10.0.1.7"]);
        assert_eq!(addressed_ips(Some("[fd00::7]:10250"), local), ["fd00::7"]);
        assert_eq!(addressed_ips(Some("fd00::1:7"), local), ["fd00::1:7"]);
        // The API server's own address, passed on by a proxied upgrade: the connection's first.
        assert_eq!(
            addressed_ips(Some("127.0.0.1:6443"), local),
            ["127.0.0.2", "127.0.0.1"]
        );
        assert_eq!(addressed_ips(None, local), ["127.0.0.2"]);
        let mapped: SocketAddr = "[::ffff:10.0.1.9]:10250".parse().unwrap();
        assert_eq!(
            addressed_ips(Some("api.example.com:443"), mapped),
            ["10.0.1.9", "api.example.com"]
        );
    }

    #[test]
    fn a_pod_without_an_instance_is_a_bad_request_naming_why() {
        let failed = pod(
            serde_json::json!({"phase": "Failed", "reason": "InvalidLaunchSettings",
            "message": "annotation ec2-kubelet.io/instance-type: m5.24xlarge is not allowed"}),
        );
        let Reply(code, text) = Reply::no_instance(&failed, "default", "bad", None);
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert_eq!(
            text,
            "pod default/bad has no instance: InvalidLaunchSettings: annotation ec2-kubelet.io/instance-type: m5.24xlarge is not allowed"
        );
        let Reply(_, text) = Reply::no_instance(
            &pod(serde_json::json!({"phase": "Pending"})),
            "default",
            "bad",
            None,
        );
        assert_eq!(text, "pod default/bad has no instance yet: the pod is Pending");
        let lost = pod(serde_json::json!({"phase": "Failed", "reason": "InstanceLost"}));
        let Reply(code, text) = Reply::no_instance(&lost, "default", "bad", Some("i-0abc"));
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert_eq!(
            text,
            "pod default/bad has no running instance (instance i-0abc is gone): InstanceLost"
        );
    }
}
