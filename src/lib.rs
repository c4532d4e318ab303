//! ec2-kubelet: a Kubernetes operator that makes EC2 instances look like pods.
//!
//! Layout follows responsibilities: `crd` (custom resource types), `config` (operator
//! configuration), `schema` (validation of objects against CRD schemas, as the API server does),
//! `telemetry` (logs).

pub mod agent;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod crd;
pub mod demo;
pub mod devcluster;
pub mod enrollment;
pub mod events;
pub mod faults;
pub mod kubelet;
pub mod metrics;
pub mod net;
pub mod node;
pub mod operator;
pub mod pki;
pub mod pod;
pub mod schema;
pub mod task;
pub mod telemetry;
pub mod warm;
