//! The error of the operator's tasks (controllers, node tasks, pod workers, warm pools), named
//! for what a user sees in events and metrics, and when a failure is tried again.

use super::backoff;

/// What can go wrong in a controller, named for what a user sees in events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cloud: {0}")]
    Cloud(#[from] crate::cloud::Error),
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },
    /// Adding or removing our finalizer failed.
    #[error("finalizer ({action}): {source}")]
    Finalizer {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// A call to a pod's agent failed.
    #[error("agent {call}: {source}")]
    Agent {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    /// The pod's worker was told to stop while it waited.
    #[error("the pod worker was stopped")]
    WorkerStopped,
    #[error("{0}")]
    InUse(String),
    /// A compare-and-swap write lost to other writers every time it tried.
    #[error("{object}: the status kept changing under {attempts} compare-and-swap writes")]
    Contended { object: String, attempts: usize },
}

impl Error {
    /// A short name for event reasons and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Cloud(error) => error.reason(),
            Error::InvalidSpec { .. } => "InvalidSpec",
            Error::Finalizer { .. } => "FinalizerError",
            Error::Agent { .. } => "AgentUnreachable",
            Error::WorkerStopped => "WorkerStopped",
            Error::InUse(_) => "InUse",
            Error::Contended { .. } => "StatusContended",
        }
    }

    /// Worth another try soon (a conflict, throttling, a 5xx, no answer); otherwise the object
    /// must change first (an invalid spec, a 4xx such as 413 or 422), and a retry waits for the
    /// next resync instead of hammering the API server.
    pub fn is_retryable(&self) -> bool {
        let kube_retryable = |error: &kube::Error| {
            backoff::is_transient(error) || matches!(error, kube::Error::Api(status) if status.code == 409)
        };
        match self {
            Error::Kube(error) => kube_retryable(error),
            // The finalizer helper's JSON patch tests the finalizers it read: a 422 means they
            // changed meanwhile (it worked from a stale cached object), a conflict like a 409.
            Error::Finalizer { source: error, .. } => {
                kube_retryable(error) || matches!(error, kube::Error::Api(status) if status.code == 422)
            }
            Error::Cloud(error) => error.is_retryable(),
            Error::InvalidSpec { .. } => false,
            Error::Agent { .. } | Error::WorkerStopped | Error::InUse(_) | Error::Contended { .. } => true,
        }
    }

    /// The finalizer helper's error, with the failed step's own error kept.
    pub fn from_finalizer(error: kube::runtime::finalizer::Error<Error>) -> Error {
        use kube::runtime::finalizer::Error as Finalizer;
        match error {
            Finalizer::ApplyFailed(error) | Finalizer::CleanupFailed(error) => error,
            Finalizer::AddFinalizer(source) => Error::Finalizer {
                action: "add",
                source,
            },
            Finalizer::RemoveFinalizer(source) => Error::Finalizer {
                action: "remove",
                source,
            },
            Finalizer::UnnamedObject => Error::InvalidSpec {
                field: "metadata.name".into(),
                message: "the object has no name".into(),
            },
            Finalizer::InvalidFinalizer => Error::InvalidSpec {
                field: "metadata.finalizers".into(),
                message: "the finalizer name is invalid".into(),
            },
        }
    }
}

/// When a failed reconcile runs again: soon (5–10 s, jittered) for what may pass by itself,
/// at the next resync for what needs the object or the cloud to change.
pub fn retry_after(error: &Error, resync: std::time::Duration) -> std::time::Duration {
    if error.is_retryable() {
        std::time::Duration::from_secs(5 + u64::from(rand::random::<u8>() % 5))
    } else {
        resync
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl crate::metrics::ReasonOf for Error {
    fn reason_of(&self) -> &'static str {
        self.reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("refused", "").with_code(code).boxed())
    }

    #[test]
    fn a_conflict_and_a_server_error_retry_soon_and_a_refusal_waits_for_the_resync() {
        let resync = Duration::from_secs(300);
        for (error, soon) in [
            (Error::Kube(api_error(409)), true),
            (Error::Kube(api_error(429)), true),
            (Error::Kube(api_error(500)), true),
            (Error::Kube(api_error(413)), false),
            (Error::Kube(api_error(422)), false),
            (
                Error::Finalizer {
                    action: "add",
                    source: api_error(503),
                },
                true,
            ),
            (
                Error::Finalizer {
                    action: "remove",
                    source: api_error(403),
                },
                false,
            ),
            (
                Error::Finalizer {
                    action: "add",
                    source: api_error(422),
                },
                true,
            ),
            (
                Error::InvalidSpec {
                    field: "spec.nodes".into(),
                    message: "x".into(),
                },
                false,
            ),
            (
                Error::Agent {
                    call: "LaunchPod",
                    source: tonic::Status::unavailable("down"),
                },
                true,
            ),
        ] {
            let after = retry_after(&error, resync);
            assert_eq!(after < resync, soon, "{error}: {after:?}");
            if soon {
                assert!((5..10).contains(&after.as_secs()), "{error}: {after:?}");
            }
        }
    }

    #[test]
    fn errors_keep_their_source() {
        let error = Error::Agent {
            call: "LaunchPod",
            source: tonic::Status::unavailable("connection refused"),
        };
        assert_eq!(error.reason(), "AgentUnreachable");
        let source = std::error::Error::source(&error).expect("the gRPC status is kept");
        assert!(source.to_string().contains("connection refused"));
        let finalizer = Error::from_finalizer(kube::runtime::finalizer::Error::AddFinalizer(api_error(409)));
        assert_eq!(finalizer.reason(), "FinalizerError");
        assert!(finalizer.is_retryable());
    }
}
