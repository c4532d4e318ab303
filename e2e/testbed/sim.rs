//! The `sim` backend: an in-process EC2 simulator for benchmarks. Instances boot after a
//! configurable latency (with jitter), every API call takes a token from an EC2-like token
//! bucket of its action class (`RequestLimitExceeded` when empty), `RunInstances` fails with
//! `InsufficientInstanceCapacity` at a configurable rate, and every call is counted per action.
//!
//! Simulated agents speak the real gRPC protocol: a few tonic servers on loopback serve every
//! simulated instance, told apart by the [`INSTANCE_HEADER`] the operator sends with each call.
//! A [`SimCloud`] outlives the operators that use it (as EC2 outlives a crashed operator), so a
//! benchmark can kill an operator and start another on the same cloud.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use crate::heap;
use ec2_kubelet::agent_client::INSTANCE_HEADER;
use ec2_kubelet::cloud::{
    Compute, Eni, EniRequest, Error, ImageInfo, ImageQuery, Instance, InstanceFilter, InstanceState,
    InstanceTypeInfo, LaunchRequest, Result, eni_tags, instance_tags,
};
use ec2_kubelet::crd::{TagMap, tags};
use ec2_kubelet_protocol::v1::agent_server::{Agent, AgentServer};
use ec2_kubelet_protocol::v1::{
    AttachInput, AttachOutput, ContainerState, ContainerStatus, ExecInput, ExecOutput, GetLogsRequest,
    GetStatsRequest, LaunchPodRequest, LaunchPodResponse, LogChunk, PingRequest, PingResponse, PodStats,
    PodStatus, PortForwardInput, PortForwardOutput, TerminatePodRequest, TerminatePodResponse,
    WatchPodStatusRequest, container_state,
};

/// An EC2 token bucket: `capacity` calls at once, refilled by `refill_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub capacity: f64,
    pub refill_per_second: f64,
}

/// The request-rate limits of an account, per action class. The defaults are EC2's documented
/// defaults (RunInstances 1000 + 2/s, TerminateInstances 1000 + 20/s, other mutating actions
/// 200 + 5/s, describes 100 + 20/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub run_instances: Bucket,
    pub terminate_instances: Bucket,
    pub mutating: Bucket,
    pub describe: Bucket,
}

impl Default for RateLimits {
    fn default() -> Self {
        let bucket = |capacity, refill_per_second| Bucket {
            capacity,
            refill_per_second,
        };
        RateLimits {
            run_instances: bucket(1000.0, 2.0),
            terminate_instances: bucket(1000.0, 20.0),
            mutating: bucket(200.0, 5.0),
            describe: bucket(100.0, 20.0),
        }
    }
}

impl RateLimits {
    /// Every bucket `factor` times larger and faster (an account with raised limits).
    pub fn scaled(self, factor: f64) -> RateLimits {
        let scale = |b: Bucket| Bucket {
            capacity: b.capacity * factor,
            refill_per_second: b.refill_per_second * factor,
        };
        RateLimits {
            run_instances: scale(self.run_instances),
            terminate_instances: scale(self.terminate_instances),
            mutating: scale(self.mutating),
            describe: scale(self.describe),
        }
    }
}

/// How the simulated cloud behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub cluster: String,
    /// From `RunInstances` until the agent answers.
    pub boot_latency: Duration,
    /// Up to this much more, uniformly.
    pub boot_jitter: Duration,
    /// Share of `RunInstances` calls that fail with `InsufficientInstanceCapacity` (0..1).
    pub capacity_error_rate: f64,
    /// The round trip of every API call.
    pub call_latency: Duration,
    pub limits: RateLimits,
    /// How many gRPC servers the simulated agents share.
    pub agent_servers: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            cluster: "ec2-kubelet".into(),
            boot_latency: Duration::ZERO,
            boot_jitter: Duration::ZERO,
            capacity_error_rate: 0.0,
            call_latency: Duration::ZERO,
            limits: RateLimits::default(),
            agent_servers: 16,
        }
    }
}

struct TokenBucket {
    limit: Bucket,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(limit: Bucket) -> Self {
        TokenBucket {
            limit,
            tokens: limit.capacity,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.limit.refill_per_second;
        self.tokens = (self.tokens + refill).min(self.limit.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A pod on a simulated agent.
struct SimPod {
    status: watch::Sender<PodStatus>,
}

struct SimInstance {
    instance: Instance,
    booted_at: Instant,
    /// Which agent server answers for it.
    server: usize,
    pods: HashMap<String, SimPod>,
}

/// What happened to one pod, as the simulator saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodTimeline {
    /// The first `RunInstances` for the pod.
    pub run_instances: Option<Instant>,
    /// The agent reported the pod's containers running.
    pub agent_running: Option<Instant>,
    /// The latest `WatchPodStatus` stream opened for it.
    pub watched: Option<Instant>,
    /// Instances created for the pod (more than one is a duplicate launch).
    pub instances: u32,
}

/// Counters of the simulated cloud.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimCounters {
    /// Calls by API action, throttled ones included.
    pub calls: BTreeMap<String, u64>,
    pub throttled: BTreeMap<String, u64>,
    pub capacity_errors: u64,
    pub instances_launched: u64,
    pub instances_running: u64,
    /// Pod UIDs for which more than one instance was created.
    pub duplicate_launches: u64,
}

impl SimCounters {
    /// Calls of one action.
    pub fn of(&self, action: &str) -> u64 {
        self.calls.get(action).copied().unwrap_or(0)
    }

    /// What happened between `earlier` and these counters.
    pub fn since(&self, earlier: &SimCounters) -> SimCounters {
        let minus = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        SimCounters {
            calls: minus(&self.calls, &earlier.calls),
            throttled: minus(&self.throttled, &earlier.throttled),
            capacity_errors: self.capacity_errors - earlier.capacity_errors,
            instances_launched: self.instances_launched - earlier.instances_launched,
            instances_running: self.instances_running,
            duplicate_launches: self.duplicate_launches - earlier.duplicate_launches,
        }
    }
}

#[derive(Default)]
struct State {
    enis: BTreeMap<String, Eni>,
    instances: HashMap<String, SimInstance>,
    /// The newest instance of each pod UID (the `ClientToken` index).
    by_pod: HashMap<String, String>,
    timelines: HashMap<String, PodTimeline>,
    counters: SimCounters,
    next_id: u64,
}

/// The simulated cloud: EC2 state, rate limits and the agent servers.
pub struct SimCloud {
    options: SimOptions,
    state: Mutex<State>,
    boot_latency: Mutex<Duration>,
    buckets: Mutex<HashMap<&'static str, TokenBucket>>,
    /// `http://127.0.0.1:port` of each agent server.
    servers: Vec<String>,
    _stop: watch::Sender<bool>,
}

/// The action class an EC2 action's rate limit belongs to.
fn class(action: &str) -> &'static str {
    match action {
        "RunInstances" => "run",
        "TerminateInstances" => "terminate",
        a if a.starts_with("Describe") => "describe",
        _ => "mutating",
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis(at: Instant) -> i64 {
    let ago = at.elapsed().as_millis() as i64;
    ec2_kubelet_protocol::util::now_ms() - ago
}

impl SimCloud {
    /// Starts the agent servers on loopback; the cloud lives while the returned handle does.
    pub async fn start(options: SimOptions) -> std::io::Result<Arc<SimCloud>> {
        let (stop, stopped) = watch::channel(false);
        let mut listeners = Vec::new();
        for _ in 0..options.agent_servers.max(1) {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let servers = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| format!("http://{a}")))
            .collect::<std::io::Result<Vec<_>>>()?;
        let cloud = Arc::new(SimCloud {
            boot_latency: Mutex::new(options.boot_latency),
            options,
            state: Mutex::new(State::default()),
            buckets: Mutex::new(HashMap::new()),
            servers,
            _stop: stop,
        });
        for listener in listeners {
            let service = AgentServer::new(SimAgents {
                cloud: Arc::downgrade(&cloud),
            });
            let mut stopped = stopped.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .max_concurrent_streams(Some(1 << 20))
                    .add_service(service)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    }),
            );
        }
        Ok(cloud)
    }

    /// Instances launched from now on boot in `latency` (plus the jitter).
    pub fn set_boot_latency(&self, latency: Duration) {
        *lock(&self.boot_latency) = latency;
    }

    /// A `Compute` on this cloud for one operator.
    pub fn compute(self: &Arc<Self>) -> SimCompute {
        SimCompute { cloud: self.clone() }
    }

    pub fn counters(&self) -> SimCounters {
        let state = lock(&self.state);
        let mut counters = state.counters.clone();
        counters.instances_running = state
            .instances
            .values()
            .filter(|i| i.instance.state.is_alive())
            .count() as u64;
        counters
    }

    /// What happened to a pod, by UID.
    pub fn timeline(&self, pod_uid: &str) -> PodTimeline {
        lock(&self.state)
            .timelines
            .get(pod_uid)
            .copied()
            .unwrap_or_default()
    }

    /// Pod UIDs of the live instances (one entry per instance).
    pub fn live_pod_uids(&self) -> Vec<String> {
        lock(&self.state)
            .instances
            .values()
            .filter(|i| i.instance.state.is_alive())
            .filter_map(|i| i.instance.tag(tags::POD_UID).map(str::to_string))
            .collect()
    }

    /// Takes a token for `action` (or fails it as throttled) after the call's round trip.
    async fn call(&self, action: &str) -> Result<()> {
        if !self.options.call_latency.is_zero() {
            tokio::time::sleep(self.options.call_latency).await;
        }
        let class = class(action);
        let allowed = {
            let mut buckets = lock(&self.buckets);
            let limits = &self.options.limits;
            buckets
                .entry(class)
                .or_insert_with(|| {
                    TokenBucket::new(match class {
                        "run" => limits.run_instances,
                        "terminate" => limits.terminate_instances,
                        "describe" => limits.describe,
                        _ => limits.mutating,
                    })
                })
                .take()
        };
        heap::as_simulator(|| {
            let mut state = lock(&self.state);
            *state.counters.calls.entry(action.into()).or_insert(0) += 1;
            if !allowed {
                *state.counters.throttled.entry(action.into()).or_insert(0) += 1;
            }
        });
        if allowed {
            Ok(())
        } else {
            Err(Error::Throttled {
                action: action.into(),
            })
        }
    }

    /// A booted, running instance, for the agent servers.
    fn booted(&self, instance_id: &str) -> std::result::Result<(), Status> {
        let state = lock(&self.state);
        match state.instances.get(instance_id) {
            Some(i) if i.instance.state.is_alive() && i.booted_at <= Instant::now() => Ok(()),
            Some(i) if i.instance.state.is_alive() => Err(Status::unavailable("booting")),
            _ => Err(Status::unavailable("no such instance")),
        }
    }

    fn with_instance<T>(
        &self,
        instance_id: &str,
        f: impl FnOnce(&mut SimInstance, &mut HashMap<String, PodTimeline>) -> T,
    ) -> std::result::Result<T, Status> {
        self.booted(instance_id)?;
        let mut state = lock(&self.state);
        let State {
            instances, timelines, ..
        } = &mut *state;
        let instance = instances
            .get_mut(instance_id)
            .ok_or_else(|| Status::unavailable("no such instance"))?;
        Ok(f(instance, timelines))
    }
}

/// The `Compute` of one operator on a [`SimCloud`].
pub struct SimCompute {
    cloud: Arc<SimCloud>,
}

#[async_trait::async_trait]
impl Compute for SimCompute {
    fn backend(&self) -> &'static str {
        "sim"
    }

    async fn ensure_eni(&self, request: &EniRequest) -> Result<Eni> {
        self.cloud.call("DescribeNetworkInterfaces").await?;
        let existing = lock(&self.cloud.state)
            .enis
            .values()
            .find(|e| e.pool == request.pool && e.index == request.index)
            .cloned();
        if let Some(eni) = existing {
            return Ok(eni);
        }
        self.cloud.call("CreateNetworkInterface").await?;
        let mut state = lock(&self.cloud.state);
        state.next_id += 1;
        let n = state.next_id;
        let eni = Eni {
            eni_id: format!("eni-{n:017x}"),
            private_ip: format!("10.0.{}.{}", n / 250, n % 250 + 4),
            subnet_id: request.subnet_id.clone(),
            pool: request.pool.clone(),
            index: request.index,
            tags: eni_tags(&self.cloud.options.cluster, request),
        };
        heap::as_simulator(|| state.enis.insert(eni.eni_id.clone(), eni.clone()));
        Ok(eni)
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        self.cloud.call("DeleteNetworkInterface").await?;
        lock(&self.cloud.state).enis.remove(eni_id);
        Ok(())
    }

    async fn describe_enis(&self, pool: &str) -> Result<Vec<Eni>> {
        self.cloud.call("DescribeNetworkInterfaces").await?;
        let mut enis: Vec<Eni> = lock(&self.cloud.state)
            .enis
            .values()
            .filter(|e| e.pool == pool)
            .cloned()
            .collect();
        enis.sort_by_key(|e| e.index);
        Ok(enis)
    }

    async fn instance_types(&self, names: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        // The local backend's catalogue; cached by real backends, so not an API call per pod.
        Ok(ec2_kubelet::cloud::local::catalogue(names))
    }

    async fn launch_instance(&self, request: &LaunchRequest) -> Result<Instance> {
        heap::as_simulator(|| {
            let mut state = lock(&self.cloud.state);
            let timeline = state.timelines.entry(request.pod_uid.clone()).or_default();
            timeline.run_instances.get_or_insert_with(Instant::now);
        });
        self.cloud.call("RunInstances").await?;
        if !ec2_kubelet::cloud::local::offered(&request.instance_type) {
            return Err(Error::InstanceTypeNotFound {
                instance_type: request.instance_type.clone(),
            });
        }
        let options = &self.cloud.options;
        if options.capacity_error_rate > 0.0 && rand::random::<f64>() < options.capacity_error_rate {
            lock(&self.cloud.state).counters.capacity_errors += 1;
            return Err(Error::InsufficientCapacity {
                instance_type: request.instance_type.clone(),
            });
        }
        let boot_latency = *lock(&self.cloud.boot_latency);
        let mut state = lock(&self.cloud.state);
        // The ClientToken: the same pod gets its live instance back.
        if let Some(existing) = state
            .by_pod
            .get(&request.pod_uid)
            .and_then(|id| state.instances.get(id))
            .filter(|i| i.instance.state.is_alive())
        {
            return Ok(existing.instance.clone());
        }
        state.next_id += 1;
        let n = state.next_id;
        let jitter = options.boot_jitter.mul_f64(rand::random::<f64>());
        let instance = Instance {
            instance_id: format!("i-{n:017x}"),
            state: InstanceState::Pending,
            instance_type: request.instance_type.clone(),
            private_ip: Some(format!("10.1.{}.{}", (n / 250) % 250, n % 250 + 4)),
            launch_time: ec2_kubelet_protocol::util::now_ms(),
            tags: instance_tags(&options.cluster, request),
        };
        let server = (n as usize) % self.cloud.servers.len();
        // The simulated cloud's copy is the simulator's; the one returned is the operator's.
        heap::as_simulator(|| {
            state
                .by_pod
                .insert(request.pod_uid.clone(), instance.instance_id.clone());
            state.instances.insert(
                instance.instance_id.clone(),
                SimInstance {
                    instance: instance.clone(),
                    booted_at: Instant::now() + boot_latency + jitter,
                    server,
                    pods: HashMap::new(),
                },
            );
        });
        state.counters.instances_launched += 1;
        let timeline = state.timelines.entry(request.pod_uid.clone()).or_default();
        timeline.instances += 1;
        if timeline.instances == 2 {
            state.counters.duplicate_launches += 1;
        }
        Ok(instance)
    }

    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        self.cloud.call("DescribeInstances").await?;
        let cluster = self.cloud.options.cluster.as_str();
        let now = Instant::now();
        let state = lock(&self.cloud.state);
        let mut found: Vec<Instance> = state
            .instances
            .values()
            .filter(|i| match filter {
                InstanceFilter::Ids(ids) => ids.contains(&i.instance.instance_id),
                InstanceFilter::Pool(pool) => {
                    i.instance.tag(tags::POOL) == Some(pool.as_str())
                        && i.instance.tag(tags::CLUSTER) == Some(cluster)
                }
                InstanceFilter::Cluster => i.instance.tag(tags::CLUSTER) == Some(cluster),
            })
            .map(|i| {
                let mut instance = i.instance.clone();
                if instance.state == InstanceState::Pending && i.booted_at <= now {
                    instance.state = InstanceState::Running;
                }
                instance
            })
            .collect();
        found.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(found)
    }

    async fn tag_instance(&self, instance_id: &str, new_tags: &TagMap) -> Result<()> {
        self.cloud.call("CreateTags").await?;
        let mut state = lock(&self.cloud.state);
        let Some(found) = state.instances.get_mut(instance_id) else {
            return Err(Error::NotFound {
                resource: format!("instance {instance_id}"),
            });
        };
        heap::as_simulator(|| found.instance.tags.extend(new_tags.clone()));
        if let Some(uid) = new_tags.get(tags::POD_UID) {
            heap::as_simulator(|| state.by_pod.insert(uid.clone(), instance_id.to_string()));
        }
        Ok(())
    }

    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<()> {
        self.cloud.call("TerminateInstances").await?;
        let mut state = lock(&self.cloud.state);
        for id in instance_ids {
            if let Some(instance) = state.instances.get_mut(id) {
                instance.instance.state = InstanceState::Terminated;
                // Their status streams end with the instance.
                instance.pods.clear();
            }
        }
        Ok(())
    }

    fn agent_endpoint(&self, instance: &Instance, _port: u16) -> Result<String> {
        let state = lock(&self.cloud.state);
        let server = state
            .instances
            .get(&instance.instance_id)
            .map(|i| i.server)
            .ok_or_else(|| Error::NotFound {
                resource: format!("instance {}", instance.instance_id),
            })?;
        Ok(self.cloud.servers[server].clone())
    }

    async fn describe_images(&self, query: &ImageQuery) -> Result<Vec<ImageInfo>> {
        self.cloud.call("DescribeImages").await?;
        let image = |id: &str| ImageInfo {
            image_id: id.into(),
            name: "sim".into(),
            architecture: "x86_64".into(),
            creation_date: "2026-01-01T00:00:00.000Z".into(),
        };
        Ok(match query {
            ImageQuery::Ids(ids) => ids.iter().map(|id| image(id)).collect(),
            ImageQuery::Selector { .. } => vec![image("ami-0000000000000000a")],
        })
    }

    async fn existing_subnets(&self, subnet_ids: &[String]) -> Result<Vec<String>> {
        self.cloud.call("DescribeSubnets").await?;
        Ok(subnet_ids.to_vec())
    }

    async fn existing_security_groups(&self, group_ids: &[String]) -> Result<Vec<String>> {
        self.cloud.call("DescribeSecurityGroups").await?;
        Ok(group_ids.to_vec())
    }
}

/// The agents of every simulated instance behind one gRPC server: a call names its instance in
/// the [`INSTANCE_HEADER`]. Pods "run" as soon as they are launched.
struct SimAgents {
    cloud: std::sync::Weak<SimCloud>,
}

type ServerStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

impl SimAgents {
    fn target<T>(&self, request: &Request<T>) -> std::result::Result<(Arc<SimCloud>, String), Status> {
        let cloud = self
            .cloud
            .upgrade()
            .ok_or_else(|| Status::unavailable("the simulated cloud is gone"))?;
        let instance = request
            .metadata()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{INSTANCE_HEADER}: required")))?;
        Ok((cloud, instance.to_string()))
    }
}

fn container_status(name: &str, state: container_state::State, ready: bool) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(ContainerState { state: Some(state) }),
        ready,
        started: ready,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Agent for SimAgents {
    async fn ping(
        &self,
        request: Request<PingRequest>,
    ) -> std::result::Result<Response<PingResponse>, Status> {
        let (cloud, instance) = self.target(&request)?;
        let (pod_uids, started) = cloud.with_instance(&instance, |i, _| {
            (i.pods.keys().cloned().collect(), millis(i.booted_at))
        })?;
        Ok(Response::new(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_id: instance.clone(),
            agent_instance_id: instance,
            pod_uids,
            started_at_unix_ms: started,
        }))
    }

    async fn launch_pod(
        &self,
        request: Request<LaunchPodRequest>,
    ) -> std::result::Result<Response<LaunchPodResponse>, Status> {
        let (cloud, instance) = self.target(&request)?;
        let spec = request
            .into_inner()
            .pod
            .ok_or_else(|| Status::invalid_argument("pod: required"))?;
        let already_known = cloud.with_instance(&instance, |i, timelines| {
            if i.pods.contains_key(&spec.uid) {
                return true;
            }
            let now = ec2_kubelet_protocol::util::now_ms();
            let running = container_state::State::Running(ec2_kubelet_protocol::v1::Running {
                started_at_unix_ms: now,
            });
            let status = PodStatus {
                pod_uid: spec.uid.clone(),
                containers: spec
                    .containers
                    .iter()
                    .map(|c| container_status(&c.name, running.clone(), true))
                    .collect(),
                phase: ec2_kubelet_protocol::v1::PodPhase::Running as i32,
                started_at_unix_ms: now,
                revision: 1,
                ..Default::default()
            };
            let (status, _) = watch::channel(status);
            i.pods.insert(spec.uid.clone(), SimPod { status });
            timelines.entry(spec.uid.clone()).or_default().agent_running = Some(Instant::now());
            false
        })?;
        Ok(Response::new(LaunchPodResponse { already_known }))
    }

    async fn terminate_pod(
        &self,
        request: Request<TerminatePodRequest>,
    ) -> std::result::Result<Response<TerminatePodResponse>, Status> {
        let (cloud, instance) = self.target(&request)?;
        let uid = request.into_inner().pod_uid;
        let status = cloud.with_instance(&instance, |i, _| {
            let pod = i.pods.get(&uid)?;
            let now = ec2_kubelet_protocol::util::now_ms();
            pod.status.send_modify(|status| {
                for container in &mut status.containers {
                    *container = container_status(
                        &container.name,
                        container_state::State::Terminated(ec2_kubelet_protocol::v1::Terminated {
                            exit_code: 0,
                            reason: "Completed".into(),
                            finished_at_unix_ms: now,
                            ..Default::default()
                        }),
                        false,
                    );
                }
                status.phase = ec2_kubelet_protocol::v1::PodPhase::Succeeded as i32;
                status.revision += 1;
            });
            Some(pod.status.borrow().clone())
        })?;
        let status = status.ok_or_else(|| Status::not_found(format!("pod {uid} not found")))?;
        Ok(Response::new(TerminatePodResponse { status: Some(status) }))
    }

    type WatchPodStatusStream = ServerStream<PodStatus>;

    async fn watch_pod_status(
        &self,
        request: Request<WatchPodStatusRequest>,
    ) -> std::result::Result<Response<Self::WatchPodStatusStream>, Status> {
        use futures::StreamExt;
        let (cloud, instance) = self.target(&request)?;
        let uid = request.into_inner().pod_uid;
        let updates = cloud.with_instance(&instance, |i, timelines| {
            let pod = i.pods.get(&uid)?;
            timelines.entry(uid.clone()).or_default().watched = Some(Instant::now());
            Some(pod.status.subscribe())
        })?;
        let updates = updates.ok_or_else(|| Status::not_found(format!("pod {uid} not found")))?;
        Ok(Response::new(Box::pin(WatchStream::new(updates).map(Ok))))
    }

    type GetLogsStream = ServerStream<LogChunk>;

    async fn get_logs(
        &self,
        request: Request<GetLogsRequest>,
    ) -> std::result::Result<Response<Self::GetLogsStream>, Status> {
        let (cloud, instance) = self.target(&request)?;
        cloud.with_instance(&instance, |_, _| ())?;
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    type ExecStream = ServerStream<ExecOutput>;

    async fn exec(
        &self,
        _: Request<Streaming<ExecInput>>,
    ) -> std::result::Result<Response<Self::ExecStream>, Status> {
        Err(Status::unimplemented("simulated agents run no processes"))
    }

    type AttachStream = ServerStream<AttachOutput>;

    async fn attach(
        &self,
        _: Request<Streaming<AttachInput>>,
    ) -> std::result::Result<Response<Self::AttachStream>, Status> {
        Err(Status::unimplemented("simulated agents run no processes"))
    }

    type PortForwardStream = ServerStream<PortForwardOutput>;

    async fn port_forward(
        &self,
        _: Request<Streaming<PortForwardInput>>,
    ) -> std::result::Result<Response<Self::PortForwardStream>, Status> {
        Err(Status::unimplemented("simulated agents listen on no ports"))
    }

    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> std::result::Result<Response<PodStats>, Status> {
        let (cloud, instance) = self.target(&request)?;
        cloud.with_instance(&instance, |_, _| ())?;
        Ok(Response::new(PodStats::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_bucket_allows_its_capacity_then_its_refill_rate() {
        let mut bucket = TokenBucket::new(Bucket {
            capacity: 3.0,
            refill_per_second: 0.0,
        });
        assert!(bucket.take() && bucket.take() && bucket.take());
        assert!(!bucket.take(), "empty after its capacity");
    }

    #[test]
    fn actions_fall_into_ec2_classes() {
        assert_eq!(class("RunInstances"), "run");
        assert_eq!(class("DescribeInstances"), "describe");
        assert_eq!(class("CreateNetworkInterface"), "mutating");
        let scaled = RateLimits::default().scaled(10.0);
        assert_eq!(scaled.run_instances.capacity, 10_000.0);
    }
}
