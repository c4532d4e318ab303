//! The `Ec2Instance` records' finalizer: a record someone deletes (by hand, with its pool, by
//! the garbage collector) goes only after its instance is terminated. The pod workers and the
//! warm pools retire the records they are done with themselves, finalizer first, so this only
//! ever sees the records others delete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};

use crate::cloud::Instance;
use crate::crd::{Ec2Instance, INSTANCE_FINALIZER, tags};
use crate::events::EventType;
use crate::runtime::{Context, Result, records};

/// How often the records being deleted are looked for.
const EVERY: Duration = Duration::from_secs(1);

/// Whether an instance belongs to `record`: named by its status, or tagged with its name (or,
/// for an instance launched before records, with the pod UID it is named after).
pub fn belongs(instance: &Instance, record: &Ec2Instance) -> bool {
    let name = record.name_any();
    record.instance_id() == Some(instance.instance_id.as_str())
        || instance.tag(tags::RECORD) == Some(name.as_str())
        || (instance.tag(tags::RECORD).is_none() && instance.tag(tags::POD_UID) == Some(name.as_str()))
}

/// Terminates the live instances of `record` (through its pool's gate); the ids it terminated.
pub async fn terminate_instances_of(ctx: &Context, record: &Ec2Instance) -> Result<Vec<String>> {
    let pool = &record.spec.pool;
    let instances = ctx.pool_instances(pool, Instant::now()).await?;
    let ids: Vec<String> = instances
        .iter()
        .filter(|i| i.state.is_alive() && belongs(i, record))
        .map(|i| i.instance_id.clone())
        .collect();
    if !ids.is_empty() {
        ctx.gate
            .call(pool, || ctx.compute.terminate_instances(&ids))
            .await?;
    }
    Ok(ids)
}

/// Finishes the deletion of one record: its instance terminated, its finalizer removed.
async fn finalize(ctx: &Context, record: &Ec2Instance) -> Result<()> {
    let ids = terminate_instances_of(ctx, record).await?;
    records::retire(&ctx.client, &record.name_any(), &ctx.metrics.record_writes).await?;
    let name = record.name_any();
    if !ids.is_empty() {
        let note = format!("terminated {} for deleted record {name}", ids.join(", "));
        ctx.events
            .publish(
                &record.object_ref(&()),
                EventType::Normal,
                "InstanceTerminated",
                note,
                "Finalize",
            )
            .await;
    }
    tracing::info!(record = %name, instances = ?ids, "finalized a deleted Ec2Instance record");
    Ok(())
}

/// Finalizes every record being deleted, until the task is dropped (in the leader).
pub async fn run(ctx: Arc<Context>) {
    ctx.records.ready().await;
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let deleting: Vec<Arc<Ec2Instance>> = ctx
            .records
            .all()
            .into_iter()
            .filter(|r| {
                r.metadata.deletion_timestamp.is_some()
                    && r.finalizers().iter().any(|f| f == INSTANCE_FINALIZER)
            })
            .collect();
        for record in deleting {
            if let Err(error) = finalize(&ctx, &record).await {
                tracing::warn!(%error, record = %record.name_any(), "finalizing an Ec2Instance record");
            }
        }
    }
}
