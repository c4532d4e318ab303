//! Launch planning: what a pod's instance looks like, from the pool, the pod's template and
//! annotations (`settings`) and its resource requests against the instance types on offer
//! (`sizing`), put together for one pod in `plan`. Pure: no I/O. The pod workers read the
//! template and the catalogue and call `plan`; the warm pools use `settings`.

pub mod plan;
pub mod settings;
pub mod sizing;
