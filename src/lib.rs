//! ec2-kubelet: a Kubernetes operator that makes EC2 instances look like pods.
//!
//! This crate is the operator. The agent that runs on every instance is its own crate
//! (`src/agent`), and what both speak is a third (`proto`: the gRPC protocol, its PKI and the
//! utilities they share). The test bed (dev cluster, EC2 simulator, demo, benchmark) lives in
//! `e2e/testbed`. docs/architecture.md has the picture.

pub mod agent_client;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod crd;
pub mod enrollment;
pub mod events;
pub mod faults;
pub mod kubelet;
pub mod launch;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod pod;
pub mod runtime;
pub mod schema;
pub mod task;
pub mod warm;
