//! Spot interruption notices from the instance metadata service (IMDSv2): the agent polls
//! `/latest/meta-data/spot/instance-action` (404 until EC2 decides to reclaim the instance, then
//! `{"action": "terminate", "time": "..."}`) and marks every pod's status, so the operator can
//! fail the pods with `SpotInterrupted` before the instance disappears.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::runtime::Runtime;

/// One HTTP/1.1 request to the metadata service: status and body.
async fn call(
    endpoint: &Uri,
    method: Method,
    path: &str,
    header: (&str, &str),
) -> Result<(StatusCode, String), String> {
    let host = endpoint.host().ok_or("the IMDS endpoint has no host")?;
    let port = endpoint.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(header.0, header.1)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET `path` with an IMDSv2 session token: status and body.
async fn get(endpoint: &Uri, path: &str) -> Result<(StatusCode, String), String> {
    let (status, token) = call(
        endpoint,
        Method::PUT,
        "/latest/api/token",
        ("X-aws-ec2-metadata-token-ttl-seconds", "300"),
    )
    .await?;
    if status != StatusCode::OK {
        return Err(format!("IMDS token: {status}"));
    }
    call(
        endpoint,
        Method::GET,
        path,
        ("X-aws-ec2-metadata-token", token.trim()),
    )
    .await
}

/// The id of the instance the agent runs on.
pub async fn instance_id(endpoint: &Uri) -> Result<String, String> {
    match get(endpoint, "/latest/meta-data/instance-id").await? {
        (StatusCode::OK, body) => Ok(body.trim().to_string()),
        (other, _) => Err(format!("instance-id: {other}")),
    }
}

/// Asks once: `Some(reclaim time in unix ms)` when a notice is out.
pub async fn spot_notice(endpoint: &Uri) -> Result<Option<i64>, String> {
    let (status, body) = get(endpoint, "/latest/meta-data/spot/instance-action").await?;
    match status {
        StatusCode::NOT_FOUND => Ok(None),
        StatusCode::OK => {
            let notice: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("instance-action: {e}"))?;
            let at = notice["time"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_millisecond())
                .unwrap_or_else(|| jiff::Timestamp::now().as_millisecond() + 120_000);
            Ok(Some(at))
        }
        other => Err(format!("instance-action: {other}")),
    }
}

/// Polls for a notice every `every` until one comes, then marks the runtime's pods.
pub async fn watch_spot(runtime: Arc<Runtime>, endpoint: Uri, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        match spot_notice(&endpoint).await {
            Ok(Some(at)) => {
                tracing::warn!(
                    reclaim_at_unix_ms = at,
                    "spot interruption notice: this instance is being reclaimed"
                );
                runtime.spot_interruption(at);
                return;
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(%error, "polling the instance metadata service"),
        }
    }
}
