//! The template controller: checks every `Ec2PodTemplate` against EC2 (through the Compute
//! trait) on change and every `sync.templateResyncSeconds` (images get deregistered), and
//! writes what it found: `resolvedImageId` (the `imageId`, or the newest image matching
//! `imageSelector`), `availableInstanceTypes` (the listed types EC2 offers that match the
//! image's architecture), and `Ready` or `Invalid` with a reason naming the field. A finalizer
//! keeps a template while pods use it.

use std::sync::Arc;
use std::time::Duration;

use crate::events::EventType;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::cloud::ImageQuery;
use crate::crd::{
    ConditionStatus, Ec2NodePool, Ec2PodTemplate, Ec2PodTemplateSpec, annotations, set_condition,
};
use crate::runtime::{Context, Error, Result};

pub const FINALIZER: &str = "ec2-kubelet.io/template-in-use";

/// Why a template is not usable: the condition reason, the field and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Invalid {
    fn new(reason: &'static str, field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What the checks found for a valid template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub image_id: String,
    pub architecture: String,
    pub instance_types: Vec<String>,
}

/// Checks a template's image, subnets, security groups and instance types against the cloud.
pub async fn check(ctx: &Context, spec: &Ec2PodTemplateSpec) -> Result<Result<Checked, Invalid>> {
    let compute = &ctx.compute;
    let image = match (&spec.image_id, &spec.image_selector) {
        (Some(id), _) => {
            let found = compute
                .describe_images(&ImageQuery::Ids(vec![id.clone()]))
                .await?;
            match found.into_iter().next() {
                Some(image) => image,
                None => {
                    return Ok(Err(Invalid::new(
                        "ImageNotFound",
                        "spec.imageId",
                        format!(
                            "{id} does not exist or is not visible to this account: check the id and the region"
                        ),
                    )));
                }
            }
        }
        (None, Some(selector)) => {
            let query = ImageQuery::Selector {
                owners: selector.owners.clone(),
                name: selector.name.clone(),
                tags: selector.tags.clone(),
                architecture: selector.architecture.map(|a| a.ec2_name().to_string()),
            };
            match compute.describe_images(&query).await?.into_iter().next() {
                Some(newest) => newest,
                None => {
                    return Ok(Err(Invalid::new(
                        "ImageNotFound",
                        "spec.imageSelector",
                        "no available image matches the selector: check owners, name pattern, tags and architecture",
                    )));
                }
            }
        }
        (None, None) => {
            return Ok(Err(Invalid::new(
                "ImageNotFound",
                "spec.imageId",
                "set spec.imageId or spec.imageSelector",
            )));
        }
    };
    let subnets = compute.existing_subnets(&spec.subnet_ids).await?;
    if let Some((i, missing)) = spec
        .subnet_ids
        .iter()
        .enumerate()
        .find(|(_, s)| !subnets.contains(s))
    {
        return Ok(Err(Invalid::new(
            "SubnetNotFound",
            format!("spec.subnetIds[{i}]"),
            format!("subnet {missing} does not exist in this region"),
        )));
    }
    let groups = compute.existing_security_groups(&spec.security_group_ids).await?;
    if let Some((i, missing)) = spec
        .security_group_ids
        .iter()
        .enumerate()
        .find(|(_, g)| !groups.contains(g))
    {
        return Ok(Err(Invalid::new(
            "SecurityGroupNotFound",
            format!("spec.securityGroupIds[{i}]"),
            format!("security group {missing} does not exist in this region"),
        )));
    }
    let mut listed = spec.instance_types.clone();
    if let Some(default) = &spec.instance_type
        && !listed.contains(default)
    {
        listed.push(default.clone());
    }
    let offered = compute.instance_types(&listed).await?;
    if let Some((i, missing)) = listed
        .iter()
        .enumerate()
        .find(|(_, name)| !offered.iter().any(|o| &o.name == *name))
    {
        let field = if i < spec.instance_types.len() {
            format!("spec.instanceTypes[{i}]")
        } else {
            "spec.instanceType".into()
        };
        return Ok(Err(Invalid::new(
            "InstanceTypeNotOffered",
            field,
            format!("{missing} is not offered by EC2 in this region"),
        )));
    }
    let matching: Vec<String> = listed
        .iter()
        .filter(|name| {
            offered
                .iter()
                .any(|o| &o.name == *name && o.architectures.contains(&image.architecture))
        })
        .cloned()
        .collect();
    if matching.is_empty() && !listed.is_empty() {
        return Ok(Err(Invalid::new(
            "ArchitectureMismatch",
            "spec.instanceTypes",
            format!(
                "none of the instance types runs {} images like {}: choose types of that architecture or another image",
                image.architecture, image.image_id
            ),
        )));
    }
    Ok(Ok(Checked {
        image_id: image.image_id,
        architecture: image.architecture,
        instance_types: matching,
    }))
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

async fn publish(ctx: &Context, template: &Ec2PodTemplate, type_: EventType, reason: &str, note: String) {
    ctx.events
        .publish(&template.object_ref(&()), type_, reason, note, "Validate")
        .await;
}

fn api(ctx: &Context, template: &Ec2PodTemplate) -> Api<Ec2PodTemplate> {
    Api::namespaced(ctx.client.clone(), &template.namespace().unwrap_or_default())
}

async fn apply(template: &Ec2PodTemplate, ctx: &Context) -> Result<Action> {
    let generation = template.metadata.generation;
    let mut conditions = template
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let checked = check(ctx, &template.spec).await?;
    let (status, changed) = match &checked {
        Ok(checked) => {
            let message = format!(
                "image {} ({}), {} instance type(s) available",
                checked.image_id,
                checked.architecture,
                checked.instance_types.len()
            );
            let changed = set_condition(
                &mut conditions,
                "Ready",
                ConditionStatus::True,
                "Validated",
                &message,
                generation,
                now(),
            );
            (
                json!({"resolvedImageId": checked.image_id, "architecture": checked.architecture,
                    "availableInstanceTypes": checked.instance_types,
                    "conditions": conditions, "observedGeneration": generation}),
                changed,
            )
        }
        Err(invalid) => {
            let message = format!("{}: {}", invalid.field, invalid.message);
            let changed = set_condition(
                &mut conditions,
                "Ready",
                ConditionStatus::False,
                invalid.reason,
                &message,
                generation,
                now(),
            );
            (
                json!({"resolvedImageId": null, "architecture": null, "availableInstanceTypes": [],
                    "conditions": conditions, "observedGeneration": generation}),
                changed,
            )
        }
    };
    let previous = template.status.as_ref().map(|s| {
        (
            s.resolved_image_id.clone(),
            s.available_instance_types.clone(),
            s.observed_generation,
        )
    });
    let current = (
        status["resolvedImageId"].as_str().map(String::from),
        checked
            .as_ref()
            .map(|c| c.instance_types.clone())
            .unwrap_or_default(),
        generation,
    );
    if changed || previous.as_ref() != Some(&current) {
        api(ctx, template)
            .patch_status(
                &template.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await?;
        if let Err(invalid) = &checked {
            let note = format!("{}: {}", invalid.field, invalid.message);
            publish(ctx, template, EventType::Warning, invalid.reason, note).await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(
        ctx.config.sync.template_resync_seconds.into(),
    )))
}

/// The pods that use a template: named by their `ec2-kubelet.io/template` annotation, or bound
/// to a pool whose `templateRef` is the template.
pub async fn users(ctx: &Context, template: &Ec2PodTemplate) -> Result<Vec<String>> {
    ctx.records.ready().await;
    let namespace = template.namespace().unwrap_or_default();
    let name = template.name_any();
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let mut users = Vec::new();
    for pool in pools.list(&ListParams::default()).await?.items {
        let uses = pool
            .spec
            .template_ref
            .as_ref()
            .is_some_and(|t| t.namespace == namespace && t.name == name);
        if !uses {
            continue;
        }
        let pool_name = pool.name_any();
        users.extend(
            ctx.records
                .of_pool(&pool_name)
                .iter()
                .filter_map(|r| r.spec.pod.as_ref())
                .map(|p| format!("{}/{}", p.namespace, p.name)),
        );
    }
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    // Only annotations matter: the metadata list costs a fraction of a full one.
    for pod in pods.list_metadata(&ListParams::default()).await?.items {
        let pod_namespace = pod.namespace().unwrap_or_default();
        let named = pod.annotations().get(annotations::TEMPLATE).is_some_and(|value| {
            value == &format!("{namespace}/{name}") || (value == &name && pod_namespace == namespace)
        });
        if named && pod.metadata.deletion_timestamp.is_none() {
            users.push(format!("{pod_namespace}/{}", pod.name_any()));
        }
    }
    users.sort();
    users.dedup();
    Ok(users)
}

async fn cleanup(template: &Ec2PodTemplate, ctx: &Context) -> Result<Action> {
    let users = users(ctx, template).await?;
    if users.is_empty() {
        return Ok(Action::await_change());
    }
    let message = format!(
        "cannot be deleted while pods use it: {}; delete them (or move their pools to another template) first",
        users.join(", ")
    );
    let mut conditions = template
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if set_condition(
        &mut conditions,
        "Ready",
        ConditionStatus::False,
        "InUse",
        &message,
        template.metadata.generation,
        now(),
    ) {
        api(ctx, template)
            .patch_status(
                &template.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"conditions": conditions}})),
            )
            .await?;
        publish(ctx, template, EventType::Warning, "InUse", message.clone()).await;
    }
    Err(Error::InUse(message))
}

pub async fn reconcile(template: Arc<Ec2PodTemplate>, ctx: Arc<Context>) -> Result<Action> {
    let templates = api(&ctx, &template);
    finalizer::finalizer(&templates, FINALIZER, template, |event| async {
        match event {
            FinalizerEvent::Apply(template) => apply(&template, &ctx).await,
            FinalizerEvent::Cleanup(template) => cleanup(&template, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(template: Arc<Ec2PodTemplate>, error: &Error, ctx: Arc<Context>) -> Action {
    match error {
        Error::InUse(_) => Action::requeue(Duration::from_secs(5)),
        _ => {
            tracing::warn!(template = %template.name_any(), %error, reason = error.reason(), "template reconcile failed");
            let resync = Duration::from_secs(ctx.config.sync.template_resync_seconds.into());
            Action::requeue(crate::runtime::retry_after(error, resync))
        }
    }
}
