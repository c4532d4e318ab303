//! Custom resources of ec2-kubelet (group `ec2-kubelet.io`, version `v1alpha1`) and the
//! well-known names (labels, annotations, EC2 tags) the operator writes and reads.

mod conditions;
mod instance;
mod pool;
pub mod reference;
mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use conditions::{ConditionStatus, set_condition};
pub use instance::{Ec2Instance, Ec2InstanceSpec, Ec2InstanceStatus, InstancePhase, PodRef};
pub use pool::{
    AgentSettings, BindingPhase, Ec2NodePool, Ec2NodePoolSpec, Ec2NodePoolStatus, NodeCapacity, NodeTaint,
    PodBinding, PoolNodeStatus, SecretRef, TaintEffect, TemplateRef, WarmInstance, WarmPool, WarmState,
    default_agent_port, default_node_taints,
};
pub use template::{
    BlockDeviceMapping, EbsVolume, EbsVolumeType, Ec2PodTemplate, Ec2PodTemplateSpec, Ec2PodTemplateStatus,
    ImageSelector, Placement, Tenancy,
};

/// API group of every ec2-kubelet resource.
pub const GROUP: &str = "ec2-kubelet.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// EC2 tags (key -> value), as written on ENIs and instances.
pub type TagMap = BTreeMap<String, String>;

/// Namespace and name of a namespaced object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Operating system of a pool's instances (the `kubernetes.io/os` node label).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperatingSystem {
    #[default]
    Linux,
    Darwin,
    Windows,
}

impl OperatingSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatingSystem::Linux => "linux",
            OperatingSystem::Darwin => "darwin",
            OperatingSystem::Windows => "windows",
        }
    }
}

/// CPU architecture of a pool's instances (the `kubernetes.io/arch` node label).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    #[default]
    Amd64,
    Arm64,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Amd64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }

    /// The name EC2 uses for this architecture (`x86_64`, `arm64`).
    pub fn ec2_name(self) -> &'static str {
        match self {
            Architecture::Amd64 => "x86_64",
            Architecture::Arm64 => "arm64",
        }
    }
}

pub use ec2_kubelet_protocol::util::{is_dns_label, is_dns_subdomain};

/// Pod annotations a user sets to steer a pod's instance (prefix `ec2-kubelet.io/`).
pub mod annotations {
    pub const INSTANCE_TYPE: &str = "ec2-kubelet.io/instance-type";
    pub const TEMPLATE: &str = "ec2-kubelet.io/template";
    pub const IMAGE_ID: &str = "ec2-kubelet.io/image-id";
    pub const SUBNET_ID: &str = "ec2-kubelet.io/subnet-id";
    pub const SECURITY_GROUPS: &str = "ec2-kubelet.io/security-groups";
    pub const IAM_INSTANCE_PROFILE: &str = "ec2-kubelet.io/iam-instance-profile";
    pub const USER_DATA: &str = "ec2-kubelet.io/user-data";
    pub const TAGS: &str = "ec2-kubelet.io/tags";
    pub const SPOT: &str = "ec2-kubelet.io/spot";
    /// Every annotation above: what users set.
    pub const USER_SET: [&str; 9] = [
        INSTANCE_TYPE,
        TEMPLATE,
        IMAGE_ID,
        SUBNET_ID,
        SECURITY_GROUPS,
        IAM_INSTANCE_PROFILE,
        USER_DATA,
        TAGS,
        SPOT,
    ];
    /// Written by the operator: the instance that runs the pod.
    pub const INSTANCE_ID: &str = "ec2-kubelet.io/instance-id";
}

/// Labels the operator puts on its virtual nodes.
pub mod labels {
    pub const POOL: &str = "ec2-kubelet.io/pool";
    pub const NODE_INDEX: &str = "ec2-kubelet.io/node-index";
    /// On `Ec2Instance` records (with `POOL`): the pod's node, namespace, name and UID, and
    /// whether the instance waits warm. A value a label cannot hold (over 63 characters) is
    /// left out: the UID label always fits.
    pub const NODE: &str = "ec2-kubelet.io/node";
    pub const POD_NAMESPACE: &str = "ec2-kubelet.io/pod-namespace";
    pub const POD_NAME: &str = "ec2-kubelet.io/pod-name";
    pub const POD_UID: &str = "ec2-kubelet.io/pod-uid";
    pub const WARM: &str = "ec2-kubelet.io/warm";

    /// `value` as a label value, if it can be one (at most 63 characters of `[A-Za-z0-9-_.]`,
    /// alphanumeric at both ends).
    pub fn value(value: &str) -> Option<&str> {
        let ok = value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && value.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
            && value.chars().last().is_none_or(|c| c.is_ascii_alphanumeric());
        ok.then_some(value)
    }
}

/// The finalizer on every `Ec2Instance` record: its instance is terminated before it goes.
pub const INSTANCE_FINALIZER: &str = "ec2-kubelet.io/terminate-instance";

/// EC2 tags the operator writes on every ENI and instance it creates, and reads back after a restart.
pub mod tags {
    /// The operator's cluster name: nothing without it is ever touched.
    pub const CLUSTER: &str = "ec2-kubelet.io/cluster";
    pub const POOL: &str = "ec2-kubelet.io/pool";
    pub const NODE: &str = "ec2-kubelet.io/node";
    pub const NODE_INDEX: &str = "ec2-kubelet.io/node-index";
    pub const POD_UID: &str = "ec2-kubelet.io/pod-uid";
    pub const POD: &str = "ec2-kubelet.io/pod";
    pub const WARM: &str = "ec2-kubelet.io/warm";
    /// The name of the instance's `Ec2Instance` record.
    pub const RECORD: &str = "ec2-kubelet.io/record";
    /// The agent's port on the instance, so a restarted operator reaches it without the template.
    pub const AGENT_PORT: &str = "ec2-kubelet.io/agent-port";
    /// The nonce of the instance's bootstrap token: a token is only good for the instance
    /// tagged with its nonce.
    pub const ENROLLMENT: &str = "ec2-kubelet.io/enrollment";
    pub const NAME: &str = "Name";
}

/// The CRDs of this crate, as installed in a cluster.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Ec2NodePool::crd(), Ec2PodTemplate::crd(), Ec2Instance::crd()]
}

/// File name of a CRD under `crds/`: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML document of a CRD as written under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated by `ec2-kubelet crdgen` from src/crd/: do not edit by hand.\n{body}"
    ))
}

/// Writes every CRD into `dir` (only CRDs, so `kubectl apply -f crds/` applies the folder)
/// and returns the paths written.
pub fn write_crds(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let stale = dir.join("kustomization.yaml");
    if stale.exists() {
        std::fs::remove_file(stale)?;
    }
    write_crd_files(dir)
}

/// Writes only the CRD documents into `dir` (a Helm chart's `crds/`, where every file is installed).
pub fn write_crd_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for crd in crds() {
        let path = dir.join(crd_file_name(&crd));
        let yaml = crd_yaml(&crd).map_err(std::io::Error::other)?;
        std::fs::write(&path, yaml)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_carry_group_version_scope_and_short_names() {
        let pool = Ec2NodePool::crd();
        assert_eq!(pool.spec.group, GROUP);
        assert_eq!(pool.spec.scope, "Cluster");
        assert_eq!(
            pool.spec.names.short_names.as_deref(),
            Some(&["ecnp".to_string()][..])
        );
        let template = Ec2PodTemplate::crd();
        assert_eq!(template.spec.scope, "Namespaced");
        assert_eq!(
            template.spec.names.short_names.as_deref(),
            Some(&["ecpt".to_string()][..])
        );
        assert_eq!(template.spec.versions[0].name, VERSION);
    }

    #[test]
    fn pool_printer_columns_are_nodes_ready_pods_warm_age() {
        let crd = Ec2NodePool::crd();
        let columns: Vec<_> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.to_uppercase())
            .collect();
        assert_eq!(columns, ["NODES", "READY", "PODS", "WARM", "AGE"]);
    }

    #[test]
    fn pool_defaults_fill_taints_max_pods_and_agent_port() {
        let pool: Ec2NodePoolSpec = serde_json::from_value(serde_json::json!({
            "nodes": 2, "subnetIds": ["subnet-0abc"]
        }))
        .expect("minimal pool parses");
        assert_eq!(pool.node_taints, default_node_taints());
        assert_eq!(pool.max_pods_per_node, 110);
        assert_eq!(pool.agent.port, 8484);
        assert_eq!(pool.os, OperatingSystem::Linux);
    }

    #[test]
    fn status_bindings_round_trip_keyed_by_node_then_uid() {
        let mut status = Ec2NodePoolStatus::default();
        status.bindings.entry("node-a".into()).or_default().insert(
            "uid-1".into(),
            PodBinding {
                namespace: "default".into(),
                name: "web".into(),
                instance_id: Some("i-0123".into()),
                instance_type: Some("t3.micro".into()),
                private_ip: None,
                phase: BindingPhase::Booting,
                launch_time: None,
            },
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["bindings"]["node-a"]["uid-1"]["instanceId"], "i-0123");
        assert_eq!(json["bindings"]["node-a"]["uid-1"]["phase"], "Booting");
        let back: Ec2NodePoolStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
