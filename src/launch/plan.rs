//! A pod's launch, decided: from the pool, the template as found and the pod, its settings; from
//! those and the instance types EC2 offers, its instance type, the types to fall back to and
//! why. The pod worker reads the template and the catalogue, and calls these in between.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::settings::{self, InvalidSetting, LaunchSettings};
use super::sizing;
use crate::cloud::InstanceTypeInfo;
use crate::crd::{Ec2NodePoolSpec, Ec2PodTemplate, annotations};

/// The template a pod's settings name, as the pod worker found it.
#[derive(Clone, Debug)]
pub enum Template {
    /// The pod and its pool name none.
    NotNamed,
    /// Named (`namespace`, `name`) but not found.
    Missing(String, String),
    Found(Box<Ec2PodTemplate>),
}

/// The instance type a pod gets, the types to try next when EC2 has no capacity for it, and why
/// it was chosen (for the pod's event).
#[derive(Clone, Debug, PartialEq)]
pub struct TypeChoice {
    pub instance_type: String,
    pub fallbacks: Vec<String>,
    pub why: String,
}

/// The launch settings of `pod` on a node of `pool` whose ENI is in `node_subnet`: pool <
/// template < annotations, after checking that the template exists, is valid and launches
/// images of the pool's os and arch.
pub fn settings_for(
    pool: &Ec2NodePoolSpec,
    node_subnet: &str,
    pod: &Pod,
    template: &Template,
) -> Result<LaunchSettings, InvalidSetting> {
    let template = match template {
        Template::NotNamed => None,
        Template::Missing(namespace, name) => {
            return Err(InvalidSetting {
                field: annotations::TEMPLATE.into(),
                message: format!("Ec2PodTemplate {namespace}/{name} not found"),
            });
        }
        Template::Found(template) => {
            // A template the controller found invalid launches nothing else instead.
            if let Some(invalid) = invalid_condition(template) {
                return Err(InvalidSetting {
                    field: annotations::TEMPLATE.into(),
                    message: format!(
                        "Ec2PodTemplate {}/{} is invalid ({}): {}",
                        template.namespace().unwrap_or_default(),
                        template.name_any(),
                        invalid.reason,
                        invalid.message
                    ),
                });
            }
            if let Some(mismatch) = architecture_mismatch(template, pool) {
                return Err(mismatch);
            }
            Some(template)
        }
    };
    let resolved_image = template
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.resolved_image_id.as_deref());
    settings::resolve(
        pool,
        template.map(|t| &t.spec),
        resolved_image,
        pod.annotations(),
        &pod.uid().unwrap_or_default(),
        node_subnet,
    )
}

/// The instance types to ask EC2 about for `settings`: the requested one (to check it is
/// offered), else the allowed ones (to size the pod among them), else none (the default).
pub fn types_to_describe(settings: &LaunchSettings) -> Vec<String> {
    match &settings.requested_type {
        Some(requested) => vec![requested.clone()],
        None => settings.allowed_types.clone(),
    }
}

/// Chooses the pod's instance type from `offered` (what EC2 answered for
/// [`types_to_describe`]): the requested type if EC2 offers it; else the smallest allowed type
/// that fits the pod's requests on `arch`, the others that fit as fallbacks; else the
/// template's default.
pub fn choose_type(
    settings: &LaunchSettings,
    pod: &Pod,
    offered: &[InstanceTypeInfo],
    arch: crate::crd::Architecture,
) -> Result<TypeChoice, InvalidSetting> {
    let chosen = |instance_type: &str, fallbacks, why| TypeChoice {
        instance_type: instance_type.to_string(),
        fallbacks,
        why,
    };
    if let Some(requested) = &settings.requested_type {
        if !offered.iter().any(|info| info.name == *requested) {
            return Err(InvalidSetting {
                field: annotations::INSTANCE_TYPE.into(),
                message: format!("{requested} is not offered by EC2 in this region"),
            });
        }
        let why = format!(
            "{requested}: set by the {} annotation",
            annotations::INSTANCE_TYPE
        );
        return Ok(chosen(requested, Vec::new(), why));
    }
    if settings.allowed_types.is_empty() {
        return match &settings.default_type {
            Some(default) => Ok(chosen(
                default,
                Vec::new(),
                format!("{default}: the template default"),
            )),
            None => Err(InvalidSetting {
                field: annotations::INSTANCE_TYPE.into(),
                message:
                    "no instance type: set the annotation, or instanceTypes/instanceType in the template"
                        .into(),
            }),
        };
    }
    let invalid_containers = |message| InvalidSetting {
        field: "spec.containers".into(),
        message,
    };
    let needs = sizing::pod_needs(pod).map_err(invalid_containers)?;
    match sizing::smallest_fit(offered, &needs, arch) {
        Ok((info, why)) => {
            let fallbacks = sizing::candidates(offered, &needs, arch)
                .into_iter()
                .skip(1)
                .map(|i| i.name.clone())
                .collect();
            Ok(chosen(&info.name, fallbacks, why))
        }
        Err(message) => match &settings.default_type {
            Some(default) => Ok(chosen(
                default,
                Vec::new(),
                format!("{default}: the template default ({message})"),
            )),
            None => Err(invalid_containers(message)),
        },
    }
}

/// The template's `Ready=False` condition when the template controller found it invalid (not
/// when it is only in use).
fn invalid_condition(
    template: &Ec2PodTemplate,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    template
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason != "InUse")
}

/// A template whose image does not fit the pool's `os`/`arch` (an x86_64 image for an arm64
/// pool, a Linux image for a darwin pool): its instances would not be what the nodes claim.
fn architecture_mismatch(template: &Ec2PodTemplate, pool: &Ec2NodePoolSpec) -> Option<InvalidSetting> {
    let image_arch = template.status.as_ref()?.architecture.as_deref()?;
    let (cpu, mac) = match image_arch.strip_suffix("_mac") {
        Some(cpu) => (cpu, true),
        None => (image_arch, false),
    };
    let darwin = pool.os.as_str() == "darwin";
    if cpu == pool.arch.ec2_name() && mac == darwin {
        return None;
    }
    Some(InvalidSetting {
        field: annotations::TEMPLATE.into(),
        message: format!(
            "Ec2PodTemplate {}/{} launches {image_arch} images, but the pool's nodes are {}/{}: use a template whose image matches the pool's os and arch",
            template.namespace().unwrap_or_default(),
            template.name_any(),
            pool.os.as_str(),
            pool.arch.as_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Architecture;
    use serde_json::json;

    fn pool(arch: &str) -> Ec2NodePoolSpec {
        serde_json::from_value(
            json!({"nodes": 1, "subnetIds": ["subnet-a"], "securityGroupIds": ["sg-pool"],
            "arch": arch, "templateRef": {"namespace": "infra", "name": "gpu"}}),
        )
        .unwrap()
    }

    fn template(status: serde_json::Value) -> Template {
        let template: Ec2PodTemplate = serde_json::from_value(json!({
            "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2PodTemplate",
            "metadata": {"name": "gpu", "namespace": "infra"},
            "spec": {"imageSelector": {"owners": ["amazon"], "name": "al2023-*"},
                "instanceTypes": ["t3.micro", "t3.large", "t3.xlarge"], "instanceType": "t3.micro"},
            "status": status,
        }))
        .unwrap();
        Template::Found(Box::new(template))
    }

    fn pod(annotations: serde_json::Value, cpu: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "apps", "uid": "u1", "annotations": annotations},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "2Gi"}}}]},
        }))
        .unwrap()
    }

    fn info(name: &str, vcpus: u32, memory_mib: u64) -> InstanceTypeInfo {
        InstanceTypeInfo {
            name: name.into(),
            vcpus,
            memory_mib,
            gpus: 0,
            architectures: vec!["x86_64".into()],
        }
    }

    fn offered() -> Vec<InstanceTypeInfo> {
        vec![
            info("t3.xlarge", 4, 16384),
            info("t3.micro", 2, 1024),
            info("t3.large", 2, 8192),
        ]
    }

    fn settings(annotations: serde_json::Value) -> LaunchSettings {
        let resolved = json!({"resolvedImageId": "ami-0123456789abcdef0", "architecture": "x86_64"});
        settings_for(
            &pool("amd64"),
            "subnet-a",
            &pod(annotations, "1"),
            &template(resolved),
        )
        .unwrap()
    }

    #[test]
    fn the_template_must_exist_be_valid_and_match_the_pools_os_and_arch() {
        let p = pod(json!({}), "1");
        let missing = Template::Missing("infra".into(), "gpu".into());
        let error = settings_for(&pool("amd64"), "subnet-a", &p, &missing).unwrap_err();
        assert_eq!(
            (error.field.as_str(), error.message.as_str()),
            (annotations::TEMPLATE, "Ec2PodTemplate infra/gpu not found")
        );
        let invalid = template(
            json!({"conditions": [{"type": "Ready", "status": "False", "reason": "ImageNotFound",
            "message": "no image matches", "lastTransitionTime": "2026-11-30T12:00:00Z"}]}),
        );
        let error = settings_for(&pool("amd64"), "subnet-a", &p, &invalid).unwrap_err();
        assert_eq!(
            error.message,
            "Ec2PodTemplate infra/gpu is invalid (ImageNotFound): no image matches"
        );
        let arm = template(json!({"resolvedImageId": "ami-0123456789abcdef0", "architecture": "arm64"}));
        let error = settings_for(&pool("amd64"), "subnet-a", &p, &arm).unwrap_err();
        assert!(
            error
                .message
                .contains("launches arm64 images, but the pool's nodes are linux/amd64"),
            "{}",
            error.message
        );
        // Found and valid: the template's resolved image, the node's subnet.
        let found = settings(json!({}));
        assert_eq!(
            (found.image_id.as_str(), found.subnet_id.as_str()),
            ("ami-0123456789abcdef0", "subnet-a")
        );
        assert_eq!(types_to_describe(&found), ["t3.micro", "t3.large", "t3.xlarge"]);
    }

    #[test]
    fn a_requested_type_must_be_offered() {
        let requested = settings(json!({annotations::INSTANCE_TYPE: "t3.large"}));
        assert_eq!(types_to_describe(&requested), ["t3.large"]);
        let choice = choose_type(&requested, &pod(json!({}), "1"), &offered(), Architecture::Amd64).unwrap();
        assert_eq!(choice.instance_type, "t3.large");
        assert!(choice.fallbacks.is_empty());
        assert_eq!(
            choice.why,
            "t3.large: set by the ec2-kubelet.io/instance-type annotation"
        );
        let error = choose_type(&requested, &pod(json!({}), "1"), &[], Architecture::Amd64).unwrap_err();
        assert_eq!(error.message, "t3.large is not offered by EC2 in this region");
    }

    #[test]
    fn sizing_picks_the_smallest_fit_falls_back_to_larger_ones_then_to_the_default() {
        let allowed = settings(json!({}));
        let choice = choose_type(&allowed, &pod(json!({}), "1"), &offered(), Architecture::Amd64).unwrap();
        assert_eq!(choice.instance_type, "t3.large", "{}", choice.why);
        assert_eq!(choice.fallbacks, ["t3.xlarge"]);
        assert!(
            choice.why.starts_with("t3.large: the smallest allowed type with"),
            "{}",
            choice.why
        );
        // Nothing fits 8 CPUs: the template's default, saying why.
        let choice = choose_type(&allowed, &pod(json!({}), "8"), &offered(), Architecture::Amd64).unwrap();
        assert_eq!(choice.instance_type, "t3.micro");
        assert!(
            choice
                .why
                .starts_with("t3.micro: the template default (no allowed instance type"),
            "{}",
            choice.why
        );
        let no_default = LaunchSettings {
            default_type: None,
            ..allowed.clone()
        };
        let error =
            choose_type(&no_default, &pod(json!({}), "8"), &offered(), Architecture::Amd64).unwrap_err();
        assert_eq!(error.field, "spec.containers");
        let error = choose_type(
            &no_default,
            &pod(json!({}), "lots"),
            &offered(),
            Architecture::Amd64,
        )
        .unwrap_err();
        assert_eq!(error.field, "spec.containers");
        // No list: the default, or nothing to launch.
        let only_default = LaunchSettings {
            allowed_types: Vec::new(),
            ..allowed.clone()
        };
        assert!(types_to_describe(&only_default).is_empty());
        let choice = choose_type(&only_default, &pod(json!({}), "1"), &[], Architecture::Amd64).unwrap();
        assert_eq!(
            (choice.instance_type.as_str(), choice.why.as_str()),
            ("t3.micro", "t3.micro: the template default")
        );
        let nothing = LaunchSettings {
            default_type: None,
            ..only_default
        };
        let error = choose_type(&nothing, &pod(json!({}), "1"), &[], Architecture::Amd64).unwrap_err();
        assert_eq!(error.field, annotations::INSTANCE_TYPE);
    }
}
