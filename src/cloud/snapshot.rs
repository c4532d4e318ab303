//! Shared, batched reads of the cloud: every caller that needs a pool's instances (or ENIs)
//! gets one snapshot, fetched by a single call that started no earlier than the caller asked
//! for. A thousand pod workers recovering at once cost one `DescribeInstances` per pool, not a
//! thousand; node health checks of a pool share one `DescribeNetworkInterfaces` per interval.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

type Slot<T> = Arc<tokio::sync::Mutex<Option<(Instant, Arc<T>)>>>;

/// Snapshots by key (a pool name).
pub struct Snapshots<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
}

impl<T> Default for Snapshots<T> {
    fn default() -> Self {
        Snapshots {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Snapshots<T> {
    /// The snapshot of `key` taken by a fetch that started at or after `not_before`; callers
    /// that arrive while a fetch runs wait for it, or for the next one if it started too early.
    pub async fn get<E, Fut>(
        &self,
        key: &str,
        not_before: Instant,
        fetch: impl FnOnce() -> Fut,
    ) -> Result<Arc<T>, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let mut snapshot = slot.lock().await;
        if let Some((taken, value)) = &*snapshot
            && *taken >= not_before
        {
            return Ok(value.clone());
        }
        let started = Instant::now();
        let value = Arc::new(fetch().await?);
        *snapshot = Some((started, value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_a_fetch_that_started_after_they_asked() {
        let snapshots: Arc<Snapshots<usize>> = Arc::default();
        let fetches = Arc::new(AtomicUsize::new(0));
        let asked = Instant::now();
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let (snapshots, fetches) = (snapshots.clone(), fetches.clone());
                tokio::spawn(async move {
                    snapshots
                        .get("pool", asked, || async {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            Ok::<_, ()>(fetches.fetch_add(1, Ordering::SeqCst) + 1)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(*caller.await.unwrap(), 1, "every caller got the first fetch");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // A caller asking for something newer than the snapshot gets a new fetch.
        let later = Instant::now();
        let value = snapshots
            .get("pool", later, || async {
                Ok::<_, ()>(fetches.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await
            .unwrap();
        assert_eq!(*value, 2);
    }
}
