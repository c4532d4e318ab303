//! The agent: the gRPC server on every instance that runs one pod's containers as supervised
//! processes (each under a shim that owns its logs), reports their state, streams logs and
//! runs exec sessions and port forwards. State lives in a directory, so a restarted agent re-adopts its pods.

pub mod attach;
pub mod enroll;
pub mod exec;
pub mod imds;
pub mod logs;
pub mod portforward;
pub mod runtime;
pub mod server;
pub mod shim;
pub mod state;
pub mod stats;

/// The protocol's generated messages and services, as the agent's modules name them.
pub use ec2_kubelet_protocol::v1 as proto;

/// What can go wrong inside the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid pod spec: {0}")]
    InvalidSpec(String),
    #[error("pod {0} not found")]
    PodNotFound(String),
    #[error("container {container:?} not found in pod {pod}")]
    ContainerNotFound { pod: String, container: String },
    #[error("agent state: {0}")]
    State(String),
    #[error("gRPC transport: {0}")]
    Transport(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidSpec(_) => tonic::Status::invalid_argument(error.to_string()),
            Error::PodNotFound(_) | Error::ContainerNotFound { .. } => {
                tonic::Status::not_found(error.to_string())
            }
            _ => tonic::Status::internal(error.to_string()),
        }
    }
}
