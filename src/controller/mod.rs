//! The operator's controllers: the pool controller (ENIs, virtual nodes, drain, finalizer,
//! status) and the template controller (validation, the templates' status). What they share
//! with the node tasks, pod workers and the kubelet API is in `crate::runtime`.

pub mod pool;
pub mod template;
