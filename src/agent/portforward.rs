//! Port forwarding: one TCP connection from the operator's kubelet API (`kubectl port-forward`)
//! to a port on this instance. The pod is the instance, so its ports are the instance's: the
//! agent dials `localhost:port`, as a kubelet dials the port inside the pod's network namespace.
//! Bytes flow both ways; each direction is closed on its own (the client's `close_write` is a
//! TCP half-close), and the session ends when both are.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::proto::{PortForwardInput, PortForwardOutput, PortForwardStart, port_forward_input};

/// How long a dial may take (a listening port answers at once; a filtered one would hang).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 32 * 1024;

/// The first message of a session: where to connect.
pub async fn start(inputs: &mut Streaming<PortForwardInput>) -> Result<PortForwardStart, Status> {
    match inputs.message().await? {
        Some(PortForwardInput {
            input: Some(port_forward_input::Input::Start(start)),
        }) if (1..=u16::MAX as u32).contains(&start.port) => Ok(start),
        Some(PortForwardInput {
            input: Some(port_forward_input::Input::Start(start)),
        }) => Err(Status::invalid_argument(format!(
            "port {} is not a TCP port (1-65535)",
            start.port
        ))),
        _ => Err(Status::invalid_argument(
            "port forward: the first message must be `start`",
        )),
    }
}

/// Dials the port on this instance; the error reads as Go's dialer puts it, as kubectl users
/// know it ("dial tcp 127.0.0.1:81: connect: connection refused").
pub async fn dial(port: u16) -> Result<TcpStream, Status> {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(("localhost", port))).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(Status::unavailable(format!(
            "dial tcp localhost:{port}: connect: {}",
            describe(&error)
        ))),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "dial tcp localhost:{port}: i/o timeout after {DIAL_TIMEOUT:?}"
        ))),
    }
}

fn describe(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => error.to_string(),
    }
}

/// Carries bytes between the client's stream and the connection until both directions are
/// closed, or the client goes away (its stream fails or `tx` is dropped: the connection is
/// closed at once).
pub async fn run(
    stream: TcpStream,
    mut inputs: Streaming<PortForwardInput>,
    tx: mpsc::Sender<Result<PortForwardOutput, Status>>,
) {
    let (mut read, mut write) = stream.into_split();
    let upstream = async move {
        loop {
            match inputs.message().await {
                Ok(Some(PortForwardInput {
                    input: Some(port_forward_input::Input::Data(data)),
                })) => {
                    if write.write_all(&data).await.is_err() {
                        return false;
                    }
                }
                Ok(Some(PortForwardInput {
                    input: Some(port_forward_input::Input::CloseWrite(true)),
                })) => {
                    let _ = write.shutdown().await;
                    return true;
                }
                Ok(Some(_)) => {}
                // The client's stream ended without a close (it went away) or failed.
                Ok(None) | Err(_) => return false,
            }
        }
    };
    let downstream = async move {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buffer).await {
                Ok(0) => return true,
                Ok(n) => {
                    let data = buffer[..n].to_vec();
                    if tx.send(Ok(PortForwardOutput { data })).await.is_err() {
                        return false;
                    }
                }
                Err(error) => {
                    let _ = tx
                        .send(Err(Status::aborted(format!("reading the connection: {error}"))))
                        .await;
                    return false;
                }
            }
        }
    };
    tokio::pin!(upstream, downstream);
    // Whichever direction ends first: a clean end waits for the other; an abrupt one ends both.
    tokio::select! {
        closed = &mut upstream => if closed { downstream.await; },
        ended = &mut downstream => if ended { upstream.await; },
    }
}
