//! `exec` and `attach`, over either transport a kubelet serves:
//!
//! * **WebSocket** with the Kubernetes channel protocols (`v5.channel.k8s.io`,
//!   `v4.channel.k8s.io`): every binary message starts with a channel byte (0 stdin, 1 stdout,
//!   2 stderr, 3 error/status, 4 resize; v5 adds 255 = "close channel N").
//! * **SPDY/3.1** with `v4.channel.k8s.io` (see [`super::spdy`]): one stream per channel, opened
//!   by the client with a `streamtype` header (`error`, `stdin`, `stdout`, `stderr`, `resize`).
//!   A real API server dials kubelets this way when it translates kubectl's WebSocket session.
//!
//! The command's end is a `Status` object on the error channel, which kubectl turns into its
//! exit code. Both transports feed one session (the agent call) through [`FromClient`] and
//! [`ToClient`] channels.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use super::spdy;
use super::{Body, Query, Reply, full, pod_agent};
use crate::runtime::Context;
use ec2_kubelet_protocol::v1::exec_input::Input;
use ec2_kubelet_protocol::v1::exec_output::Output;
use ec2_kubelet_protocol::v1::{ExecInput, ExecStart, GetLogsRequest, TerminalSize};

/// What a streaming endpoint speaks: its WebSocket sub-protocols in order of preference (`""`:
/// a client that offers none is served) and its stream protocol over SPDY.
pub(crate) struct Protocols {
    pub(crate) what: &'static str,
    pub(crate) websocket: &'static [&'static str],
    pub(crate) spdy: &'static str,
}

/// `exec` and `attach`: SPDY carries v4 only (the newest a kubelet serves over SPDY).
const EXEC: Protocols = Protocols {
    what: "exec and attach",
    websocket: &[V5, "v4.channel.k8s.io"],
    spdy: "v4.channel.k8s.io",
};
const V5: &str = "v5.channel.k8s.io";
pub(crate) const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// How long a SPDY client has to open the streams it asked for (the kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// After the status is sent, how long the client has to close the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Target {
    node: String,
    namespace: String,
    name: String,
    container: String,
}

impl Target {
    pub(crate) fn new(node: &str, namespace: &str, name: &str, container: &str) -> Target {
        Target {
            node: node.into(),
            namespace: namespace.into(),
            name: name.into(),
            container: container.into(),
        }
    }
}

/// The upgrade the client asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket { accept: String, protocol: &'static str },
    Spdy { protocol: &'static str },
}

/// Checks the upgrade and picks the transport and its protocol.
pub(crate) fn negotiate(headers: &HeaderMap, protocols: &Protocols) -> Result<Transport, Reply> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        let offered: Vec<&str> = headers
            .get_all(STREAM_PROTOCOL_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(str::trim))
            .collect();
        if !offered.contains(&protocols.spdy) {
            return Err(Reply(
                StatusCode::FORBIDDEN,
                format!(
                    "no supported stream protocol among {offered:?}; this kubelet speaks {} over SPDY",
                    protocols.spdy
                ),
            ));
        }
        return Ok(Transport::Spdy {
            protocol: protocols.spdy,
        });
    }
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(Reply(
            StatusCode::BAD_REQUEST,
            format!(
                "{} need an upgrade: WebSocket ({}) or SPDY/3.1 ({})",
                protocols.what,
                protocols.websocket.join(", "),
                protocols.spdy
            ),
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Reply::bad_request("missing Sec-WebSocket-Key"))?;
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    let protocol = protocols
        .websocket
        .iter()
        .find(|p| offered.iter().any(|o| o == *p) || (p.is_empty() && offered.is_empty()))
        .ok_or_else(|| {
            Reply::bad_request(format!(
                "no supported sub-protocol among {offered:?}; this kubelet speaks {}",
                protocols.websocket.join(", ")
            ))
        })?;
    Ok(Transport::WebSocket {
        accept: derive_accept_key(key.as_bytes()),
        protocol,
    })
}

pub(crate) fn switching_protocols(transport: &Transport) -> Response<Body> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    match transport {
        Transport::WebSocket { accept, protocol } => {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            if let Ok(accept) = HeaderValue::from_str(accept) {
                headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            }
            if !protocol.is_empty() {
                headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
            }
        }
        Transport::Spdy { protocol } => {
            headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            headers.insert(STREAM_PROTOCOL_HEADER, HeaderValue::from_static(protocol));
        }
    }
    response
}

/// A close with code 1000: clients (client-go) take anything else as an error.
pub(crate) fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

pub(crate) fn framed(channel: u8, data: &[u8]) -> Message {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.push(channel);
    message.extend_from_slice(data);
    Message::binary(message)
}

/// The `Status` kubectl reads on the error channel when the command ends.
fn exit_status(command: &[String], exit_code: i32, error: &str) -> serde_json::Value {
    if !error.is_empty() {
        return json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "message": error});
    }
    if exit_code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
        "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {exit_code}"),
        "details": {"causes": [{"reason": "ExitCode", "message": exit_code.to_string()}]},
    })
}

/// What the client sends, whatever the transport.
#[derive(Debug, PartialEq)]
enum FromClient {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize(TerminalSize),
}

/// What the session sends before its final status.
#[derive(Debug)]
enum ToClient {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// The streams a session uses: a SPDY client opens exactly these. The API server asks a kubelet
/// with `input`, `output`, `error` and `tty` (`stdin`, `stdout`, `stderr` are the names of the
/// API server's own query, and accepted too).
#[derive(Clone, Copy, Debug)]
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl Wanted {
    fn from(query: &Query) -> Wanted {
        let tty = query.flag("tty");
        Wanted {
            stdin: query.flag("input") || query.flag("stdin"),
            stdout: query.flag("output") || query.flag("stdout"),
            // With a terminal, stderr is part of the terminal's output.
            stderr: (query.flag("error") || query.flag("stderr")) && !tty,
            tty,
        }
    }

    fn stream_types(&self) -> Vec<&'static str> {
        let mut types = vec!["error"];
        for (on, name) in [
            (self.stdin, "stdin"),
            (self.stdout, "stdout"),
            (self.stderr, "stderr"),
            (self.tty, "resize"),
        ] {
            if on {
                types.push(name);
            }
        }
        types
    }
}

/// A resize message: `{"Width": w, "Height": h}`.
fn terminal_size(json: &serde_json::Value) -> TerminalSize {
    TerminalSize {
        width: json["Width"].as_u64().unwrap_or(0) as u32,
        height: json["Height"].as_u64().unwrap_or(0) as u32,
    }
}

/// A session: reads what the client sends until that channel closes (the client left), sends
/// output, and returns the final status.
type Session = std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send>>;

/// Answers 101 and runs the session on the upgraded connection.
fn upgrade<F>(request: Request<Incoming>, transport: Transport, wanted: Wanted, session: F) -> Response<Body>
where
    F: FnOnce(mpsc::Receiver<FromClient>, mpsc::Sender<ToClient>) -> Session + Send + 'static,
{
    let response = switching_protocols(&transport);
    let upgrading = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let upgraded = match upgrading.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => return tracing::debug!(%error, "exec upgrade"),
        };
        match transport {
            Transport::WebSocket { protocol, .. } => {
                let socket = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                over_websocket(socket, protocol == V5, session).await;
            }
            Transport::Spdy { .. } => {
                if let Err(error) = over_spdy(upgraded, wanted, session).await {
                    tracing::debug!(%error, "exec over SPDY");
                }
            }
        }
    });
    response
}

async fn over_websocket<S, F>(socket: WebSocketStream<S>, v5: bool, session: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(mpsc::Receiver<FromClient>, mpsc::Sender<ToClient>) -> Session,
{
    let (mut sink, mut source) = socket.split();
    let (inputs, from_client) = mpsc::channel(16);
    let (to_client, mut outputs) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = source.next().await {
            let Message::Binary(data) = message else {
                if matches!(message, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let input = match (data.first(), data.get(1)) {
                (Some(&STDIN), _) => FromClient::Stdin(data[1..].to_vec()),
                (Some(&RESIZE), _) => {
                    let size: serde_json::Value = serde_json::from_slice(&data[1..]).unwrap_or_default();
                    FromClient::Resize(terminal_size(&size))
                }
                (Some(&CLOSE), Some(&STDIN)) if v5 => FromClient::CloseStdin,
                _ => continue,
            };
            if inputs.send(input).await.is_err() {
                break;
            }
        }
    });
    let running = tokio::spawn(session(from_client, to_client));
    while let Some(output) = outputs.recv().await {
        let message = match output {
            ToClient::Stdout(data) => framed(STDOUT, &data),
            ToClient::Stderr(data) => framed(STDERR, &data),
        };
        if sink.send(message).await.is_err() {
            running.abort();
            reader.abort();
            return;
        }
    }
    let status = running
        .await
        .unwrap_or_else(|e| exit_status(&[], 0, &e.to_string()));
    let _ = sink.send(framed(ERROR, status.to_string().as_bytes())).await;
    let _ = sink.send(normal_close()).await;
    reader.abort();
}

async fn over_spdy<S, F>(io: S, wanted: Wanted, session: F) -> Result<(), spdy::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(mpsc::Receiver<FromClient>, mpsc::Sender<ToClient>) -> Session,
{
    let (read, write) = tokio::io::split(io);
    let mut reader = spdy::Reader::new(read);
    let mut writer = spdy::Writer::new(write);
    // 1. The client opens one stream per channel; each is accepted.
    let types = wanted.stream_types();
    let mut streams: std::collections::HashMap<&'static str, u32> = Default::default();
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while streams.len() < types.len() {
        let frame = match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(frame) => frame?,
            Err(_) => {
                writer.go_away(last).await?;
                return Err(spdy::Error::Protocol(format!(
                    "the client opened {:?} of the streams {types:?} in {STREAM_CREATION_TIMEOUT:?}",
                    streams.keys().collect::<Vec<_>>()
                )));
            }
        };
        match frame {
            Some(spdy::Frame::Open { id, headers, .. }) => {
                writer.reply(id).await?;
                last = last.max(id);
                let kind = headers
                    .iter()
                    .find(|(n, _)| n == "streamtype")
                    .map(|(_, v)| v.as_str());
                tracing::debug!(id, ?kind, ?types, "SPDY stream opened");
                match types.iter().find(|t| Some(**t) == kind) {
                    Some(kind) => {
                        streams.insert(kind, id);
                    }
                    None => writer.reset(id).await?,
                }
            }
            Some(spdy::Frame::Ping { id }) => writer.pong(id).await?,
            Some(spdy::Frame::GoAway) | None => return Ok(()),
            Some(_) => {}
        }
    }
    // 2. The session, with the client's frames read on their own task.
    let (frames_tx, mut frames) = mpsc::channel(16);
    let read_frames = tokio::spawn(async move {
        while let Ok(Some(frame)) = reader.next().await {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let (inputs, from_client) = mpsc::channel(16);
    let mut inputs = Some(inputs);
    let (to_client, mut outputs) = mpsc::channel(16);
    let running = tokio::spawn(session(from_client, to_client));
    let stdout = streams.get("stdout").copied();
    let stderr = streams.get("stderr").copied().or(stdout);
    let stdin = streams.get("stdin").copied();
    let resize = streams.get("resize").copied();
    let mut resize_buffer: Vec<u8> = Vec::new();
    let mut client_gone = false;
    loop {
        tokio::select! {
            output = outputs.recv() => match output {
                Some(ToClient::Stdout(data)) => if let Some(id) = stdout { writer.data(id, &data, false).await? },
                Some(ToClient::Stderr(data)) => if let Some(id) = stderr { writer.data(id, &data, false).await? },
                None => break,
            },
            frame = frames.recv(), if !client_gone => match frame {
                Some(spdy::Frame::Data { id, data, fin }) => {
                    let Some(sender) = inputs.as_ref() else { continue };
                    if Some(id) == stdin {
                        if !data.is_empty() {
                            let _ = sender.send(FromClient::Stdin(data)).await;
                        }
                        if fin {
                            let _ = sender.send(FromClient::CloseStdin).await;
                        }
                    } else if Some(id) == resize {
                        resize_buffer.extend_from_slice(&data);
                        let mut sizes = serde_json::Deserializer::from_slice(&resize_buffer).into_iter::<serde_json::Value>();
                        let mut parsed = Vec::new();
                        for size in sizes.by_ref() {
                            match size {
                                Ok(size) => parsed.push(terminal_size(&size)),
                                Err(_) => break,
                            }
                        }
                        let consumed = sizes.byte_offset();
                        resize_buffer.drain(..consumed);
                        for size in parsed {
                            let _ = sender.send(FromClient::Resize(size)).await;
                        }
                    }
                }
                Some(spdy::Frame::Ping { id }) => writer.pong(id).await?,
                Some(spdy::Frame::Open { id, .. }) => writer.reset(id).await?,
                Some(spdy::Frame::Reset { .. }) => {}
                // The client left: the session sees its input end.
                Some(spdy::Frame::GoAway) | None => {
                    client_gone = true;
                    inputs = None;
                }
            },
        }
    }
    // 3. The status on the error stream, every stream closed, then the connection.
    let status = running
        .await
        .unwrap_or_else(|e| exit_status(&[], 0, &e.to_string()));
    if let Some(id) = streams.get("error").copied() {
        writer.data(id, status.to_string().as_bytes(), true).await?;
    }
    for (kind, id) in &streams {
        if *kind != "error" {
            writer.data(*id, &[], true).await?;
        }
    }
    writer.go_away(last).await?;
    drop(inputs);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async { while frames.recv().await.is_some() {} }).await;
    read_frames.abort();
    writer.shutdown().await;
    Ok(())
}

/// Passes what the client sends on to an agent call's input (as `message` makes it), until the
/// client leaves or the call ends.
async fn forward_input<T>(
    mut from_client: mpsc::Receiver<FromClient>,
    inputs: mpsc::Sender<T>,
    message: impl Fn(FromClient) -> T,
) {
    while let Some(input) = from_client.recv().await {
        if inputs.send(message(input)).await.is_err() {
            break;
        }
    }
}

/// An agent call refused before its stream began: a missing container, or one that is not
/// running, is the user's 400 (kubectl shows it); anything else is the agent's failure.
fn refused(status: tonic::Status) -> Reply {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            Reply::bad_request(status.message().to_string())
        }
        _ => Reply::unavailable(status.message().to_string()),
    }
}

/// `exec`: runs a command in the container through the agent's `Exec` stream.
pub(crate) async fn exec(
    ctx: Arc<Context>,
    request: Request<Incoming>,
    target: Target,
    query: Query,
) -> Result<Response<Body>, Reply> {
    let command = query.all("command");
    if command.is_empty() {
        return Err(Reply::bad_request("command is required"));
    }
    let transport = negotiate(request.headers(), &EXEC)?;
    let wanted = Wanted::from(&query);
    let (pod, mut agent) = pod_agent(&ctx, &target.node, &target.namespace, &target.name).await?;
    let (inputs, input_rx) = mpsc::channel::<ExecInput>(16);
    let start = ExecStart {
        pod_uid: pod.uid().unwrap_or_default(),
        container: target.container.clone(),
        command: command.clone(),
        stdin: wanted.stdin,
        tty: wanted.tty,
    };
    let _ = inputs
        .send(ExecInput {
            input: Some(Input::Start(start)),
        })
        .await;
    // Started before the upgrade, so a missing container is an HTTP error kubectl can show.
    let mut outputs = agent
        .exec(tokio_stream::wrappers::ReceiverStream::new(input_rx))
        .await
        .map_err(refused)?
        .into_inner();
    Ok(upgrade(
        request,
        transport,
        wanted,
        move |from_client, to_client| {
            Box::pin(async move {
                let forward = tokio::spawn(forward_input(from_client, inputs, |input| {
                    let input = match input {
                        FromClient::Stdin(data) => Input::Stdin(data),
                        FromClient::CloseStdin => Input::CloseStdin(true),
                        FromClient::Resize(size) => Input::Resize(size),
                    };
                    ExecInput { input: Some(input) }
                }));
                let mut status = exit_status(
                    &command,
                    0,
                    "the agent ended the exec stream without an exit status",
                );
                while let Some(output) = outputs.next().await {
                    let message = match output {
                        Ok(output) => match output.output {
                            Some(Output::Stdout(data)) => ToClient::Stdout(data),
                            Some(Output::Stderr(data)) => ToClient::Stderr(data),
                            Some(Output::Exit(exit)) => {
                                status = exit_status(&command, exit.exit_code, &exit.error);
                                break;
                            }
                            None => continue,
                        },
                        Err(error) => {
                            status = exit_status(&command, 0, &format!("exec: {}", error.message()));
                            break;
                        }
                    };
                    if to_client.send(message).await.is_err() {
                        break;
                    }
                }
                forward.abort();
                status
            })
        },
    ))
}

/// `attach`: for a container with `tty` or `stdin` in its spec, its streams through the agent's
/// `Attach` (input, terminal resizes, raw output); for any other, its output from now on (the
/// log, followed). Either way until the container's run ends or the client leaves.
pub(crate) async fn attach(
    ctx: Arc<Context>,
    request: Request<Incoming>,
    target: Target,
    query: Query,
) -> Result<Response<Body>, Reply> {
    let transport = negotiate(request.headers(), &EXEC)?;
    let wanted = Wanted::from(&query);
    let (pod, mut agent) = pod_agent(&ctx, &target.node, &target.namespace, &target.name).await?;
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == target.container))
        .ok_or_else(|| {
            Reply::bad_request(format!(
                "container {} is not valid for pod {}",
                target.container, target.name
            ))
        })?;
    if container.tty.unwrap_or(false) || container.stdin.unwrap_or(false) {
        return attach_streams(request, transport, wanted, &pod, agent, &target.container).await;
    }
    let logs = GetLogsRequest {
        pod_uid: pod.uid().unwrap_or_default(),
        container: target.container.clone(),
        follow: true,
        tail_lines: Some(0),
        ..Default::default()
    };
    let mut stream = agent
        .get_logs(logs)
        .await
        .map_err(|status| Reply::bad_request(status.message().to_string()))?
        .into_inner();
    Ok(upgrade(
        request,
        transport,
        wanted,
        move |mut from_client, to_client| {
            Box::pin(async move {
                loop {
                    tokio::select! {
                        chunk = stream.next() => match chunk {
                            Some(Ok(chunk)) => if to_client.send(ToClient::Stdout(chunk.data)).await.is_err() { break },
                            Some(Err(error)) => return exit_status(&[], 0, error.message()),
                            None => break,
                        },
                        // Input is not attached to anything; its end is the client's departure.
                        input = from_client.recv() => if input.is_none() { break },
                    }
                }
                exit_status(&[], 0, "")
            })
        },
    ))
}

/// Attach to a container that has a terminal or an open standard input: the agent's `Attach`.
async fn attach_streams(
    request: Request<Incoming>,
    transport: Transport,
    wanted: Wanted,
    pod: &k8s_openapi::api::core::v1::Pod,
    mut agent: crate::agent_client::AgentChannel,
    container: &str,
) -> Result<Response<Body>, Reply> {
    use ec2_kubelet_protocol::v1::attach_input::Input as AttachIn;
    use ec2_kubelet_protocol::v1::attach_output::Output as AttachOut;
    use ec2_kubelet_protocol::v1::{AttachInput, AttachStart};
    let (inputs, input_rx) = mpsc::channel::<AttachInput>(16);
    let start = AttachIn::Start(AttachStart {
        pod_uid: pod.uid().unwrap_or_default(),
        container: container.to_string(),
    });
    let _ = inputs.send(AttachInput { input: Some(start) }).await;
    let mut outputs = agent
        .attach(tokio_stream::wrappers::ReceiverStream::new(input_rx))
        .await
        .map_err(refused)?
        .into_inner();
    Ok(upgrade(
        request,
        transport,
        wanted,
        move |from_client, to_client| {
            Box::pin(async move {
                let mut forward = tokio::spawn(forward_input(from_client, inputs, |input| {
                    let input = match input {
                        FromClient::Stdin(data) => AttachIn::Stdin(data),
                        FromClient::CloseStdin => AttachIn::CloseStdin(true),
                        FromClient::Resize(size) => AttachIn::Resize(size),
                    };
                    AttachInput { input: Some(input) }
                }));
                let mut status = exit_status(&[], 0, "");
                loop {
                    let output = tokio::select! {
                        output = outputs.next() => output,
                        // The client left: detach (the container runs on).
                        _ = &mut forward => break,
                    };
                    let message = match output {
                        Some(Ok(output)) => match output.output {
                            Some(AttachOut::Stdout(data)) => ToClient::Stdout(data),
                            Some(AttachOut::Stderr(data)) => ToClient::Stderr(data),
                            None => continue,
                        },
                        Some(Err(error)) => {
                            status = exit_status(&[], 0, &format!("attach: {}", error.message()));
                            break;
                        }
                        // The container's run ended.
                        None => break,
                    };
                    if to_client.send(message).await.is_err() {
                        break;
                    }
                }
                forward.abort();
                status
            })
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_prefers_v5_and_spdy_speaks_v4() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v4.channel.k8s.io, v5.channel.k8s.io, channel.k8s.io"),
        );
        let transport = negotiate(&headers, &EXEC).unwrap_or_else(|r| panic!("{}", r.1));
        assert_eq!(
            transport,
            Transport::WebSocket {
                // RFC 6455's example key and answer.
                accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".into(),
                protocol: "v5.channel.k8s.io",
            }
        );
        // SPDY (a real API server's translation of kubectl's session): v4 only.
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        headers.insert(
            STREAM_PROTOCOL_HEADER,
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        let refused = negotiate(&headers, &EXEC).unwrap_err();
        assert_eq!(refused.0, StatusCode::FORBIDDEN);
        headers.append(
            STREAM_PROTOCOL_HEADER,
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        assert_eq!(
            negotiate(&headers, &EXEC).unwrap_or_else(|r| panic!("{}", r.1)),
            Transport::Spdy {
                protocol: "v4.channel.k8s.io"
            }
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(negotiate(&headers, &EXEC).unwrap_err().0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn exit_codes_become_the_status_kubectl_reads() {
        assert_eq!(exit_status(&[], 0, "")["status"], "Success");
        let failed = exit_status(&["false".into()], 3, "");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status(&[], 0, "no such container")["status"], "Failure");
    }
}
