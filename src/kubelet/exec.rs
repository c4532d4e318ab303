//! `exec` and `attach` over WebSocket with the Kubernetes channel protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`): every binary message starts with a channel byte
//! (0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 resize; v5 adds 255 = "close channel N").
//! The command's end is a `Status` object on channel 3, which kubectl turns into its exit code.

use std::sync::Arc;

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

use super::{Body, Query, Reply, full, pod_agent};
use crate::agent::proto::exec_input::Input;
use crate::agent::proto::exec_output::Output;
use crate::agent::proto::{ExecInput, ExecStart, GetLogsRequest, TerminalSize};
use crate::controller::Context;

/// The sub-protocols served, in order of preference.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

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

/// Checks the WebSocket upgrade and picks the sub-protocol: (accept key, protocol).
fn negotiate(headers: &HeaderMap) -> Result<(String, &'static str), Reply> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(Reply(
            StatusCode::BAD_REQUEST,
            "exec and attach need a WebSocket upgrade (v5.channel.k8s.io or v4.channel.k8s.io); SPDY is not served".into(),
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
    let protocol = PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .ok_or_else(|| {
            Reply::bad_request(format!(
                "no supported sub-protocol among {offered:?}; this kubelet speaks {}",
                PROTOCOLS.join(", ")
            ))
        })?;
    Ok((derive_accept_key(key.as_bytes()), protocol))
}

fn switching_protocols(accept: &str, protocol: &str) -> Response<Body> {
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Ok(protocol) = HeaderValue::from_str(protocol) {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// A close with code 1000: clients (client-go) take anything else as an error.
fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

fn framed(channel: u8, data: &[u8]) -> Message {
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

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers 101 and runs `session` on the upgraded connection.
fn upgrade<F, Fut>(request: Request<Incoming>, accept: &str, protocol: &str, session: F) -> Response<Body>
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let upgrading = hyper::upgrade::on(request);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                session(socket).await;
            }
            Err(error) => tracing::debug!(%error, "exec upgrade"),
        }
    });
    switching_protocols(accept, protocol)
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
    let (accept, protocol) = negotiate(request.headers())?;
    let (pod, mut agent) = pod_agent(&ctx, &target.node, &target.namespace, &target.name).await?;
    let (inputs, input_rx) = mpsc::channel::<ExecInput>(16);
    let start = ExecStart {
        pod_uid: pod.uid().unwrap_or_default(),
        container: target.container.clone(),
        command: command.clone(),
        stdin: query.flag("stdin"),
        tty: query.flag("tty"),
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
        .map_err(|status| match status.code() {
            tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                Reply::bad_request(status.message().to_string())
            }
            _ => Reply::unavailable(status.message().to_string()),
        })?
        .into_inner();
    let v5 = protocol == PROTOCOLS[0];
    Ok(upgrade(request, &accept, protocol, move |socket| async move {
        let (mut sink, mut source) = socket.split();
        let forward = tokio::spawn(async move {
            while let Some(Ok(message)) = source.next().await {
                let Message::Binary(data) = message else {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                let input = match (data.first(), data.get(1)) {
                    (Some(&STDIN), _) => Input::Stdin(data[1..].to_vec()),
                    (Some(&RESIZE), _) => {
                        let size: serde_json::Value = serde_json::from_slice(&data[1..]).unwrap_or_default();
                        Input::Resize(TerminalSize {
                            width: size["Width"].as_u64().unwrap_or(0) as u32,
                            height: size["Height"].as_u64().unwrap_or(0) as u32,
                        })
                    }
                    (Some(&CLOSE), Some(&STDIN)) if v5 => Input::CloseStdin(true),
                    _ => continue,
                };
                if inputs.send(ExecInput { input: Some(input) }).await.is_err() {
                    break;
                }
            }
        });
        let mut status = exit_status(
            &command,
            0,
            "the agent ended the exec stream without an exit status",
        );
        while let Some(output) = outputs.next().await {
            let message = match output {
                Ok(output) => match output.output {
                    Some(Output::Stdout(data)) => framed(STDOUT, &data),
                    Some(Output::Stderr(data)) => framed(STDERR, &data),
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
            if sink.send(message).await.is_err() {
                break;
            }
        }
        let _ = sink.send(framed(ERROR, status.to_string().as_bytes())).await;
        let _ = sink.send(normal_close()).await;
        forward.abort();
    }))
}

/// `attach`: the container's output from now on (the agent runs containers without a terminal
/// to attach stdin to), until the container's run ends.
pub(crate) async fn attach(
    ctx: Arc<Context>,
    request: Request<Incoming>,
    target: Target,
    _query: Query,
) -> Result<Response<Body>, Reply> {
    let (accept, protocol) = negotiate(request.headers())?;
    let (pod, mut agent) = pod_agent(&ctx, &target.node, &target.namespace, &target.name).await?;
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
    Ok(upgrade(request, &accept, protocol, move |socket| async move {
        let (mut sink, mut source) = socket.split();
        let mut status = exit_status(&[], 0, "");
        loop {
            tokio::select! {
                chunk = stream.next() => match chunk {
                    Some(Ok(chunk)) => if sink.send(framed(STDOUT, &chunk.data)).await.is_err() { return },
                    Some(Err(error)) => { status = exit_status(&[], 0, error.message()); break }
                    None => break,
                },
                message = source.next() => match message {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
        let _ = sink.send(framed(ERROR, status.to_string().as_bytes())).await;
        let _ = sink.send(normal_close()).await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_offered_protocol_wins_and_spdy_is_refused() {
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
        let (accept, protocol) = negotiate(&headers).unwrap_or_else(|r| panic!("{}", r.1));
        assert_eq!(protocol, "v5.channel.k8s.io");
        // RFC 6455's example key and answer.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(negotiate(&headers).unwrap_err().1.contains("SPDY is not served"));
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
