//! `Ec2Instance` records as every replica sees them, and the writes that keep them.
//!
//! Every replica follows the records with one watch ([`Records::run`]) and keeps them indexed
//! by name, by pod UID and by pool: pod workers find their pod's instance there after a restart,
//! the kubelet API finds the instance a request is for, and the leader's garbage collector,
//! warm pools and counts read the pool's records without listing them. Workers never take the
//! store's word for what they just wrote themselves: they keep their own until they restart.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::VirtualNode;
use super::synced::Synced;
use super::{Error, Result};
use crate::cloud::{Instance, LaunchRequest};
use crate::crd::{Ec2Instance, Ec2InstanceSpec, Ec2NodePool, INSTANCE_FINALIZER, PodRef, labels, tags};

#[derive(Default)]
struct State {
    by_name: HashMap<String, Arc<Ec2Instance>>,
    /// Pod UID -> record name (differs for a claimed warm instance).
    by_pod: HashMap<String, String>,
}

impl State {
    fn insert(&mut self, mut record: Ec2Instance) {
        // What nobody reads here: at 10,000 records the managed fields alone are megabytes, and
        // the labels and owner reference (for selectors and the garbage collector) about 1 KiB
        // a record. Every write to a record is a merge patch: nothing writes these copies back.
        record.metadata.managed_fields = None;
        record.metadata.annotations = None;
        record.metadata.labels = None;
        record.metadata.owner_references = None;
        let name = record.name_any();
        self.remove(&name);
        if let Some(uid) = record.pod_uid() {
            self.by_pod.insert(uid.to_string(), name.clone());
        }
        self.by_name.insert(name, Arc::new(record));
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.by_name.remove(name)
            && let Some(uid) = old.pod_uid()
            && self.by_pod.get(uid).is_some_and(|n| n == name)
        {
            self.by_pod.remove(uid);
        }
    }
}

/// The records of every pool, as the watch last delivered them; cheap to clone.
#[derive(Clone)]
pub struct Records {
    state: Arc<RwLock<State>>,
    ready: Synced,
    /// Counts the changes the store took in (see [`Records::changes`]).
    changes: watch::Sender<u64>,
}

impl Default for Records {
    fn default() -> Self {
        Records {
            state: Default::default(),
            ready: Synced::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl Records {
    /// Follows the records until the stream ends (it retries with backoff; a re-list replaces
    /// what the store held).
    pub async fn run(&self, client: Client) {
        let api: Api<Ec2Instance> = Api::all(client);
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        let mut relist: Option<State> = None;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    if matches!(&error, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
                    {
                        tracing::error!(%error, "the Ec2Instance CRD is not installed: apply crds/ (`helm upgrade` does not update CRDs); node tasks wait for it");
                    } else {
                        tracing::warn!(%error, "watching Ec2Instance records");
                    }
                    continue;
                }
            };
            let changed = !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            match event {
                watcher::Event::Apply(record) => state.insert(record),
                watcher::Event::Delete(record) => state.remove(&record.name_any()),
                watcher::Event::Init => relist = Some(State::default()),
                watcher::Event::InitApply(record) => relist.get_or_insert_with(State::default).insert(record),
                watcher::Event::InitDone => {
                    *state = relist.take().unwrap_or_default();
                    drop(state);
                    self.ready.mark();
                }
            }
            if changed {
                self.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Turns changed whenever the store changed (a record applied or deleted, a re-list done).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until the first list has been read.
    pub async fn ready(&self) {
        self.ready.wait().await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Ec2Instance>> {
        self.read().by_name.get(name).cloned()
    }

    /// The record of the pod with this UID.
    pub fn of_pod(&self, uid: &str) -> Option<Arc<Ec2Instance>> {
        let state = self.read();
        let name = state.by_pod.get(uid).map(String::as_str).unwrap_or(uid);
        state.by_name.get(name).cloned()
    }

    /// The records of a pool.
    pub fn of_pool(&self, pool: &str) -> Vec<Arc<Ec2Instance>> {
        self.of_pool_where(pool, |_| true)
    }

    /// The records of a pool that `keep` keeps (only those are cloned: the warm pools and the
    /// counts ask often for a few records among thousands).
    pub fn of_pool_where(&self, pool: &str, keep: impl Fn(&Ec2Instance) -> bool) -> Vec<Arc<Ec2Instance>> {
        self.read()
            .by_name
            .values()
            .filter(|r| r.spec.pool == pool && keep(r))
            .cloned()
            .collect()
    }

    /// Every record.
    pub fn all(&self) -> Vec<Arc<Ec2Instance>> {
        self.read().by_name.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn api(client: &Client) -> Api<Ec2Instance> {
    Api::all(client.clone())
}

/// The record name of a warm instance of `pool`: its EC2 idempotency key too.
pub fn warm_name(pool: &str) -> String {
    let suffix = format!("{:016x}", rand::random::<u64>());
    let mut pool = pool.to_string();
    pool.truncate(253 - "warm--".len() - suffix.len());
    format!("warm-{}-{suffix}", pool.trim_end_matches(['.', '-']))
}

/// The labels of a record: pool, node, pod and warm, each only if a label can hold it.
pub fn record_labels(pool: &str, node: &str, pod: Option<&PodRef>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |key: &str, value: &str| {
        if !value.is_empty()
            && let Some(value) = labels::value(value)
        {
            out.insert(key.to_string(), value.to_string());
        }
    };
    put(labels::POOL, pool);
    put(labels::NODE, node);
    match pod {
        Some(pod) => {
            put(labels::POD_NAMESPACE, &pod.namespace);
            put(labels::POD_NAME, &pod.name);
            put(labels::POD_UID, &pod.uid);
            put(labels::WARM, "false");
        }
        None => put(labels::WARM, "true"),
    }
    out
}

/// What a record asks for an instance launched from `request`.
pub fn spec_of_request(request: &LaunchRequest, pod: Option<PodRef>) -> Ec2InstanceSpec {
    Ec2InstanceSpec {
        pool: request.pool.clone(),
        node: request.node.clone(),
        pod,
        instance_type: request.instance_type.clone(),
        image_id: request.image_id.clone(),
        subnet_id: request.subnet_id.clone(),
        security_group_ids: request.security_group_ids.clone(),
        iam_instance_profile: request.iam_instance_profile.clone(),
        agent_port: i32::from(request.agent_port),
        spot: request.spot,
    }
}

/// What a record written after the fact (for an instance whose record is gone) can say: what
/// the instance and the node tell.
pub fn spec_of_instance(node: &VirtualNode, instance: &Instance, pod: PodRef) -> Ec2InstanceSpec {
    Ec2InstanceSpec {
        pool: node.pool.clone(),
        node: node.name.clone(),
        pod: Some(pod),
        instance_type: instance.instance_type.clone(),
        agent_port: instance
            .tag(tags::AGENT_PORT)
            .and_then(|p| p.parse().ok())
            .unwrap_or(node.spec.agent.port),
        ..Default::default()
    }
}

/// A new record named `name` for `spec`, owned by the pool (`pool_uid`), with the finalizer.
pub fn new_record(name: &str, spec: Ec2InstanceSpec, pool_uid: &str) -> Ec2Instance {
    let labels = record_labels(&spec.pool, &spec.node, spec.pod.as_ref());
    let pool = spec.pool.clone();
    let mut record = Ec2Instance::new(name, spec);
    record.metadata.labels = Some(labels);
    record.metadata.finalizers = Some(vec![INSTANCE_FINALIZER.to_string()]);
    if !pool_uid.is_empty() {
        record.metadata.owner_references = Some(vec![OwnerReference {
            api_version: Ec2NodePool::api_version(&()).into_owned(),
            kind: Ec2NodePool::kind(&()).into_owned(),
            name: pool,
            uid: pool_uid.to_string(),
            controller: Some(true),
            block_owner_deletion: None,
        }]);
    }
    record
}

/// Creates `record`; one that exists already (a retry) is fine. Returns whether it was new.
pub async fn create(client: &Client, record: &Ec2Instance, writes: &Counter) -> Result<bool> {
    writes.inc();
    match api(client).create(&PostParams::default(), record).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 && status.reason == "AlreadyExists" => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// The record of the pod with this UID, read from the API server (by name, then by label: a
/// claimed warm instance's record is not named after its pod).
pub async fn find_of_pod(client: &Client, uid: &str) -> kube::Result<Option<Ec2Instance>> {
    let api = api(client);
    if let Some(record) = api.get_opt(uid).await? {
        return Ok(Some(record));
    }
    let selector = format!("{}={uid}", labels::POD_UID);
    let listed = api
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    Ok(listed.items.into_iter().next())
}

/// Merges `status` into the record's status. `Ok(false)` when the record does not exist.
pub async fn set_status(client: &Client, name: &str, status: Value, writes: &Counter) -> Result<bool> {
    writes.inc();
    let patch = json!({"status": status});
    match api(client)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Removes a record whose instance is terminated: its finalizer first (so the record never
/// waits in deletion for the finalizer's own clean-up), then the record. Gone already is fine.
pub async fn retire(client: &Client, name: &str, writes: &Counter) -> Result<()> {
    let api = api(client);
    writes.inc();
    let unfinalize = json!({"metadata": {"finalizers": null}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&unfinalize))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_not_found() => return Ok(()),
        Err(error) => return Err(error.into()),
    }
    writes.inc();
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(error) => Err(Error::from(error)),
    }
}

/// Whether an instance belongs to `record`: named by its status, or tagged with its name (or,
/// for an instance launched before records, with the pod UID it is named after).
pub fn belongs(instance: &Instance, record: &Ec2Instance) -> bool {
    let name = record.name_any();
    record.instance_id() == Some(instance.instance_id.as_str())
        || instance.tag(tags::RECORD) == Some(name.as_str())
        || (instance.tag(tags::RECORD).is_none() && instance.tag(tags::POD_UID) == Some(name.as_str()))
}

/// Terminates the live instances of `records` (all of `pool`), as one snapshot of the pool's
/// instances taken at or after `not_before` finds them, in one call through the pool's gate;
/// the ids it terminated.
pub async fn terminate_instances_of(
    ctx: &super::Context,
    pool: &str,
    records: &[&Ec2Instance],
    not_before: std::time::Instant,
) -> Result<Vec<String>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let instances = ctx.pool_instances(pool, not_before).await?;
    let ids: Vec<String> = instances
        .iter()
        .filter(|i| i.state.is_alive() && records.iter().any(|r| belongs(i, r)))
        .map(|i| i.instance_id.clone())
        .collect();
    if !ids.is_empty() {
        ctx.gate
            .call(pool, || ctx.compute.terminate_instances(&ids))
            .await?;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, pool: &str, uid: Option<&str>) -> Ec2Instance {
        let mut spec = Ec2InstanceSpec {
            pool: pool.into(),
            ..Default::default()
        };
        spec.pod = uid.map(|uid| PodRef {
            namespace: "default".into(),
            name: "web".into(),
            uid: uid.into(),
        });
        Ec2Instance::new(name, spec)
    }

    #[test]
    fn records_are_found_by_name_pod_and_pool() {
        let mut state = State::default();
        state.insert(record("uid-a", "gpu", Some("uid-a")));
        state.insert(record("warm-gpu-1", "gpu", Some("uid-b")));
        state.insert(record("warm-gpu-2", "gpu", None));
        state.insert(record("uid-c", "mac", Some("uid-c")));
        let records = Records::default();
        *records.state.write().unwrap() = state;
        assert_eq!(records.of_pod("uid-a").unwrap().name_any(), "uid-a");
        assert_eq!(records.of_pod("uid-b").unwrap().name_any(), "warm-gpu-1");
        assert!(records.of_pod("uid-x").is_none());
        assert_eq!(records.of_pool("gpu").len(), 3);
        // A claimed warm record released: its pod index goes with it.
        records.state.write().unwrap().remove("warm-gpu-1");
        assert!(records.of_pod("uid-b").is_none());
        assert_eq!(records.len(), 3);
    }

    #[test]
    fn an_instance_belongs_to_the_record_that_names_it_or_that_it_is_tagged_with() {
        let instance = |id: &str, tags: &[(&str, &str)]| Instance {
            instance_id: id.into(),
            state: crate::cloud::InstanceState::Running,
            instance_type: "t3.micro".into(),
            private_ip: None,
            launch_time: 0,
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let mut named = record("uid-a", "gpu", Some("uid-a"));
        named.status = Some(crate::crd::Ec2InstanceStatus {
            instance_id: Some("i-1".into()),
            ..Default::default()
        });
        assert!(belongs(&instance("i-1", &[]), &named), "named by the status");
        let unnamed = record("warm-gpu-1", "gpu", None);
        assert!(belongs(
            &instance("i-2", &[(tags::RECORD, "warm-gpu-1")]),
            &unnamed
        ));
        assert!(!belongs(
            &instance("i-2", &[(tags::RECORD, "warm-gpu-9")]),
            &unnamed
        ));
        // Launched before records: the pod UID the record is named after.
        let old = record("uid-c", "gpu", Some("uid-c"));
        assert!(belongs(&instance("i-3", &[(tags::POD_UID, "uid-c")]), &old));
        // A claimed warm instance carries its pod's UID but another record's name.
        let claimed = [(tags::POD_UID, "uid-c"), (tags::RECORD, "warm-gpu-1")];
        assert!(!belongs(&instance("i-4", &claimed), &old));
    }

    #[test]
    fn labels_hold_what_fits_and_warm_names_are_valid() {
        let pod = PodRef {
            namespace: "default".into(),
            name: "x".repeat(64),
            uid: "0b7c9a0e-1111-2222-3333-444455556666".into(),
        };
        let labels = record_labels("gpu", "ip-10-0-0-1.gpu", Some(&pod));
        assert_eq!(labels.get(labels::POD_NAME), None, "too long for a label");
        assert_eq!(labels[labels::POD_UID], pod.uid);
        assert_eq!(labels[labels::NODE], "ip-10-0-0-1.gpu");
        assert_eq!(labels[labels::WARM], "false");
        let warm = record_labels("gpu", "", None);
        assert_eq!(warm[labels::WARM], "true");
        assert!(!warm.contains_key(labels::NODE));
        let name = warm_name(&"p".repeat(253));
        assert!(name.len() <= 253 && crate::crd::is_dns_subdomain(&name), "{name}");
    }
}
