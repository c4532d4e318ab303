//! The `Ec2Instance` records' finalizer: a record someone deletes (by hand, with its pool, by
//! the garbage collector) goes only after its instance is terminated. The pod workers and the
//! warm pools retire the records they are done with themselves, finalizer first, so this only
//! ever sees the records others delete.

use std::sync::Arc;
use std::time::Duration;

use kube::{Resource, ResourceExt};

use crate::crd::{Ec2Instance, INSTANCE_FINALIZER};
use crate::events::EventType;
use crate::runtime::{Context, Result, records};

/// How often the records being deleted are looked for.
const EVERY: Duration = Duration::from_secs(1);

/// Finishes the deletion of one record: its instance terminated, its finalizer removed.
async fn finalize(ctx: &Context, record: &Ec2Instance) -> Result<()> {
    let ids = records::terminate_instances_of(ctx, record).await?;
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
