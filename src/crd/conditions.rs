//! Status conditions in the Kubernetes convention: one entry per `type`, whose
//! `lastTransitionTime` moves only when `status` changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The three values of a condition's `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }
}

/// Sets the condition of `type_` in `conditions`, keeping `lastTransitionTime` when the status
/// did not change. Returns whether anything changed, so callers can skip a no-op status write.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status_str = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed = existing.status != status_str
                || existing.reason != reason
                || existing.message != message
                || existing.observed_generation != observed_generation;
            if existing.status != status_str {
                existing.last_transition_time = now;
            }
            existing.status = status_str.into();
            existing.reason = reason.into();
            existing.message = message.into();
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status: status_str.into(),
                reason: reason.into(),
                message: message.into(),
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Pending",
            "",
            Some(1),
            at(10)
        ));
        assert!(set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::False,
            "Pending",
            "waiting",
            Some(1),
            at(20)
        ));
        assert_eq!(
            conditions[0].last_transition_time,
            at(10),
            "same status keeps the transition time"
        );
        assert!(set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "AllNodesReady",
            "",
            Some(2),
            at(30)
        ));
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn identical_condition_is_not_a_change() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "Ok",
            "fine",
            Some(1),
            at(1),
        );
        assert!(!set_condition(
            &mut conditions,
            "Ready",
            ConditionStatus::True,
            "Ok",
            "fine",
            Some(1),
            at(2)
        ));
        assert!(set_condition(
            &mut conditions,
            "Degraded",
            ConditionStatus::False,
            "Ok",
            "",
            Some(1),
            at(2)
        ));
        assert_eq!(conditions.len(), 2);
    }
}
