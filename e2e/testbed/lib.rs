//! The test bed of ec2-kubelet: what the tests, the demo and the benchmark run the operator
//! against, and nothing the operator or the agent ships with.
//!
//! - `devcluster`: an in-process Kubernetes API server stand-in (fast tests, `make demo-dev`).
//! - `sim`: an in-process EC2 and agent simulator, a `Compute` backend for the benchmark.
//! - `demo`: the main job on an embedded default (the real control plane or the dev cluster,
//!   the operator on the local backend, the samples).
//! - `heap`: whose a heap allocation is, for the benchmark's attributing allocator.
//! - `binaries`: the workspace's binaries for tests, built on first use.

pub mod binaries;
pub mod demo;
pub mod devcluster;
pub mod heap;
pub mod sim;
