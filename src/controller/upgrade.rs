//! The upgrade from an operator that kept its bindings in the pool's status.
//!
//! Before `Ec2Instance` records, a pool's `status.bindings` mapped node -> pod UID -> instance,
//! and `status.warm` listed the warm instances. The pool controller turns each into a record
//! (named as this version would have named it: the pod's UID, `warm-<pool>-<instance id>`),
//! then clears both maps. Nothing is launched or terminated: the pod workers find their
//! instances through the records and tags as after any restart. Creating a record that
//! exists is a no-op, so an upgrade cut short is finished by the next reconcile.

use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::{BindingPhase, Ec2InstanceSpec, Ec2NodePool, PodBinding, PodRef, WarmInstance, WarmState};
use crate::events::EventType;
use crate::runtime::{Context, Result, records};

/// The record name of a warm instance recorded in the status by an older operator.
pub fn warm_record_name(pool: &str, instance_id: &str) -> String {
    let mut pool = pool.to_string();
    pool.truncate(253 - "warm--".len() - instance_id.len());
    format!("warm-{}-{instance_id}", pool.trim_end_matches(['.', '-']))
}

fn time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Value {
    json!(t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// The record (spec, status) of a pod's binding.
fn of_binding(
    pool: &Ec2NodePool,
    node: &str,
    uid: &str,
    binding: &PodBinding,
) -> (Ec2InstanceSpec, Option<Value>) {
    let spec = Ec2InstanceSpec {
        pool: pool.name_any(),
        node: node.to_string(),
        pod: Some(PodRef {
            namespace: binding.namespace.clone(),
            name: binding.name.clone(),
            uid: uid.to_string(),
        }),
        instance_type: binding.instance_type.clone().unwrap_or_default(),
        agent_port: pool.spec.agent.port,
        ..Default::default()
    };
    let status = binding.instance_id.as_ref().map(|id| {
        let phase = match binding.phase {
            BindingPhase::Running => "Running",
            _ => "Booting",
        };
        let mut status = json!({"phase": phase, "instanceId": id,
            "instanceType": binding.instance_type, "privateIp": binding.private_ip});
        if let Some(t) = &binding.launch_time {
            status["launchTime"] = time(t);
        }
        status
    });
    (spec, status)
}

/// The record (spec, status) of a warm instance.
fn of_warm(pool: &Ec2NodePool, id: &str, warm: &WarmInstance) -> (Ec2InstanceSpec, Value) {
    let spec = Ec2InstanceSpec {
        pool: pool.name_any(),
        instance_type: warm.instance_type.clone(),
        image_id: warm.image_id.clone(),
        subnet_id: warm.subnet_id.clone(),
        security_group_ids: warm.security_group_ids.clone(),
        iam_instance_profile: warm.iam_instance_profile.clone(),
        agent_port: warm.agent_port,
        ..Default::default()
    };
    let phase = match warm.state {
        WarmState::Ready => "Ready",
        WarmState::Launching => "Booting",
    };
    let mut status = json!({"phase": phase, "instanceId": id, "instanceType": warm.instance_type,
        "privateIp": warm.private_ip, "launchTime": time(&warm.launch_time)});
    if let Some(t) = &warm.ready_time {
        status["readyTime"] = time(t);
    }
    (spec, status)
}

async fn write(
    ctx: &Context,
    name: &str,
    spec: Ec2InstanceSpec,
    status: Option<Value>,
    pool_uid: &str,
) -> Result<()> {
    let writes = &ctx.metrics.record_writes;
    let record = records::new_record(name, spec, pool_uid);
    let created = records::create(&ctx.client, &record, writes).await?;
    // A record made by an earlier, interrupted upgrade (or by a pod worker since) keeps the
    // status it has.
    if let (true, Some(status)) = (created, status) {
        records::set_status(&ctx.client, name, status, writes).await?;
    }
    Ok(())
}

/// Moves the pool's status bindings and warm instances into records, then clears them.
/// Returns how many of each it moved.
pub async fn move_bindings(ctx: &Context, pool: &Ec2NodePool) -> Result<Option<(usize, usize)>> {
    let Some(status) = &pool.status else {
        return Ok(None);
    };
    if status.bindings.is_empty() && status.warm.is_empty() {
        return Ok(None);
    }
    let pool_uid = pool.uid().unwrap_or_default();
    let mut bindings = 0;
    for (node, pods) in &status.bindings {
        for (uid, binding) in pods {
            let (spec, record_status) = of_binding(pool, node, uid, binding);
            write(ctx, uid, spec, record_status, &pool_uid).await?;
            bindings += 1;
        }
    }
    for (id, warm) in &status.warm {
        let (spec, record_status) = of_warm(pool, id, warm);
        write(
            ctx,
            &warm_record_name(&pool.name_any(), id),
            spec,
            Some(record_status),
            &pool_uid,
        )
        .await?;
    }
    let clear = json!({"status": {"bindings": null, "warm": null}});
    let pools: kube::Api<Ec2NodePool> = kube::Api::all(ctx.client.clone());
    pools
        .patch_status(
            &pool.name_any(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&clear),
        )
        .await?;
    let moved = (bindings, status.warm.len());
    let note = format!(
        "moved {} pod binding(s) and {} warm instance(s) from the pool's status into Ec2Instance records",
        moved.0, moved.1
    );
    tracing::info!(pool = %pool.name_any(), %note);
    ctx.events
        .publish(
            &pool.object_ref(&()),
            EventType::Normal,
            "MovedToRecords",
            note,
            "Upgrade",
        )
        .await;
    Ok(Some(moved))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_becomes_a_record_of_its_pod_and_instance() {
        let mut pool = Ec2NodePool::new("gpu", crate::crd::Ec2NodePoolSpec::minimal());
        pool.spec.agent.port = 9000;
        let binding = PodBinding {
            namespace: "default".into(),
            name: "web".into(),
            instance_id: Some("i-0abc".into()),
            instance_type: Some("t3.micro".into()),
            private_ip: Some("10.0.0.7".into()),
            phase: BindingPhase::Running,
            launch_time: None,
        };
        let (spec, status) = of_binding(&pool, "ip-10-0-0-1.gpu", "uid-1", &binding);
        assert_eq!(spec.pod.as_ref().unwrap().uid, "uid-1");
        assert_eq!((spec.node.as_str(), spec.agent_port), ("ip-10-0-0-1.gpu", 9000));
        let status = status.expect("an instance to record");
        assert_eq!(
            (status["phase"].as_str(), status["instanceId"].as_str()),
            (Some("Running"), Some("i-0abc"))
        );
        let launching = PodBinding {
            instance_id: None,
            phase: BindingPhase::Launching,
            ..binding
        };
        assert!(
            of_binding(&pool, "n", "uid-2", &launching).1.is_none(),
            "nothing launched yet"
        );
        let name = warm_record_name("gpu", "i-0123456789abcdef0");
        assert_eq!(name, "warm-gpu-i-0123456789abcdef0");
    }
}
