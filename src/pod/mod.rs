//! Pods on virtual nodes: what each pod's instance looks like (launch settings, right-sizing),
//! what the agent is asked to run (spec) and what the pod reports (status). The lifecycle
//! driver (launch, status stream, deletion, recovery) builds on these.

pub mod bindings;
pub mod lifecycle;
pub mod settings;
pub mod sizing;
pub mod spec;
pub mod status;
pub mod writer;
