//! Shared, batched reads of the cloud: every caller that needs a pool's instances (or ENIs)
//! gets one snapshot, fetched by a single call that started no earlier than the caller asked
//! for. A thousand pod workers recovering at once cost one `DescribeInstances` per pool, not a
//! thousand; node health checks of a pool share one `DescribeNetworkInterfaces` per interval.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Slot<T> = Arc<tokio::sync::Mutex<Option<(Instant, Arc<T>)>>>;

/// Snapshots by key (a pool name).
pub struct Snapshots<T> {
    slots: Mutex<HashMap<String, Slot<T>>>,
    /// How long a snapshot is kept after its fetch started (`None`: until the next one).
    retain: Option<Duration>,
}

impl<T> Default for Snapshots<T> {
    fn default() -> Self {
        Snapshots {
            slots: Mutex::new(HashMap::new()),
            retain: None,
        }
    }
}

impl<T: Send + Sync + 'static> Snapshots<T> {
    /// Snapshots dropped `retain` after their fetch started: no caller accepts an older one,
    /// and a pool's instances at 10,000 pods are megabytes a quiet operator would keep for
    /// nothing.
    pub fn retaining(retain: Duration) -> Self {
        Snapshots {
            slots: Mutex::new(HashMap::new()),
            retain: Some(retain),
        }
    }

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
        if let Some(retain) = self.retain {
            let slot = Arc::downgrade(&slot);
            tokio::spawn(async move {
                tokio::time::sleep(retain).await;
                if let Some(slot) = slot.upgrade() {
                    let mut snapshot = slot.lock().await;
                    if snapshot.as_ref().is_some_and(|(taken, _)| *taken == started) {
                        *snapshot = None;
                    }
                }
            });
        }
        Ok(value)
    }
}

/// A pool's instances as one `DescribeInstances` returned them, indexed by instance id and by
/// the pod UID they are tagged with: ten thousand pod workers recovering at once each find
/// their instance in a hash map, not by walking all ten thousand (which cost seconds of CPU in
/// one large pool).
#[derive(Debug, Default)]
pub struct PoolInstances {
    all: Vec<super::Instance>,
    by_id: HashMap<String, usize>,
    by_pod: HashMap<String, Vec<usize>>,
}

impl PoolInstances {
    pub fn new(all: Vec<super::Instance>) -> PoolInstances {
        let mut by_id = HashMap::with_capacity(all.len());
        let mut by_pod: HashMap<String, Vec<usize>> = HashMap::with_capacity(all.len());
        for (index, instance) in all.iter().enumerate() {
            by_id.insert(instance.instance_id.clone(), index);
            if let Some(uid) = instance.tag(crate::crd::tags::POD_UID) {
                by_pod.entry(uid.to_string()).or_default().push(index);
            }
        }
        PoolInstances { all, by_id, by_pod }
    }

    /// The instance with this id.
    pub fn get(&self, instance_id: &str) -> Option<&super::Instance> {
        self.by_id.get(instance_id).map(|&index| &self.all[index])
    }

    /// The instances tagged with this pod UID.
    pub fn of_pod(&self, uid: &str) -> impl Iterator<Item = &super::Instance> {
        self.by_pod
            .get(uid)
            .into_iter()
            .flatten()
            .map(|&index| &self.all[index])
    }
}

impl std::ops::Deref for PoolInstances {
    type Target = [super::Instance];

    fn deref(&self) -> &[super::Instance] {
        &self.all
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

    #[tokio::test(start_paused = true)]
    async fn a_retained_snapshot_goes_after_its_time() {
        let snapshots: Snapshots<usize> = Snapshots::retaining(std::time::Duration::from_secs(30));
        let fetches = AtomicUsize::new(0);
        let fetch = || async { Ok::<_, ()>(fetches.fetch_add(1, Ordering::SeqCst) + 1) };
        let asked = Instant::now();
        assert_eq!(*snapshots.get("pool", asked, fetch).await.unwrap(), 1);
        tokio::time::sleep(std::time::Duration::from_secs(29)).await;
        assert_eq!(
            *snapshots.get("pool", asked, fetch).await.unwrap(),
            1,
            "still kept"
        );
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(
            *snapshots.get("pool", asked, fetch).await.unwrap(),
            2,
            "dropped: fetched again although the caller would take an old one"
        );
    }

    #[test]
    fn pool_instances_are_found_by_id_and_by_pod() {
        let instance = |id: &str, pod: Option<&str>| super::super::Instance {
            instance_id: id.into(),
            state: super::super::InstanceState::Running,
            instance_type: "t3.micro".into(),
            private_ip: None,
            launch_time: 0,
            tags: pod
                .map(|uid| [(crate::crd::tags::POD_UID.to_string(), uid.to_string())].into())
                .unwrap_or_default(),
        };
        let pool = PoolInstances::new(vec![
            instance("i-1", Some("a")),
            instance("i-2", None),
            instance("i-3", Some("a")),
            instance("i-4", Some("b")),
        ]);
        assert_eq!(pool.len(), 4);
        assert_eq!(pool.get("i-2").map(|i| i.instance_id.as_str()), Some("i-2"));
        assert!(pool.get("i-9").is_none());
        let of_a: Vec<&str> = pool.of_pod("a").map(|i| i.instance_id.as_str()).collect();
        assert_eq!(of_a, ["i-1", "i-3"]);
        assert_eq!(pool.of_pod("c").count(), 0);
    }
}
