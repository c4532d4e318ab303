//! The operator's controllers and what they share: the `Context` (client, compute, config,
//! event recorder, replica identity) and the crate-level `Error`.

pub mod backoff;
pub mod pool;
pub mod template;

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;

use crate::events::{EventType, Recorder};

use crate::cloud::Compute;
use crate::config::OperatorConfig;

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
    pub agents: crate::agent::client::Connections,
    /// Batched binding writes, one writer per pool.
    pub bindings: crate::pod::bindings::BindingWriters,
    /// Each pool's instances and ENIs, read in shared batches.
    pub instances: crate::cloud::snapshot::Snapshots<Vec<crate::cloud::Instance>>,
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
            bindings: Default::default(),
            instances: Default::default(),
            enis: Default::default(),
        }
    }

    /// The instances of `pool` as of a `DescribeInstances` that started at or after
    /// `not_before` (shared by every caller; through the pool's throttling gate).
    pub async fn pool_instances(
        &self,
        pool: &str,
        not_before: std::time::Instant,
    ) -> Result<Arc<Vec<crate::cloud::Instance>>> {
        let filter = crate::cloud::InstanceFilter::Pool(pool.to_string());
        let fetch = || self.gate.call(pool, || self.compute.describe_instances(&filter));
        Ok(self.instances.get(pool, not_before, fetch).await?)
    }

    /// Records an event that may repeat (a controller's finding, a launch retried through an
    /// outage): see [`crate::events::Recorder::publish`].
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        self.events.publish(regarding, type_, reason, note, action).await
    }

    /// Records an event that happens once in its object's life (a pod's launch, its
    /// termination): see [`crate::events::Recorder::publish_once`].
    pub async fn publish_once(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events.publish_once(regarding, type_, reason, note).await
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

/// What can go wrong in a controller, named for what a user sees in events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cloud: {0}")]
    Cloud(#[from] crate::cloud::Error),
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("agent: {0}")]
    Agent(String),
    #[error("{0}")]
    InUse(String),
    #[error("pool status: {0}")]
    Binding(String),
}

impl Error {
    /// A short name for event reasons and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Cloud(error) => error.reason(),
            Error::InvalidSpec { .. } => "InvalidSpec",
            Error::Finalizer(_) => "FinalizerError",
            Error::Agent(_) => "AgentUnreachable",
            Error::InUse(_) => "InUse",
            Error::Binding(_) => "BindingWriteFailed",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
