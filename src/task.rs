//! Owned tasks: a spawned task whose owner stops it and waits for its end, so that a
//! replacement never runs beside the task it replaces (two pod loops for one node would drive
//! the same pods twice).

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A task told to stop through a `watch` flag, and joined by its owner.
pub struct OwnedTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl OwnedTask {
    /// Spawns `run`, which must return soon after its receiver turns true.
    pub fn spawn<F, Fut>(run: F) -> OwnedTask
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        OwnedTask {
            stop,
            handle: tokio::spawn(run(stopped)),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Asks the task to stop, without waiting (the owner joins it later with [`Self::join`]).
    pub fn signal(&self) {
        // The task may have ended already: nobody is left to tell.
        let _ = self.stop.send(true);
    }

    /// Waits for the task's end; a task that panicked is logged.
    pub async fn join(self) {
        if let Err(error) = self.handle.await {
            tracing::warn!(%error, "an owned task ended abnormally");
        }
    }

    /// Stops the task and waits for its end.
    pub async fn stop(self) {
        self.signal();
        self.join().await;
    }
}

/// A spawned task that lives as long as its owner: aborted when dropped.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A task that counts itself as running until well after it was told to stop (as a pod
    /// loop flushes its status writes before it ends).
    fn slow_to_stop(running: Arc<AtomicUsize>, most: Arc<AtomicUsize>) -> OwnedTask {
        OwnedTask::spawn(move |mut stop| async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            running.fetch_sub(1, Ordering::SeqCst);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_starts_only_after_the_task_it_replaces_has_ended() {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut current = slow_to_stop(running.clone(), most.clone());
        for _ in 0..3 {
            tokio::task::yield_now().await;
            current.stop().await;
            assert_eq!(
                running.load(Ordering::SeqCst),
                0,
                "stop returns once the task ended"
            );
            current = slow_to_stop(running.clone(), most.clone());
        }
        current.stop().await;
        assert_eq!(most.load(Ordering::SeqCst), 1, "never two at once");
    }
}
