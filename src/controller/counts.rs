//! The pool's counts, kept fresh: pods per node and in all, and warm instances Ready and
//! booting, recounted from the stores the leader already keeps (pods' placements, the records,
//! the pools) when one of them changed, at most once a second, and written only when they
//! changed. The pool controller's reconcile (on spec, node readiness and resync) would leave
//! them stale for up to its resync interval; a recount every second would walk every pod of a
//! quiet cluster for nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::pool::PodPlacement;
use crate::crd::{Ec2NodePool, Ec2NodePoolStatus};
use crate::runtime::Context;
use crate::runtime::synced::Synced;

const EVERY: Duration = Duration::from_secs(1);

/// The status patch that brings `status`'s counts to `on_node` (pods per node name) and the
/// warm counts; `None` when they already say so.
pub fn patch(status: &Ec2NodePoolStatus, on_node: &HashMap<String, i32>, warm: (i32, i32)) -> Option<Value> {
    let mut nodes = Map::new();
    let mut total = 0;
    for (name, entry) in &status.nodes {
        let pods = on_node.get(name).copied().unwrap_or(0);
        total += pods;
        if entry.pods != pods {
            nodes.insert(name.clone(), json!({"pods": pods}));
        }
    }
    let (ready, booting) = warm;
    let same = nodes.is_empty()
        && total == status.pods
        && ready == status.warm_ready
        && booting == status.warm_launching;
    (!same).then(
        || json!({"status": {"pods": total, "nodes": nodes, "warmReady": ready, "warmLaunching": booting}}),
    )
}

/// Recounts every pool after a change, at most once a second, until the task is dropped (in
/// the leader). `touched` turns changed with every pod or pool event; the records have their
/// own.
pub async fn run(
    ctx: Arc<Context>,
    (pools, pools_synced): (Store<Ec2NodePool>, Synced),
    (pods, pods_synced): (Store<PodPlacement>, Synced),
    mut touched: watch::Receiver<u64>,
) {
    pools_synced.wait().await;
    pods_synced.wait().await;
    ctx.records.ready().await;
    let mut records = ctx.records.changes();
    let api: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let mut first = true;
    loop {
        if !first {
            // What changed during the last pass and this pause is seen here: a burst of
            // changes costs one pass a second.
            tokio::time::sleep(EVERY).await;
            let ended = tokio::select! {
                changed = touched.changed() => changed.is_err(),
                changed = records.changed() => changed.is_err(),
            };
            if ended {
                return;
            }
        }
        first = false;
        let mut on_node: HashMap<String, i32> = HashMap::new();
        for pod in pods.state() {
            if let Some(node) = &pod.node {
                *on_node.entry(node.clone()).or_default() += 1;
            }
        }
        for pool in pools.state() {
            if pool.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = pool.name_any();
            let status = pool.status.clone().unwrap_or_default();
            let Some(patch) = patch(&status, &on_node, crate::warm::counts(&ctx, &name)) else {
                continue;
            };
            if let Err(error) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(%error, pool = %name, "writing the pool's counts");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PoolNodeStatus;

    #[test]
    fn only_changed_counts_are_written() {
        let mut status = Ec2NodePoolStatus::default();
        for name in ["a", "b"] {
            status.nodes.insert(name.into(), PoolNodeStatus::default());
        }
        let on_node = HashMap::from([("a".to_string(), 3), ("elsewhere".to_string(), 9)]);
        let written = patch(&status, &on_node, (1, 0)).expect("counts changed");
        assert_eq!(
            written,
            json!({"status": {"pods": 3, "nodes": {"a": {"pods": 3}}, "warmReady": 1, "warmLaunching": 0}})
        );
        status.nodes.get_mut("a").unwrap().pods = 3;
        status.pods = 3;
        status.warm_ready = 1;
        assert_eq!(patch(&status, &on_node, (1, 0)), None, "nothing changed");
        assert!(patch(&status, &HashMap::new(), (1, 0)).is_some(), "the pods left");
    }
}
