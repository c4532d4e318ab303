//! The operator's controllers and what they share: the `Context` (client, compute, config,
//! event recorder, replica identity) and the crate-level `Error`.

pub mod backoff;
pub mod pool;
pub mod template;

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::events::{EventType, Recorder, Reporter};

use crate::cloud::Compute;
use crate::config::OperatorConfig;

/// Everything a reconcile or a node task needs.
pub struct Context {
    pub client: Client,
    pub compute: Arc<dyn Compute>,
    pub config: OperatorConfig,
    /// This replica's name in leases (`holderIdentity`).
    pub identity: String,
    pub recorder: Recorder,
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
        let reporter = Reporter {
            controller: "ec2-kubelet".into(),
            instance: Some(identity.to_string()),
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Context {
            recorder: Recorder::new(client.clone(), reporter),
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
    /// outage) through `recorder`, which folds repeats into one event with a count. A failed
    /// write is logged and otherwise ignored: events are best effort.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::debug!(%error, %reason, "recording an event");
        }
    }

    /// Records an event that happens once in its object's life (a pod's launch, its
    /// termination). The recorder keeps every event it published for six minutes to count
    /// repeats, and scans that cache on each publish: at thousands of pods that is megabytes
    /// and a quadratic scan for events that never repeat. Controllers' events, which do
    /// repeat, go through `recorder`.
    pub async fn publish_once(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let now = jiff::Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or("ec2-kubelet"),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(reason.to_string()),
            reason: Some(reason.to_string()),
            note: Some(note),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            reporting_controller: Some("ec2-kubelet".into()),
            reporting_instance: Some(self.identity.clone()),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..Default::default()
        };
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            tracing::debug!(%error, %reason, "recording an event");
        }
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
