//! Accepting connections the way Go's `net/http` server does: an accept error (EMFILE when the
//! process is out of file descriptors, ENFILE, ECONNABORTED) is logged and retried after a
//! pause that doubles from 5 ms to 1 s, never in a hot loop that starves the process of the
//! CPU it needs to close connections.

use std::future::Future;
use std::time::Duration;

/// The pause before the next accept after errors; reset by a success.
pub struct AcceptBackoff {
    next: Duration,
}

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: FIRST_PAUSE }
    }
}

impl AcceptBackoff {
    /// Accepts the next connection through `accept`, pausing after each error. `server` names
    /// the server in the logs.
    pub async fn accept<T, F, Fut>(&mut self, server: &str, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(connection) => {
                    self.next = FIRST_PAUSE;
                    return connection;
                }
                Err(error) => {
                    let pause = self.next;
                    tracing::warn!(%error, %server, retry_in = ?pause, "accepting a connection");
                    tokio::time::sleep(pause).await;
                    self.next = (pause * 2).min(LONGEST_PAUSE);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_retried_with_a_pause_that_doubles_up_to_a_second() {
        let calls = AtomicU32::new(0);
        let mut backoff = AcceptBackoff::default();
        let out_of_files = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(std::io::Error::from_raw_os_error(libc::EMFILE))
        };
        let started = tokio::time::Instant::now();
        let gave_up =
            tokio::time::timeout(Duration::from_secs(10), backoff.accept("test", out_of_files)).await;
        assert!(gave_up.is_err(), "an accept that always fails never returns");
        // 5 ms, 10, 20 … 640 ms, then once a second: 8 tries in the first 1.3 s, then 1 a second.
        let tries = calls.load(Ordering::SeqCst);
        assert!(
            (15..=18).contains(&tries),
            "{tries} tries in {:?}",
            started.elapsed()
        );

        // A success resets the pause.
        let failures = AtomicU32::new(0);
        let flaky = || async {
            if failures.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(std::io::Error::from_raw_os_error(libc::ECONNABORTED))
            } else {
                Ok(7)
            }
        };
        let started = tokio::time::Instant::now();
        assert_eq!(backoff.accept("test", flaky).await, 7);
        assert_eq!(started.elapsed(), Duration::from_secs(1) + Duration::from_secs(1));
        assert_eq!(backoff.next, FIRST_PAUSE);
    }
}
