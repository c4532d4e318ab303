//! Pods on virtual nodes: what the agent is asked to run (spec), what the pod reports (status)
//! and how it is written (writer). The lifecycle driver (launch, status stream, deletion,
//! recovery) builds on these and on the launch planning of `crate::launch`.

pub mod kept;
pub mod lifecycle;
pub mod spec;
pub mod status;
pub mod writer;
