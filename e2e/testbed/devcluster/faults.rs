//! Fault injection: which resource requests the fault proxy ([`super::proxy`]) answers the way
//! a loaded or failing API server does, so tests (and `ec2-kubelet-dev cluster --fault-rate`) can show
//! a client converges anyway, against the dev cluster or a real API server. Faults can be limited to one client by its `User-Agent` (the system under
//! test), leaving the test's own client a reliable view.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `500 InternalError`, before the request is served (nothing is written).
    ServerError,
    /// `429 TooManyRequests` with `Retry-After: 1`, as API priority and fairness answers.
    TooManyRequests,
    /// `409 Conflict` on an update or patch, as if another writer had won the race.
    Conflict,
    /// A watch answered with a `410 Gone` ERROR event: the client must relist.
    Gone,
    /// A watch cut off after a random moment (0–3 s) with a broken response body.
    DropWatch,
    /// The answer is delayed by a random time up to `FaultOptions::slow_max`.
    Slow,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::Conflict,
        Fault::Gone,
        Fault::DropWatch,
        Fault::Slow,
    ];

    /// The name used by `--faults` and in counts.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ServerError => "server-error",
            Fault::TooManyRequests => "too-many-requests",
            Fault::Conflict => "conflict",
            Fault::Gone => "gone",
            Fault::DropWatch => "drop-watch",
            Fault::Slow => "slow",
        }
    }

    /// Faults only a watch can get.
    fn watch_only(self) -> bool {
        matches!(self, Fault::Gone | Fault::DropWatch)
    }

    /// Whether this fault can befall a request of this shape.
    fn applies(self, watch: bool, update: bool) -> bool {
        match self {
            Fault::Gone | Fault::DropWatch => watch,
            Fault::Conflict => update,
            Fault::ServerError | Fault::TooManyRequests | Fault::Slow => true,
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Fault, String> {
        Fault::ALL.into_iter().find(|f| f.name() == text).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {text:?}: one of {}", names.join(", "))
        })
    }
}

/// Which faults, how often, for whom.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultOptions {
    /// Share of eligible requests that get a fault, 0.0–1.0.
    pub rate: f64,
    /// The share for watch requests, if not `rate` (watches are few and long-lived: a higher
    /// share keeps watchers reconnecting).
    pub watch_rate: Option<f64>,
    /// The faults drawn from (each request that gets one gets one of those that apply).
    pub kinds: Vec<Fault>,
    /// Only requests whose `User-Agent` starts with this; `None`: every client.
    pub user_agent: Option<String>,
    /// Only requests for this resource (`leases`, `pods/status`); `None`: every resource.
    pub resource: Option<String>,
    /// The longest delay of [`Fault::Slow`].
    pub slow_max: Duration,
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions {
            rate: 0.0,
            watch_rate: None,
            kinds: Fault::ALL.to_vec(),
            user_agent: None,
            resource: None,
            slow_max: Duration::from_millis(500),
        }
    }
}

/// The fault settings in force and what was injected.
pub struct Injector {
    options: Mutex<FaultOptions>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

/// The shape of a resource request, as far as faults care.
pub struct RequestShape<'a> {
    pub user_agent: &'a str,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: &'a str,
    pub watch: bool,
    /// A PUT or PATCH of one object.
    pub update: bool,
}

impl Injector {
    pub fn new(options: FaultOptions) -> Injector {
        Injector {
            options: Mutex::new(options),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set(&self, options: FaultOptions) {
        *self.options.lock().unwrap_or_else(|p| p.into_inner()) = options;
    }

    /// How many of each fault were injected so far.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The fault this request gets, if any (and, for `Slow`, the delay).
    pub fn draw(&self, request: &RequestShape) -> Option<(Fault, Duration)> {
        let options = self.options.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let rate = match options.watch_rate {
            Some(rate) if request.watch => rate,
            _ => options.rate,
        };
        if rate <= 0.0 {
            return None;
        }
        if let Some(prefix) = &options.user_agent
            && !request.user_agent.starts_with(prefix.as_str())
        {
            return None;
        }
        if options.resource.as_ref().is_some_and(|r| r != request.resource) {
            return None;
        }
        let mut eligible: Vec<Fault> = options
            .kinds
            .iter()
            .copied()
            .filter(|f| f.applies(request.watch, request.update))
            .collect();
        // A watch gets a watch fault when one is enabled: watches are few, and the others
        // befall every other request anyway.
        if eligible.iter().any(|f| f.watch_only()) {
            eligible.retain(|f| f.watch_only());
        }
        let mut rng = rand::rng();
        if eligible.is_empty() || !rng.random_bool(rate.min(1.0)) {
            return None;
        }
        let fault = eligible[rng.random_range(0..eligible.len())];
        let delay = match fault {
            Fault::Slow => options.slow_max.mul_f64(rng.random_range(0.2..=1.0)),
            Fault::DropWatch => Duration::from_millis(rng.random_range(0..3000)),
            _ => Duration::ZERO,
        };
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fault.name())
            .or_default() += 1;
        Some((fault, delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(user_agent: &str, watch: bool, update: bool) -> RequestShape<'_> {
        RequestShape {
            user_agent,
            resource: "pods",
            watch,
            update,
        }
    }

    #[test]
    fn faults_fall_only_where_they_apply_and_on_whom_they_are_aimed() {
        let injector = Injector::new(FaultOptions {
            rate: 1.0,
            kinds: vec![Fault::Conflict, Fault::Gone],
            user_agent: Some("ec2-kubelet/".into()),
            ..Default::default()
        });
        assert_eq!(
            injector.draw(&shape("kubectl/v1.34", true, false)),
            None,
            "not aimed at kubectl"
        );
        assert_eq!(
            injector.draw(&shape("ec2-kubelet/0.1", false, false)),
            None,
            "a get: neither applies"
        );
        assert_eq!(
            injector.draw(&shape("ec2-kubelet/0.1", true, false)).map(|f| f.0),
            Some(Fault::Gone)
        );
        assert_eq!(
            injector.draw(&shape("ec2-kubelet/0.1", false, true)).map(|f| f.0),
            Some(Fault::Conflict)
        );
        assert_eq!(injector.counts(), BTreeMap::from([("conflict", 1), ("gone", 1)]));
        injector.set(FaultOptions {
            rate: 1.0,
            kinds: vec![Fault::ServerError],
            resource: Some("leases".into()),
            ..Default::default()
        });
        assert_eq!(
            injector.draw(&shape("ec2-kubelet/0.1", false, true)),
            None,
            "aimed at leases, not pods"
        );
        injector.set(FaultOptions::default());
        assert_eq!(
            injector.draw(&shape("ec2-kubelet/0.1", true, true)),
            None,
            "rate 0: off"
        );
        assert_eq!("drop-watch".parse::<Fault>(), Ok(Fault::DropWatch));
        assert!(
            "teapot"
                .parse::<Fault>()
                .unwrap_err()
                .contains("one of server-error")
        );
    }
}
