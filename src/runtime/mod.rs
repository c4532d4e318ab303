//! The runtime layer: what the controllers, node tasks, pod workers, warm pools, the kubelet
//! API and enrollment share, below all of them. The `Context` (client, compute, config, event
//! recorder, metrics, agent connections, replica identity), the `Error`, the retry gate and
//! backoff, leases, the `Ec2Instance` records and the virtual node a task runs.

pub mod backoff;
pub mod error;
pub mod lease;
pub mod records;
pub mod synced;
pub mod virtual_node;

use std::sync::Arc;

use kube::Client;

use crate::cloud::Compute;
use crate::config::OperatorConfig;
use crate::events::Recorder;

pub use error::{Error, Result, retry_after};
pub use virtual_node::{NODE_LEASE_NAMESPACE, VirtualNode, node_name};

/// How long a pool's instance snapshot is kept: as old as any caller takes one (a recorded
/// pod's check after a restart); older ones are dropped, not kept until the next fetch.
pub const SNAPSHOT_RETAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Everything a reconcile or a node task needs.
pub struct Context {
    pub client: Client,
    pub compute: Arc<dyn Compute>,
    pub config: OperatorConfig,
    /// This replica's name in leases (`holderIdentity`).
    pub identity: String,
    /// Events, as client-go records them (repeats of one message fold into a series).
    pub events: Recorder,
    /// Per-pool backoff shared by every pod worker (EC2 throttling).
    pub gate: backoff::CloudGate,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connections to agents, shared by every caller of one agent.
    pub agents: crate::agent_client::Connections,
    /// The `Ec2Instance` records, as this replica's watch sees them.
    pub records: records::Records,
    /// Each pool's instances and ENIs, read in shared batches.
    pub instances: crate::cloud::snapshot::Snapshots<crate::cloud::snapshot::PoolInstances>,
    pub enis: crate::cloud::snapshot::Snapshots<Vec<crate::cloud::Eni>>,
}

impl Context {
    pub fn new(client: Client, compute: Arc<dyn Compute>, config: OperatorConfig, identity: &str) -> Context {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Context {
            events: Recorder::new(client.clone(), "ec2-kubelet", identity),
            client,
            compute: Arc::new(crate::cloud::Metered::new(compute, metrics.clone())),
            config,
            identity: identity.to_string(),
            gate: backoff::CloudGate::default().counting(metrics.throttled.clone()),
            metrics,
            agents: Default::default(),
            records: Default::default(),
            instances: crate::cloud::snapshot::Snapshots::retaining(SNAPSHOT_RETAIN),
            enis: Default::default(),
        }
    }

    /// The instances of `pool` as of a `DescribeInstances` that started at or after
    /// `not_before` (shared by every caller; through the pool's throttling gate).
    pub async fn pool_instances(
        &self,
        pool: &str,
        not_before: std::time::Instant,
    ) -> Result<Arc<crate::cloud::snapshot::PoolInstances>> {
        let filter = crate::cloud::InstanceFilter::Pool(pool.to_string());
        let fetch = || async {
            let all = self
                .gate
                .call(pool, || self.compute.describe_instances(&filter))
                .await?;
            Ok::<_, crate::cloud::Error>(crate::cloud::snapshot::PoolInstances::new(all))
        };
        Ok(self.instances.get(pool, not_before, fetch).await?)
    }

    /// The ENIs of `pool` as of a `DescribeNetworkInterfaces` that started at or after
    /// `not_before` (shared by every caller).
    pub async fn pool_enis(
        &self,
        pool: &str,
        not_before: std::time::Instant,
    ) -> Result<Arc<Vec<crate::cloud::Eni>>> {
        let fetch = || self.compute.describe_enis(pool);
        Ok(self.enis.get(pool, not_before, fetch).await?)
    }

    /// The port of the kubelet API the operator serves for every virtual node.
    pub fn kubelet_port(&self) -> u16 {
        self.config
            .server
            .kubelet_address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(10250)
    }
}
