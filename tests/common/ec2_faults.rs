//! A fault-injecting HTTP proxy in front of the EC2 emulator: the operator's real aws-sdk-ec2
//! client talks to it, and it answers chosen EC2 actions with 5xx errors, with silence (a
//! request that never gets an answer, so the SDK's attempt timeout fires), or by forwarding
//! the request and then losing the answer (the action happened; the caller never hears it).
//! Everything else is forwarded to moto as is.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// What the proxy does to a request of a faulted action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ec2Fault {
    /// HTTP 500 `InternalError`.
    ServerError,
    /// HTTP 503 `Unavailable`.
    Unavailable,
    /// No answer: the request is held (not forwarded) until the caller gives up.
    Hang,
    /// Forwarded (EC2 does the work), but the answer never comes back.
    LoseReply,
}

#[derive(Default)]
struct Rules {
    /// Faults still to inject, by action, in order.
    pending: HashMap<String, VecDeque<Ec2Fault>>,
    /// Requests seen, by action.
    seen: HashMap<String, u32>,
    /// Faults injected, by action.
    injected: HashMap<String, Vec<Ec2Fault>>,
}

pub struct Ec2FaultProxy {
    /// `http://127.0.0.1:<port>`: the endpoint to give the client under test.
    pub endpoint: String,
    rules: Arc<Mutex<Rules>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ec2FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a held or lost answer stays held (well past any attempt timeout under test).
const HELD: Duration = Duration::from_secs(120);

impl Ec2FaultProxy {
    /// A proxy on a free loopback port in front of the emulator at `upstream`
    /// (`http://127.0.0.1:<port>`).
    pub async fn start(upstream: &str) -> Ec2FaultProxy {
        let upstream: String = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let rules: Arc<Mutex<Rules>> = Arc::default();
        let shared = rules.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (rules, upstream) = (shared.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (rules, upstream) = (rules.clone(), upstream.clone());
                        async move { Ok::<_, Infallible>(handle(rules, &upstream, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ec2FaultProxy {
            endpoint,
            rules,
            task,
        }
    }

    /// The next `times` requests of `action` (e.g. `RunInstances`) get `fault`, after the ones
    /// already queued for it.
    pub fn fail(&self, action: &str, fault: Ec2Fault, times: usize) {
        let mut rules = self.rules.lock().unwrap();
        let queue = rules.pending.entry(action.to_string()).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Requests of `action` the proxy saw (faulted or not).
    pub fn seen(&self, action: &str) -> u32 {
        self.rules.lock().unwrap().seen.get(action).copied().unwrap_or(0)
    }

    /// The faults injected into `action` so far, in order.
    pub fn injected(&self, action: &str) -> Vec<Ec2Fault> {
        self.rules
            .lock()
            .unwrap()
            .injected
            .get(action)
            .cloned()
            .unwrap_or_default()
    }
}

/// The `Action` of an EC2 query-protocol body (`Action=RunInstances&Version=…`).
fn action_of(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or_default()
        .to_string()
}

/// An EC2 error answer, as EC2 writes it.
fn ec2_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>ec2-fault-proxy</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn handle(
    rules: Arc<Mutex<Rules>>,
    upstream: &str,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let action = action_of(&body);
    let fault = {
        let mut rules = rules.lock().unwrap();
        *rules.seen.entry(action.clone()).or_default() += 1;
        let fault = rules.pending.get_mut(&action).and_then(VecDeque::pop_front);
        if let Some(fault) = fault {
            rules.injected.entry(action.clone()).or_default().push(fault);
        }
        fault
    };
    match fault {
        Some(Ec2Fault::ServerError) => {
            return ec2_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "An internal error has occurred.",
            );
        }
        Some(Ec2Fault::Unavailable) => {
            return ec2_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The server is overloaded and can't handle the request.",
            );
        }
        Some(Ec2Fault::Hang) => {
            tokio::time::sleep(HELD).await;
            return ec2_error(StatusCode::GATEWAY_TIMEOUT, "Held", "held past every timeout");
        }
        _ => {}
    }
    let answer = forward(upstream, Request::from_parts(parts, Full::new(body))).await;
    if fault == Some(Ec2Fault::LoseReply) {
        tokio::time::sleep(HELD).await;
    }
    answer
}

/// Sends the request to the emulator on a connection of its own and returns its answer.
async fn forward(upstream: &str, request: Request<Full<Bytes>>) -> Response<Full<Bytes>> {
    let stream = match tokio::net::TcpStream::connect(upstream).await {
        Ok(stream) => stream,
        Err(error) => return ec2_error(StatusCode::BAD_GATEWAY, "ProxyError", &error.to_string()),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1 connection to the emulator");
    tokio::spawn(connection);
    match sender.send_request(request).await {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Response::from_parts(parts, Full::new(body))
        }
        Err(error) => ec2_error(StatusCode::BAD_GATEWAY, "ProxyError", &error.to_string()),
    }
}
