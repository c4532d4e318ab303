//! `portForward`: TCP connections to a pod's ports (`kubectl port-forward`), over either
//! transport a kubelet serves. Each connection is one agent `PortForward` call, which dials the
//! port on the pod's instance.
//!
//! * **SPDY/3.1** with `portforward.k8s.io` (what a real API server dials: it tunnels kubectl's
//!   WebSocket session, `SPDY/3.1+portforward.k8s.io`, into SPDY to the kubelet). Per connection
//!   the client opens two streams with the same `requestID` and `port` headers: `error`
//!   (read-only for the client) and `data`. Many connections share one SPDY connection. A
//!   connection that cannot be made is a message on its error stream, which kubectl prints.
//! * **WebSocket** (`v4.channel.k8s.io`, or no sub-protocol) with the ports in the query
//!   (`?port=8080&port=9090`): one connection per port, on channels `2i` (data) and `2i+1`
//!   (error); the first message on each channel is the port, two bytes little-endian.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kube::ResourceExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::exec::{Protocols, Transport, framed, negotiate, normal_close, switching_protocols};
use super::spdy;
use super::{Body, Query, Reply, pod_agent};
use crate::agent_client::AgentChannel;
use crate::runtime::Context;
use ec2_kubelet_protocol::v1::port_forward_input::Input;
use ec2_kubelet_protocol::v1::{PortForwardInput, PortForwardStart};

const PORT_FORWARD: Protocols = Protocols {
    what: "port-forward",
    websocket: &["v4.channel.k8s.io", ""],
    spdy: "portforward.k8s.io",
};

/// How long a SPDY client has to open the second stream of a pair (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client sends on one forwarded connection.
#[derive(Debug)]
enum Upstream {
    Data(Vec<u8>),
    /// The client sends no more (a SPDY half-close).
    CloseWrite,
}

/// What one forwarded connection has for the client.
#[derive(Debug)]
enum Downstream {
    Data(Vec<u8>),
    /// The connection could not be made, or broke: the message for the error stream.
    Failed(String),
    /// The port closed its side.
    End,
}

/// The pod whose ports are forwarded, and its agent.
struct Target {
    agent: AgentChannel,
    pod_uid: String,
    /// `namespace/name`, for messages.
    pod: String,
}

impl Target {
    /// One connection to `port`: the agent call, fed by `upstream`, answered on `downstream`
    /// (tagged with `key`) until the port closes its side. Dropping `upstream`'s sender ends it.
    async fn forward<K: Copy + Send + 'static>(
        self: Arc<Self>,
        port: u16,
        key: K,
        mut upstream: mpsc::UnboundedReceiver<Upstream>,
        downstream: mpsc::Sender<(K, Downstream)>,
    ) {
        let failed = |message: &str| {
            Downstream::Failed(format!(
                "error forwarding port {port} to pod {}, uid {}: {message}",
                self.pod, self.pod_uid
            ))
        };
        let (inputs, input_rx) = mpsc::channel(16);
        let start = Input::Start(PortForwardStart {
            pod_uid: self.pod_uid.clone(),
            port: port.into(),
        });
        let _ = inputs.send(PortForwardInput { input: Some(start) }).await;
        let mut agent = self.agent.clone();
        let mut outputs = match agent
            .port_forward(tokio_stream::wrappers::ReceiverStream::new(input_rx))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = downstream.send((key, failed(status.message()))).await;
                return;
            }
        };
        let mut writing = true;
        loop {
            tokio::select! {
                output = outputs.next() => match output {
                    Some(Ok(output)) => {
                        if downstream.send((key, Downstream::Data(output.data))).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(status)) => {
                        let _ = downstream.send((key, failed(status.message()))).await;
                        return;
                    }
                    None => break,
                },
                input = upstream.recv(), if writing => {
                    let input = match input {
                        Some(Upstream::Data(data)) => Input::Data(data),
                        Some(Upstream::CloseWrite) => {
                            writing = false;
                            Input::CloseWrite(true)
                        }
                        // The client reset the connection or left.
                        None => return,
                    };
                    if inputs.send(PortForwardInput { input: Some(input) }).await.is_err() {
                        writing = false;
                    }
                },
            }
        }
        let _ = downstream.send((key, Downstream::End)).await;
    }
}

/// `/portForward/{namespace}/{pod}[/{uid}]`.
pub(crate) async fn port_forward(
    ctx: Arc<Context>,
    request: Request<Incoming>,
    node: &str,
    path: &[&str],
    query: &Query,
) -> Result<Response<Body>, Reply> {
    let (namespace, name, uid) = match path {
        [namespace, name] => (*namespace, *name, None),
        [namespace, name, uid] => (*namespace, *name, Some(*uid)),
        _ => {
            return Err(Reply::bad_request(
                "expected /portForward/{namespace}/{pod}[/{uid}]",
            ));
        }
    };
    let transport = negotiate(request.headers(), &PORT_FORWARD)?;
    let ports = match transport {
        Transport::WebSocket { .. } => websocket_ports(query)?,
        Transport::Spdy { .. } => Vec::new(),
    };
    let (pod, agent) = pod_agent(&ctx, node, namespace, name).await?;
    let pod_uid = pod.uid().unwrap_or_default();
    if uid.is_some_and(|uid| uid != pod_uid) {
        return Err(Reply::not_found(format!(
            "pod {namespace}/{name} with uid {} not found on node {node}",
            uid.unwrap_or_default()
        )));
    }
    let target = Arc::new(Target {
        agent,
        pod_uid,
        pod: format!("{namespace}/{name}"),
    });
    let response = switching_protocols(&transport);
    let upgrading = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let upgraded = match upgrading.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => return tracing::debug!(%error, "port-forward upgrade"),
        };
        match transport {
            Transport::Spdy { .. } => {
                if let Err(error) = over_spdy(upgraded, target).await {
                    tracing::debug!(%error, "port-forward over SPDY");
                }
            }
            Transport::WebSocket { .. } => {
                let socket = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                over_websocket(socket, target, ports).await;
            }
        }
    });
    Ok(response)
}

/// The `port` query parameters of a WebSocket request (repeated, or comma-separated).
fn websocket_ports(query: &Query) -> Result<Vec<u16>, Reply> {
    let values = query.all("port");
    if values.is_empty() {
        return Err(Reply::bad_request("query parameter \"port\" is required"));
    }
    let mut ports = Vec::new();
    for value in &values {
        for port in value.split(',') {
            match port.trim().parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => {
                    return Err(Reply::bad_request(format!(
                        "port {port:?} is not a TCP port (1-65535)"
                    )));
                }
            }
        }
    }
    Ok(ports)
}

/// A SPDY stream's role in a forwarded connection, from its headers.
#[derive(Debug, PartialEq, Eq)]
struct StreamHeaders {
    request_id: String,
    port: u16,
    data: bool,
}

/// Reads a stream's headers as the kubelet does: `port` (1-65535) and `streamType` (`error` or
/// `data`) are required; without a `requestID` (old clients), pairs are told apart by stream
/// id (an error stream's id, and its data stream's id minus 2).
fn stream_headers(id: u32, headers: &[(String, String)]) -> Result<StreamHeaders, String> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let port = get("port").ok_or("\"port\" header is required")?;
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => return Err(format!("port {port:?} is not a TCP port (1-65535)")),
    };
    let data = match get("streamtype") {
        Some("data") => true,
        Some("error") => false,
        Some(other) => return Err(format!("invalid stream type {other:?}")),
        None => return Err("\"streamType\" header is required".into()),
    };
    let request_id = match get("requestid") {
        Some(id) => id.to_string(),
        None if data => id.saturating_sub(2).to_string(),
        None => id.to_string(),
    };
    Ok(StreamHeaders {
        request_id,
        port,
        data,
    })
}

/// A pair of streams being opened.
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
}

/// A forwarded connection under way, by its data stream.
struct Forwarding {
    error: u32,
    upstream: mpsc::UnboundedSender<Upstream>,
    task: JoinHandle<()>,
}

/// What the SPDY session reacts to besides the client's frames.
enum Timer {
    /// A pair's creation timeout passed.
    Expired(String),
}

async fn over_spdy<S>(io: S, target: Arc<Target>) -> Result<(), spdy::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let mut reader = spdy::Reader::new(read);
    let mut writer = spdy::Writer::new(write);
    let (frames_tx, mut frames) = mpsc::channel(16);
    let read_frames = tokio::spawn(async move {
        loop {
            let frame = reader.next().await;
            let last = !matches!(frame, Ok(Some(_)));
            if frames_tx.send(frame).await.is_err() || last {
                break;
            }
        }
    });
    // Client-to-pod channels are unbounded (as in the kubelet's SPDY streams): a bounded one
    // could stall this loop, and with it the pod-to-client direction it drains.
    let (downstream, mut events) = mpsc::channel::<((u32, u32), Downstream)>(64);
    let (timers_tx, mut timers) = mpsc::channel::<Timer>(16);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwarding: HashMap<u32, Forwarding> = HashMap::new();
    let mut last = 0;
    let result = loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(Some(spdy::Frame::Open { id, headers, .. }))) => {
                    last = last.max(id);
                    let stream = match stream_headers(id, &headers) {
                        Ok(stream) => stream,
                        Err(message) => {
                            tracing::debug!(id, %message, "port-forward stream refused");
                            writer.reset(id).await?;
                            continue;
                        }
                    };
                    writer.reply(id).await?;
                    let pair = pairs.entry(stream.request_id.clone()).or_insert_with(|| {
                        let timers = timers_tx.clone();
                        let request = stream.request_id.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(STREAM_CREATION_TIMEOUT).await;
                            let _ = timers.send(Timer::Expired(request)).await;
                        });
                        Pair { port: stream.port, ..Default::default() }
                    });
                    let slot = if stream.data { &mut pair.data } else { &mut pair.error };
                    if slot.is_some() {
                        let kind = if stream.data { "data" } else { "error" };
                        let message = format!("error processing stream for request {}: {kind} stream already assigned", stream.request_id);
                        if let Some(error) = pair.error.filter(|_| stream.data) {
                            writer.data(error, message.as_bytes(), true).await?;
                        }
                        writer.reset(id).await?;
                        continue;
                    }
                    *slot = Some(id);
                    if let (Some(error), Some(data)) = (pair.error, pair.data) {
                        let port = pair.port;
                        pairs.remove(&stream.request_id);
                        let (upstream, upstream_rx) = mpsc::unbounded_channel();
                        let task = tokio::spawn(target.clone().forward(port, (data, error), upstream_rx, downstream.clone()));
                        forwarding.insert(data, Forwarding { error, upstream, task });
                    }
                }
                Some(Ok(Some(spdy::Frame::Data { id, data, fin }))) => {
                    if let Some(forward) = forwarding.get(&id) {
                        if !data.is_empty() {
                            let _ = forward.upstream.send(Upstream::Data(data));
                        }
                        if fin {
                            let _ = forward.upstream.send(Upstream::CloseWrite);
                        }
                    }
                }
                // A reset data stream: that connection is dropped (the agent closes it).
                Some(Ok(Some(spdy::Frame::Reset { id }))) => {
                    if let Some(forward) = forwarding.remove(&id) {
                        forward.task.abort();
                    }
                }
                Some(Ok(Some(spdy::Frame::Ping { id }))) => writer.pong(id).await?,
                Some(Ok(Some(spdy::Frame::GoAway))) | Some(Ok(None)) | None => break Ok(()),
                Some(Err(error)) => break Err(error),
            },
            Some(((data, error), event)) = events.recv() => match event {
                Downstream::Data(bytes) => {
                    if forwarding.contains_key(&data) {
                        writer.data(data, &bytes, false).await?;
                    }
                }
                Downstream::Failed(message) => {
                    if forwarding.remove(&data).is_some() {
                        tracing::debug!(%message, "port-forward connection failed");
                        writer.data(error, message.as_bytes(), true).await?;
                        writer.reset(data).await?;
                    }
                }
                Downstream::End => {
                    if let Some(forward) = forwarding.remove(&data) {
                        writer.data(data, &[], true).await?;
                        writer.data(forward.error, &[], true).await?;
                    }
                }
            },
            Some(Timer::Expired(request)) = timers.recv() => {
                if let Some(pair) = pairs.remove(&request) {
                    let message = format!("timed out waiting for the streams of request {request}");
                    if let Some(error) = pair.error {
                        writer.data(error, message.as_bytes(), true).await?;
                    }
                    if let Some(data) = pair.data {
                        writer.reset(data).await?;
                    }
                }
            },
        }
    };
    for (_, forward) in forwarding {
        forward.task.abort();
    }
    read_frames.abort();
    let _ = writer.go_away(last).await;
    writer.shutdown().await;
    result
}

async fn over_websocket<S>(socket: WebSocketStream<S>, target: Arc<Target>, ports: Vec<u16>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = socket.split();
    let (downstream, mut events) = mpsc::channel::<(usize, Downstream)>(64);
    let mut upstreams = Vec::new();
    let mut tasks = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let port_bytes = port.to_le_bytes();
        for channel in [2 * index, 2 * index + 1] {
            if sink.send(framed(channel as u8, &port_bytes)).await.is_err() {
                return;
            }
        }
        let (upstream, upstream_rx) = mpsc::unbounded_channel();
        upstreams.push(Some(upstream));
        tasks.push(tokio::spawn(target.clone().forward(
            *port,
            index,
            upstream_rx,
            downstream.clone(),
        )));
    }
    drop(downstream);
    let mut open = ports.len();
    while open > 0 {
        tokio::select! {
            message = source.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let Some(&channel) = data.first() else { continue };
                    let index = channel as usize / 2;
                    if channel % 2 == 0
                        && let Some(Some(upstream)) = upstreams.get(index)
                        && data.len() > 1
                    {
                        let _ = upstream.send(Upstream::Data(data[1..].to_vec()));
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some((index, event)) = events.recv() => {
                let message = match event {
                    Downstream::Data(bytes) => framed((2 * index) as u8, &bytes),
                    Downstream::Failed(text) => {
                        open -= 1;
                        upstreams[index] = None;
                        framed((2 * index + 1) as u8, text.as_bytes())
                    }
                    Downstream::End => {
                        open -= 1;
                        upstreams[index] = None;
                        continue;
                    }
                };
                if sink.send(message).await.is_err() {
                    break;
                }
            },
        }
    }
    for task in tasks {
        task.abort();
    }
    let _ = sink.send(normal_close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn streams_pair_by_request_id_or_by_stream_id() {
        let error = stream_headers(
            1,
            &headers(&[("streamtype", "error"), ("port", "8080"), ("requestid", "0")]),
        );
        assert_eq!(
            error,
            Ok(StreamHeaders {
                request_id: "0".into(),
                port: 8080,
                data: false
            })
        );
        // Without requestID: the data stream (id 3) pairs with the error stream (id 1).
        let old_error = stream_headers(1, &headers(&[("streamtype", "error"), ("port", "80")]));
        let old_data = stream_headers(3, &headers(&[("streamtype", "data"), ("port", "80")]));
        assert_eq!(old_error.unwrap().request_id, old_data.unwrap().request_id);
        for (bad, why) in [
            (&[("streamtype", "data")][..], "\"port\" header is required"),
            (
                &[("streamtype", "data"), ("port", "0")][..],
                "port \"0\" is not a TCP port (1-65535)",
            ),
            (
                &[("streamtype", "data"), ("port", "70000")][..],
                "port \"70000\" is not a TCP port (1-65535)",
            ),
            (&[("port", "80")][..], "\"streamType\" header is required"),
            (
                &[("streamtype", "stdin"), ("port", "80")][..],
                "invalid stream type \"stdin\"",
            ),
        ] {
            assert_eq!(stream_headers(5, &headers(bad)), Err(why.to_string()));
        }
    }

    #[test]
    fn websocket_ports_come_from_the_query() {
        let query = Query::parse(Some("port=8080&port=9090,9091"));
        assert_eq!(websocket_ports(&query).ok(), Some(vec![8080, 9090, 9091]));
        assert!(websocket_ports(&Query::parse(None)).is_err());
        assert!(websocket_ports(&Query::parse(Some("port=http"))).is_err());
    }

    #[test]
    fn portforward_speaks_its_own_spdy_protocol_and_websocket_without_one() {
        use hyper::header::{self, HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        headers.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("portforward.k8s.io"),
        );
        assert_eq!(
            negotiate(&headers, &PORT_FORWARD).unwrap_or_else(|r| panic!("{}", r.1)),
            Transport::Spdy {
                protocol: "portforward.k8s.io"
            }
        );
        headers.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        assert!(negotiate(&headers, &PORT_FORWARD).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        let Transport::WebSocket { protocol, .. } =
            negotiate(&headers, &PORT_FORWARD).unwrap_or_else(|r| panic!("{}", r.1))
        else {
            panic!("not a WebSocket")
        };
        assert_eq!(protocol, "");
    }
}
