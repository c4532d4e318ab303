//! `Ec2Instance`: the record of one EC2 instance the operator launched, for a pod or kept warm
//! for one. One object per instance, so a pool of 10,000 pods is 10,000 small objects, not one
//! object of 10,000 bindings (etcd refuses values over 1.5 MiB).
//!
//! Cluster-scoped, like the pool that owns it: a warm instance belongs to no namespace until a
//! pod claims it, and a claim cannot move an object between namespaces. Named by the
//! instance's EC2 idempotency key: the pod's UID for an instance launched for a pod, and
//! `warm-<pool>-<random>` for a warm one (which keeps its name when a pod claims it). So a
//! record is found from the pod (name, or label `ec2-kubelet.io/pod-uid`), from the instance
//! (tag `ec2-kubelet.io/record`) and from the pool (label `ec2-kubelet.io/pool`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What was asked: the pool, node and pod an instance is for, and its resolved launch settings.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "ec2-kubelet.io",
    version = "v1alpha1",
    kind = "Ec2Instance",
    plural = "ec2instances",
    shortname = "eci",
    category = "ec2-kubelet",
    doc = "The record of one EC2 instance launched by ec2-kubelet: for a pod, or kept warm for one. Written before RunInstances; its finalizer terminates the instance before the record goes.",
    status = "Ec2InstanceStatus",
    printcolumn = r#"{"name":"Pod","type":"string","description":"The pod the instance runs","jsonPath":".spec.pod.name"}"#,
    printcolumn = r#"{"name":"Node","type":"string","description":"The virtual node of the pod","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Instance","type":"string","description":"EC2 instance id","jsonPath":".status.instanceId"}"#,
    printcolumn = r#"{"name":"Type","type":"string","description":"EC2 instance type","jsonPath":".status.instanceType"}"#,
    printcolumn = r#"{"name":"IP","type":"string","description":"Private IP (the pod's IP)","jsonPath":".status.privateIp"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Namespace","type":"string","priority":1,"description":"The pod's namespace","jsonPath":".spec.pod.namespace"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","priority":1,"jsonPath":".spec.pool"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct Ec2InstanceSpec {
    /// The pool whose pod (or warm pool) the instance serves.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// The virtual node of the pod (empty for a warm instance no pod claimed yet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The pod the instance runs (absent for a warm instance no pod claimed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The instance type asked for first (EC2 capacity may have led to a fallback: see status).
    pub instance_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subnet_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// The agent's port on the instance.
    #[schemars(range(min = 1, max = 65535))]
    pub agent_port: i32,
    /// A spot instance.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot: bool,
}

/// The pod an instance runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What exists: the instance, where it is in its life, and when it got there.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ec2InstanceStatus {
    /// Absent until RunInstances answered (the record is written first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<InstancePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The type EC2 launched (the first allowed type that had capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// When RunInstances answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<Time>,
    /// When the agent first accepted work (a warm instance: answered; a pod's: took the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
    /// `Ready`: whether the agent answers, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Where an instance is in its life, as the operator last recorded it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum InstancePhase {
    /// The instance exists; its agent has not answered yet.
    Booting,
    /// A warm instance whose agent answers: a pod may claim it.
    Ready,
    /// The agent runs the pod.
    Running,
}

impl InstancePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            InstancePhase::Booting => "Booting",
            InstancePhase::Ready => "Ready",
            InstancePhase::Running => "Running",
        }
    }
}

impl Ec2Instance {
    /// The instance id, once recorded.
    pub fn instance_id(&self) -> Option<&str> {
        self.status.as_ref()?.instance_id.as_deref()
    }

    pub fn phase(&self) -> Option<InstancePhase> {
        self.status.as_ref()?.phase
    }

    /// The pod's UID, once a pod has the instance.
    pub fn pod_uid(&self) -> Option<&str> {
        self.spec.pod.as_ref().map(|p| p.uid.as_str())
    }
}
