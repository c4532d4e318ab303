//! `Compute`: the operator's only door to the cloud. Controllers never import `aws_sdk_ec2`;
//! they talk to this trait, implemented by `aws` (real EC2), `local` (agent processes on
//! loopback, the embedded default); the test bed adds `sim` (an in-process simulator for
//! benchmarks, e2e/testbed/sim.rs).

pub mod aws;
pub mod bootstrap;
pub mod local;
pub mod snapshot;

use std::collections::BTreeMap;
use std::path::Path;

use crate::crd::TagMap;

/// What went wrong in the cloud, classified so callers know whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{action} throttled by EC2 (RequestLimitExceeded)")]
    Throttled { action: String },
    #[error("insufficient capacity for instance type {instance_type}")]
    InsufficientCapacity { instance_type: String },
    #[error("EC2 unavailable during {action}: {message}")]
    Unavailable { action: String, message: String },
    #[error("image {image_id} not found")]
    ImageNotFound { image_id: String },
    #[error("instance type {instance_type} not offered")]
    InstanceTypeNotFound { instance_type: String },
    #[error("subnet {subnet_id} not found")]
    SubnetNotFound { subnet_id: String },
    #[error("security group {group_id} not found")]
    SecurityGroupNotFound { group_id: String },
    #[error("invalid parameter for {action}: {message}")]
    InvalidParameter { action: String, message: String },
    #[error("{resource} not found")]
    NotFound { resource: String },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Throttling, capacity and 5xx/timeouts pass; a retry with backoff may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Throttled { .. } | Error::InsufficientCapacity { .. } | Error::Unavailable { .. }
        )
    }

    /// A short name for metrics labels and event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Throttled { .. } => "Throttled",
            Error::InsufficientCapacity { .. } => "InsufficientInstanceCapacity",
            Error::Unavailable { .. } => "Unavailable",
            Error::ImageNotFound { .. } => "ImageNotFound",
            Error::InstanceTypeNotFound { .. } => "InstanceTypeNotFound",
            Error::SubnetNotFound { .. } => "SubnetNotFound",
            Error::SecurityGroupNotFound { .. } => "SecurityGroupNotFound",
            Error::InvalidParameter { .. } => "InvalidParameter",
            Error::NotFound { .. } => "NotFound",
            Error::Internal(_) => "Internal",
        }
    }
}

impl crate::metrics::ReasonOf for Error {
    fn reason_of(&self) -> &'static str {
        self.reason()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The ENI that backs virtual node `index` of `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniRequest {
    pub pool: String,
    pub index: u32,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    /// Tags beyond the ones the backend writes itself (cluster, pool, node index).
    pub tags: TagMap,
}

/// A node ENI as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Eni {
    pub eni_id: String,
    pub private_ip: String,
    pub subnet_id: String,
    pub pool: String,
    pub index: u32,
    pub tags: TagMap,
}

/// What the operator needs to know of an instance type to size pods.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceTypeInfo {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub gpus: u32,
    /// EC2 architecture names (`x86_64`, `arm64`).
    pub architectures: Vec<String>,
}

/// Everything needed to launch the instance of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchRequest {
    /// The pod's UID: the idempotency key (`ClientToken`, and the `pod-uid` tag looked up first).
    pub pod_uid: String,
    pub pool: String,
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub instance_type: String,
    pub image_id: String,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub spot: bool,
    /// The caller has just seen (in a snapshot taken after the pod's binding was written) that
    /// no live instance carries the pod's UID, so the backend need not look it up again.
    pub known_absent: bool,
    /// Tenancy and Dedicated Host of the instance (Mac instances need a host).
    pub placement: Option<crate::crd::Placement>,
    pub agent_port: u16,
    /// Tags beyond the ones the backend writes itself.
    pub tags: TagMap,
    /// How the instance's agent gets its certificate (`None`: the agent serves plain text).
    pub enrollment: Option<Enrollment>,
}

/// What a new instance's agent needs to enroll (see `ec2_kubelet_protocol::pki`). Travels in the user data;
/// the nonce is also a tag of the instance.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Enrollment {
    pub nonce: String,
    /// The one-time bootstrap token: a credential, never logged.
    pub token: String,
    pub ca_pem: String,
    pub url: String,
}

impl Enrollment {
    /// The agent's flags to enroll with the CA and the token in these files (the bootstrap
    /// writes them on an instance).
    pub fn agent_flags(&self, ca_file: &str, token_file: &str) -> Vec<String> {
        [
            "--enroll-url",
            &self.url,
            "--ca-file",
            ca_file,
            "--bootstrap-token-file",
            token_file,
        ]
        .map(String::from)
        .to_vec()
    }

    /// Writes the CA and the token (only its owner reads it) into `dir`, as the bootstrap does
    /// on an instance, and returns the agent's flags naming them.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let (ca, token) = (dir.join("ca.crt"), dir.join("bootstrap-token"));
        std::fs::write(&ca, &self.ca_pem)?;
        ec2_kubelet_protocol::util::write_private(&token, self.token.as_bytes())?;
        Ok(self.agent_flags(&ca.display().to_string(), &token.display().to_string()))
    }
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("nonce", &self.nonce)
            .field("token", &"<redacted>")
            .field("url", &self.url)
            .finish()
    }
}

/// EC2 instance states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
}

impl InstanceState {
    /// Still exists as far as pods are concerned (not terminated, stopping or stopped).
    pub fn is_alive(self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }
}

/// An instance as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    pub instance_id: String,
    pub state: InstanceState,
    pub instance_type: String,
    pub private_ip: Option<String>,
    /// Unix milliseconds.
    pub launch_time: i64,
    pub tags: TagMap,
}

impl Instance {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// An AMI as the operator needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub image_id: String,
    pub name: String,
    /// EC2 architecture name (`x86_64`, `arm64`, `arm64_mac`, `x86_64_mac`).
    pub architecture: String,
    /// RFC 3339, as EC2 reports it.
    pub creation_date: String,
}

/// Which images to describe: fixed ids, or the ones matching a template's `imageSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageQuery {
    Ids(Vec<String>),
    Selector {
        owners: Vec<String>,
        /// Name pattern with `*` and `?` wildcards.
        name: Option<String>,
        tags: TagMap,
        /// EC2 architecture name.
        architecture: Option<String>,
    },
}

/// Which instances to describe: by id, or every instance of a pool (one tag filter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceFilter {
    Ids(Vec<String>),
    Pool(String),
    /// Every instance carrying the operator's cluster tag.
    Cluster,
}

/// The operator's only door to the cloud.
#[async_trait::async_trait]
pub trait Compute: Send + Sync {
    /// `aws`, `local` or `sim`.
    fn backend(&self) -> &'static str;

    /// Creates the ENI of node `index` of a pool, or returns it if it exists (found by tags).
    async fn ensure_eni(&self, request: &EniRequest) -> Result<Eni>;

    /// Deletes an ENI; deleting one that is gone is not an error.
    async fn delete_eni(&self, eni_id: &str) -> Result<()>;

    /// Every ENI of a pool (one tag-filtered call, paginated).
    async fn describe_enis(&self, pool: &str) -> Result<Vec<Eni>>;

    /// Facts about instance types; unknown names are left out. Cached by the backend.
    async fn instance_types(&self, names: &[String]) -> Result<Vec<InstanceTypeInfo>>;

    /// Launches the instance of a pod, idempotently: an instance already tagged with the pod's
    /// UID is returned instead of launching another.
    async fn launch_instance(&self, request: &LaunchRequest) -> Result<Instance>;

    /// Instances matching the filter, in as few calls as the cloud allows.
    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>>;

    /// Terminates instances; terminating one that is gone is not an error.
    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<()>;

    /// Adds or overwrites tags on an instance (`CreateTags`): a claimed warm instance takes
    /// its pod's tags.
    async fn tag_instance(&self, instance_id: &str, tags: &TagMap) -> Result<()>;

    /// The `http://host:port` at which the instance's agent answers.
    fn agent_endpoint(&self, instance: &Instance, port: u16) -> Result<String>;

    /// Images by id (unknown ids are left out), or those matching a selector, newest first.
    async fn describe_images(&self, query: &ImageQuery) -> Result<Vec<ImageInfo>>;

    /// Which of these subnets exist.
    async fn existing_subnets(&self, subnet_ids: &[String]) -> Result<Vec<String>>;

    /// Which of these security groups exist.
    async fn existing_security_groups(&self, group_ids: &[String]) -> Result<Vec<String>>;
}

/// A backend that counts every call in the operator's metrics (`ec2_kubelet_cloud_calls_total`
/// by action and outcome).
pub struct Metered {
    inner: std::sync::Arc<dyn Compute>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Metered {
    pub fn new(
        inner: std::sync::Arc<dyn Compute>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Metered {
        Metered { inner, metrics }
    }

    fn count<T>(&self, action: &str, result: Result<T>) -> Result<T> {
        self.metrics.cloud_call(action, &result);
        result
    }
}

#[async_trait::async_trait]
impl Compute for Metered {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ensure_eni(&self, request: &EniRequest) -> Result<Eni> {
        self.count("EnsureEni", self.inner.ensure_eni(request).await)
    }
    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        self.count("DeleteNetworkInterface", self.inner.delete_eni(eni_id).await)
    }
    async fn describe_enis(&self, pool: &str) -> Result<Vec<Eni>> {
        self.count("DescribeNetworkInterfaces", self.inner.describe_enis(pool).await)
    }
    async fn instance_types(&self, names: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        self.count("DescribeInstanceTypes", self.inner.instance_types(names).await)
    }
    async fn launch_instance(&self, request: &LaunchRequest) -> Result<Instance> {
        self.count("RunInstances", self.inner.launch_instance(request).await)
    }
    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        self.count("DescribeInstances", self.inner.describe_instances(filter).await)
    }
    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<()> {
        self.count(
            "TerminateInstances",
            self.inner.terminate_instances(instance_ids).await,
        )
    }
    async fn tag_instance(&self, instance_id: &str, tags: &TagMap) -> Result<()> {
        self.count("CreateTags", self.inner.tag_instance(instance_id, tags).await)
    }
    fn agent_endpoint(&self, instance: &Instance, port: u16) -> Result<String> {
        self.inner.agent_endpoint(instance, port)
    }
    async fn describe_images(&self, query: &ImageQuery) -> Result<Vec<ImageInfo>> {
        self.count("DescribeImages", self.inner.describe_images(query).await)
    }
    async fn existing_subnets(&self, subnet_ids: &[String]) -> Result<Vec<String>> {
        self.count("DescribeSubnets", self.inner.existing_subnets(subnet_ids).await)
    }
    async fn existing_security_groups(&self, group_ids: &[String]) -> Result<Vec<String>> {
        self.count(
            "DescribeSecurityGroups",
            self.inner.existing_security_groups(group_ids).await,
        )
    }
}

/// The tags every ENI and instance of the operator carries, plus the caller's.
pub fn owned_tags(cluster: &str, pool: &str, extra: &TagMap) -> TagMap {
    let mut tags: BTreeMap<String, String> = extra.clone();
    tags.insert(crate::crd::tags::CLUSTER.into(), cluster.into());
    tags.insert(crate::crd::tags::POOL.into(), pool.into());
    tags
}

/// The tags of a node ENI: the operator's own, the node index, and the request's.
pub fn eni_tags(cluster: &str, request: &EniRequest) -> TagMap {
    let mut tags = owned_tags(cluster, &request.pool, &request.tags);
    tags.insert(crate::crd::tags::NODE_INDEX.into(), request.index.to_string());
    tags
}

/// The tags of a pod's instance: the operator's own, the node, the pod (UID and name), and the request's.
pub fn instance_tags(cluster: &str, request: &LaunchRequest) -> TagMap {
    use crate::crd::tags;
    let mut instance_tags = owned_tags(cluster, &request.pool, &request.tags);
    instance_tags.insert(tags::POD_UID.into(), request.pod_uid.clone());
    if let Some(enrollment) = &request.enrollment {
        instance_tags.insert(tags::ENROLLMENT.into(), enrollment.nonce.clone());
    }
    if request.tags.get(tags::WARM).is_some_and(|w| w == "true") {
        // A warm instance has no pod yet (its "pod UID" is its launch token).
        instance_tags.insert(tags::NAME.into(), request.name.clone());
        return instance_tags;
    }
    let pod = format!("{}/{}", request.namespace, request.name);
    instance_tags.insert(tags::NODE.into(), request.node.clone());
    instance_tags.insert(tags::POD.into(), pod.clone());
    instance_tags.insert(tags::NAME.into(), pod);
    instance_tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        assert!(
            Error::Throttled {
                action: "RunInstances".into()
            }
            .is_retryable()
        );
        assert!(
            Error::InsufficientCapacity {
                instance_type: "p5.48xlarge".into()
            }
            .is_retryable()
        );
        assert!(
            !Error::ImageNotFound {
                image_id: "ami-1".into()
            }
            .is_retryable()
        );
        assert_eq!(
            Error::InsufficientCapacity {
                instance_type: "x".into()
            }
            .reason(),
            "InsufficientInstanceCapacity"
        );
    }

    #[test]
    fn operator_tags_win_over_user_tags() {
        let mut extra = TagMap::new();
        extra.insert(crate::crd::tags::CLUSTER.into(), "spoofed".into());
        extra.insert("team".into(), "a".into());
        let tags = owned_tags("prod", "p1", &extra);
        assert_eq!(tags[crate::crd::tags::CLUSTER], "prod");
        assert_eq!(tags["team"], "a");
    }
}
