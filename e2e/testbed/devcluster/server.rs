//! The HTTP side of the dev cluster: routing of Kubernetes API paths, request decoding,
//! responses (`Status` errors, Tables, warnings), watch streams and the pod log proxy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{RwLock, broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::DevClusterOptions;
use super::convert::to_api;
use super::error::ApiError;
use super::openapi;
use super::registry::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    ChangeKind, DeleteOptions, Deleted, FieldValidation, ListOptions, PatchKind, Store, Subresource,
    WatchStart, WriteOptions,
};
use super::table::{IncludeObject, table};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Shared by every connection.
pub struct State {
    pub store: Arc<Store>,
    pub options: DevClusterOptions,
    pub address: SocketAddr,
    /// Bumped to end every open watch (fault injection for tests).
    pub watch_epoch: watch::Sender<u64>,
    /// Held for writing while new watches must wait.
    pub watch_gate: Arc<RwLock<()>>,
    /// Every resource request, when `options.audit` is on.
    pub audit: std::sync::Mutex<Vec<AuditRecord>>,
    /// Bytes of watch events sent, by resource (`pods`, `ec2instances.ec2-kubelet.io`, ...).
    pub watch_bytes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    /// Cluster CA, kubelet-client identity, tokens.
    pub auth: super::auth::ClusterAuth,
}

/// One resource request as an authorizer sees it: who (User-Agent), the verb, and what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuditRecord {
    pub user_agent: String,
    pub verb: String,
    pub group: String,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
}

/// An empty body (e.g. a 101 answer).
pub fn empty() -> Body {
    full(Bytes::new())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, value: &Value, warnings: &[String]) -> Response<Body> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    for warning in warnings {
        let escaped = warning.replace('"', "\\\"");
        builder = builder.header("Warning", format!("299 - \"{escaped}\""));
    }
    builder
        .body(full(serde_json::to_vec(value).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(full("")))
}

/// A `Status` answer for `error` (with `Retry-After` on a 429).
pub(super) fn error_response(error: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &error.status(), &[]);
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// Serves one accepted connection until it closes or the server shuts down.
pub async fn serve_connection(
    state: Arc<State>,
    stream: tokio::net::TcpStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        _ = connection => {}
        _ = super::stopped(&mut shutdown) => {}
    }
}

/// Query parameters, decoded.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(request: &Request<Incoming>) -> Query {
        let raw = request.uri().query().unwrap_or_default();
        Query(form_urlencoded::parse(raw.as_bytes()).into_owned().collect())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
    fn write_options(&self) -> Result<WriteOptions, ApiError> {
        let field_validation = match self.get("fieldValidation") {
            None | Some("Warn") => FieldValidation::Warn,
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "fieldValidation: Unsupported value: \"{other}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
                )));
            }
        };
        Ok(WriteOptions {
            dry_run: self.get("dryRun") == Some("All"),
            field_validation,
            field_manager: self.get("fieldManager").map(String::from),
            force: self.flag("force"),
        })
    }
    fn list_options(&self, rt: &ResourceType) -> Result<ListOptions, ApiError> {
        Ok(ListOptions {
            labels: LabelSelector::parse(self.get("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?,
            fields: FieldSelector::parse(self.get("fieldSelector").unwrap_or_default(), &rt.field_labels)
                .map_err(ApiError::bad_request)?,
            limit: self.get("limit").and_then(|l| l.parse().ok()),
            continue_token: self.get("continue").map(String::from),
            metadata_only: false,
        })
    }
}

/// A request for a resource, after routing.
struct Target {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let response = match route(&state, request).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "dev cluster request");
    response
}

async fn route(state: &Arc<State>, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let registry = state.store.registry();
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value, &[]));
    match segments.as_slice() {
        ["version"] => ok(json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-ec2kubelet-dev",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "n/a", "compiler": "rustc", "platform": "linux/amd64",
        })),
        ["healthz" | "livez" | "readyz"] => Ok(Response::new(full("ok"))),
        ["api"] => ok(registry.core_versions(&state.address.to_string())),
        ["apis"] => ok(registry.group_list()),
        ["openapi", "v3"] => ok(openapi::root(&registry)),
        ["openapi", "v3", rest @ ..] => openapi::group_version(&registry, rest)
            .map(|document| json_response(StatusCode::OK, &document, &[]))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["api", "v1"] => registry
            .resource_list("", "v1")
            .map(|document| json_response(StatusCode::OK, &document, &[]))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["apis", group] => registry
            .group(group)
            .map(|document| json_response(StatusCode::OK, &document, &[]))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["apis", group, version] => registry
            .resource_list(group, version)
            .map(|document| json_response(StatusCode::OK, &document, &[]))
            .ok_or_else(|| ApiError::no_route(&path)),
        ["api", "v1", rest @ ..] => {
            let target = target(&registry, "", "v1", rest).ok_or_else(|| ApiError::no_route(&path))?;
            resource(state, request, target).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = target(&registry, group, version, rest).ok_or_else(|| ApiError::no_route(&path))?;
            resource(state, request, target).await
        }
        _ => Err(ApiError::no_route(&path)),
    }
}

fn target(registry: &super::registry::Registry, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    let rt = registry.find(group, version, resource)?;
    if namespace.is_some() && !rt.namespaced {
        return None;
    }
    if let Some(sub) = &subresource {
        let known = (sub == "status" && rt.status) || rt.subresources.contains(&sub.as_str());
        if !known {
            return None;
        }
    }
    Some(Target {
        rt,
        version: version.to_string(),
        namespace,
        name,
        subresource,
    })
}

async fn read_body(request: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let bytes = http_body_util::Limited::new(request.into_body(), MAX_REQUEST_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => ApiError::entity_too_large(MAX_REQUEST_BODY_BYTES),
            None => ApiError::bad_request(format!("reading the request body: {e}")),
        })?
        .to_bytes();
    Ok((content_type, bytes))
}

/// kube-apiserver's largest request body (`MaxRequestBodyBytes`, 3 MiB): a larger one is
/// refused with 413 before it is decoded.
pub const MAX_REQUEST_BODY_BYTES: usize = 3 * 1024 * 1024;

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// A create or update body: JSON, YAML, or protobuf for the kinds `protobuf` knows; other
/// encodings are refused with 415.
fn decode(content_type: &str, bytes: &[u8]) -> Result<Value, ApiError> {
    match content_type {
        "application/json" | "" => parse_json(bytes),
        "application/yaml" => parse_yaml(bytes),
        "application/vnd.kubernetes.protobuf" => super::protobuf::decode(bytes)
            .map_err(|e| ApiError::unsupported_media_type(&format!("{content_type}: {e}"))),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

fn parse_yaml(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_yaml::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

/// `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`, as
/// `kubectl get -o name` and kube's `list_metadata` send it.
fn wants_metadata_list(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadataList"))
}

fn wants_table(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=Table"))
}

fn delete_options(query: &Query, content_type: &str, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        decode(content_type, body)?
    };
    let dry_run = query.get("dryRun") == Some("All")
        || body["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let propagation = body["propagationPolicy"]
        .as_str()
        .map(String::from)
        .or_else(|| query.get("propagationPolicy").map(String::from))
        .or_else(|| (body["orphanDependents"] == json!(true)).then(|| "Orphan".to_string()));
    Ok(DeleteOptions {
        grace_period: body["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
        propagation,
        uid: body["preconditions"]["uid"].as_str().map(String::from),
        resource_version: body["preconditions"]["resourceVersion"]
            .as_str()
            .map(String::from),
        dry_run,
    })
}

async fn resource(
    state: &Arc<State>,
    request: Request<Incoming>,
    target: Target,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(&request);
    let store = &state.store;
    let Target {
        rt,
        version,
        namespace,
        name,
        subresource,
    } = target;
    let ns = namespace.as_deref();
    let table_wanted = wants_table(&request);
    let metadata_wanted = wants_metadata_list(&request);
    let include = IncludeObject::parse(query.get("includeObject"));
    let sub = match subresource.as_deref() {
        Some("status") => Subresource::Status,
        _ => Subresource::Main,
    };
    let method = request.method().clone();
    let user_agent = super::header_text(request.headers(), header::USER_AGENT);
    let watch = method == Method::GET && name.is_none() && query.flag("watch");
    let audited_resource = match &subresource {
        Some(sub) => format!("{}/{sub}", rt.resource),
        None => rt.resource.clone(),
    };
    if state.options.audit {
        let verb = match (&method, &name) {
            (&Method::GET, None) if query.flag("watch") => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, None) => "deletecollection",
            (&Method::DELETE, Some(_)) => "delete",
            _ => "other",
        };
        let record = AuditRecord {
            user_agent: user_agent.clone(),
            verb: verb.into(),
            group: rt.group.clone(),
            resource: audited_resource.clone(),
            namespace: namespace.clone(),
        };
        state.audit.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    }
    match (method, name, subresource.as_deref()) {
        (Method::GET, None, None) if watch => {
            let format = table_wanted.then_some(include);
            watch_response(state, rt, version, namespace, query, format).await
        }
        (Method::GET, None, None) => {
            let mut options = query.list_options(&rt)?;
            options.metadata_only = metadata_wanted && !table_wanted;
            let page = store.list(&rt, &version, ns, &options)?;
            let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
            if let Some(token) = &page.continue_token {
                metadata["continue"] = json!(token);
            }
            if let Some(remaining) = page.remaining {
                metadata["remainingItemCount"] = json!(remaining);
            }
            let body = if table_wanted {
                table(&rt, &version, &page.items, metadata, include)
            } else {
                let (kind, api_version) = if options.metadata_only {
                    (
                        "PartialObjectMetadataList".to_string(),
                        "meta.k8s.io/v1".to_string(),
                    )
                } else {
                    (format!("{}List", rt.kind), rt.api_version(&version))
                };
                json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": page.items})
            };
            Ok(json_response(StatusCode::OK, &body, &[]))
        }
        (Method::GET | Method::POST, Some(name), Some(kind @ ("exec" | "attach"))) => {
            let pod = store.get(&rt, &version, ns, &name)?;
            super::logs::proxy_upgrade(state, &pod, kind, request, &query.0).await
        }
        (Method::GET, Some(name), Some("log")) => {
            let pod = store.get(&rt, &version, ns, &name)?;
            super::logs::proxy(state, &pod, request.uri().query().unwrap_or_default(), &query.0).await
        }
        (Method::GET, Some(name), None | Some("status")) => {
            let object = store.get(&rt, &version, ns, &name)?;
            let body = if table_wanted {
                let rv = object["metadata"]["resourceVersion"].clone();
                table(&rt, &version, &[object], json!({"resourceVersion": rv}), include)
            } else {
                object
            };
            Ok(json_response(StatusCode::OK, &body, &[]))
        }
        (Method::POST, None, None) if rt.resource == "tokenreviews" => {
            let (content_type, bytes) = read_body(request).await?;
            let review = state.auth.token_review(decode(&content_type, &bytes)?);
            Ok(json_response(StatusCode::CREATED, &review, &[]))
        }
        (Method::POST, None, None) if rt.resource == "subjectaccessreviews" => {
            let (content_type, bytes) = read_body(request).await?;
            let review = super::auth::subject_access_review(store, decode(&content_type, &bytes)?)?;
            Ok(json_response(StatusCode::CREATED, &review, &[]))
        }
        (Method::POST, None, None) if rt.create_only => {
            let (_, bytes) = read_body(request).await?;
            let binding = parse_json(&bytes)?;
            bind(
                store,
                ns,
                binding["metadata"]["name"].as_str().unwrap_or_default(),
                &binding,
            )
        }
        (Method::POST, Some(name), Some("binding")) => {
            let (_, bytes) = read_body(request).await?;
            bind(store, ns, &name, &parse_json(&bytes)?)
        }
        (Method::POST, Some(name), Some("eviction")) => {
            let (_, bytes) = read_body(request).await?;
            let eviction = parse_json(&bytes)?;
            let body = serde_json::to_vec(&eviction["deleteOptions"]).unwrap_or_default();
            let options = delete_options(&query, "application/json", &body)?;
            store.delete(&rt, &version, ns, &name, &options)?;
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
            Ok(json_response(StatusCode::CREATED, &status, &[]))
        }
        (Method::POST, None, None) => {
            let options = query.write_options()?;
            let (content_type, bytes) = read_body(request).await?;
            let written = store.create(&rt, &version, ns, decode(&content_type, &bytes)?, &options)?;
            Ok(json_response(
                StatusCode::CREATED,
                &written.object,
                &written.warnings,
            ))
        }
        (Method::PUT, Some(name), None | Some("status") | Some("finalize")) => {
            let options = query.write_options()?;
            let (content_type, bytes) = read_body(request).await?;
            let written = store.update(
                &rt,
                &version,
                ns,
                &name,
                decode(&content_type, &bytes)?,
                sub,
                &options,
            )?;
            Ok(json_response(StatusCode::OK, &written.object, &written.warnings))
        }
        (Method::PATCH, Some(name), None | Some("status")) => {
            let options = query.write_options()?;
            let (content_type, bytes) = read_body(request).await?;
            let (kind, body) = match content_type.as_str() {
                "application/json-patch+json" => (PatchKind::Json, parse_json(&bytes)?),
                "application/merge-patch+json" => (PatchKind::Merge, parse_json(&bytes)?),
                "application/strategic-merge-patch+json" => (PatchKind::Strategic, parse_json(&bytes)?),
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    (PatchKind::Apply, parse_yaml(&bytes)?)
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let written = store.patch(&rt, &version, ns, &name, kind, body, sub, &options)?;
            let status = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &written.object, &written.warnings))
        }
        (Method::DELETE, Some(name), None) => {
            let (content_type, bytes) = read_body(request).await?;
            let options = delete_options(&query, &content_type, &bytes)?;
            let body = match store.delete(&rt, &version, ns, &name, &options)? {
                Deleted::Gone(body) | Deleted::Pending(body) => body,
            };
            Ok(json_response(StatusCode::OK, &body, &[]))
        }
        (Method::DELETE, None, None) => {
            let list = query.list_options(&rt)?;
            let (content_type, bytes) = read_body(request).await?;
            let options = delete_options(&query, &content_type, &bytes)?;
            let items = store.delete_collection(&rt, &version, ns, &list, &options)?;
            let body = json!({
                "kind": format!("{}List", rt.kind),
                "apiVersion": rt.api_version(&version),
                "metadata": {"resourceVersion": store.current_rv().to_string()},
                "items": items,
            });
            Ok(json_response(StatusCode::OK, &body, &[]))
        }
        (method, _, _) => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method})"
        ))),
    }
}

fn bind(
    store: &Store,
    namespace: Option<&str>,
    pod: &str,
    binding: &Value,
) -> Result<Response<Body>, ApiError> {
    let node = binding["target"]["name"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::bad_request("target.name: Required value"));
    }
    store.bind(namespace.unwrap_or_default(), pod, node)?;
    let status =
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201});
    Ok(json_response(StatusCode::CREATED, &status, &[]))
}

/// `pods`, or `ec2instances.ec2-kubelet.io` for a resource of a group.
fn qualified_name(group: &str, plural: &str) -> String {
    match group {
        "" => plural.to_string(),
        group => format!("{plural}.{group}"),
    }
}

pub(super) fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch: replays from `resourceVersion` (or the current state), then streams live changes,
/// filtered by namespace and selectors, with bookmarks and `timeoutSeconds`.
async fn watch_response(
    state: &Arc<State>,
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    query: Query,
    table_format: Option<IncludeObject>,
) -> Result<Response<Body>, ApiError> {
    let list = query.list_options(&rt)?;
    let bookmarks = query.flag("allowWatchBookmarks");
    let initial_events = query.flag("sendInitialEvents");
    let start = match query.get("resourceVersion") {
        _ if initial_events => WatchStart::Now,
        None | Some("0") => WatchStart::Now,
        Some(rv) => WatchStart::After(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let subscription = {
        let _gate = state.watch_gate.read().await;
        state.store.watch(&rt.storage, start)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let render = {
        let rt = rt.clone();
        let version = version.clone();
        move |object: &Value| {
            let object = to_api(&rt, &version, object);
            match table_format {
                Some(include) => table(&rt, &version, &[object], json!({}), include),
                None => object,
            }
        }
    };
    let (backlog, mut receiver, subscribed_rv) = match subscription {
        Ok(subscription) => subscription,
        Err(error) => {
            // The real server answers an expired resourceVersion with an ERROR event.
            let _ = tx.try_send(watch_line("ERROR", &error.status()));
            drop(tx);
            return Ok(stream_response(rx));
        }
    };
    let matches = {
        let namespace = namespace.clone().filter(|_| rt.namespaced);
        move |object: &Value| {
            namespace
                .as_deref()
                .is_none_or(|n| object["metadata"]["namespace"].as_str() == Some(n))
                && list.labels.matches_object(object)
                && list.fields.matches(object)
        }
    };
    let mut epoch = state.watch_epoch.subscribe();
    epoch.mark_unchanged();
    let bookmark_every = state.options.bookmark_interval;
    // Bookmarks never claim a version whose changes this watch has not sent yet.
    let start_rv = match start {
        WatchStart::After(rv) => rv,
        WatchStart::Now => subscribed_rv,
    };
    let kind = rt.kind.clone();
    let api_version = rt.api_version(&version);
    let storage = rt.storage.clone();
    let sent = state.watch_bytes.clone();
    let resource = qualified_name(&rt.group, &rt.resource);
    tokio::spawn(async move {
        let bookmark = |rv: u64, initial_end: bool| {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            watch_line(
                "BOOKMARK",
                &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}),
            )
        };
        let mut last_rv = start_rv;
        let event_for = |change: &super::store::Change| -> Option<Bytes> {
            let now_matches = matches(&change.object);
            let type_ = match change.kind {
                ChangeKind::Added => now_matches.then_some("ADDED"),
                ChangeKind::Deleted => now_matches.then_some("DELETED"),
                ChangeKind::Modified => {
                    let before = change.old.as_ref().is_some_and(|old| matches(old));
                    match (before, now_matches) {
                        (true, true) => Some("MODIFIED"),
                        (false, true) => Some("ADDED"),
                        (true, false) => Some("DELETED"),
                        (false, false) => None,
                    }
                }
            }?;
            let line = watch_line(type_, &render(&change.object));
            let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
            *sent.entry(resource.clone()).or_default() += line.len() as u64;
            Some(line)
        };
        for change in &backlog {
            last_rv = last_rv.max(change.rv);
            if let Some(line) = event_for(change)
                && tx.send(line).await.is_err()
            {
                return;
            }
        }
        if initial_events && bookmarks && tx.send(bookmark(last_rv, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_every);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                change = receiver.recv() => match change {
                    Ok(change) => {
                        last_rv = last_rv.max(change.rv);
                        if change.storage != storage {
                            continue;
                        }
                        if let Some(line) = event_for(&change)
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher too slow for the broadcast buffer is cut off; it resumes from its
                    // last resourceVersion like after any other disconnect.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    Ok(stream_response(rx))
}

/// A chunked JSON stream of what `rx` carries.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|bytes| Ok::<_, std::io::Error>(Frame::data(bytes)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(full("")))
}

/// Answers a proxied upstream response with its status and streamed body.
pub fn proxied(response: Response<Incoming>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let body = body.map_err(std::io::Error::other).boxed();
    Response::from_parts(parts, body)
}
