//! Whether a reflector's store has taken in its first complete list, for any number of tasks
//! that wait for it at once.
//!
//! kube-runtime's `Store::wait_until_ready` waits on one `futures` oneshot shared by every clone
//! of the store, and a oneshot keeps one waker: of two tasks waiting at the same time, only the
//! one that polled last is woken when the list completes. The other waits until something else
//! happens to wake it. In the operator that was the pool controller's first reconcile after a
//! replica took over (waiting for the pods' store beside the counts task): it hung until the
//! pool's resync, so a scale or a deletion in the meantime waited 30 s or more. So only one task
//! ever waits on a store (the `Controller`, on its own), and everyone else waits here.

use kube::runtime::watcher;
use tokio::sync::watch;

/// Set once the stream it observes ends its first list; cheap to clone, any number of waiters.
#[derive(Clone)]
pub struct Synced(std::sync::Arc<watch::Sender<bool>>);

impl Default for Synced {
    fn default() -> Self {
        Synced(std::sync::Arc::new(watch::Sender::new(false)))
    }
}

impl Synced {
    /// Marks the store synced when `event` ends a list: observe the events after they reached
    /// the store (after `reflect`), so that waiters find the listed objects there.
    pub fn observe<K>(&self, event: &watcher::Event<K>) {
        if matches!(event, watcher::Event::InitDone) {
            self.mark();
        }
    }

    /// Marks the store synced: for a store that takes in its list itself.
    pub fn mark(&self) {
        self.0.send_if_modified(|synced| !std::mem::replace(synced, true));
    }

    /// Whether the first list is in.
    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits for the first list.
    pub async fn wait(&self) {
        let mut synced = self.0.subscribe();
        // The sender lives as long as `self`: the wait ends only when synced.
        let _ = synced.wait_for(|synced| *synced).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_wakes_when_the_first_list_ends() {
        let synced = Synced::default();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let synced = synced.clone();
                tokio::spawn(async move { synced.wait().await })
            })
            .collect();
        // Every waiter is parked before the list ends.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!synced.is_synced());
        synced.observe::<()>(&watcher::Event::Init);
        synced.observe::<()>(&watcher::Event::InitApply(()));
        assert!(!synced.is_synced(), "not before the list ends");
        synced.observe::<()>(&watcher::Event::InitDone);
        assert!(synced.is_synced());
        for waiter in waiters {
            // A guard against a hang, not a measurement: a lost wakeup never ends.
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("a waiter was never woken")
                .unwrap();
        }
        // And a late waiter returns at once.
        synced.wait().await;
    }
}
