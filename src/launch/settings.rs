//! Launch settings of a pod's instance: pool defaults < `Ec2PodTemplate` < pod annotations.
//! Every annotation is checked here; a bad one names itself and the fix, so only that pod fails
//! (`InvalidLaunchSettings`).

use std::collections::BTreeMap;

use regex::Regex;

use crate::cloud::LaunchRequest;
use crate::crd::{Ec2NodePoolSpec, Ec2PodTemplateSpec, TagMap, annotations};

/// Where a pod's template comes from: its `ec2-kubelet.io/template` annotation (`name` in the
/// pod's namespace, or `namespace/name`), else the pool's `templateRef`. An annotation that is
/// not a namespace and object name is invalid.
pub fn template_ref(
    pod_namespace: &str,
    pod_annotations: &BTreeMap<String, String>,
    pool: &Ec2NodePoolSpec,
) -> Result<Option<(String, String)>, InvalidSetting> {
    if let Some(value) = pod_annotations
        .get(annotations::TEMPLATE)
        .filter(|v| !v.is_empty())
    {
        let (namespace, name) = match value.split_once('/') {
            Some((namespace, name)) => (namespace, name),
            None => (pod_namespace, value.as_str()),
        };
        if !crate::crd::is_dns_label(namespace) || !crate::crd::is_dns_subdomain(name) {
            return Err(invalid(
                annotations::TEMPLATE,
                format!(
                    "{value:?} is not a template name: use name (in the pod's namespace) or namespace/name"
                ),
            ));
        }
        return Ok(Some((namespace.to_string(), name.to_string())));
    }
    Ok(pool
        .template_ref
        .as_ref()
        .map(|r| (r.namespace.clone(), r.name.clone())))
}

/// A launch setting that cannot be used: the annotation (or template field) and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSetting {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Everything that decides a pod's instance except its final type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaunchSettings {
    pub image_id: String,
    /// The type the pod's annotation asks for; `None` lets sizing choose among `allowed_types`.
    pub requested_type: Option<String>,
    /// Types the pod may get (the template's list; empty means any).
    pub allowed_types: Vec<String>,
    /// The template's default type, when sizing cannot decide.
    pub default_type: Option<String>,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    pub user_data: Option<String>,
    pub key_name: Option<String>,
    pub tags: TagMap,
    pub spot: bool,
    pub agent_port: u16,
}

impl LaunchSettings {
    /// The launch request of these settings as `instance_type`, with the agent port also in a
    /// tag (how the operator finds the agent again) and how the agent enrolls (`None`: agent
    /// TLS is disabled); whose instance it is (pod UID, pool, node, name) is the caller's to
    /// fill in.
    pub fn into_request(
        self,
        instance_type: String,
        enrollment: Option<crate::cloud::Enrollment>,
    ) -> LaunchRequest {
        let mut tags = self.tags;
        tags.insert(crate::crd::tags::AGENT_PORT.into(), self.agent_port.to_string());
        LaunchRequest {
            instance_type,
            image_id: self.image_id,
            subnet_id: self.subnet_id,
            security_group_ids: self.security_group_ids,
            iam_instance_profile: self.iam_instance_profile,
            user_data: self.user_data,
            key_name: self.key_name,
            spot: self.spot,
            agent_port: self.agent_port,
            tags,
            enrollment,
            ..LaunchRequest::default()
        }
    }
}

const MAX_USER_DATA: usize = 16 * 1024;

fn check(field: &str, value: &str, pattern: &str, example: &str) -> Result<String, InvalidSetting> {
    let value = value.trim();
    let ok = Regex::new(pattern).map(|re| re.is_match(value)).unwrap_or(false);
    if ok {
        Ok(value.to_string())
    } else {
        Err(invalid(
            field,
            format!("{value:?} is not valid: expected something like {example}"),
        ))
    }
}

/// `k=v,k2=v2` pod tags; the operator's own prefixes are refused.
fn parse_tags(value: &str) -> Result<TagMap, InvalidSetting> {
    let mut tags = TagMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, tag_value) = pair.split_once('=').ok_or_else(|| {
            invalid(
                annotations::TAGS,
                format!("{pair:?} is not key=value (e.g. team=ml,cost-center=42)"),
            )
        })?;
        let key = key.trim();
        if key.is_empty() || key.len() > 128 || tag_value.len() > 256 {
            return Err(invalid(
                annotations::TAGS,
                format!("{pair:?}: keys are 1-128 characters, values at most 256"),
            ));
        }
        if key.starts_with("ec2-kubelet.io/") || key.starts_with("aws:") {
            return Err(invalid(
                annotations::TAGS,
                format!("{key:?}: tag keys starting with ec2-kubelet.io/ or aws: are reserved"),
            ));
        }
        tags.insert(key.to_string(), tag_value.trim().to_string());
    }
    Ok(tags)
}

/// A stable choice among `options` for this pod (spreads pods over a template's subnets).
fn pick<'a>(options: &'a [String], pod_uid: &str) -> Option<&'a String> {
    if options.is_empty() {
        return None;
    }
    let hash = pod_uid
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    options.get((hash % options.len() as u64) as usize)
}

/// Merges pool < template < annotations. `node_subnet` is the subnet of the pod's node ENI,
/// the default when neither the template nor the pod names one.
pub fn resolve(
    pool: &Ec2NodePoolSpec,
    template: Option<&Ec2PodTemplateSpec>,
    template_image: Option<&str>,
    pod_annotations: &BTreeMap<String, String>,
    pod_uid: &str,
    node_subnet: &str,
) -> Result<LaunchSettings, InvalidSetting> {
    let empty = Ec2PodTemplateSpec::default();
    let template = template.unwrap_or(&empty);
    let annotation = |key: &str| {
        pod_annotations
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    };

    let image_id = match annotation(annotations::IMAGE_ID) {
        Some(value) => check(annotations::IMAGE_ID, value, r"^ami-[0-9a-f]{8,17}$", "ami-0abcdef1234567890")?,
        None => template
            .image_id
            .clone()
            .or_else(|| template_image.map(String::from))
            .ok_or_else(|| {
                invalid(
                    annotations::IMAGE_ID,
                    "no image: set the annotation, or a template (ec2-kubelet.io/template or the pool's templateRef) with imageId or a resolved imageSelector",
                )
            })?,
    };
    let requested_type = match annotation(annotations::INSTANCE_TYPE) {
        Some(value) => {
            let value = check(
                annotations::INSTANCE_TYPE,
                value,
                r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$",
                "m5.large",
            )?;
            if !template.instance_types.is_empty() && !template.instance_types.contains(&value) {
                return Err(invalid(
                    annotations::INSTANCE_TYPE,
                    format!(
                        "{value} is not allowed by the template: choose one of {}",
                        template.instance_types.join(", ")
                    ),
                ));
            }
            Some(value)
        }
        None => None,
    };
    let subnet_id = match annotation(annotations::SUBNET_ID) {
        Some(value) => check(
            annotations::SUBNET_ID,
            value,
            r"^subnet-[0-9a-f]{1,17}$",
            "subnet-0abc1234",
        )?,
        None => pick(&template.subnet_ids, pod_uid)
            .cloned()
            .unwrap_or_else(|| node_subnet.to_string()),
    };
    let security_group_ids = match annotation(annotations::SECURITY_GROUPS) {
        Some(value) => value
            .split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(|g| {
                check(
                    annotations::SECURITY_GROUPS,
                    g,
                    r"^sg-[0-9a-f]{1,17}$",
                    "sg-0abc1234,sg-0def5678",
                )
            })
            .collect::<Result<Vec<_>, _>>()?,
        None if !template.security_group_ids.is_empty() => template.security_group_ids.clone(),
        None => pool.security_group_ids.clone(),
    };
    let iam_instance_profile = match annotation(annotations::IAM_INSTANCE_PROFILE) {
        Some(value) => Some(check(
            annotations::IAM_INSTANCE_PROFILE,
            value,
            r"^([\w+=,.@-]{1,128}|arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[\w+=,.@/-]+)$",
            "my-profile or arn:aws:iam::123456789012:instance-profile/my-profile",
        )?),
        None => template.iam_instance_profile.clone(),
    };
    let user_data = match pod_annotations.get(annotations::USER_DATA) {
        Some(value) if value.len() > MAX_USER_DATA => {
            return Err(invalid(
                annotations::USER_DATA,
                format!("{} bytes is more than the 16 KiB EC2 accepts", value.len()),
            ));
        }
        Some(value) => Some(value.clone()),
        None => template.user_data.clone(),
    };
    let mut tags = pool.tags.clone();
    tags.extend(template.tags.clone());
    if let Some(value) = pod_annotations.get(annotations::TAGS) {
        tags.extend(parse_tags(value)?);
    }
    let spot = match annotation(annotations::SPOT) {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(invalid(
                annotations::SPOT,
                format!("{other:?} is not a boolean: use true or false"),
            ));
        }
        None => template.spot,
    };
    let agent_port = template.agent_port.unwrap_or(pool.agent.port);
    Ok(LaunchSettings {
        image_id,
        requested_type,
        allowed_types: template.instance_types.clone(),
        default_type: template.instance_type.clone(),
        subnet_id,
        security_group_ids,
        iam_instance_profile,
        user_data,
        key_name: template.key_name.clone(),
        tags,
        spot,
        agent_port: u16::try_from(agent_port).unwrap_or(8484),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool() -> Ec2NodePoolSpec {
        serde_json::from_value(
            json!({"nodes": 1, "subnetIds": ["subnet-a"], "securityGroupIds": ["sg-pool"],
            "tags": {"team": "platform"}, "templateRef": {"namespace": "infra", "name": "general"}}),
        )
        .unwrap()
    }

    fn template() -> Ec2PodTemplateSpec {
        serde_json::from_value(
            json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro", "t3.medium"],
            "instanceType": "t3.micro", "securityGroupIds": ["sg-tmpl"], "tags": {"team": "ml", "env": "dev"},
            "agentPort": 9000}),
        )
        .unwrap()
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn templates_come_from_the_annotation_or_the_pool() {
        let pool = pool();
        assert_eq!(
            template_ref("apps", &annotations(&[]), &pool),
            Ok(Some(("infra".into(), "general".into())))
        );
        let named = annotations(&[(annotations::TEMPLATE, "gpu")]);
        assert_eq!(
            template_ref("apps", &named, &pool),
            Ok(Some(("apps".into(), "gpu".into())))
        );
        let qualified = annotations(&[(annotations::TEMPLATE, "shared/gpu")]);
        assert_eq!(
            template_ref("apps", &qualified, &pool),
            Ok(Some(("shared".into(), "gpu".into())))
        );
        for bad in ["a/b/c", "GPU", "/gpu", "shared/", "../gpu", "gpu?watch=true"] {
            let error =
                template_ref("apps", &annotations(&[(annotations::TEMPLATE, bad)]), &pool).unwrap_err();
            assert!(
                error.to_string().starts_with("ec2-kubelet.io/template: ")
                    && error.message.contains("namespace/name"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn pool_then_template_then_annotations() {
        let defaults = resolve(
            &pool(),
            Some(&template()),
            None,
            &annotations(&[]),
            "uid",
            "subnet-a",
        )
        .unwrap();
        assert_eq!(defaults.image_id, "ami-0123456789abcdef0");
        assert_eq!(defaults.security_group_ids, ["sg-tmpl"]);
        assert_eq!(
            defaults.subnet_id, "subnet-a",
            "the node's subnet when the template has none"
        );
        assert_eq!(defaults.tags["team"], "ml");
        assert_eq!(defaults.tags["env"], "dev");
        assert_eq!(defaults.agent_port, 9000);
        assert_eq!(defaults.requested_type, None);
        assert_eq!(defaults.default_type.as_deref(), Some("t3.micro"));

        let pod = annotations(&[
            (annotations::INSTANCE_TYPE, "t3.medium"),
            (annotations::SECURITY_GROUPS, "sg-01, sg-02"),
            (annotations::SUBNET_ID, "subnet-0b"),
            (annotations::TAGS, "team=web,owner=me"),
            (annotations::SPOT, "true"),
        ]);
        let overridden = resolve(&pool(), Some(&template()), None, &pod, "uid", "subnet-a").unwrap();
        assert_eq!(overridden.requested_type.as_deref(), Some("t3.medium"));
        assert_eq!(overridden.security_group_ids, ["sg-01", "sg-02"]);
        assert_eq!(overridden.subnet_id, "subnet-0b");
        assert_eq!(overridden.tags["team"], "web");
        assert_eq!(overridden.tags["owner"], "me");
        assert!(overridden.spot);

        let without_template = resolve(
            &pool(),
            None,
            None,
            &annotations(&[(annotations::IMAGE_ID, "ami-0123456789abcdef0")]),
            "u",
            "subnet-a",
        )
        .unwrap();
        assert_eq!(without_template.security_group_ids, ["sg-pool"]);
        assert_eq!(without_template.agent_port, 8484);
    }

    #[test]
    fn bad_annotations_name_themselves_and_the_fix() {
        let cases = [
            (
                annotations::INSTANCE_TYPE,
                "m5.xlarge",
                "ec2-kubelet.io/instance-type: m5.xlarge is not allowed by the template: choose one of t3.micro, t3.medium",
            ),
            (
                annotations::INSTANCE_TYPE,
                "huge",
                "ec2-kubelet.io/instance-type: \"huge\" is not valid: expected something like m5.large",
            ),
            (
                annotations::IMAGE_ID,
                "ubuntu",
                "ec2-kubelet.io/image-id: \"ubuntu\" is not valid",
            ),
            (
                annotations::SECURITY_GROUPS,
                "sg-01,default",
                "ec2-kubelet.io/security-groups: \"default\" is not valid",
            ),
            (annotations::TAGS, "ec2-kubelet.io/pool=x", "reserved"),
            (annotations::TAGS, "novalue", "is not key=value"),
            (
                annotations::SPOT,
                "yes",
                "ec2-kubelet.io/spot: \"yes\" is not a boolean",
            ),
            (
                annotations::SUBNET_ID,
                "subnet-XYZ",
                "ec2-kubelet.io/subnet-id: \"subnet-XYZ\" is not valid",
            ),
            (
                annotations::IAM_INSTANCE_PROFILE,
                "my profile",
                "ec2-kubelet.io/iam-instance-profile: \"my profile\" is not valid",
            ),
            (
                annotations::USER_DATA,
                &"#!/bin/sh\n".repeat(2000),
                "ec2-kubelet.io/user-data: 20000 bytes is more than the 16 KiB EC2 accepts",
            ),
        ];
        // Every annotation a user sets has a case here, but the template's, whose bad values
        // are in `templates_come_from_the_annotation_or_the_pool`.
        for key in annotations::USER_SET {
            assert!(
                key == annotations::TEMPLATE || cases.iter().any(|(k, _, _)| *k == key),
                "no bad-value case for {key}"
            );
        }
        for (key, value, expected) in cases {
            let error = resolve(
                &pool(),
                Some(&template()),
                None,
                &annotations(&[(key, value)]),
                "uid",
                "subnet-a",
            )
            .unwrap_err();
            assert!(error.to_string().contains(expected), "{key}={value}: {error}");
        }
        let no_image = resolve(&pool(), None, None, &annotations(&[]), "uid", "subnet-a").unwrap_err();
        assert!(
            no_image
                .to_string()
                .starts_with("ec2-kubelet.io/image-id: no image")
        );
    }
}
