//! Which part of the benchmark's process a heap allocation belongs to.
//!
//! The benchmark runs the operator, the dev cluster and the simulator in one process, each on
//! its own tokio runtime, and its allocator (`bench.rs`) counts live bytes per [`Class`] of the
//! thread that allocated them. Some of the simulator's work runs on the operator's threads (the
//! `Compute` calls are plain method calls): the simulator marks what it keeps from them as its
//! own with [`as_simulator`], so the operator is not charged for the simulated cloud's tables.

use std::cell::Cell;

/// Whose an allocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Other = 0,
    Operator = 1,
    Cluster = 2,
    Simulator = 3,
}

/// How many classes there are (for per-class counters).
pub const CLASSES: usize = 4;

thread_local! {
    static CLASS: Cell<Class> = const { Cell::new(Class::Other) };
}

/// The class of what this thread allocates now.
pub fn current() -> Class {
    CLASS.with(Cell::get)
}

/// Makes `class` this thread's class (a runtime's thread-start hook).
pub fn set_thread_class(class: Class) {
    CLASS.with(|c| c.set(class));
}

/// Runs `f` with what it allocates counted as the simulator's. `f` is synchronous: a class set
/// across an await would follow the thread, not the task.
pub fn as_simulator<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(Class);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_thread_class(self.0);
        }
    }
    let _restore = Restore(current());
    set_thread_class(Class::Simulator);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulator_class_holds_only_inside_the_closure() {
        set_thread_class(Class::Operator);
        assert_eq!(as_simulator(current), Class::Simulator);
        assert_eq!(current(), Class::Operator);
        let caught = std::panic::catch_unwind(|| as_simulator(|| panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(current(), Class::Operator, "restored after a panic too");
    }
}
