//! Backoff for cloud calls: exponential with full jitter per retry loop, and one gate per pool
//! shared by every pod worker, so a throttled account is not hammered by a thousand workers
//! each backing off on its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::cloud;
use crate::metrics::PoolLabels;

/// Exponential backoff with full jitter: attempt n waits a random time in
/// `[base·2ⁿ / 2, base·2ⁿ]`, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The next delay; each call doubles the ceiling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    /// 1 s doubling up to 30 s: the pace of a kubelet's pod-worker retries.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

/// Whether a Kubernetes API error may pass by itself: a 5xx, a 429, or no answer at all.
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// Runs `call` again while it fails with a transient error, backing off from 0.5 s (with
/// jitter) for at most `patience`; other errors, and the last transient one, are returned. For
/// steps a replica cannot start without: one flaky answer must not cost a start.
pub async fn retry_transient<T, F, Fut>(what: &str, patience: Duration, call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    retry_while(what, patience, backoff, is_transient, call).await
}

/// Runs `call` again while it fails with an error `retryable` accepts, waiting `backoff`'s
/// delays, for at most `patience`; other errors, and the last retryable one, are returned.
pub async fn retry_while<T, F, Fut>(
    what: &str,
    patience: Duration,
    mut backoff: Backoff,
    retryable: fn(&kube::Error) -> bool,
    mut call: F,
) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let deadline = Instant::now() + patience;
    loop {
        match call().await {
            Err(error) if retryable(&error) && Instant::now() < deadline => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "{what}; retrying");
                tokio::time::sleep(delay).await;
            }
            outcome => return outcome,
        }
    }
}

struct PoolGate {
    open_at: Instant,
    /// While the pool recovers from throttling, callers pass one at a time, this far apart.
    next_slot: Instant,
    backoff: Backoff,
}

/// One gate per pool: after `RequestLimitExceeded` every caller of that pool waits until the
/// gate reopens, and the pause grows (with jitter) while the throttling lasts. When it reopens,
/// the waiting callers are let through one per `initial` delay, not all at once (EC2 refills
/// a drained bucket at a few calls per second), until a call succeeds again.
pub struct CloudGate {
    pools: Mutex<HashMap<String, PoolGate>>,
    initial: Duration,
    max: Duration,
    /// Throttled attempts per call before the error goes back to the caller.
    attempts: u32,
    /// Throttled calls by pool, in the operator's metrics.
    throttled: Option<Family<PoolLabels, Counter>>,
}

impl Default for CloudGate {
    fn default() -> Self {
        CloudGate::new(Duration::from_millis(500), Duration::from_secs(30), 8)
    }
}

impl CloudGate {
    pub fn new(initial: Duration, max: Duration, attempts: u32) -> CloudGate {
        CloudGate {
            pools: Mutex::new(HashMap::new()),
            initial,
            max,
            attempts: attempts.max(1),
            throttled: None,
        }
    }

    /// Counts throttled calls by pool in `family`.
    pub fn counting(mut self, family: Family<PoolLabels, Counter>) -> CloudGate {
        self.throttled = Some(family);
        self
    }

    /// When the pool's gate opens (now if it is not throttled).
    pub fn open_at(&self, pool: &str) -> Instant {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.get(pool).map_or_else(Instant::now, |g| g.open_at)
    }

    /// When this caller may go: now if the pool is not throttled, else the next free slot
    /// after the gate opens (which it takes).
    fn admit(&self, pool: &str) -> Instant {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        match pools.get_mut(pool) {
            None => Instant::now(),
            Some(gate) => {
                let slot = gate.open_at.max(gate.next_slot);
                gate.next_slot = slot + self.initial;
                slot
            }
        }
    }

    /// Records a throttled call: closes the gate for the next backoff delay, returned.
    pub fn throttled(&self, pool: &str) -> Duration {
        if let Some(family) = &self.throttled {
            family.get_or_create(&PoolLabels { pool: pool.into() }).inc();
        }
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let gate = pools.entry(pool.to_string()).or_insert_with(|| PoolGate {
            open_at: Instant::now(),
            next_slot: Instant::now(),
            backoff: Backoff::new(self.initial, self.max),
        });
        let delay = gate.backoff.next_delay();
        gate.open_at = gate.open_at.max(Instant::now() + delay);
        // The queue starts over behind the new pause.
        gate.next_slot = gate.open_at;
        delay
    }

    /// Records a successful call: the pool's next throttling starts from the initial delay.
    pub fn succeeded(&self, pool: &str) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gate) = pools.get_mut(pool)
            && gate.open_at <= Instant::now()
        {
            pools.remove(pool);
        }
    }

    /// Runs a cloud call for `pool` through the gate: waits while it is closed, and retries
    /// throttled attempts (each closing the gate for everyone) up to the attempt limit.
    pub async fn call<T, F, Fut>(&self, pool: &str, mut call: F) -> cloud::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = cloud::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            tokio::time::sleep_until(self.admit(pool)).await;
            match call().await {
                Err(cloud::Error::Throttled { action }) => {
                    attempt += 1;
                    let delay = self.throttled(pool);
                    tracing::warn!(%pool, %action, ?delay, attempt, "EC2 throttled the pool's calls; backing off");
                    if attempt >= self.attempts {
                        return Err(cloud::Error::Throttled { action });
                    }
                }
                other => {
                    if other.is_ok() {
                        self.succeeded(pool);
                    }
                    return other;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        for (n, delay) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << n)).min(Duration::from_millis(800));
            assert!(
                *delay >= ceiling / 2 && *delay <= ceiling,
                "attempt {n}: {delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_throttled_pool_makes_every_caller_wait_but_not_other_pools() {
        let gate = CloudGate::new(Duration::from_millis(200), Duration::from_millis(800), 3);
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        // Throttled twice, then it succeeds: two pauses of 100–200 ms then 200–400 ms.
        let result = gate
            .call("p1", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(cloud::Error::Throttled {
                        action: "RunInstances".into(),
                    })
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");

        // Another caller of a throttled pool waits for the gate; another pool does not.
        gate.throttled("p1");
        let closed_until = gate.open_at("p1");
        assert!(closed_until > Instant::now());
        assert!(gate.open_at("p2") <= Instant::now());
        let before = Instant::now();
        gate.call("p1", || async { Ok(()) }).await.unwrap();
        assert!(Instant::now() >= closed_until && Instant::now() > before);

        // Throttled on every attempt: the error comes back after the attempt limit.
        let result: cloud::Result<()> = gate
            .call("p3", || async {
                Err(cloud::Error::Throttled {
                    action: "TerminateInstances".into(),
                })
            })
            .await;
        assert!(matches!(result, Err(cloud::Error::Throttled { .. })));
    }

    #[tokio::test]
    async fn callers_waiting_on_a_throttled_pool_are_let_through_one_at_a_time() {
        let gate = std::sync::Arc::new(CloudGate::new(
            Duration::from_millis(100),
            Duration::from_millis(200),
            3,
        ));
        gate.throttled("p1");
        let opens = gate.open_at("p1");
        let callers = (0..5).map(|_| {
            let gate = gate.clone();
            tokio::spawn(async move { gate.call("p1", || async { Ok(Instant::now()) }).await.unwrap() })
        });
        let mut passed: Vec<Instant> = futures::future::join_all(callers)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        passed.sort();
        assert!(passed[0] >= opens);
        // Five callers, one per 100 ms once the gate opens: the last went about 400 ms after the
        // first (not all at the opening; the timer wakes each within a millisecond or two).
        let spread = passed[4] - passed[0];
        assert!(spread >= Duration::from_millis(390), "{spread:?}");
        // Once calls succeed the pool is no longer throttled: a new caller goes at once.
        tokio::time::sleep_until(passed[4] + Duration::from_millis(1)).await;
        gate.succeeded("p1");
        assert!(gate.open_at("p1") <= Instant::now());
    }
}
