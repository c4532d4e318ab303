//! Launch planning: what a pod's instance looks like, from the pool, the pod's template and
//! annotations (`settings`) and its resource requests against the instance types on offer
//! (`sizing`). Pure: no I/O, used by the pod workers and the warm pools.

pub mod settings;
pub mod sizing;
