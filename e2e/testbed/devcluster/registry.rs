//! The resource types the dev cluster serves: the built-in kinds (stored generically) and the
//! kinds that CRDs add at runtime. Also renders the discovery documents (`/api`, `/apis`, ...).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

/// Where objects of a type are stored: two API types can share storage (core and
/// `events.k8s.io` events are the same objects, as in the real server).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey {
    pub group: String,
    pub resource: String,
}

/// How objects are translated between storage and this API type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as served (only `apiVersion` follows the requested version).
    Identity,
    /// `events.k8s.io/v1` Event over core/v1 Event storage.
    EventsV1,
}

/// The columns of `kubectl get` (Table responses).
#[derive(Clone, Debug)]
pub enum Printer {
    /// Name and age.
    Default,
    Pods,
    Nodes,
    Namespaces,
    Events,
    Leases,
    ConfigMaps,
    Secrets,
    Deployments,
    Crds,
    /// A CRD's `additionalPrinterColumns`, per version.
    Custom(BTreeMap<String, Vec<PrinterColumn>>),
}

/// One `additionalPrinterColumns` entry.
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One servable resource (e.g. `pods`, `ec2nodepools.ec2-kubelet.io`).
#[derive(Clone, Debug)]
pub struct ResourceType {
    pub group: String,
    /// Served versions; the first is the preferred one.
    pub versions: Vec<String>,
    pub resource: String,
    pub kind: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource: the main resource ignores status and vice versa.
    pub status: bool,
    /// Other subresources (`log`, `binding`, `eviction`, `scale`, `finalize`).
    pub subresources: Vec<&'static str>,
    /// Only `create` (e.g. `bindings`).
    pub create_only: bool,
    pub storage: StorageKey,
    pub codec: Codec,
    pub printer: Printer,
    /// CRD types: `openAPIV3Schema` per version.
    pub schemas: BTreeMap<String, Value>,
    /// Fields usable in field selectors besides `metadata.name` and `metadata.namespace`.
    pub field_labels: Vec<String>,
    /// A built-in kind: strategic merge patch is accepted.
    pub builtin: bool,
}

impl ResourceType {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    pub fn preferred_version(&self) -> &str {
        &self.versions[0]
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }

    /// `Pod` or `Ec2NodePool.ec2-kubelet.io`, as used in messages.
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    pub fn is(&self, group: &str, resource: &str) -> bool {
        self.group == group && self.resource == resource
    }
}

/// Builder for the built-in kinds.
struct Builtin {
    rt: ResourceType,
}

impl Builtin {
    fn new(group: &str, version: &str, resource: &str, kind: &str, namespaced: bool) -> Builtin {
        Builtin {
            rt: ResourceType {
                group: group.into(),
                versions: vec![version.into()],
                resource: resource.into(),
                kind: kind.into(),
                singular: kind.to_lowercase(),
                namespaced,
                short_names: vec![],
                categories: vec![],
                status: false,
                subresources: vec![],
                create_only: false,
                storage: StorageKey {
                    group: group.into(),
                    resource: resource.into(),
                },
                codec: Codec::Identity,
                printer: Printer::Default,
                schemas: BTreeMap::new(),
                field_labels: vec![],
                builtin: true,
            },
        }
    }
    fn short(mut self, names: &[&str]) -> Self {
        self.rt.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }
    fn all(mut self) -> Self {
        self.rt.categories = vec!["all".into()];
        self
    }
    fn status(mut self) -> Self {
        self.rt.status = true;
        self
    }
    fn sub(mut self, names: &[&'static str]) -> Self {
        self.rt.subresources.extend(names);
        self
    }
    fn printer(mut self, printer: Printer) -> Self {
        self.rt.printer = printer;
        self
    }
    fn fields(mut self, fields: &[&str]) -> Self {
        self.rt.field_labels = fields.iter().map(|s| s.to_string()).collect();
        self
    }
    fn build(self) -> Arc<ResourceType> {
        Arc::new(self.rt)
    }
}

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// The built-in kinds the stand-in serves.
pub fn builtins() -> Vec<Arc<ResourceType>> {
    let mut types = vec![
        Builtin::new("", "v1", "namespaces", "Namespace", false)
            .short(&["ns"])
            .status()
            .sub(&["finalize"])
            .printer(Printer::Namespaces)
            .fields(&["status.phase"])
            .build(),
        Builtin::new("", "v1", "pods", "Pod", true)
            .short(&["po"])
            .all()
            .status()
            .sub(&["binding", "log", "eviction", "exec", "attach"])
            .printer(Printer::Pods)
            .fields(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ])
            .build(),
        Builtin::new("", "v1", "nodes", "Node", false)
            .short(&["no"])
            .status()
            .printer(Printer::Nodes)
            .fields(&["spec.unschedulable"])
            .build(),
        Builtin::new("", "v1", "events", "Event", true)
            .short(&["ev"])
            .printer(Printer::Events)
            .fields(EVENT_FIELDS)
            .build(),
        Builtin::new("", "v1", "configmaps", "ConfigMap", true)
            .short(&["cm"])
            .printer(Printer::ConfigMaps)
            .build(),
        Builtin::new("", "v1", "secrets", "Secret", true)
            .printer(Printer::Secrets)
            .fields(&["type"])
            .build(),
        Builtin::new("", "v1", "serviceaccounts", "ServiceAccount", true)
            .short(&["sa"])
            .build(),
        Builtin::new("", "v1", "services", "Service", true)
            .short(&["svc"])
            .all()
            .status()
            .build(),
        Builtin::new("", "v1", "endpoints", "Endpoints", true)
            .short(&["ep"])
            .build(),
        Builtin::new("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true)
            .short(&["pvc"])
            .status()
            .build(),
        Builtin::new("coordination.k8s.io", "v1", "leases", "Lease", true)
            .printer(Printer::Leases)
            .build(),
        Builtin::new("apps", "v1", "deployments", "Deployment", true)
            .short(&["deploy"])
            .all()
            .status()
            .sub(&["scale"])
            .printer(Printer::Deployments)
            .build(),
        Builtin::new("apps", "v1", "replicasets", "ReplicaSet", true)
            .short(&["rs"])
            .all()
            .status()
            .sub(&["scale"])
            .build(),
        Builtin::new("apps", "v1", "statefulsets", "StatefulSet", true)
            .short(&["sts"])
            .all()
            .status()
            .sub(&["scale"])
            .build(),
        Builtin::new("apps", "v1", "daemonsets", "DaemonSet", true)
            .short(&["ds"])
            .all()
            .status()
            .build(),
        Builtin::new("batch", "v1", "jobs", "Job", true)
            .all()
            .status()
            .build(),
        Builtin::new("batch", "v1", "cronjobs", "CronJob", true)
            .short(&["cj"])
            .all()
            .status()
            .build(),
        Builtin::new(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
        )
        .short(&["pdb"])
        .status()
        .build(),
        Builtin::new(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
        )
        .short(&["netpol"])
        .build(),
        Builtin::new("networking.k8s.io", "v1", "ingresses", "Ingress", true)
            .short(&["ing"])
            .status()
            .build(),
        Builtin::new(
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            "PriorityClass",
            false,
        )
        .short(&["pc"])
        .build(),
        Builtin::new("rbac.authorization.k8s.io", "v1", "roles", "Role", true).build(),
        Builtin::new(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
        )
        .build(),
        Builtin::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
        )
        .build(),
        Builtin::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        )
        .build(),
        Builtin::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .short(&["crd", "crds"])
        .status()
        .printer(Printer::Crds)
        .build(),
    ];
    for (group, resource, kind, namespaced) in [
        ("", "bindings", "Binding", true),
        ("authentication.k8s.io", "tokenreviews", "TokenReview", false),
        (
            "authorization.k8s.io",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
        ),
    ] {
        let mut create_only = Builtin::new(group, "v1", resource, kind, namespaced).build();
        Arc::make_mut(&mut create_only).create_only = true;
        types.push(create_only);
    }
    let mut events = Builtin::new("events.k8s.io", "v1", "events", "Event", true)
        .printer(Printer::Events)
        .fields(EVENT_FIELDS)
        .build();
    {
        let events = Arc::make_mut(&mut events);
        events.codec = Codec::EventsV1;
        events.storage = StorageKey {
            group: String::new(),
            resource: "events".into(),
        };
    }
    types.push(events);
    types
}

/// The resource type a CustomResourceDefinition (as stored JSON) makes servable.
pub fn from_crd(crd: &Value) -> Result<ResourceType, String> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().ok_or("spec.group: Required value")?;
    let names = &spec["names"];
    let plural = names["plural"]
        .as_str()
        .ok_or("spec.names.plural: Required value")?;
    let kind = names["kind"].as_str().ok_or("spec.names.kind: Required value")?;
    let scope = spec["scope"].as_str().ok_or("spec.scope: Required value")?;
    let namespaced = match scope {
        "Namespaced" => true,
        "Cluster" => false,
        other => return Err(format!("spec.scope: Unsupported value: \"{other}\"")),
    };
    let versions = spec["versions"]
        .as_array()
        .ok_or("spec.versions: Required value")?;
    if versions.is_empty() {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version".into(),
        );
    }
    let storage_count = versions.iter().filter(|v| v["storage"] == json!(true)).count();
    if storage_count != 1 {
        return Err(format!(
            "spec.versions: Invalid value: must have exactly one version marked as storage version, status.storedVersions ({storage_count} marked)"
        ));
    }
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let mut served: Vec<&Value> = versions.iter().filter(|v| v["served"] == json!(true)).collect();
    // The storage version first, so it is the preferred one.
    served.sort_by_key(|v| v["storage"] != json!(true));
    let mut schemas = BTreeMap::new();
    let mut columns = BTreeMap::new();
    let mut status = false;
    let mut scale = false;
    let mut field_labels = Vec::new();
    for version in &served {
        let name = version["name"]
            .as_str()
            .ok_or("spec.versions[].name: Required value")?;
        if let Some(schema) = version.pointer("/schema/openAPIV3Schema") {
            schemas.insert(name.to_string(), schema.clone());
        }
        let list: Vec<PrinterColumn> = version["additionalPrinterColumns"]
            .as_array()
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c["name"].as_str().unwrap_or_default().to_string(),
                        type_: c["type"].as_str().unwrap_or("string").to_string(),
                        format: c["format"].as_str().unwrap_or_default().to_string(),
                        description: c["description"].as_str().unwrap_or_default().to_string(),
                        priority: c["priority"].as_i64().unwrap_or(0),
                        json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        columns.insert(name.to_string(), list);
        status |= version.pointer("/subresources/status").is_some();
        scale |= version.pointer("/subresources/scale").is_some();
        if let Some(fields) = version["selectableFields"].as_array() {
            for field in fields {
                if let Some(path) = field["jsonPath"].as_str() {
                    field_labels.push(path.trim_start_matches('.').to_string());
                }
            }
        }
    }
    if served.is_empty() {
        return Err("spec.versions: Invalid value: at least one version must be served".into());
    }
    Ok(ResourceType {
        group: group.into(),
        versions: served
            .iter()
            .map(|v| v["name"].as_str().unwrap_or_default().to_string())
            .collect(),
        resource: plural.into(),
        kind: kind.into(),
        singular: names["singular"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| kind.to_lowercase()),
        namespaced,
        short_names: strings(&names["shortNames"]),
        categories: strings(&names["categories"]),
        status,
        subresources: if scale { vec!["scale"] } else { vec![] },
        create_only: false,
        storage: StorageKey {
            group: group.into(),
            resource: plural.into(),
        },
        codec: Codec::Identity,
        printer: Printer::Custom(columns),
        schemas,
        field_labels,
        builtin: false,
    })
}

/// Every served type, built-in and custom.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Registry {
        Registry { types: builtins() }
    }

    pub fn find(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.resource == resource && t.serves(version))
            .cloned()
    }

    /// The type that serves `resource` in `group`, whatever the version.
    pub fn find_any_version(&self, group: &str, resource: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.resource == resource)
            .cloned()
    }

    /// The type of a `Kind` in an `apiVersion` (ownerReferences, involvedObject).
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.serves(version) && !t.create_only)
            .cloned()
    }

    /// Adds or replaces a CRD's type.
    pub fn upsert(&mut self, rt: ResourceType) {
        self.types
            .retain(|t| !(t.group == rt.group && t.resource == rt.resource));
        self.types.push(Arc::new(rt));
    }

    pub fn remove(&mut self, group: &str, resource: &str) {
        self.types
            .retain(|t| !(t.group == group && t.resource == resource));
    }

    pub fn types(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// A name (plural, kind or short name) taken by a type of another CRD in the same group.
    pub fn name_conflict(&self, rt: &ResourceType) -> Option<String> {
        self.types
            .iter()
            .filter(|t| t.group == rt.group && t.resource != rt.resource)
            .find_map(|t| {
                if t.kind == rt.kind {
                    Some(format!("kind {} is already in use", rt.kind))
                } else {
                    rt.short_names
                        .iter()
                        .find(|s| t.short_names.contains(s))
                        .map(|s| format!("short name {s} is already in use"))
                }
            })
    }

    fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in &self.types {
            let versions = groups.entry(t.group.clone()).or_default();
            for v in &t.versions {
                if !versions.contains(v) {
                    versions.push(v.clone());
                }
            }
        }
        groups
    }

    /// `GET /api`.
    pub fn core_versions(&self, server_address: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        })
    }

    fn group_document(name: &str, versions: &[String]) -> Value {
        let versions: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({
            "name": name,
            "versions": versions,
            "preferredVersion": versions[0],
        })
    }

    /// `GET /apis`.
    pub fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .filter(|(g, _)| !g.is_empty())
            .map(|(g, v)| Registry::group_document(g, v))
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/<group>`.
    pub fn group(&self, group: &str) -> Option<Value> {
        let groups = self.groups();
        let versions = groups.get(group).filter(|_| !group.is_empty())?;
        let mut document = Registry::group_document(group, versions);
        document["kind"] = json!("APIGroup");
        document["apiVersion"] = json!("v1");
        Some(document)
    }

    /// `GET /api/v1` or `GET /apis/<group>/<version>`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let types: Vec<&Arc<ResourceType>> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.serves(version))
            .collect();
        if types.is_empty() {
            return None;
        }
        let mut resources = Vec::new();
        for t in types {
            let verbs: Vec<&str> = if t.create_only {
                vec!["create"]
            } else {
                vec![
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ]
            };
            let mut entry = json!({
                "name": t.resource,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": verbs,
            });
            if !t.short_names.is_empty() {
                entry["shortNames"] = json!(t.short_names);
            }
            if !t.categories.is_empty() {
                entry["categories"] = json!(t.categories);
            }
            resources.push(entry);
            let mut subresources: Vec<(&str, Value)> = Vec::new();
            if t.status {
                subresources.push((
                    "status",
                    json!({"kind": t.kind, "verbs": ["get", "patch", "update"]}),
                ));
            }
            for sub in &t.subresources {
                let entry = match *sub {
                    "log" => json!({"kind": "Pod", "verbs": ["get"]}),
                    "exec" => json!({"kind": "PodExecOptions", "verbs": ["create", "get"]}),
                    "attach" => json!({"kind": "PodAttachOptions", "verbs": ["create", "get"]}),
                    "binding" => json!({"kind": "Binding", "verbs": ["create"]}),
                    "eviction" => {
                        json!({"kind": "Eviction", "group": "policy", "version": "v1", "verbs": ["create"]})
                    }
                    "scale" => json!({
                        "kind": "Scale", "group": "autoscaling", "version": "v1",
                        "verbs": ["get", "patch", "update"],
                    }),
                    "finalize" => json!({"kind": t.kind, "verbs": ["update"]}),
                    _ => continue,
                };
                subresources.push((sub, entry));
            }
            for (sub, mut entry) in subresources {
                entry["name"] = json!(format!("{}/{}", t.resource, sub));
                entry["singularName"] = json!("");
                entry["namespaced"] = json!(t.namespaced);
                resources.push(entry);
            }
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }
}
