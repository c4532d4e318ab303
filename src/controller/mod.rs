//! The operator's controllers: the pool controller (ENIs, virtual nodes, drain, finalizer,
//! status), the template controller (validation, the templates' status) and the finalizer of
//! the `Ec2Instance` records. What they share
//! with the node tasks, pod workers and the kubelet API is in `crate::runtime`.

pub mod counts;
pub mod instance;
pub mod pool;
pub mod template;
pub mod upgrade;
