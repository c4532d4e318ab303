//! `Ec2NodePool`: how many virtual nodes, in which subnets, with which defaults.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Architecture, ObjectRef, OperatingSystem, TagMap};

/// Desired state of a pool of virtual nodes. Every node is backed by one ENI.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ec2-kubelet.io",
    version = "v1alpha1",
    kind = "Ec2NodePool",
    plural = "ec2nodepools",
    shortname = "ecnp",
    category = "ec2-kubelet",
    doc = "A pool of virtual nodes, each backed by one ENI; every pod bound to one of them runs on its own EC2 instance.",
    status = "Ec2NodePoolStatus",
    printcolumn = r#"{"name":"Nodes","type":"integer","description":"Virtual nodes wanted","jsonPath":".spec.nodes"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"Virtual nodes Ready","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","description":"Pods bound to the pool's nodes","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Warm","type":"integer","description":"Warm instances booted and waiting for a pod","jsonPath":".status.warmReady"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(
    "(has(self.subnetIds) && size(self.subnetIds) > 0) || (has(self.subnetSelector) && size(self.subnetSelector) > 0)"
).message("one of spec.subnetIds or spec.subnetSelector is required: the subnets in which node ENIs are created"))]
#[serde(rename_all = "camelCase")]
pub struct Ec2NodePoolSpec {
    /// Number of virtual nodes (one ENI each). Scaling down drains the highest-index nodes first.
    #[schemars(range(min = 0, max = 1000))]
    pub nodes: i32,

    /// Subnets in which node ENIs are created, spread round-robin by node index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^subnet-[0-9a-f]{1,17}$")))]
    pub subnet_ids: Vec<String>,

    /// Select subnets by tags instead of (or in addition to) `subnetIds`: all tags must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subnet_selector: TagMap,

    /// Security groups attached to node ENIs, and the default for instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^sg-[0-9a-f]{1,17}$")))]
    pub security_group_ids: Vec<String>,

    /// Default launch settings for pods on this pool (kind `Ec2PodTemplate`); a pod may name another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,

    /// Extra labels on every node of the pool (added to the built-in virtual-kubelet labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,

    /// Taints on every node of the pool; pods must tolerate them to be scheduled there.
    #[serde(default = "default_node_taints")]
    #[schemars(length(max = 32))]
    pub node_taints: Vec<NodeTaint>,

    /// Most pods the scheduler may bind to one node (advertised as the node's `pods` capacity).
    #[serde(default = "default_max_pods_per_node")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_pods_per_node: i32,

    /// Resources each node advertises; the sum of what its pods' instances may request.
    #[serde(default)]
    pub capacity: NodeCapacity,

    /// Operating system of the pool's instances; sets the nodes' `kubernetes.io/os` label.
    #[serde(default)]
    pub os: OperatingSystem,

    /// CPU architecture of the pool's instances; sets the nodes' `kubernetes.io/arch` label.
    #[serde(default)]
    pub arch: Architecture,

    /// Instances kept booted with a Ready agent, so that a matching pod starts in about a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<WarmPool>,

    /// How the operator reaches the agent on each instance.
    #[serde(default)]
    pub agent: AgentSettings,

    /// Tags added to every ENI and instance of the pool (on top of the operator's own tags).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('ec2-kubelet.io/') && !k.startsWith('aws:'))")
        .message("tag keys starting with 'ec2-kubelet.io/' or 'aws:' are reserved"))]
    pub tags: TagMap,
}

/// A reference to an `Ec2PodTemplate`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRef {
    /// Kind of the referenced object; only `Ec2PodTemplate` is supported.
    #[serde(default = "default_template_kind")]
    #[schemars(regex(pattern = r"^Ec2PodTemplate$"))]
    pub kind: String,
    /// Namespace of the template.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// Name of the template.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

impl From<&TemplateRef> for ObjectRef {
    fn from(r: &TemplateRef) -> Self {
        ObjectRef {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        }
    }
}

/// A node taint, as in `Node.spec.taints`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTaint {
    /// Taint key: an optional DNS subdomain prefix and a name, as for labels.
    #[schemars(
        length(min = 1, max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
        )
    )]
    pub key: String,
    /// Taint value (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(
        length(max = 63),
        regex(pattern = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
    )]
    pub value: String,
    /// What happens to pods that do not tolerate the taint.
    pub effect: TaintEffect,
}

/// Effect of a taint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// The taint every virtual node carries unless the pool says otherwise, as Virtual Kubelet does.
pub fn default_node_taints() -> Vec<NodeTaint> {
    vec![NodeTaint {
        key: "virtual-kubelet.io/provider".into(),
        value: "ec2".into(),
        effect: TaintEffect::NoSchedule,
    }]
}

fn default_max_pods_per_node() -> i32 {
    110
}

fn default_template_kind() -> String {
    "Ec2PodTemplate".into()
}

/// Resources a virtual node advertises. Unset fields get generous defaults: the real limit is the
/// account's EC2 quota, not the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    /// CPU advertised per node (default `1k`, i.e. 1000 cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory advertised per node (default `4Ti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Pods per node (default: `maxPodsPerNode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Quantity>,
    /// `nvidia.com/gpu` advertised per node (default: none advertised).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Quantity>,
}

/// Booted instances kept waiting for pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPool {
    /// Instances kept booted with the agent Ready.
    #[schemars(range(min = 0, max = 1000))]
    pub size: i32,
    /// Launch settings of warm instances (default: the pool's `templateRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Instance types kept warm, in order of preference (default: the template's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")))]
    pub instance_types: Vec<String>,
    /// Recycle warm instances older than this (Go duration, e.g. `12h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub max_age: Option<String>,
}

/// How the operator talks to the agent on each instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// TCP port of the agent's gRPC server on the instance.
    #[serde(default = "default_agent_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Secret holding the CA and operator client certificate for mTLS (`ca.crt`, `tls.crt`, `tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            port: default_agent_port(),
            tls_secret_ref: None,
        }
    }
}

/// The default agent port, used by pools and templates alike.
pub fn default_agent_port() -> i32 {
    8484
}

/// A reference to a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Observed state of a pool: written by the operator, never read back as truth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ec2NodePoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes whose Ready condition is True.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Pods bound to the pool's nodes (recounted within a second of a change).
    #[serde(default)]
    pub pods: i32,
    /// Virtual nodes, keyed by node name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, PoolNodeStatus>,
    /// Deprecated: where operators before `Ec2Instance` records kept the pod-to-instance
    /// bindings (node name -> pod UID -> binding). An upgraded operator moves each into a
    /// record and clears this; it never writes it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bindings: BTreeMap<String, BTreeMap<String, PodBinding>>,
    /// Deprecated: where operators before `Ec2Instance` records kept the warm instances (by
    /// instance id). An upgraded operator moves each into a record and clears this.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub warm: BTreeMap<String, WarmInstance>,
    /// Warm instances whose agent is Ready.
    #[serde(default)]
    pub warm_ready: i32,
    /// Warm instances launched and not Ready yet.
    #[serde(default)]
    pub warm_launching: i32,
    /// `Ready` and `Degraded`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A booted instance waiting for a pod, with the launch settings a pod must match to take it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmInstance {
    pub instance_type: String,
    pub image_id: String,
    pub subnet_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// The agent port the instance was launched with.
    pub agent_port: i32,
    pub state: WarmState,
    /// When RunInstances answered.
    pub launch_time: Time,
    /// When the agent first answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
}

/// Where a warm instance is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WarmState {
    /// Launched; its agent has not answered yet.
    Launching,
    /// The agent answers: a pod may claim it.
    Ready,
}

/// One virtual node of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolNodeStatus {
    /// Position of the node in the pool (0-based); scale-down removes the highest first.
    pub index: i32,
    /// The ENI that backs the node.
    pub eni_id: String,
    /// The ENI's private IP, which names the node and is its InternalIP.
    pub private_ip: String,
    /// Whether the node's Ready condition is True.
    #[serde(default)]
    pub ready: bool,
    /// Pods bound to the node.
    #[serde(default)]
    pub pods: i32,
}

/// "Pod UID -> instance": what the operator launched for one pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodBinding {
    pub namespace: String,
    pub name: String,
    /// The EC2 instance running the pod, once RunInstances answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The instance type chosen for the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The instance's private IP (the pod's IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    pub phase: BindingPhase,
    /// When RunInstances was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<Time>,
}

/// Where a pod's instance is in its life, as the operator last recorded it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BindingPhase {
    /// Recorded before RunInstances: a restart finishes or reverts the launch.
    Launching,
    /// The instance exists; waiting for its agent.
    Booting,
    /// The agent accepted the pod.
    Running,
    /// The pod is being stopped and its instance terminated.
    Terminating,
    /// The pod finished; its instance is terminated.
    Completed,
}

impl Ec2NodePoolSpec {
    /// A minimal valid spec: one node in one subnet. Callers adjust what they need.
    pub fn minimal() -> Self {
        Ec2NodePoolSpec {
            nodes: 1,
            subnet_ids: vec!["subnet-0a1b2c3d".into()],
            subnet_selector: TagMap::new(),
            security_group_ids: vec!["sg-0a1b2c3d".into()],
            template_ref: None,
            node_labels: BTreeMap::new(),
            node_taints: default_node_taints(),
            max_pods_per_node: default_max_pods_per_node(),
            capacity: NodeCapacity::default(),
            os: OperatingSystem::default(),
            arch: Architecture::default(),
            warm_pool: None,
            agent: AgentSettings::default(),
            tags: TagMap::new(),
        }
    }
}
