//! The object store: every object of every kind under one lock, one monotonic
//! `resourceVersion` counter, a bounded history of changes for watches, and the write
//! semantics of the real API server (generation, optimistic concurrency, status subresource,
//! finalizers, graceful pod deletion, namespace cascade, owner-reference garbage collection).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::builtin;
use super::convert::{to_api, to_storage};
use super::error::{ApiError, deleted_status};
use super::patch::{self, Semantics};
use super::registry::{Registry, ResourceType, StorageKey, from_crd};
use super::selector::{FieldSelector, LabelSelector};

/// Namespace ("" for cluster-scoped kinds) and name.
pub type ObjectKey = (String, String);

/// How many changes watches can replay by default before a client gets `410 Gone`.
pub const DEFAULT_HISTORY: usize = 10_000;

/// The current time as the API server writes timestamps.
pub fn now() -> String {
    timestamp_after(0)
}

fn timestamp_after(seconds: i64) -> String {
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(seconds);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn new_uid() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Version 4, RFC 4122 variant.
    hex.replace_range(12..13, "4");
    let variant = ["8", "9", "a", "b"][(bytes[8] & 3) as usize];
    hex.replace_range(16..17, variant);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One change, in storage form. `old` is the previous state of a modified object (watches
/// with selectors turn a change that leaves the selection into `DELETED`).
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub storage: StorageKey,
    pub kind: ChangeKind,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

/// The `fieldValidation` query parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

/// Options shared by create, update and patch.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    pub field_manager: Option<String>,
    pub force: bool,
}

/// The result of a write, in API form.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub warnings: Vec<String>,
    pub created: bool,
}

/// `DeleteOptions` (from the body or the query).
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period: Option<i64>,
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

/// What a delete did.
#[derive(Debug)]
pub enum Deleted {
    /// The object is gone: the `Status` the server answers with (pods answer with the object).
    Gone(Value),
    /// The object is kept until its finalizers or its grace period are done (API form).
    Pending(Value),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// LIST parameters.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    /// Items as `PartialObjectMetadata` (what `Accept: ...;as=PartialObjectMetadataList` asks
    /// for): only the metadata is converted and sent.
    pub metadata_only: bool,
}

/// A page of a list, in API form.
#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// A watch's start: the changes to replay first, the live changes after them, and the
/// resourceVersion the store was at when the two were split (the first safe bookmark).
pub type Subscription = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>, u64);

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchStart {
    /// Synthetic `ADDED` events for every current object, then live changes.
    Now,
    /// Every change after this `resourceVersion`, then live changes.
    After(u64),
}

struct Inner {
    rv: u64,
    registry: Registry,
    objects: HashMap<StorageKey, BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    window: usize,
    /// The highest resourceVersion dropped from the history.
    compacted: u64,
    /// The last configuration each field manager applied, by object uid (server-side apply).
    applied: HashMap<(String, String), Value>,
    /// Objects by the uid of each of their owners (garbage collection).
    dependents: HashMap<String, BTreeSet<(StorageKey, ObjectKey)>>,
    tx: broadcast::Sender<Arc<Change>>,
}

/// The dev cluster's storage. Cheap to share (`Arc<Store>`); every operation takes the one lock.
pub struct Store {
    inner: Mutex<Inner>,
}

fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object["metadata"][field].as_str().unwrap_or_default()
}

fn resource_version(object: &Value) -> u64 {
    meta_str(object, "resourceVersion").parse().unwrap_or(0)
}

fn owner_uids(object: &Value) -> Vec<String> {
    object["metadata"]["ownerReferences"]
        .as_array()
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r["uid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The object without server-managed metadata and status: what `generation` tracks.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Value::Object(map) = &mut copy {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// The namespaces the NamespaceLifecycle admission plugin never lets go.
const IMMORTAL_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// etcd's largest request (`--max-request-bytes`, 1.5 MiB by default and on managed clusters).
pub const ETCD_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// Refuses an object too large for etcd, in the words kube-apiserver passes on (a 500).
fn check_size(object: &Value) -> Result<(), ApiError> {
    let size = serde_json::to_vec(object).map(|bytes| bytes.len()).unwrap_or(0);
    if size > ETCD_MAX_REQUEST_BYTES {
        return Err(ApiError::storage("etcdserver: request is too large"));
    }
    Ok(())
}

fn has_finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    namespace: String,
    name: String,
}

impl Store {
    pub fn new(window: usize) -> Store {
        let (tx, _) = broadcast::channel(16_384);
        let store = Store {
            inner: Mutex::new(Inner {
                rv: 0,
                registry: Registry::with_builtins(),
                objects: HashMap::new(),
                history: VecDeque::new(),
                window: window.max(1),
                compacted: 0,
                applied: HashMap::new(),
                dependents: HashMap::new(),
                tx,
            }),
        };
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            store
                .create_builtin("", "namespaces", None, object)
                .expect("the initial namespaces are valid");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the registry (discovery, routing).
    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    pub fn find_type(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceType>> {
        self.lock().registry.find(group, version, resource)
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Creates a built-in object from server code (scheduler, initial namespaces, events).
    pub fn create_builtin(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let rt = inner
            .registry
            .find_any_version(group, resource)
            .ok_or_else(|| ApiError::no_route(resource))?;
        let version = rt.preferred_version().to_string();
        inner
            .create(&rt, &version, namespace, object, &WriteOptions::default())
            .map(|w| w.object)
    }

    pub fn get(
        &self,
        rt: &ResourceType,
        version: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let inner = self.lock();
        let stored = inner.get_stored(rt, namespace, name)?;
        Ok(to_api(rt, version, &stored))
    }

    pub fn list(
        &self,
        rt: &ResourceType,
        version: &str,
        namespace: Option<&str>,
        options: &ListOptions,
    ) -> Result<ListPage, ApiError> {
        self.lock().list(rt, version, namespace, options)
    }

    pub fn create(
        &self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        self.lock().create(rt, version, namespace, body, options)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        subresource: Subresource,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let mut inner = self.lock();
        let current = inner.get_stored(rt, namespace, name)?;
        let body_name = meta_str(&body, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut body = body;
        body["metadata"]["name"] = json!(name);
        inner.commit_update(rt, version, current, body, subresource, options)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: Value,
        subresource: Subresource,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        self.lock()
            .patch(rt, version, namespace, name, kind, body, subresource, options)
    }

    pub fn delete(
        &self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let mut inner = self.lock();
        let key = inner.key(rt, namespace, name);
        inner.delete(rt, version, key, options)
    }

    /// Deletes every object the selectors match; returns the deleted or pending objects.
    pub fn delete_collection(
        &self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        list: &ListOptions,
        options: &DeleteOptions,
    ) -> Result<Vec<Value>, ApiError> {
        let mut inner = self.lock();
        let page = inner.list(rt, version, namespace, list)?;
        let mut out = Vec::new();
        for item in page.items {
            let key = inner.key(rt, Some(meta_str(&item, "namespace")), meta_str(&item, "name"));
            match inner.delete(rt, version, key, options) {
                Ok(Deleted::Pending(object)) => out.push(object),
                Ok(Deleted::Gone(_)) => out.push(item),
                Err(error) if error.code == 404 => {}
                Err(error) => return Err(error),
            }
        }
        Ok(out)
    }

    /// `pods/binding`: assigns a pod to a node, as the scheduler does.
    pub fn bind(&self, namespace: &str, pod: &str, node: &str) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let rt = inner
            .registry
            .find("", "v1", "pods")
            .ok_or_else(|| ApiError::internal("pods are not registered"))?;
        let current = inner.get_stored(&rt, Some(namespace), pod)?;
        let assigned = current["spec"]["nodeName"].as_str().unwrap_or_default();
        if !assigned.is_empty() {
            return Err(ApiError::conflict(
                "",
                "pods",
                pod,
                &format!("pod {pod} is already assigned to node \"{assigned}\""),
            ));
        }
        if !current["metadata"]["deletionTimestamp"].is_null() {
            return Err(ApiError::conflict(
                "",
                "pods",
                pod,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let mut pod_object = (*current).clone();
        pod_object["spec"]["nodeName"] = json!(node);
        set_condition(
            &mut pod_object["status"],
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}),
        );
        let key = inner.key(&rt, Some(namespace), pod);
        let stored = inner.put(&rt.storage, key, pod_object, Some(current));
        Ok(to_api(&rt, "v1", &stored))
    }

    /// Subscribes to changes of one storage key, atomically with the backlog to replay.
    pub fn watch(&self, storage: &StorageKey, start: WatchStart) -> Result<Subscription, ApiError> {
        let inner = self.lock();
        let receiver = inner.tx.subscribe();
        let backlog = match start {
            WatchStart::After(rv) => {
                if rv < inner.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        inner.compacted + 1
                    )));
                }
                inner
                    .history
                    .iter()
                    .filter(|c| c.rv > rv && &c.storage == storage)
                    .cloned()
                    .collect()
            }
            WatchStart::Now => inner
                .objects
                .get(storage)
                .map(|bucket| {
                    bucket
                        .values()
                        .map(|object| {
                            Arc::new(Change {
                                rv: resource_version(object),
                                storage: storage.clone(),
                                kind: ChangeKind::Added,
                                object: object.clone(),
                                old: None,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        Ok((backlog, receiver, inner.rv))
    }

    /// Every change from now on, of every kind (the scheduler and benchmarks listen here).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.lock().tx.subscribe()
    }

    /// Stored objects of one kind, across namespaces (server-side controllers).
    pub fn objects(&self, group: &str, resource: &str) -> Vec<Arc<Value>> {
        let storage = StorageKey {
            group: group.into(),
            resource: resource.into(),
        };
        self.lock()
            .objects
            .get(&storage)
            .map(|bucket| bucket.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Replaces the condition of the same type, or appends it.
fn set_condition(status: &mut Value, condition: Value) {
    if !status.is_object() {
        *status = json!({});
    }
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let mut conditions: Vec<Value> = conditions
        .into_iter()
        .filter(|c| c["type"] != condition["type"])
        .collect();
    conditions.push(condition);
    status["conditions"] = json!(conditions);
}

impl Inner {
    fn key(&self, rt: &ResourceType, namespace: Option<&str>, name: &str) -> ObjectKey {
        let namespace = if rt.namespaced {
            namespace.unwrap_or_default()
        } else {
            ""
        };
        (namespace.to_string(), name.to_string())
    }

    fn get_stored(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        let key = self.key(rt, namespace, name);
        self.objects
            .get(&rt.storage)
            .and_then(|bucket| bucket.get(&key))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.resource, name))
    }

    /// Records a change in the history and tells every watcher.
    fn record(
        &mut self,
        storage: &StorageKey,
        kind: ChangeKind,
        object: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        let change = Arc::new(Change {
            rv: self.rv,
            storage: storage.clone(),
            kind,
            object,
            old,
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.window {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        let _ = self.tx.send(change);
    }

    /// Stores a new version of an object with the next resourceVersion.
    fn put(
        &mut self,
        storage: &StorageKey,
        key: ObjectKey,
        mut object: Value,
        old: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let object = Arc::new(object);
        if let Some(old) = &old {
            for uid in owner_uids(old) {
                if let Some(set) = self.dependents.get_mut(&uid) {
                    set.remove(&(storage.clone(), key.clone()));
                }
            }
        }
        for uid in owner_uids(&object) {
            self.dependents
                .entry(uid)
                .or_default()
                .insert((storage.clone(), key.clone()));
        }
        self.objects
            .entry(storage.clone())
            .or_default()
            .insert(key, object.clone());
        let kind = if old.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(storage, kind, object.clone(), old);
        object
    }

    fn check_body(&self, rt: &ResourceType, version: &str, body: Value) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        }
        let expected = rt.api_version(version);
        let given_version = body["apiVersion"].as_str().unwrap_or_default();
        let given_kind = body["kind"].as_str().unwrap_or_default();
        if (!given_version.is_empty() && given_version != expected)
            || (!given_kind.is_empty() && given_kind != rt.kind)
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({given_version}) does not match the expected API version ({expected})"
            )));
        }
        let mut body = body;
        if !body["metadata"].is_object() {
            body["metadata"] = json!({});
        }
        Ok(to_storage(rt, body))
    }

    /// Runs the CRD schema (defaults, pruning, validation) as the real server does.
    fn admit_schema(
        &self,
        rt: &ResourceType,
        version: &str,
        object: &mut Value,
        old: Option<&Value>,
        options: &WriteOptions,
    ) -> Result<Vec<String>, ApiError> {
        let Some(schema) = rt
            .schemas
            .get(version)
            .or_else(|| rt.schemas.get(rt.preferred_version()))
        else {
            return Ok(vec![]);
        };
        let name = meta_str(object, "name").to_string();
        let admitted = ec2_kubelet::schema::admit(schema, object.clone(), old)
            .map_err(|errors| ApiError::invalid(&rt.group, &rt.kind, &name, &errors))?;
        *object = admitted.object;
        let unknown: Vec<String> = admitted
            .pruned
            .iter()
            .map(|path| format!("unknown field \"{path}\""))
            .collect();
        match options.field_validation {
            FieldValidation::Strict if !unknown.is_empty() => Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                unknown.join(", "),
                kind = rt.kind
            ))),
            FieldValidation::Warn => Ok(unknown),
            _ => Ok(vec![]),
        }
    }

    fn namespace_phase(&self, namespace: &str) -> Option<String> {
        let storage = StorageKey {
            group: String::new(),
            resource: "namespaces".into(),
        };
        let object = self
            .objects
            .get(&storage)?
            .get(&(String::new(), namespace.to_string()))?;
        Some(object["status"]["phase"].as_str().unwrap_or("Active").to_string())
    }

    fn create(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if rt.create_only {
            return Err(ApiError::method_not_allowed(
                "bindings are created through pods/binding",
            ));
        }
        let mut object = self.check_body(rt, version, body)?;
        let namespace = if rt.namespaced {
            let url = namespace.unwrap_or_default();
            let body_namespace = meta_str(&object, "namespace");
            if !body_namespace.is_empty() && !url.is_empty() && body_namespace != url {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            let namespace = if url.is_empty() {
                body_namespace.to_string()
            } else {
                url.to_string()
            };
            match self.namespace_phase(&namespace).as_deref() {
                None => return Err(ApiError::not_found("", "namespaces", &namespace)),
                Some("Terminating") => {
                    return Err(ApiError::forbidden(format!(
                        "{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                        super::error::qualified(&rt.group, &rt.resource),
                        meta_str(&object, "name")
                    )));
                }
                Some(_) => {}
            }
            object["metadata"]["namespace"] = json!(namespace);
            namespace
        } else {
            object["metadata"].as_object_mut().map(|m| m.remove("namespace"));
            String::new()
        };
        let mut name = meta_str(&object, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&object, "generateName");
            if prefix.is_empty() {
                return Err(ApiError::invalid_field(
                    &rt.group,
                    &rt.kind,
                    "",
                    "metadata.name",
                    "",
                    Value::Null,
                ));
            }
            name = format!("{prefix}{}", random_suffix());
            object["metadata"]["name"] = json!(name);
        }
        if let Err(detail) = builtin::validate_name(rt, &name) {
            return Err(ApiError::invalid_field(
                &rt.group,
                &rt.kind,
                &name,
                "metadata.name",
                &detail,
                json!(name),
            ));
        }
        builtin::prepare_create(rt, &mut object);
        builtin::validate(rt, &object, None)?;
        let warnings = self.admit_schema(rt, version, &mut object, None, options)?;
        let key = (namespace, name.clone());
        if self
            .objects
            .get(&rt.storage)
            .is_some_and(|b| b.contains_key(&key))
        {
            return Err(ApiError::already_exists(&rt.group, &rt.resource, &name));
        }
        let metadata = object["metadata"].as_object_mut().expect("metadata is an object");
        for server_owned in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            metadata.remove(server_owned);
        }
        metadata.insert("uid".into(), json!(new_uid()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.insert("generation".into(), json!(1));
        let crd = rt.is("apiextensions.k8s.io", "customresourcedefinitions");
        if crd {
            let custom = from_crd(&object).map_err(ApiError::bad_request)?;
            if let Some(conflict) = self.registry.name_conflict(&custom) {
                return Err(ApiError::invalid_field(
                    &rt.group,
                    &rt.kind,
                    &name,
                    "spec.names",
                    &conflict,
                    Value::Null,
                ));
            }
            object["status"] = builtin::established_crd_status(&object);
        }
        if options.dry_run {
            object["metadata"]["resourceVersion"] = json!("");
            return Ok(Written {
                object: to_api(rt, version, &object),
                warnings,
                created: true,
            });
        }
        // The storage layer's checks, as kube-apiserver passes them on: plain errors, so 500s.
        let given_version = meta_str(&object, "resourceVersion");
        if !given_version.is_empty() && given_version != "0" {
            return Err(ApiError::storage(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        check_size(&object)?;
        let stored = self.put(&rt.storage, key, object, None);
        if crd && let Ok(custom) = from_crd(&stored) {
            self.registry.upsert(custom);
        }
        if rt.is("", "namespaces") {
            let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": name}});
            if let Some(sa) = self.registry.find_any_version("", "serviceaccounts") {
                let _ = self.create(&sa, "v1", Some(&name), account, &WriteOptions::default());
            }
        }
        Ok(Written {
            object: to_api(rt, version, &stored),
            warnings,
            created: true,
        })
    }

    /// Update semantics shared by PUT and PATCH: `body` (API form) replaces the main resource
    /// or only its status.
    fn commit_update(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        current: Arc<Value>,
        body: Value,
        subresource: Subresource,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let body = self.check_body(rt, version, body)?;
        let name = meta_str(&current, "name").to_string();
        let given_rv = meta_str(&body, "resourceVersion");
        if !given_rv.is_empty() && given_rv != meta_str(&current, "resourceVersion") {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.resource,
                &name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut new = match subresource {
            Subresource::Status => {
                let mut new = (*current).clone();
                new["status"] = body["status"].clone();
                new
            }
            Subresource::Main => {
                let mut new = body;
                if rt.status {
                    match current.get("status") {
                        Some(status) => new["status"] = status.clone(),
                        None => {
                            new.as_object_mut().map(|m| m.remove("status"));
                        }
                    }
                }
                for server_owned in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "namespace",
                ] {
                    match current["metadata"].get(server_owned) {
                        Some(value) => new["metadata"][server_owned] = value.clone(),
                        None => {
                            new["metadata"].as_object_mut().map(|m| m.remove(server_owned));
                        }
                    }
                }
                new["metadata"].as_object_mut().map(|m| m.remove("managedFields"));
                new
            }
        };
        if new["status"].is_null() {
            new.as_object_mut().map(|m| m.remove("status"));
        }
        builtin::prepare_update(rt, &mut new);
        builtin::validate(rt, &new, Some(&current))?;
        let warnings = self.admit_schema(rt, version, &mut new, Some(&current), options)?;
        if spec_part(&new) != spec_part(&current) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        if new == *current {
            return Ok(Written {
                object: to_api(rt, version, &current),
                warnings,
                created: false,
            });
        }
        if options.dry_run {
            return Ok(Written {
                object: to_api(rt, version, &new),
                warnings,
                created: false,
            });
        }
        let key = self.key(rt, Some(meta_str(&current, "namespace")), &name);
        let finished = !new["metadata"]["deletionTimestamp"].is_null()
            && !has_finalizers(&new)
            && new["metadata"]["deletionGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(0)
                == 0;
        if finished {
            self.remove(&rt.storage, key, new.clone());
            return Ok(Written {
                object: to_api(rt, version, &new),
                warnings,
                created: false,
            });
        }
        check_size(&new)?;
        let stored = self.put(&rt.storage, key, new, Some(current));
        if rt.is("apiextensions.k8s.io", "customresourcedefinitions")
            && let Ok(custom) = from_crd(&stored)
        {
            self.registry.upsert(custom);
        }
        Ok(Written {
            object: to_api(rt, version, &stored),
            warnings,
            created: false,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        kind: PatchKind,
        body: Value,
        subresource: Subresource,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let manager = options.field_manager.clone().unwrap_or_default();
        if kind == PatchKind::Apply && manager.is_empty() {
            return Err(ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        if kind == PatchKind::Strategic && !rt.builtin {
            return Err(ApiError::unsupported_media_type(
                "application/strategic-merge-patch+json",
            ));
        }
        let current = match self.get_stored(rt, namespace, name) {
            Ok(current) => current,
            Err(error)
                if kind == PatchKind::Apply && error.code == 404 && subresource == Subresource::Main =>
            {
                let mut object = body.clone();
                object["metadata"]["name"] = json!(name);
                let written = self.create(rt, version, namespace, object, options)?;
                if !options.dry_run {
                    let uid = meta_str(&written.object, "uid").to_string();
                    self.applied.insert((uid, manager), body);
                }
                return Ok(written);
            }
            Err(error) => return Err(error),
        };
        let mut object = to_api(rt, version, &current);
        match kind {
            PatchKind::Json => patch::json_patch(&mut object, &body).map_err(ApiError::unprocessable)?,
            PatchKind::Merge => patch::merge_patch(&mut object, &body),
            PatchKind::Strategic => {
                patch::strategic_merge(&mut object, &body).map_err(ApiError::bad_request)?
            }
            PatchKind::Apply => {
                let uid = meta_str(&current, "uid").to_string();
                let previous = self.applied.get(&(uid, manager.clone()));
                let schema = rt.schemas.get(version);
                let semantics = if rt.builtin {
                    Semantics::Builtin
                } else {
                    Semantics::Schema(schema)
                };
                patch::apply(&mut object, &body, previous, semantics);
            }
        }
        let written = self.commit_update(rt, version, current.clone(), object, subresource, options)?;
        if kind == PatchKind::Apply && !options.dry_run {
            self.applied
                .insert((meta_str(&current, "uid").to_string(), manager), body);
        }
        Ok(written)
    }

    fn delete(
        &mut self,
        rt: &Arc<ResourceType>,
        version: &str,
        key: ObjectKey,
        options: &DeleteOptions,
    ) -> Result<Deleted, ApiError> {
        let current = self.get_stored(rt, Some(&key.0), &key.1)?;
        let name = key.1.clone();
        if rt.is("", "namespaces") && IMMORTAL_NAMESPACES.contains(&name.as_str()) {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let uid = meta_str(&current, "uid").to_string();
        if let Some(expected) = options.uid.as_deref().filter(|u| !u.is_empty())
            && expected != uid
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.resource,
                &name,
                &format!("Precondition failed: UID in precondition: {expected}, UID in object meta: {uid}"),
            ));
        }
        let current_rv = meta_str(&current, "resourceVersion").to_string();
        if let Some(expected) = options.resource_version.as_deref().filter(|r| !r.is_empty())
            && expected != current_rv
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.resource,
                &name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {expected}, ResourceVersion in object meta: {current_rv}"
                ),
            ));
        }
        if options.dry_run {
            return Ok(Deleted::Pending(to_api(rt, version, &current)));
        }
        let deleting = !current["metadata"]["deletionTimestamp"].is_null();
        if rt.is("", "pods") {
            let grace = options
                .grace_period
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
                .max(0);
            let scheduled = current["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let terminal = matches!(current["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
            let grace = if scheduled && !terminal { grace } else { 0 };
            if grace > 0 {
                let pending = current["metadata"]["deletionGracePeriodSeconds"].as_i64();
                if pending.is_some_and(|p| p <= grace) {
                    return Ok(Deleted::Pending(to_api(rt, version, &current)));
                }
                let mut new = (*current).clone();
                new["metadata"]["deletionTimestamp"] = json!(timestamp_after(grace));
                new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                let generation = new["metadata"]["generation"].as_i64().unwrap_or(1);
                new["metadata"]["generation"] = json!(generation + 1);
                let stored = self.put(&rt.storage, key, new, Some(current));
                return Ok(Deleted::Pending(to_api(rt, version, &stored)));
            }
        }
        if rt.is("", "namespaces") {
            return Ok(self.delete_namespace(rt, version, current));
        }
        if has_finalizers(&current) {
            if deleting && current["metadata"]["deletionGracePeriodSeconds"].as_i64() == Some(0) {
                return Ok(Deleted::Pending(to_api(rt, version, &current)));
            }
            let mut new = (*current).clone();
            if !deleting {
                new["metadata"]["deletionTimestamp"] = json!(now());
            }
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            let stored = self.put(&rt.storage, key, new, Some(current));
            return Ok(Deleted::Pending(to_api(rt, version, &stored)));
        }
        let orphan = options.propagation.as_deref() == Some("Orphan");
        let last = self.remove_with(&rt.storage, key, (*current).clone(), orphan);
        Ok(Deleted::Gone(if rt.is("", "pods") {
            to_api(rt, version, &last)
        } else {
            deleted_status(&rt.group, &rt.resource, &name, &uid)
        }))
    }

    /// Marks a namespace Terminating, deletes everything in it, and removes it once empty.
    fn delete_namespace(&mut self, rt: &Arc<ResourceType>, version: &str, current: Arc<Value>) -> Deleted {
        let name = meta_str(&current, "name").to_string();
        let key = (String::new(), name.clone());
        let stored = if current["metadata"]["deletionTimestamp"].is_null() {
            let mut new = (*current).clone();
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            new["status"]["phase"] = json!("Terminating");
            self.put(&rt.storage, key, new, Some(current))
        } else {
            current
        };
        let contents: Vec<(StorageKey, ObjectKey)> = self
            .objects
            .iter()
            .flat_map(|(storage, bucket)| {
                bucket
                    .keys()
                    .filter(|k| k.0 == name)
                    .map(move |k| (storage.clone(), k.clone()))
            })
            .collect();
        for (storage, key) in contents {
            if let Some(item_rt) = self.registry.find_any_version(&storage.group, &storage.resource) {
                let item_version = item_rt.preferred_version().to_string();
                let _ = self.delete(&item_rt, &item_version, key, &DeleteOptions::default());
            }
        }
        self.finalize_namespace(&name);
        Deleted::Pending(to_api(rt, version, &stored))
    }

    /// Removes a Terminating namespace once nothing is left in it.
    fn finalize_namespace(&mut self, namespace: &str) {
        if self.namespace_phase(namespace).as_deref() != Some("Terminating") {
            return;
        }
        let empty = self
            .objects
            .values()
            .all(|bucket| bucket.keys().all(|k| k.0 != namespace));
        if !empty {
            return;
        }
        let storage = StorageKey {
            group: String::new(),
            resource: "namespaces".into(),
        };
        let key = (String::new(), namespace.to_string());
        if let Some(object) = self.objects.get(&storage).and_then(|b| b.get(&key)).cloned() {
            let mut last = (*object).clone();
            last["spec"]["finalizers"] = json!([]);
            self.remove(&storage, key, last);
        }
    }

    fn remove(&mut self, storage: &StorageKey, key: ObjectKey, last: Value) -> Value {
        self.remove_with(storage, key, last, false)
    }

    /// Removes an object for good, then what depended on it: a CRD's objects, the dependents
    /// of its owner references (unless orphaned), and a Terminating namespace left empty.
    fn remove_with(&mut self, storage: &StorageKey, key: ObjectKey, mut last: Value, orphan: bool) -> Value {
        let Some(previous) = self.objects.get_mut(storage).and_then(|b| b.remove(&key)) else {
            return last;
        };
        for uid in owner_uids(&previous) {
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(&(storage.clone(), key.clone()));
            }
        }
        self.rv += 1;
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let uid = meta_str(&last, "uid").to_string();
        self.applied.retain(|(object_uid, _), _| object_uid != &uid);
        self.record(storage, ChangeKind::Deleted, Arc::new(last.clone()), None);

        if storage.group == "apiextensions.k8s.io"
            && storage.resource == "customresourcedefinitions"
            && let Ok(custom) = from_crd(&last)
        {
            let objects: Vec<(ObjectKey, Arc<Value>)> = self
                .objects
                .get(&custom.storage)
                .map(|b| b.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            for (key, object) in objects {
                self.remove(&custom.storage, key, (*object).clone());
            }
            self.registry.remove(&custom.group, &custom.resource);
        }

        let dependents = self.dependents.remove(&uid).unwrap_or_default();
        for (dep_storage, dep_key) in dependents {
            let Some(dependent) = self
                .objects
                .get(&dep_storage)
                .and_then(|b| b.get(&dep_key))
                .cloned()
            else {
                continue;
            };
            let mut updated = (*dependent).clone();
            if let Some(refs) = updated["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != json!(uid));
            }
            let still_owned = !owner_uids(&updated).is_empty();
            if orphan || still_owned {
                self.put(&dep_storage, dep_key, updated, Some(dependent));
            } else if let Some(dep_rt) = self
                .registry
                .find_any_version(&dep_storage.group, &dep_storage.resource)
            {
                let version = dep_rt.preferred_version().to_string();
                let _ = self.delete(&dep_rt, &version, dep_key, &DeleteOptions::default());
            }
        }

        if !key.0.is_empty() {
            self.finalize_namespace(&key.0);
        }
        last
    }

    fn list(
        &self,
        rt: &ResourceType,
        version: &str,
        namespace: Option<&str>,
        options: &ListOptions,
    ) -> Result<ListPage, ApiError> {
        let mut rv = self.rv;
        let mut start: Option<ObjectKey> = None;
        if let Some(token) = options.continue_token.as_deref().filter(|t| !t.is_empty()) {
            let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<ContinueToken>(&bytes).ok())
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            if decoded.rv < self.compacted {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            rv = decoded.rv;
            start = Some((decoded.namespace, decoded.name));
        }
        let namespace = namespace.filter(|n| !n.is_empty() && rt.namespaced);
        let mut items = Vec::new();
        let mut continue_token = None;
        let mut remaining = None;
        if let Some(bucket) = self.objects.get(&rt.storage) {
            // A continued list starts after its token's key, not at the first key.
            let after = match &start {
                Some(key) => Bound::Excluded(key),
                None => Bound::Unbounded,
            };
            let mut matching = bucket
                .range((after, Bound::Unbounded))
                .filter(|(key, _)| namespace.is_none_or(|n| key.0 == n))
                .filter(|(_, object)| {
                    options.labels.matches_object(object) && options.fields.matches(object)
                });
            for (key, object) in matching.by_ref() {
                items.push(if options.metadata_only {
                    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": object["metadata"]})
                } else {
                    to_api(rt, version, object)
                });
                if options
                    .limit
                    .is_some_and(|limit| limit > 0 && items.len() >= limit)
                {
                    let rest = matching.count();
                    if rest > 0 {
                        let token = ContinueToken {
                            rv,
                            namespace: key.0.clone(),
                            name: key.1.clone(),
                        };
                        let bytes = serde_json::to_vec(&token).unwrap_or_default();
                        continue_token = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
                        remaining = Some(rest);
                    }
                    break;
                }
            }
        }
        Ok(ListPage {
            items,
            resource_version: rv,
            continue_token,
            remaining,
        })
    }
}
