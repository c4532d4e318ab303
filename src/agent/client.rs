//! The operator's side of the agent API: clients that name the instance they mean to reach,
//! over connections shared per endpoint.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::proto::agent_client::AgentClient;

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

/// A client of one instance's agent.
pub type AgentChannel = AgentClient<InterceptedService<Channel, InstanceHeader>>;

/// A client of the agent of `instance_id` on `channel`.
pub fn for_instance(channel: Channel, instance_id: &str) -> AgentChannel {
    let value = instance_id
        .parse()
        .unwrap_or_else(|_| AsciiMetadataValue::from_static("invalid"));
    AgentClient::with_interceptor(channel, InstanceHeader(value))
}

/// Open HTTP/2 connections to agents by endpoint, so every caller of one agent shares one
/// connection (calls are multiplexed on it). A connection that fails is forgotten and the next
/// caller dials again.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<String, Channel>>,
}

impl Connections {
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection to `endpoint`, or a new one. HTTP/2 keepalives every `probe` notice
    /// a peer that stops answering.
    pub async fn connect(&self, endpoint: &str, probe: Duration) -> Result<Channel, tonic::transport::Error> {
        if let Some(channel) = self.open().get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(probe.min(Duration::from_secs(2)))
            .timeout(probe.max(Duration::from_secs(5)))
            .http2_keep_alive_interval(probe)
            .keep_alive_timeout(probe)
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        Ok(self.open().entry(endpoint.to_string()).or_insert(channel).clone())
    }

    /// Drops the connection to `endpoint` (it failed, or its instance is gone).
    pub fn forget(&self, endpoint: &str) {
        self.open().remove(endpoint);
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
