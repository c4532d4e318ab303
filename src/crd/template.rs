//! `Ec2PodTemplate`: a named, reusable bundle of launch settings for pods' instances.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Architecture, TagMap};

/// Launch settings for the instances of pods that use this template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "ec2-kubelet.io",
    version = "v1alpha1",
    kind = "Ec2PodTemplate",
    plural = "ec2podtemplates",
    shortname = "ecpt",
    category = "ec2-kubelet",
    namespaced,
    doc = "A named, reusable bundle of launch settings (AMI, instance types, subnets, security groups, IAM profile, user data, tags, agent port) for the instances of pods.",
    status = "Ec2PodTemplateStatus",
    printcolumn = r#"{"name":"Image","type":"string","description":"Resolved AMI","jsonPath":".status.resolvedImageId"}"#,
    printcolumn = r#"{"name":"Types","type":"string","description":"Allowed instance types","jsonPath":".spec.instanceTypes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.imageId) != has(self.imageSelector)")
    .message("exactly one of spec.imageId or spec.imageSelector must be set"))]
#[x_kube(validation = Rule::new("!has(self.instanceType) || !has(self.instanceTypes) || self.instanceType in self.instanceTypes")
    .message("spec.instanceType must be one of spec.instanceTypes"))]
#[serde(rename_all = "camelCase")]
pub struct Ec2PodTemplateSpec {
    /// The AMI to boot. Its user data or image must start `ec2-kubelet-agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^ami-[0-9a-f]{8,17}$"))]
    pub image_id: Option<String>,

    /// Pick the newest AMI matching these criteria instead of a fixed `imageId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_selector: Option<ImageSelector>,

    /// Default instance type when neither a pod annotation nor the pod's requests decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$"))]
    pub instance_type: Option<String>,

    /// Instance types pods may use; the smallest that fits a pod's requests is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")))]
    pub instance_types: Vec<String>,

    /// Subnets for instances (default: the pool's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^subnet-[0-9a-f]{1,17}$")))]
    pub subnet_ids: Vec<String>,

    /// Security groups for instances (default: the pool's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^sg-[0-9a-f]{1,17}$")))]
    pub security_group_ids: Vec<String>,

    /// IAM instance profile, by name or ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 2048),
        regex(
            pattern = r"^([\w+=,.@-]{1,128}|arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[\w+=,.@/-]+)$"
        )
    )]
    pub iam_instance_profile: Option<String>,

    /// User data run at boot, before the agent bootstrap the operator appends (plain text, at most 16 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,

    /// EC2 key pair for SSH access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub key_name: Option<String>,

    /// Tags added to instances launched from this template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('ec2-kubelet.io/') && !k.startsWith('aws:'))")
        .message("tag keys starting with 'ec2-kubelet.io/' or 'aws:' are reserved"))]
    pub tags: TagMap,

    /// Volumes attached at launch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub block_device_mappings: Vec<BlockDeviceMapping>,

    /// Launch spot capacity instead of on-demand. Interrupted pods fail with `SpotInterrupted`.
    #[serde(default)]
    pub spot: bool,

    /// Highest hourly price paid for spot capacity, in USD (default: the on-demand price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub spot_max_price: Option<String>,

    /// TCP port of the agent on instances from this template (default: the pool's agent port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub agent_port: Option<i32>,

    /// Where instances are placed: dedicated hardware or a Dedicated Host (needed for Mac
    /// instances such as `mac2.metal`, whose hosts are allocated for at least 24 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// EC2 placement of a template's instances.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.hostId) || self.tenancy == 'host'")
    .message("placement.hostId needs placement.tenancy: host"))]
pub struct Placement {
    /// `default` (shared hardware), `dedicated` (Dedicated Instances) or `host` (Dedicated Hosts).
    #[serde(default)]
    pub tenancy: Tenancy,
    /// The Dedicated Host to launch on (`h-...`); without it EC2 picks one of the account's hosts
    /// with auto-placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^h-[0-9a-f]{8,17}$"))]
    pub host_id: Option<String>,
    /// A host resource group (License Manager) to launch into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^arn:aws[a-z-]*:resource-groups:[a-z0-9-]+:[0-9]{12}:group/[\w.-]+$"))]
    pub host_resource_group_arn: Option<String>,
}

/// EC2 tenancy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tenancy {
    #[default]
    Default,
    Dedicated,
    Host,
}

impl Tenancy {
    pub fn as_str(self) -> &'static str {
        match self {
            Tenancy::Default => "default",
            Tenancy::Dedicated => "dedicated",
            Tenancy::Host => "host",
        }
    }
}

/// Criteria for choosing an AMI; the newest matching image wins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.owners) && size(self.owners) > 0) || has(self.name) || (has(self.tags) && size(self.tags) > 0)")
    .message("imageSelector needs at least one of owners, name or tags"))]
pub struct ImageSelector {
    /// Image owners: account ids, `self`, `amazon`, `aws-marketplace`.
    #[serde(default)]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^([0-9]{12}|self|amazon|aws-marketplace)$"))
    )]
    pub owners: Vec<String>,
    /// Image name pattern; `*` and `?` are wildcards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,
    /// Tags the image must carry.
    #[serde(default)]
    pub tags: TagMap,
    /// Image architecture (default: the pool's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<Architecture>,
}

/// A volume attached at launch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceMapping {
    /// Device name, e.g. `/dev/xvda`.
    #[schemars(regex(pattern = r"^/dev/[a-z0-9]+$"))]
    pub device_name: String,
    /// EBS volume settings.
    pub ebs: EbsVolume,
}

/// EBS volume settings of a block device mapping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EbsVolume {
    /// Size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub volume_size: Option<i32>,
    /// Volume type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<EbsVolumeType>,
    /// Provisioned IOPS (io1, io2, gp3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 256000))]
    pub iops: Option<i32>,
    /// Throughput in MiB/s (gp3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 125, max = 2000))]
    pub throughput: Option<i32>,
    /// Encrypt the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// KMS key for encryption (id or ARN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub kms_key_id: Option<String>,
    /// Snapshot to create the volume from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^snap-[0-9a-f]{8,17}$"))]
    pub snapshot_id: Option<String>,
    /// Delete the volume with the instance (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_on_termination: Option<bool>,
}

/// EBS volume types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EbsVolumeType {
    Gp2,
    Gp3,
    Io1,
    Io2,
    St1,
    Sc1,
    Standard,
}

/// Observed state of a template, from validating it against EC2.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ec2PodTemplateStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The AMI instances are launched from (`imageId`, or the newest match of `imageSelector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_image_id: Option<String>,
    /// The EC2 architecture of the resolved image (`x86_64`, `arm64`, `arm64_mac`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// The allowed instance types EC2 offers and that match the image's architecture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available_instance_types: Vec<String>,
    /// `Ready`, or `Invalid` with a reason naming the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
