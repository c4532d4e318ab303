//! Kubernetes events (`events.k8s.io/v1`), recorded as client-go's event recorder does: an event
//! that repeats with the same message becomes one event with a `series` count, and an event
//! whose message differs is a new event, so what a user reads is always what happened last.
//!
//! kube's `Recorder` keys repeats without the message (a later "created 1 ENI; 3 wanted" was
//! counted into the first "created 2 ENIs; 2 wanted"), and the API server refuses a change of
//! `note` on an existing event, so the message must be part of the key.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// How long a repeat still counts into an earlier event (client-go's series window).
const SERIES_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_mins(6);
/// The most series kept; past it the oldest are forgotten (their next repeat starts a new event).
const MAX_SERIES: usize = 4096;

/// Whether an event is routine or calls for attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// What makes two events "the same" (client-go's `getKey`): who reports it, about what object
/// (not which version of it), and what it says.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    type_: EventType,
    reason: String,
    action: String,
    note: String,
}

impl Key {
    fn new(regarding: &ObjectReference, type_: EventType, reason: &str, action: &str, note: String) -> Key {
        Key {
            api_version: regarding.api_version.clone(),
            kind: regarding.kind.clone(),
            namespace: regarding.namespace.clone(),
            name: regarding.name.clone(),
            uid: regarding.uid.clone(),
            type_,
            reason: reason.to_string(),
            action: action.to_string(),
            note,
        }
    }
}

/// An event already written, that repeats count into.
#[derive(Clone, Debug, PartialEq)]
struct Series {
    name: String,
    namespace: String,
    count: i32,
    last: jiff::Timestamp,
}

/// The write an event needs.
#[derive(Debug, PartialEq)]
enum Write {
    /// A new event with this name.
    Create { name: String },
    /// A repeat: the existing event's series goes to `count`.
    Repeat {
        name: String,
        namespace: String,
        count: i32,
    },
}

/// The recent events of this recorder, by key.
#[derive(Default)]
struct Recent {
    series: HashMap<Key, Series>,
}

impl Recent {
    /// Decides how to record `key` at `now`, and remembers it.
    fn record(&mut self, key: Key, name: String, namespace: &str, now: jiff::Timestamp) -> Write {
        self.series
            .retain(|_, s| now.duration_since(s.last) < SERIES_WINDOW);
        if let Some(series) = self.series.get_mut(&key) {
            series.count += 1;
            series.last = now;
            return Write::Repeat {
                name: series.name.clone(),
                namespace: series.namespace.clone(),
                count: series.count,
            };
        }
        if self.series.len() >= MAX_SERIES
            && let Some(oldest) = self
                .series
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
        {
            self.series.remove(&oldest);
        }
        let series = Series {
            name: name.clone(),
            namespace: namespace.to_string(),
            count: 1,
            last: now,
        };
        self.series.insert(key, series);
        Write::Create { name }
    }

    /// Forgets `key` (its event could not be written: the next one starts over).
    fn forget(&mut self, key: &Key) {
        self.series.remove(key);
    }
}

/// Records events for one reporting controller and instance.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

/// `<object>.<nanoseconds in hex>`, as client-go names events.
fn event_name(regarding: &ObjectReference, controller: &str, now: jiff::Timestamp) -> String {
    format!(
        "{}.{:x}",
        regarding.name.as_deref().unwrap_or(controller),
        now.as_nanosecond()
    )
}

impl Recorder {
    pub fn new(client: Client, controller: &str, instance: &str) -> Recorder {
        Recorder {
            client,
            controller: controller.into(),
            instance: instance.into(),
            recent: Mutex::default(),
        }
    }

    /// The event `key` describes, about `regarding`.
    fn event(&self, name: String, regarding: &ObjectReference, key: &Key, now: jiff::Timestamp) -> Event {
        Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace_of(regarding)),
                ..Default::default()
            },
            action: Some(key.action.clone()),
            reason: Some(key.reason.clone()),
            note: Some(key.note.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(key.type_.as_str().into()),
            ..Default::default()
        }
    }

    /// Records an event that may repeat (a controller's finding, a launch retried through an
    /// outage): the same message again within six minutes counts into one event's series, a
    /// different message is an event of its own. Events are best effort: a failed write is
    /// logged at warn with its cause and the caller goes on.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let now = jiff::Timestamp::now();
        let key = Key::new(regarding, type_, reason, action, note);
        let namespace = namespace_of(regarding);
        let name = event_name(regarding, &self.controller, now);
        let write =
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(key.clone(), name, &namespace, now);
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let result = match write {
            Write::Create { name } => {
                let event = self.event(name, regarding, &key, now);
                events.create(&PostParams::default(), &event).await.map(drop)
            }
            Write::Repeat { name, count, .. } => {
                let series = EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                };
                let patch = json!({"series": series});
                match events
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    // The event expired meanwhile (the API server keeps events an hour): start over.
                    Err(kube::Error::Api(status)) if status.is_not_found() => {
                        let name = event_name(regarding, &self.controller, now);
                        let event = self.event(name.clone(), regarding, &key, now);
                        {
                            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                            recent.forget(&key);
                            recent.record(key.clone(), name, &namespace, now);
                        }
                        events.create(&PostParams::default(), &event).await.map(drop)
                    }
                    other => other.map(drop),
                }
            }
        };
        if let Err(error) = result {
            self.recent.lock().unwrap_or_else(|p| p.into_inner()).forget(&key);
            log_failure(&error, reason, regarding);
        }
    }

    /// Records an event that happens once in its object's life (a pod's launch, its
    /// termination): no series is kept for it, so at thousands of pods the recorder holds
    /// nothing for them. A failed write is logged at warn with its cause.
    pub async fn publish_once(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let now = jiff::Timestamp::now();
        let name = event_name(&regarding, &self.controller, now);
        let namespace = namespace_of(&regarding);
        let event = self.event(
            name,
            &regarding,
            &Key::new(&regarding, type_, reason, reason, note),
            now,
        );
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            log_failure(&error, reason, &regarding);
        }
    }
}

/// Events of cluster-scoped objects live in `default`, as the API server expects.
fn namespace_of(regarding: &ObjectReference) -> String {
    regarding.namespace.clone().unwrap_or_else(|| "default".into())
}

/// The API server refuses new objects in a namespace being deleted (NamespaceLifecycle
/// admission): the events of its pods' last moments are expected to be lost, as client-go's
/// recorder drops them.
fn namespace_terminating(error: &kube::Error) -> bool {
    let kube::Error::Api(status) = error else {
        return false;
    };
    status.code == 403
        && status
            .details
            .iter()
            .flat_map(|d| &d.causes)
            .any(|c| c.reason == "NamespaceTerminating")
}

/// A failed event write: at warn with its cause, unless its namespace is being deleted.
fn log_failure(error: &kube::Error, reason: &str, regarding: &ObjectReference) {
    if namespace_terminating(error) {
        tracing::debug!(%error, %reason, object = ?regarding.name, "event dropped: its namespace is being deleted");
    } else {
        tracing::warn!(%error, %reason, object = ?regarding.name, "recording an event");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_refused_in_a_terminating_namespace_are_told_apart() {
        // As kube-apiserver's NamespaceLifecycle admission answers (seen in make e2e).
        let terminating: kube::core::Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 403,
            "reason": "Forbidden",
            "message": "events.events.k8s.io \"web.18ecdb\" is forbidden: unable to create new content in namespace e2e because it is being terminated",
            "details": {"name": "web.18ecdb", "group": "events.k8s.io", "kind": "events",
                "causes": [{"reason": "NamespaceTerminating", "message": "namespace e2e is being terminated", "field": "metadata.namespace"}]},
        }))
        .unwrap();
        assert!(super::namespace_terminating(&kube::Error::Api(Box::new(
            terminating.clone()
        ))));
        let mut rbac = terminating;
        rbac.details = None;
        rbac.message =
            "events.events.k8s.io is forbidden: User \"system:serviceaccount:x:y\" cannot create resource"
                .into();
        assert!(!super::namespace_terminating(&kube::Error::Api(Box::new(rbac))));
    }

    use super::*;

    fn key(note: &str) -> Key {
        Key {
            api_version: Some("ec2-kubelet.io/v1alpha1".into()),
            kind: Some("Ec2NodePool".into()),
            namespace: None,
            name: Some("web".into()),
            uid: Some("uid-1".into()),
            type_: EventType::Normal,
            reason: "ScaledUp".into(),
            action: "ScaleUp".into(),
            note: note.into(),
        }
    }

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn the_same_message_repeats_into_one_series_and_a_new_message_is_a_new_event() {
        let mut recent = Recent::default();
        let first = recent.record(key("created 2; 2 wanted"), "web.1".into(), "default", at(0));
        assert_eq!(first, Write::Create { name: "web.1".into() });
        let again = recent.record(key("created 2; 2 wanted"), "web.2".into(), "default", at(10));
        assert_eq!(
            again,
            Write::Repeat {
                name: "web.1".into(),
                namespace: "default".into(),
                count: 2
            }
        );
        // What happened last is what the user reads: a new message is its own event.
        let scaled = recent.record(key("created 1; 3 wanted"), "web.3".into(), "default", at(20));
        assert_eq!(scaled, Write::Create { name: "web.3".into() });
        let third = recent.record(key("created 2; 2 wanted"), "web.4".into(), "default", at(30));
        assert!(matches!(third, Write::Repeat { count: 3, .. }), "{third:?}");
    }

    #[test]
    fn a_series_ends_after_six_quiet_minutes_and_the_cache_is_bounded() {
        let mut recent = Recent::default();
        recent.record(key("x"), "web.1".into(), "default", at(0));
        assert!(matches!(
            recent.record(key("x"), "web.2".into(), "default", at(359)),
            Write::Repeat { count: 2, .. }
        ));
        assert_eq!(
            recent.record(key("x"), "web.3".into(), "default", at(359 + 360)),
            Write::Create { name: "web.3".into() }
        );
        for i in 0..MAX_SERIES + 10 {
            recent.record(
                key(&i.to_string()),
                format!("n{i}"),
                "default",
                at(800 + i as i64 / 100),
            );
        }
        assert_eq!(recent.series.len(), MAX_SERIES);
        assert!(recent.series.contains_key(&key(&(MAX_SERIES + 9).to_string())));
    }

    #[test]
    fn a_failed_write_is_forgotten_so_the_next_one_creates() {
        let mut recent = Recent::default();
        recent.record(key("x"), "web.1".into(), "default", at(0));
        recent.forget(&key("x"));
        assert_eq!(
            recent.record(key("x"), "web.2".into(), "default", at(1)),
            Write::Create { name: "web.2".into() }
        );
    }
}
