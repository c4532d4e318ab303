//! Named fault points in the operator's control flow. A test arms a point; the next task that
//! reaches it stops there for good and tells the test, which then kills the replica — a crash
//! at exactly that step (between a launch and its record, between a termination and the pod's
//! release). Unarmed, a point costs one atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::oneshot;

static ARMED_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Armed points: (point, subject, who to tell).
type Armed = Vec<(String, String, oneshot::Sender<()>)>;
static ARMED: Mutex<Armed> = Mutex::new(Vec::new());

/// After a launch returned the instance, before the binding records it.
pub const POD_LAUNCHED: &str = "pod.launched";
/// In the `local` backend: after an instance's record is written, before its agent starts.
pub const LOCAL_INSTANCE_RECORDED: &str = "local.instance-recorded";
/// In the `local` backend: after an instance's agent started, before its record has the pid.
pub const LOCAL_AGENT_STARTED: &str = "local.agent-started";
/// After the instance was terminated, before the binding goes and the pod is released.
pub const POD_TERMINATED: &str = "pod.terminated";

/// Arms point `name` for one subject (a pod's `namespace/name`) once: the next task reaching it
/// for that subject never returns from it, and the receiver fires.
pub fn arm(name: &str, subject: &str) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    ARMED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((name.to_string(), subject.to_string(), tx));
    ARMED_COUNT.fetch_add(1, Ordering::SeqCst);
    rx
}

/// A fault point: returns at once unless `name` is armed for `subject`, in which case it
/// disarms it, signals the test and waits forever (until the runtime running the task is
/// dropped).
pub async fn point(name: &str, subject: &str) {
    if ARMED_COUNT.load(Ordering::Relaxed) == 0 {
        return;
    }
    let hit = {
        let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        armed
            .iter()
            .position(|(n, s, _)| n == name && s == subject)
            .map(|i| armed.remove(i).2)
    };
    if let Some(tx) = hit {
        ARMED_COUNT.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(point = name, subject, "fault point reached: this task stops here");
        let _ = tx.send(());
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_armed_point_stops_one_task_once() {
        let hit = arm("test.point", "a");
        point("test.other", "a").await;
        point("test.point", "b").await;
        let stuck = tokio::spawn(point("test.point", "a"));
        hit.await.expect("the point signals when reached");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stuck.is_finished(), "the task stays at the point");
        stuck.abort();
        // Disarmed by the hit: the next task passes.
        tokio::time::timeout(Duration::from_secs(1), point("test.point", "a"))
            .await
            .expect("a disarmed point returns");
    }
}
