//! The agent protocol, shared by the operator and the agent: the gRPC messages and services
//! (`v1`, generated from `ec2kubelet/agent/v1/agent.proto`), their codec, the PKI of the
//! mutual-TLS channel and its enrollment, and the few utilities both sides use (`util`, `net`,
//! `telemetry`). Depends on neither kube nor the AWS SDK.

pub mod codec;
pub mod net;
pub mod pki;
pub mod telemetry;
pub mod util;

pub mod v1 {
    //! Generated from `proto/ec2kubelet/agent/v1/agent.proto`.
    tonic::include_proto!("ec2kubelet.agent.v1");
}
