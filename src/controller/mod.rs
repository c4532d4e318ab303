//! The operator's controllers and what they share: the `Context` (client, compute, config,
//! event recorder, replica identity) and the crate-level `Error`.

pub mod backoff;
pub mod pool;
pub mod template;

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

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
        }
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
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
