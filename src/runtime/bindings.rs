//! The binding writes of one pool, batched: pod workers of every node of the pool hand their
//! binding changes to the pool's writer and wait until they are durable. The writer sends one
//! merge patch of the pool status with everything queued since its previous write, so an idle
//! pool writes at once and a busy one (a burst of pods) writes far less often than once per
//! change. Nothing is acknowledged before the API server has it: a binding is still written
//! before its instance is launched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::crd::Ec2NodePool;

struct Change {
    node: String,
    uid: String,
    binding: Option<Value>,
    done: oneshot::Sender<Result<(), BindingError>>,
}

/// Why a binding change did not become durable.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BindingError {
    /// The API server refused or failed the batch this change was in (shared by every change
    /// of the batch).
    #[error("writing {count} binding(s) of pool {pool}: {source}")]
    Write {
        pool: String,
        count: usize,
        #[source]
        source: Arc<kube::Error>,
    },
    #[error("the binding writer of pool {pool} stopped")]
    Stopped { pool: String },
}

impl BindingError {
    /// The API server's status code, when it answered.
    fn code(&self) -> Option<u16> {
        match self {
            BindingError::Write { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            BindingError::Stopped { .. } => None,
        }
    }

    /// The pool's status would be too large to store: a 413, or the 500 a real API server
    /// answers with etcd's own refusal ("etcdserver: request is too large", over 1.5 MiB) or
    /// its gRPC client's ("trying to send message larger than max", over 2 MiB).
    fn too_large(&self) -> bool {
        let BindingError::Write { source, .. } = self else {
            return false;
        };
        match source.as_ref() {
            kube::Error::Api(status) => {
                status.code == 413
                    || (status.code == 500
                        && (status.message.contains("request is too large")
                            || status.message.contains("message larger than max")))
            }
            _ => false,
        }
    }

    /// Worth another try soon: a conflict, throttling, a 5xx or no answer. A too large status
    /// or a 422 will not pass by retrying the same write.
    pub fn is_retryable(&self) -> bool {
        if self.too_large() {
            return false;
        }
        match self.code() {
            Some(code) => code == 409 || code == 429 || code >= 500,
            None => true,
        }
    }

    /// A short name for events and metrics labels.
    pub fn reason(&self) -> &'static str {
        if self.too_large() {
            return "BindingTooLarge";
        }
        match self.code() {
            Some(409) => "BindingConflict",
            Some(429) => "BindingThrottled",
            Some(code) if code < 500 => "BindingRefused",
            _ => "BindingWriteFailed",
        }
    }
}

/// The binding writer of one pool; cheap to clone.
#[derive(Clone)]
pub struct BindingWriter {
    pool: String,
    tx: mpsc::UnboundedSender<Change>,
}

impl BindingWriter {
    /// Starts the writer task of `pool`; it ends once every handle is dropped.
    pub fn start(client: Client, pool: String, writes: Counter) -> BindingWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, pool.clone(), rx, writes));
        BindingWriter { pool, tx }
    }

    /// Writes (or with `None`, removes) the binding of pod `uid` on `node`, merged into what
    /// is there; returns once the API server has it.
    pub async fn set(&self, node: &str, uid: &str, binding: Option<Value>) -> Result<(), BindingError> {
        let (done, written) = oneshot::channel();
        let change = Change {
            node: node.to_string(),
            uid: uid.to_string(),
            binding,
            done,
        };
        let stopped = || BindingError::Stopped {
            pool: self.pool.clone(),
        };
        self.tx.send(change).map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?
    }
}

/// One merge patch for a batch of changes (later changes to a pod merge over earlier ones).
fn merged(batch: &[Change]) -> Value {
    let mut nodes: Map<String, Value> = Map::new();
    for change in batch {
        let pods = nodes
            .entry(change.node.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let patch = change.binding.clone().unwrap_or(Value::Null);
        match pods.get_mut(&change.uid) {
            Some(queued) if queued.is_object() && patch.is_object() => json_patch::merge(queued, &patch),
            _ => {
                pods[&change.uid] = patch;
            }
        }
    }
    json!({"status": {"bindings": nodes}})
}

async fn run(client: Client, pool: String, mut rx: mpsc::UnboundedReceiver<Change>, writes: Counter) {
    let pools: Api<Ec2NodePool> = Api::all(client);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        writes.inc();
        let result = match pools
            .patch_status(&pool, &PatchParams::default(), &Patch::Merge(&merged(&batch)))
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => Err(BindingError::Write {
                pool: pool.clone(),
                count: batch.len(),
                source: Arc::new(error),
            }),
        };
        for change in batch {
            // A worker that stopped waiting needs no answer.
            let _ = change.done.send(result.clone());
        }
    }
}

/// The binding writers of every pool, started on first use.
#[derive(Default)]
pub struct BindingWriters {
    writers: Mutex<HashMap<String, BindingWriter>>,
}

impl BindingWriters {
    pub fn of(&self, client: &Client, pool: &str, writes: &Counter) -> BindingWriter {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers
            .entry(pool.to_string())
            .or_insert_with(|| BindingWriter::start(client.clone(), pool.to_string(), writes.clone()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(node: &str, uid: &str, binding: Option<Value>) -> Change {
        Change {
            node: node.into(),
            uid: uid.into(),
            binding,
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_is_one_merge_patch_keyed_by_node_and_uid() {
        let batch = [
            change("n1", "a", Some(json!({"phase": "Launching", "name": "a"}))),
            change("n2", "b", Some(json!({"phase": "Launching"}))),
            change("n1", "a", Some(json!({"phase": "Running"}))),
            change("n1", "c", None),
        ];
        assert_eq!(
            merged(&batch),
            json!({"status": {"bindings": {
                "n1": {"a": {"phase": "Running", "name": "a"}, "c": null},
                "n2": {"b": {"phase": "Launching"}},
            }}})
        );
        // A removal after a write removes; a write after a removal writes.
        let batch = [change("n1", "a", Some(json!({"x": 1}))), change("n1", "a", None)];
        assert_eq!(merged(&batch)["status"]["bindings"]["n1"]["a"], Value::Null);
        let batch = [change("n1", "a", None), change("n1", "a", Some(json!({"x": 1})))];
        assert_eq!(merged(&batch)["status"]["bindings"]["n1"]["a"], json!({"x": 1}));
    }

    fn refused(code: u16) -> BindingError {
        refused_with(code, "refused")
    }

    fn refused_with(code: u16, message: &str) -> BindingError {
        BindingError::Write {
            pool: "p".into(),
            count: 2,
            source: Arc::new(kube::Error::Api(
                kube::core::Status::failure(message, "").with_code(code).boxed(),
            )),
        }
    }

    #[test]
    fn etcds_size_refusals_through_a_real_api_server_are_too_large_not_retried() {
        // What kube-apiserver v1.34 answered to a merge patch of a 1.8 MB and a 2.4 MB status
        // (tests/fidelity.rs measures the first against the real control plane).
        for message in [
            "etcdserver: request is too large",
            "rpc error: code = ResourceExhausted desc = trying to send message larger than max (2210008 vs. 2097152)",
        ] {
            let error = refused_with(500, message);
            assert_eq!(
                (error.is_retryable(), error.reason()),
                (false, "BindingTooLarge"),
                "{message}"
            );
        }
        let other = refused_with(500, "etcdserver: leader changed");
        assert_eq!(
            (other.is_retryable(), other.reason()),
            (true, "BindingWriteFailed")
        );
    }

    #[test]
    fn a_conflict_a_too_large_status_and_a_server_error_are_told_apart() {
        let cases = [
            (409, true, "BindingConflict"),
            (413, false, "BindingTooLarge"),
            (422, false, "BindingRefused"),
            (429, true, "BindingThrottled"),
            (500, true, "BindingWriteFailed"),
            (503, true, "BindingWriteFailed"),
        ];
        for (code, retryable, reason) in cases {
            let error = refused(code);
            assert_eq!(
                (error.is_retryable(), error.reason()),
                (retryable, reason),
                "{code}"
            );
            let source = std::error::Error::source(&error).expect("the API error is kept");
            assert!(source.to_string().contains("refused"), "{code}: {source}");
        }
        let stopped = BindingError::Stopped { pool: "p".into() };
        assert!(stopped.is_retryable());
        assert_eq!(stopped.to_string(), "the binding writer of pool p stopped");
    }
}
