//! Ownership through `coordination.k8s.io` Leases: which operator replica runs a node task
//! (one Lease per node in the operator's namespace) and which one runs the pool controller.
//! Every change is an optimistic-concurrency write, so two replicas never both win; nothing
//! about ownership lives only in memory.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

/// A lease held (or wanted) by `holder`.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
}

/// Whether a lease's holder has stopped renewing it.
pub fn expired(spec: &LeaseSpec, now: jiff::Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    *renewed + jiff::SignedDuration::from_secs(duration) < now
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, holder: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api,
            name: name.to_string(),
            holder: holder.to_string(),
            duration,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: jiff::Timestamp) -> LeaseSpec {
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.holder.as_str());
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0)
                    + i32::from(previous.is_some() && !ours),
            ),
            ..LeaseSpec::default()
        }
    }

    /// Takes the lease if it is free or expired, renews it if we hold it. `Ok(false)` when
    /// another holder has it (or won a race for it); an error when the renewal of a lease we
    /// hold failed, a conflict included.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
                    Err(error) => Err(error),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let ours = spec.holder_identity.as_deref() == Some(self.holder.as_str());
                let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
                if !ours && !free && !expired(&spec, now) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(Some(&spec), now));
                // `replace` carries the resourceVersion we read: a concurrent writer makes it a
                // 409. Taking a lease, that writer won it; renewing ours, it tells nothing yet
                // (the holder may still be us): an error the caller retries, until its renew
                // deadline, and the next read says who holds the lease.
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.is_conflict() && !ours => Ok(false),
                    Err(error) => Err(error),
                }
            }
        }
    }

    /// Gives the lease up if we hold it, so another replica can take over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.holder.as_str()) {
            return Ok(());
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {"holderIdentity": null, "renewTime": null},
        });
        // A 409 says the lease changed since it was read: the caller reads it again.
        match self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Gives the lease up on a clean stop, retrying transient errors and conflicts for up to
    /// `RELEASE_PATIENCE`: a release that fails leaves the successor waiting a whole lease
    /// duration. A release that still fails is logged at warn with its cause.
    pub async fn release_on_stop(&self) {
        use crate::runtime::backoff::{Backoff, retry_while};
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let what = format!("releasing lease {}", self.name);
        if let Err(error) = retry_while(&what, RELEASE_PATIENCE, backoff, retryable, || self.release()).await
        {
            tracing::warn!(lease = %self.name, %error, "releasing the lease failed: a successor waits for it to expire");
        }
    }
}

/// How long a stopping replica keeps trying to release a lease (well within the 30 s a
/// Deployment's pod gets to stop).
const RELEASE_PATIENCE: Duration = Duration::from_secs(10);

/// Errors worth another release attempt: transient ones and conflicts (read again, try again).
fn retryable(error: &kube::Error) -> bool {
    crate::runtime::backoff::is_transient(error)
        || matches!(error, kube::Error::Api(status) if status.is_conflict())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_after_its_duration_without_renewal() {
        let now = jiff::Timestamp::now();
        let spec = LeaseSpec {
            renew_time: Some(MicroTime(now - jiff::SignedDuration::from_secs(50))),
            lease_duration_seconds: Some(40),
            ..LeaseSpec::default()
        };
        assert!(expired(&spec, now));
        let fresh = LeaseSpec {
            renew_time: Some(MicroTime(now - jiff::SignedDuration::from_secs(5))),
            ..spec
        };
        assert!(!expired(&fresh, now));
        assert!(
            expired(&LeaseSpec::default(), now),
            "a lease never renewed is free"
        );
    }
}
