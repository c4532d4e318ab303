//! The fault proxy: a plain-HTTP Kubernetes API endpoint on loopback that forwards every request
//! to an upstream API server (the dev cluster or a real kube-apiserver, over whatever transport
//! and credentials its `kube::Config` names) and answers a share of the resource requests the
//! way a loaded or failing API server does (see [`super::faults`]). Tests put it between the
//! system under test and either server, so the same fault scenarios run against both.
//!
//! Every request is forwarded with the upstream configuration's identity. Protocol upgrades
//! (exec, attach, port-forward) are not carried: they are answered 501 with the reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;

use super::error::ApiError;
use super::faults::{Fault, FaultOptions, Injector, RequestShape};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A running fault proxy; stops when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

/// One resource request that passed through the proxy and how it was answered (recorded from
/// [`FaultProxy::record`] on).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Exchange {
    pub user_agent: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: String,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: String,
    /// The request's `Content-Type` (which patch), or empty.
    pub content_type: String,
    /// The HTTP status of the answer (502 when the upstream could not be reached).
    pub status: u16,
    /// The fault injected instead of (or on top of) the upstream's answer.
    pub fault: Option<&'static str>,
}

/// What the proxy shares between connections.
struct Shared {
    upstream: kube::Client,
    injector: Injector,
    /// `Some` while recording.
    log: std::sync::Mutex<Option<Vec<Exchange>>>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0: a free one) and forwards to the server `upstream` names,
    /// injecting `options` (rate 0: none until [`FaultProxy::set`]).
    pub async fn start(
        listen: SocketAddr,
        mut upstream: kube::Config,
        options: FaultOptions,
    ) -> std::io::Result<FaultProxy> {
        // Watches stay open as long as the client keeps them; the server's answers, 429 and 503
        // included, go to the client as they are (kube's client would retry them itself).
        upstream.read_timeout = None;
        upstream.default_retry = false;
        let upstream = kube::Client::try_from(upstream).map_err(std::io::Error::other)?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            injector: Injector::new(options),
            log: std::sync::Mutex::new(None),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept(listener, shared.clone(), stopped));
        Ok(FaultProxy {
            address,
            shared,
            stop,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Changes the faults injected from now on.
    pub fn set(&self, options: FaultOptions) {
        self.shared.injector.set(options);
    }

    /// How many of each fault were injected so far.
    pub fn counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.shared.injector.counts()
    }

    /// Records every resource request from now on (see [`FaultProxy::exchanges`]).
    pub fn record(&self) {
        let mut log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        log.get_or_insert_with(Vec::new);
    }

    /// The resource requests recorded so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        let log = self.shared.log.lock().unwrap_or_else(|p| p.into_inner());
        log.clone().unwrap_or_default()
    }

    /// A kube client configuration for the proxy (no credentials: it forwards as its upstream).
    pub fn client_config(&self) -> kube::Config {
        super::plain_client_config(&self.url())
    }

    /// A kubeconfig for the proxy, written to `path` (owner-only permissions).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        super::write_plain_kubeconfig(&self.url(), path)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "fault proxy accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
        });
    }
}

/// The resource a request path names (`pods`, `pods/status`), whether it names one object,
/// and `None` for non-resource paths (discovery, `/version`, `/openapi`, health).
fn resource_of(path: &str) -> Option<(String, bool)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    match rest {
        [] => None,
        [resource] => Some((resource.to_string(), false)),
        [resource, _name] => Some((resource.to_string(), true)),
        [resource, _name, subresource, ..] => Some((format!("{resource}/{subresource}"), true)),
    }
}

/// Whether the query asks for a watch (`watch=true`, `watch=1`).
fn watch_flag(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(key, value)| key == "watch" && matches!(value, "true" | "1"))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An error answer, in the dev cluster's words (a `Status`; `Retry-After` on a 429).
fn answer(error: &ApiError) -> Response<Body> {
    super::server::error_response(error).map(BodyExt::boxed_unsync)
}

/// The verb an authorizer would see for a request of this method and shape.
fn verb_of(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method, named) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, false) => "deletecollection",
        (&Method::DELETE, true) => "delete",
        _ => "other",
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    if request.headers().contains_key(header::UPGRADE) {
        return answer(&ApiError::not_implemented(
            "the fault proxy does not carry protocol upgrades (exec, attach, port-forward): connect to the API server directly",
        ));
    }
    let path = request.uri().path().to_string();
    let Some((resource, named)) = resource_of(&path) else {
        return forward_or_502(shared, request).await;
    };
    let method = request.method().clone();
    let user_agent = super::header_text(request.headers(), header::USER_AGENT);
    let content_type = super::header_text(request.headers(), header::CONTENT_TYPE);
    let watch = method == Method::GET && !named && watch_flag(request.uri().query().unwrap_or_default());
    let shape = RequestShape {
        user_agent: &user_agent,
        resource: &resource,
        watch,
        update: matches!(method, Method::PUT | Method::PATCH) && named,
    };
    let drawn = shared.injector.draw(&shape);
    let response = match drawn {
        None => forward_or_502(shared, request).await,
        Some((fault, delay)) => {
            tracing::debug!(fault = fault.name(), %path, "injecting a fault");
            inject(shared, request, fault, delay, &resource).await
        }
    };
    let mut log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(log) = log.as_mut() {
        log.push(Exchange {
            user_agent,
            verb: verb_of(&method, named, watch).into(),
            resource,
            content_type,
            status: response.status().as_u16(),
            fault: drawn.map(|(fault, _)| fault.name()),
        });
    }
    response
}

/// Answers `request` with `fault` (forwarding it first where the fault lets it through).
async fn inject(
    shared: &Shared,
    request: Request<Incoming>,
    fault: Fault,
    delay: Duration,
    resource: &str,
) -> Response<Body> {
    match fault {
        Fault::ServerError => answer(&ApiError::internal("injected fault: internal error")),
        Fault::TooManyRequests => {
            let mut error =
                ApiError::too_many_requests("injected fault: too many requests, please try again later");
            error.details = Some(json!({"retryAfterSeconds": 1}));
            answer(&error)
        }
        Fault::Conflict => {
            let name = request.uri().path().rsplit('/').next().unwrap_or_default();
            answer(&ApiError::conflict(
                "",
                resource,
                name,
                "injected fault: the object has been modified; please apply your changes to the latest version and try again",
            ))
        }
        Fault::Gone => gone(),
        Fault::DropWatch => cut_after(forward_or_502(shared, request).await, delay),
        Fault::Slow => {
            tokio::time::sleep(delay).await;
            forward_or_502(shared, request).await
        }
    }
}

async fn forward_or_502(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    match forward(shared, request).await {
        Ok(response) => response,
        Err(error) => answer(&ApiError::bad_gateway(format!(
            "the fault proxy could not reach the API server: {error}"
        ))),
    }
}

/// A watch answered with one `410 Gone` ERROR event, as an API server whose history no longer
/// reaches the asked resourceVersion does.
fn gone() -> Response<Body> {
    let expired = ApiError::gone("injected fault: too old resource version");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(super::server::watch_line("ERROR", &expired.status())))
        .expect("a valid response")
}

/// Headers that belong to one connection, not to the request (RFC 9110 section 7.6.1), and
/// the ones the upstream client sets itself.
fn forwarded(name: &header::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
    )
}

async fn forward(shared: &Shared, request: Request<Incoming>) -> Result<Response<Body>, String> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut upstream = Request::builder().method(parts.method).uri(target);
    for (name, value) in parts.headers.iter().filter(|(name, _)| forwarded(name)) {
        upstream = upstream.header(name, value);
    }
    let upstream = upstream
        .body(kube::client::Body::from(body))
        .map_err(|e| e.to_string())?;
    let response = shared.upstream.send(upstream).await.map_err(|e| e.to_string())?;
    let (mut parts, body) = response.into_parts();
    let headers = std::mem::take(&mut parts.headers);
    let mut name = None;
    for (next, value) in headers {
        // `None`: another value of the header before.
        name = next.or(name);
        if let Some(name) = name.as_ref().filter(|n| forwarded(n)) {
            parts.headers.append(name.clone(), value);
        }
    }
    let body = body.map_err(std::io::Error::other).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// The response with its body broken off after `after`, as a dropped connection does.
fn cut_after(response: Response<Body>, after: Duration) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let frames = BodyStream::new(body).take_until(tokio::time::sleep(after));
    let broken = futures::stream::once(async {
        Err::<Frame<Bytes>, _>(std::io::Error::other("watch dropped (injected fault)"))
    });
    Response::from_parts(
        parts,
        BodyExt::boxed_unsync(StreamBody::new(frames.chain(broken))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_name_their_resource() {
        let cases = [
            ("/api/v1/namespaces/default/pods", Some(("pods", false))),
            (
                "/api/v1/namespaces/default/pods/web/status",
                Some(("pods/status", true)),
            ),
            ("/api/v1/namespaces/default", Some(("namespaces", true))),
            ("/api/v1/namespaces", Some(("namespaces", false))),
            ("/api/v1/nodes/vn-1", Some(("nodes", true))),
            (
                "/apis/coordination.k8s.io/v1/namespaces/x/leases/l",
                Some(("leases", true)),
            ),
            (
                "/apis/ec2-kubelet.io/v1alpha1/ec2nodepools",
                Some(("ec2nodepools", false)),
            ),
            ("/apis/ec2-kubelet.io/v1alpha1", None),
            ("/api", None),
            ("/version", None),
            ("/openapi/v2", None),
        ];
        for (path, want) in cases {
            let got = resource_of(path);
            assert_eq!(
                got.as_ref().map(|(r, named)| (r.as_str(), *named)),
                want,
                "{path}"
            );
        }
        assert!(watch_flag("labelSelector=a&watch=true&resourceVersion=5"));
        assert!(watch_flag("watch=1"));
        assert!(!watch_flag("watch=false"));
        assert!(!watch_flag("allowWatchBookmarks=true"));
    }
}
