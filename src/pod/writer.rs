//! The pod status writes of one virtual node, coalesced: pod workers hand their status patches
//! to the node's writer, which waits a short window (20 ms by default), merges the patches of
//! each pod (later ones win) and sends one merge patch per changed pod. A pod whose state flaps
//! within the window costs one write, and a node with a thousand pods does not open a thousand
//! concurrent requests.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Concurrent writes per flush.
const PARALLEL_WRITES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PodKey {
    namespace: String,
    name: String,
}

/// A handle to a node's status writer; cheap to clone into every pod worker.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::UnboundedSender<(PodKey, Value)>,
}

impl StatusWriter {
    /// Starts the writer task of a node. It ends once every handle is dropped and what was
    /// queued is written.
    pub fn start(client: Client, window: Duration, writes: Counter) -> (StatusWriter, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = tokio::spawn(run(client, rx, window, writes));
        (StatusWriter { tx }, handle)
    }

    /// Queues a merge patch of the pod's `status` (the value of `status`, not the whole body).
    pub fn send(&self, pod: &Pod, status: Value) {
        let key = PodKey {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
        };
        let _ = self.tx.send((key, status));
    }
}

fn queue(pending: &mut Vec<(PodKey, Value)>, key: PodKey, patch: Value) {
    match pending.iter_mut().find(|(k, _)| *k == key) {
        Some((_, queued)) => json_patch::merge(queued, &patch),
        None => pending.push((key, patch)),
    }
}

async fn write(client: &Client, key: &PodKey, patch: &Value) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &key.namespace);
    match pods
        .patch_status(
            &key.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": patch})),
        )
        .await
    {
        Ok(_) => Ok(()),
        // The pod went away meanwhile: nothing left to write.
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        // A rejected patch will be rejected again: say so and drop it.
        Err(kube::Error::Api(status)) if status.code < 500 && !matches!(status.code, 409 | 429) => {
            tracing::error!(pod = %key.name, namespace = %key.namespace, message = %status.message, "pod status patch rejected");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

async fn run(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<(PodKey, Value)>,
    window: Duration,
    writes: Counter,
) {
    // Patches in arrival order of their pod, merged per pod.
    let mut pending: Vec<(PodKey, Value)> = Vec::new();
    let mut open = true;
    // After the last handle is gone, failed writes get a few more tries, not forever.
    let mut tries_after_close = 3;
    while open || (!pending.is_empty() && tries_after_close > 0) {
        if pending.is_empty() {
            match rx.recv().await {
                Some((key, patch)) => queue(&mut pending, key, patch),
                None => break,
            }
        }
        // Coalesce whatever else arrives within the window.
        let flush_at = tokio::time::Instant::now() + window;
        while open {
            tokio::select! {
                _ = tokio::time::sleep_until(flush_at) => break,
                message = rx.recv() => match message {
                    Some((key, patch)) => queue(&mut pending, key, patch),
                    None => open = false,
                },
            }
        }
        let batch = std::mem::take(&mut pending);
        let failed: HashMap<PodKey, Value> = futures::stream::iter(batch)
            .map(|(key, patch)| {
                let client = client.clone();
                writes.inc();
                async move {
                    match write(&client, &key, &patch).await {
                        Ok(()) => None,
                        Err(error) => {
                            tracing::warn!(%error, pod = %key.name, namespace = %key.namespace, "writing pod status; retrying");
                            Some((key, patch))
                        }
                    }
                }
            })
            .buffer_unordered(PARALLEL_WRITES)
            .filter_map(|failed| async move { failed })
            .collect()
            .await;
        if !failed.is_empty() {
            // Failed writes go first in the next batch; anything newer merges on top of them.
            pending.extend(failed);
            if !open {
                tries_after_close -= 1;
                tokio::time::sleep(window.max(Duration::from_millis(100))).await;
            }
        }
    }
}
