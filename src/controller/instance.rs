//! The `Ec2Instance` records' finalizer: a record someone deletes (by hand, with its pool, by
//! the garbage collector) goes only after its instance is terminated. The pod workers and the
//! warm pools retire the records they are done with themselves, finalizer first, so this only
//! ever sees the records others delete.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};

use crate::crd::{Ec2Instance, INSTANCE_FINALIZER};
use crate::events::EventType;
use crate::runtime::{Context, Result, records};

/// How often the records being deleted are looked for.
const EVERY: Duration = Duration::from_secs(1);

/// Finishes the deletion of the records of one pool: their instances terminated (one snapshot,
/// one call), then each record's finalizer removed.
async fn finalize(ctx: &Context, pool: &str, deleting: &[&Ec2Instance], not_before: Instant) -> Result<()> {
    let ids = records::terminate_instances_of(ctx, pool, deleting, not_before).await?;
    for record in deleting {
        records::retire(&ctx.client, &record.name_any(), &ctx.metrics.record_writes).await?;
        let terminated: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| record.instance_id() == Some(*id))
            .collect();
        let name = record.name_any();
        if !terminated.is_empty() {
            let note = format!("terminated {} for deleted record {name}", terminated.join(", "));
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
        tracing::info!(record = %name, "finalized a deleted Ec2Instance record");
    }
    Ok(())
}

/// Finalizes every record being deleted, until the task is dropped (in the leader).
pub async fn run(ctx: Arc<Context>) {
    ctx.records.ready().await;
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let tick = Instant::now();
        let mut by_pool: BTreeMap<String, Vec<Arc<Ec2Instance>>> = BTreeMap::new();
        for record in ctx.records.all() {
            let ours = record.finalizers().iter().any(|f| f == INSTANCE_FINALIZER);
            if record.metadata.deletion_timestamp.is_some() && ours {
                by_pool.entry(record.spec.pool.clone()).or_default().push(record);
            }
        }
        for (pool, deleting) in by_pool {
            let deleting: Vec<&Ec2Instance> = deleting.iter().map(|r| r.as_ref()).collect();
            if let Err(error) = finalize(&ctx, &pool, &deleting, tick).await {
                tracing::warn!(%error, %pool, "finalizing deleted Ec2Instance records");
            }
        }
    }
}
