//! The operator's side of the agent API: clients that name the instance they mean to reach,
//! over connections shared per endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use ec2_kubelet_protocol::v1::agent_client::AgentClient;

/// The gRPC metadata key naming the instance a call is meant for. An agent serving several
/// (simulated) instances routes by it; the operator always sends it.
pub const INSTANCE_HEADER: &str = "x-ec2-kubelet-instance-id";

/// Adds the [`INSTANCE_HEADER`] to every call.
#[derive(Clone)]
pub struct InstanceHeader(AsciiMetadataValue);

impl tonic::service::Interceptor for InstanceHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(INSTANCE_HEADER, self.0.clone());
        Ok(request)
    }
}

/// The operator's side of the agent PKI, as connections and launches need it (implemented by
/// `enrollment::AgentTls`, which also serves enrollment).
pub trait AgentPki: Send + Sync {
    /// The client configuration that presents the operator's certificate and requires the
    /// agent's to name `instance_id`.
    fn client_config(&self, instance_id: &str) -> Result<tonic::transport::ClientTlsConfig, String>;
    /// What a new instance needs to enroll: a one-time bootstrap token and the CA.
    fn enrollment(&self) -> crate::cloud::Enrollment;
}

/// A client of one instance's agent.
pub type AgentChannel = AgentClient<InterceptedService<Channel, InstanceHeader>>;

/// A client of the agent of `instance_id` on `channel`.
pub fn for_instance(channel: Channel, instance_id: &str) -> AgentChannel {
    let value = instance_id
        .parse()
        .unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"));
    AgentClient::with_interceptor(channel, InstanceHeader(value))
}

/// Why no connection to an agent could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("agent TLS: {0}")]
    Tls(String),
}

/// Open HTTP/2 connections to agents, so every caller of one agent shares one connection
/// (calls are multiplexed on it). A connection that fails is forgotten and the next caller
/// dials again. With TLS, each connection presents the operator's certificate and requires
/// the agent's to name the instance dialled.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<String, Channel>>,
    tls: Option<Arc<dyn AgentPki>>,
}

impl Connections {
    /// Connections over mutual TLS.
    pub fn with_tls(tls: Arc<dyn AgentPki>) -> Connections {
        Connections {
            open: Default::default(),
            tls: Some(tls),
        }
    }

    /// The agent PKI, when agents are reached over mutual TLS.
    pub fn tls(&self) -> Option<&Arc<dyn AgentPki>> {
        self.tls.as_ref()
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, endpoint: &str, instance_id: &str) -> String {
        match self.tls {
            // One agent's certificate per connection.
            Some(_) => format!("{instance_id}@{endpoint}"),
            // Simulated agents share a server (routed by the instance header).
            None => endpoint.to_string(),
        }
    }

    /// The open connection to the agent of `instance_id` at `endpoint`, or a new one. HTTP/2
    /// keepalives every `probe` notice a peer that stops answering.
    pub async fn connect(
        &self,
        endpoint: &str,
        instance_id: &str,
        probe: Duration,
    ) -> Result<Channel, ConnectError> {
        let key = self.key(endpoint, instance_id);
        if let Some(channel) = self.open().get(&key) {
            return Ok(channel.clone());
        }
        let dial = match &self.tls {
            Some(tls) => Endpoint::from_shared(endpoint.replacen("http://", "https://", 1))?
                .tls_config(tls.client_config(instance_id).map_err(ConnectError::Tls)?)?,
            None => Endpoint::from_shared(endpoint.to_string())?,
        };
        let channel = dial
            .connect_timeout(probe.min(Duration::from_secs(2)))
            .timeout(probe.max(Duration::from_secs(5)))
            .http2_keep_alive_interval(probe)
            .keep_alive_timeout(probe)
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        Ok(self.open().entry(key).or_insert(channel).clone())
    }

    /// Drops the connection to the agent of `instance_id` at `endpoint` (it failed, or its
    /// instance is gone).
    pub fn forget(&self, endpoint: &str, instance_id: &str) {
        let key = self.key(endpoint, instance_id);
        self.open().remove(&key);
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connects to an agent (or reuses the open connection to it) and pings it. HTTP/2 keepalives
    /// on the connection notice an agent that stops answering (a frozen or vanished instance)
    /// within about `unreachable`, so a status stream never hangs on a dead peer.
    pub async fn ping(
        &self,
        endpoint: &str,
        instance_id: &str,
        unreachable: Duration,
    ) -> Option<AgentChannel> {
        let probe = (unreachable / 2).clamp(Duration::from_secs(1), Duration::from_secs(15));
        let answer = tokio::time::timeout(probe.min(Duration::from_secs(5)), async {
            let channel = self.connect(endpoint, instance_id, probe).await.ok()?;
            let mut agent = for_instance(channel, instance_id);
            agent.ping(ec2_kubelet_protocol::v1::PingRequest {}).await.ok()?;
            Some(agent)
        });
        let agent = answer.await.ok().flatten();
        if agent.is_none() {
            self.forget(endpoint, instance_id);
        }
        agent
    }
}
