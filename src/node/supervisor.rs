//! Starts one supervised node task per virtual node listed in the pools' status, in every
//! operator replica; the tasks' ownership leases decide which replica actually runs each node.
//! A task that fails is restarted with backoff; a node that leaves the status is stopped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

use crate::crd::Ec2NodePool;
use crate::runtime::Context;
use crate::runtime::VirtualNode;
use crate::task::{OwnedTask, stopped};

/// The virtual nodes a pool's status lists (none while the pool is being deleted).
pub fn desired_nodes(pool: &Ec2NodePool) -> Vec<VirtualNode> {
    if pool.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let name = pool.metadata.name.clone().unwrap_or_default();
    let uid = pool.metadata.uid.clone().unwrap_or_default();
    pool.status
        .as_ref()
        .map(|status| {
            status
                .nodes
                .iter()
                .filter(|(_, node)| !node.eni_id.is_empty() && !node.private_ip.is_empty())
                .map(|(node_name, node)| VirtualNode {
                    name: node_name.clone(),
                    pool: name.clone(),
                    pool_uid: uid.clone(),
                    index: node.index,
                    eni_id: node.eni_id.clone(),
                    private_ip: node.private_ip.clone(),
                    spec: pool.spec.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

struct Running {
    node: watch::Sender<VirtualNode>,
    task: OwnedTask,
}

/// Runs `node::run` until it returns cleanly or `stop` turns true, restarting it after errors
/// with exponential backoff (1 s to 30 s). A run that lasted longer than the longest backoff
/// starts the backoff over: old failures do not slow the recovery from a new one.
async fn supervise(ctx: Arc<Context>, node: watch::Receiver<VirtualNode>, mut stop: watch::Receiver<bool>) {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(30);
    let mut backoff = FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = super::run(ctx.clone(), node.clone(), stop.clone()).await;
        if started.elapsed() > LONGEST {
            backoff = FIRST;
        }
        match outcome {
            Ok(()) => return,
            Err(error) => {
                let name = node.borrow().name.clone();
                tracing::warn!(node = %name, %error, retry_in = ?backoff, "node task failed; restarting");
            }
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(LONGEST);
    }
}

#[derive(Default)]
struct Tasks {
    running: HashMap<String, Running>,
    /// Tasks told to stop that may still be releasing their node: a node's new task starts
    /// only once its old one has ended, so one replica never runs a node twice.
    stopping: HashMap<String, OwnedTask>,
}

impl Tasks {
    fn sync(&mut self, ctx: &Arc<Context>, pools: &[Arc<Ec2NodePool>]) {
        let desired: HashMap<String, VirtualNode> = pools
            .iter()
            .flat_map(|pool| desired_nodes(pool))
            .map(|node| (node.name.clone(), node))
            .collect();
        self.stopping.retain(|_, task| !task.is_finished());
        let ended: Vec<String> = self
            .running
            .iter()
            .filter(|(name, running)| !desired.contains_key(*name) || running.task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        for name in ended {
            if let Some(running) = self.running.remove(&name) {
                running.task.signal();
                self.stopping.insert(name, running.task);
            }
        }
        for (name, node) in desired {
            if self.stopping.contains_key(&name) {
                continue;
            }
            match self.running.get(&name) {
                Some(task) => {
                    task.node.send_if_modified(|current| {
                        let changed = *current != node;
                        if changed {
                            *current = node.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (node_tx, node_rx) = watch::channel(node);
                    let ctx = ctx.clone();
                    let task = OwnedTask::spawn(move |stop| supervise(ctx, node_rx, stop));
                    self.running.insert(name, Running { node: node_tx, task });
                }
            }
        }
    }

    async fn stop_all(&mut self) {
        for running in self.running.values() {
            running.task.signal();
        }
        let tasks = self.running.drain().map(|(_, running)| running.task);
        futures::future::join_all(
            tasks
                .chain(self.stopping.drain().map(|(_, task)| task))
                .map(OwnedTask::join),
        )
        .await;
    }
}

/// Keeps the node tasks of this replica in line with the pools until `stop` turns true, then
/// stops them (each releases its ownership lease).
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    // Pod workers read their pods' instances from the records: not before the first list.
    tokio::select! {
        _ = stopped(&mut stop) => return,
        _ = ctx.records.ready() => {}
    }
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let (reader, writer) = reflector::store();
    let events = reflector(writer, watcher(pools, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let mut events = std::pin::pin!(events);
    let mut tasks = Tasks::default();
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            event = events.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::warn!(%error, "watching pools"),
                None => break,
            },
            _ = resync.tick() => {}
        }
        tasks.sync(&ctx, &reader.state());
    }
    tasks.stop_all().await;
}
