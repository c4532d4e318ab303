//! `ec2-kubelet-bench`: the real operator against the dev cluster and the `sim` compute
//! backend (an in-process EC2 simulator whose agents speak the real gRPC protocol), measuring
//! what the operator adds to a pod's start, how many EC2 and Kubernetes calls a pod costs, the
//! operator's CPU and memory with many pods running, how fast it recovers from a crash, and the
//! dev cluster's own write ceiling. Every scenario prints a table beside its targets and
//! appends a JSON line to the results file.
//!
//! The operator, the dev cluster and the simulator each run on their own tokio runtime (threads
//! `operator`, `devcluster`, `sim`), so the operator's CPU time is read from its own threads
//! and its heap is attributed by a counting allocator; the process RSS includes all three.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ec2_kubelet::config::OperatorConfig;
use ec2_kubelet::crd::{Ec2NodePool, Ec2PodTemplate};
use ec2_kubelet::runtime::Context;
use ec2_kubelet_testbed::devcluster::{AuditRecord, DevCluster, DevClusterOptions};
use ec2_kubelet_testbed::heap::{self, Class};
use ec2_kubelet_testbed::sim::{RateLimits, SimCloud, SimOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Memory attribution: every allocation records which runtime's thread made it (or the simulator,
// for the tables it keeps from calls on the operator's threads: `heap::as_simulator`).

const OTHER: Class = Class::Other;
const OPERATOR: Class = Class::Operator;
const CLUSTER: Class = Class::Cluster;
const SIM: Class = Class::Simulator;

static LIVE: [AtomicIsize; heap::CLASSES] = [const { AtomicIsize::new(0) }; heap::CLASSES];

/// The system allocator, with a header before each block naming the class of the thread that
/// allocated it, so live bytes are counted per runtime.
struct Attributing;

// SAFETY: forwards to `System` with a larger layout; the header lies inside the block.
unsafe impl GlobalAlloc for Attributing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let header = layout.align().max(16);
        let Ok(full) = Layout::from_size_align(layout.size() + header, header) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `full` has a non-zero size.
        let base = unsafe { System.alloc(full) };
        if base.is_null() {
            return base;
        }
        let class = heap::current() as u8;
        // SAFETY: `header` >= 16 bytes precede the returned pointer inside the block.
        unsafe { *base.add(header - 1) = class };
        LIVE[class as usize].fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: within the block.
        unsafe { base.add(header) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let header = layout.align().max(16);
        // SAFETY: `ptr` came from `alloc` above with the same layout.
        let class = unsafe { *ptr.sub(1) };
        LIVE[class as usize].fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the block and layout `alloc` made.
        unsafe {
            System.dealloc(
                ptr.sub(header),
                Layout::from_size_align_unchecked(layout.size() + header, header),
            )
        }
    }
}

#[global_allocator]
static ALLOCATOR: Attributing = Attributing;

fn live_mib(class: Class) -> f64 {
    LIVE[class as usize].load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

fn runtime(name: &'static str, class: Class, threads: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .on_thread_start(move || heap::set_thread_class(class))
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// CPU seconds (user + system) of this process's threads named `name`.
fn cpu_seconds(name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let value = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        total += (value(11) + value(12)) / ticks;
    }
    total
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// ---------------------------------------------------------------------------------------------

#[derive(Parser, Clone, Debug)]
#[command(
    name = "ec2-kubelet-bench",
    about = "Benchmarks of the operator against the dev cluster and a simulated EC2"
)]
struct Args {
    /// Scenarios to run, in order: burst, economy, steady, recovery, ceiling, warm (or all).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,
    /// Pods of the burst and economy scenarios.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Virtual nodes of the burst and economy scenarios.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Pods kept running by the steady-state and recovery scenarios.
    #[arg(long, default_value_t = 10_000)]
    steady_pods: usize,
    /// Virtual nodes of the steady-state and recovery scenarios.
    #[arg(long, default_value_t = 100)]
    steady_nodes: usize,
    /// How long the steady state is measured.
    #[arg(long, default_value_t = 60)]
    steady_seconds: u64,
    /// Virtual nodes per Ec2NodePool.
    #[arg(long, default_value_t = 10)]
    nodes_per_pool: usize,
    /// Boot latency of the economy scenario's second round (the first boots at once).
    #[arg(long, default_value_t = 30)]
    boot_seconds: u64,
    /// Boot jitter (uniform, added to the boot latency).
    #[arg(long, default_value_t = 0)]
    boot_jitter_ms: u64,
    /// Share of RunInstances calls answered InsufficientInstanceCapacity.
    #[arg(long, default_value_t = 0.0)]
    capacity_error_rate: f64,
    /// Round trip of every simulated EC2 call.
    #[arg(long, default_value_t = 0)]
    ec2_latency_ms: u64,
    /// EC2 rate limits as a multiple of the account defaults (the 10,000-pod scenarios use at
    /// least 10: launching 10,000 instances needs raised limits on a real account too).
    #[arg(long, default_value_t = 1.0)]
    limits_scale: f64,
    /// Pods served warm (and as many cold) in the warm scenario; also the warm pool's size.
    #[arg(long, default_value_t = 10)]
    warm_pods: usize,
    /// Where every scenario appends its JSON line.
    #[arg(long, default_value = "bench-results.jsonl")]
    results: PathBuf,
    /// Give up waiting for a scenario's pods after this long.
    #[arg(long, default_value_t = 900)]
    timeout_seconds: u64,
}

const NAMESPACE: &str = "bench";
const IDENTITY: &str = "ec2-kubelet-bench-0";

/// Latency percentiles.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Percentiles {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    count: usize,
}

fn percentiles(mut values: Vec<Duration>) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort();
    let at = |p: f64| {
        let index = ((values.len() as f64 - 1.0) * p).round() as usize;
        values[index].as_secs_f64() * 1000.0
    };
    Percentiles {
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        count: values.len(),
    }
}

/// What the bench saw of one pod through its watch.
#[derive(Debug, Clone, Default)]
struct Seen {
    uid: String,
    running_at: Option<Instant>,
    phase: String,
}

/// Pods of the bench namespace as a watch reports them: when each was first seen Running, and
/// which still exist.
#[derive(Clone, Default)]
struct Tracker {
    pods: Arc<Mutex<HashMap<String, Seen>>>,
}

impl Tracker {
    fn start(client: Client) -> Tracker {
        let tracker = Tracker::default();
        let pods = tracker.pods.clone();
        tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(client, NAMESPACE);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            // The pods a re-list returned so far, while one is under way: a pod deleted while
            // the watch was down (410 Gone, then a re-list) never gets a Delete event.
            let mut relisted: Option<std::collections::HashSet<String>> = None;
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let mut pods = pods.lock().unwrap();
                match event {
                    Ok(watcher::Event::Init) => relisted = Some(Default::default()),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(listed) = relisted.take() {
                            pods.retain(|name, _| listed.contains(name));
                        }
                    }
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        if let Some(listed) = relisted.as_mut() {
                            listed.insert(pod.name_any());
                        }
                        let phase = pod
                            .status
                            .as_ref()
                            .and_then(|s| s.phase.clone())
                            .unwrap_or_default();
                        let seen = pods.entry(pod.name_any()).or_default();
                        seen.uid = pod.uid().unwrap_or_default();
                        if phase == "Running" && seen.running_at.is_none() {
                            seen.running_at = Some(now);
                        }
                        seen.phase = phase;
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        pods.remove(&pod.name_any());
                    }
                    _ => {}
                }
            }
        });
        tracker
    }

    fn snapshot(&self) -> HashMap<String, Seen> {
        self.pods.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the tracked pods, printing progress.
    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HashMap<String, Seen>) -> (usize, usize),
    ) {
        let start = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let (have, want) = done(&self.pods.lock().unwrap());
            if have >= want {
                return;
            }
            if start.elapsed() > timeout {
                let mut phases: BTreeMap<String, usize> = BTreeMap::new();
                for seen in self.pods.lock().unwrap().values() {
                    *phases.entry(seen.phase.clone()).or_default() += 1;
                }
                panic!(
                    "timed out after {timeout:?} waiting for {what}: {have}/{want}; pods by phase: {phases:?}"
                );
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                eprintln!("  ... {what}: {have}/{want} after {:.0?}", start.elapsed());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running operator on its own runtime; dropping the runtime is a crash (SIGKILL): nothing
/// is released, leases and bindings stay as they were.
struct Operator {
    runtime: Runtime,
    stop: watch::Sender<bool>,
}

impl Operator {
    fn start(config: kube::Config, cloud: &Arc<SimCloud>) -> Operator {
        let runtime = runtime("operator", OPERATOR, 2);
        let (stop, stopped) = watch::channel(false);
        let compute = Arc::new(cloud.compute());
        runtime.spawn(async move {
            let client = ec2_kubelet::operator::client(config).expect("a kube client");
            let mut operator_config = OperatorConfig {
                namespace: "ec2-kubelet-system".into(),
                ..OperatorConfig::default()
            };
            // Simulated agents share gRPC servers: plain text (the figures leave TLS out).
            operator_config.agent_tls.mode = ec2_kubelet::config::AgentTlsMode::Disabled;
            // The dev cluster has no CSR signer; the figures leave serving certificates out.
            operator_config.server.kubelet_serving.mode = ec2_kubelet::config::KubeletServingMode::SelfSigned;
            let ctx = Arc::new(Context::new(client, compute, operator_config, IDENTITY));
            ec2_kubelet::operator::run(ctx, stopped).await;
        });
        Operator { runtime, stop }
    }

    fn kill(self) {
        drop(self.stop);
        self.runtime.shutdown_background();
    }
}

struct Bench {
    args: Args,
    cluster: DevCluster,
    client: Client,
    cloud: Arc<SimCloud>,
    tracker: Tracker,
    operator: Option<Operator>,
    /// Pools created so far, by name, with their node names.
    pools: BTreeMap<String, Vec<String>>,
    machine: Value,
}

/// Kubernetes writes by the operator (User-Agent `ec2-kubelet/...`), by resource and verb.
fn operator_writes(records: &[AuditRecord]) -> BTreeMap<String, u64> {
    operator_tally(records, |verb| {
        matches!(
            verb,
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    })
}

/// Every request of the operator, reads and watches included, by verb and resource.
fn operator_requests(records: &[AuditRecord]) -> BTreeMap<String, u64> {
    operator_tally(records, |_| true)
}

fn operator_tally(records: &[AuditRecord], counted: impl Fn(&str) -> bool) -> BTreeMap<String, u64> {
    let mut tally = BTreeMap::new();
    for record in records {
        if record.user_agent.starts_with("ec2-kubelet/") && counted(&record.verb) {
            *tally
                .entry(format!("{} {}", record.verb, record.resource))
                .or_insert(0) += 1;
        }
    }
    tally
}

fn total(map: &BTreeMap<String, u64>) -> u64 {
    map.values().sum()
}

fn per_pod(map: &BTreeMap<String, u64>, pods: usize) -> BTreeMap<String, f64> {
    map.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (*v as f64 / pods.max(1) as f64 * 100.0).round() / 100.0,
            )
        })
        .collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next().and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| (kb / 1024.0 / 1024.0).round());
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": model,
        "memory_gib": memory,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

impl Bench {
    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    fn record(&self, scenario: &str, figures: Value) {
        let line = json!({
            "scenario": scenario,
            "at": jiff::Timestamp::now().to_string(),
            "machine": self.machine,
            "args": format!("{:?}", self.args),
            "figures": figures,
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.args.results)
            .expect("open the results file");
        writeln!(file, "{line}").expect("write the results file");
    }

    fn start_operator(&mut self) {
        self.operator = Some(Operator::start(self.cluster.client_config(), &self.cloud));
    }

    /// Pools of `nodes_per_pool` nodes until `nodes` nodes exist and are Ready.
    async fn ensure_nodes(&mut self, nodes: usize) -> Vec<String> {
        let per_pool = self.args.nodes_per_pool.max(1);
        let pools_api: Api<Ec2NodePool> = Api::all(self.client.clone());
        let wanted_pools = nodes.div_ceil(per_pool);
        for index in 0..wanted_pools {
            let name = format!("bench-{index}");
            let size = per_pool.min(nodes - index * per_pool);
            let pool: Ec2NodePool = serde_json::from_value(json!({
                "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool",
                "metadata": {"name": name},
                "spec": {"nodes": size, "subnetIds": ["subnet-0be4c4"], "securityGroupIds": ["sg-0be4c4"],
                    "maxPodsPerNode": 1000},
            }))
            .expect("a pool");
            match pools_api.get_opt(&name).await.expect("get pool") {
                Some(existing) if existing.spec.nodes as usize >= size => {}
                Some(_) => {
                    let patch = json!({"spec": {"nodes": size}});
                    pools_api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .expect("scale pool");
                }
                None => {
                    pools_api
                        .create(&PostParams::default(), &pool)
                        .await
                        .expect("create pool");
                }
            }
        }
        let start = Instant::now();
        loop {
            let mut names = Vec::new();
            let mut ready = 0;
            for index in 0..wanted_pools {
                let pool = pools_api.get(&format!("bench-{index}")).await.expect("get pool");
                let status = pool.status.unwrap_or_default();
                ready += status.ready_nodes as usize;
                names.extend(
                    status
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.ready)
                        .map(|(name, _)| name.clone()),
                );
                self.pools.insert(
                    pool.metadata.name.unwrap_or_default(),
                    status.nodes.keys().cloned().collect(),
                );
            }
            if ready >= nodes && names.len() >= nodes {
                names.sort();
                names.truncate(nodes);
                return names;
            }
            assert!(
                start.elapsed() < Duration::from_secs(self.args.timeout_seconds),
                "nodes not Ready: {ready}/{nodes}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates `count` pods bound round-robin to `nodes`; returns when each create was sent.
    async fn create_pods(&self, prefix: &str, count: usize, nodes: &[String]) -> HashMap<String, Instant> {
        self.create_typed_pods(prefix, count, nodes, "t3.micro").await
    }

    /// `create_pods` of pods asking for `instance_type`.
    async fn create_typed_pods(
        &self,
        prefix: &str,
        count: usize,
        nodes: &[String],
        instance_type: &str,
    ) -> HashMap<String, Instant> {
        let api = self.pods_api();
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
        futures::stream::iter(0..count)
            .for_each_concurrent(64, |i| {
                let api = api.clone();
                let sent = sent.clone();
                let name = format!("{prefix}-{i}");
                let node = nodes[i % nodes.len()].clone();
                async move {
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": name, "annotations": {
                            "ec2-kubelet.io/instance-type": instance_type,
                            "ec2-kubelet.io/image-id": "ami-0123456789abcdef0"}},
                        "spec": {
                            "nodeName": node,
                            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
                            "containers": [{"name": "main", "image": "bench", "command": ["sleep", "infinity"]}],
                        },
                    }))
                    .expect("a pod");
                    sent.lock().unwrap().insert(name, Instant::now());
                    api.create(&PostParams::default(), &pod).await.expect("create pod");
                }
            })
            .await;
        Arc::try_unwrap(sent).unwrap().into_inner().unwrap()
    }

    async fn wait_running(&self, prefix: &str, count: usize) {
        let prefix = format!("{prefix}-");
        self.tracker
            .wait(
                "pods Running",
                Duration::from_secs(self.args.timeout_seconds),
                |pods| {
                    let running = pods
                        .iter()
                        .filter(|(name, seen)| name.starts_with(&prefix) && seen.running_at.is_some())
                        .count();
                    (running, count)
                },
            )
            .await;
    }

    /// Deletes the pods with this prefix and waits until they and their instances are gone.
    async fn delete_pods(&self, prefix: &str) {
        let api = self.pods_api();
        let names: Vec<String> = self
            .tracker
            .snapshot()
            .into_keys()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .collect();
        let total = names.len();
        futures::stream::iter(names)
            .for_each_concurrent(64, |name| {
                let api = api.clone();
                async move {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                }
            })
            .await;
        let prefix = format!("{prefix}-");
        self.tracker
            .wait(
                "pods gone",
                Duration::from_secs(self.args.timeout_seconds),
                |pods| {
                    let left = pods.keys().filter(|n| n.starts_with(&prefix)).count();
                    (total.saturating_sub(left), total)
                },
            )
            .await;
        let start = Instant::now();
        while self.cloud.counters().instances_running > self.tracker.snapshot().len() as u64 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "instances left running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One pod lifecycle round: `count` pods created at once, Running, deleted, gone.
    async fn lifecycle_round(&mut self, prefix: &str, count: usize, nodes: usize) -> Value {
        let nodes = self.ensure_nodes(nodes).await;
        // Settle: the node tasks and pool reconciles of the setup are not the pods' cost.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.cluster.take_audit();
        let watched_before = self.cluster.watch_bytes();
        let before = self.cloud.counters();
        let cpu_before = cpu_seconds("operator");
        let start = Instant::now();
        let sent = self.create_pods(prefix, count, &nodes).await;
        let created = start.elapsed();
        self.wait_running(prefix, count).await;
        let all_running = start.elapsed();
        let seen = self.tracker.snapshot();
        let mut to_launch = Vec::new();
        let mut to_status = Vec::new();
        for (name, bound_at) in &sent {
            let Some(pod) = seen.get(name) else { continue };
            let timeline = self.cloud.timeline(&pod.uid);
            if let Some(run) = timeline.run_instances {
                to_launch.push(run.saturating_duration_since(*bound_at));
            }
            if let (Some(agent), Some(running)) = (timeline.agent_running, pod.running_at) {
                to_status.push(running.saturating_duration_since(agent));
            }
        }
        let heap = live_mib(OPERATOR);
        self.delete_pods(prefix).await;
        let lifecycle = start.elapsed();
        let cpu = cpu_seconds("operator") - cpu_before;
        let calls = self.cloud.counters().since(&before);
        let writes = operator_writes(&self.cluster.take_audit());
        // Bytes every watcher (the operator's, and this bench's own pod watch) was sent.
        let watched: BTreeMap<String, u64> = self
            .cluster
            .watch_bytes()
            .into_iter()
            .map(|(resource, bytes)| {
                let earlier = watched_before.get(&resource).copied().unwrap_or(0);
                (resource, bytes - earlier)
            })
            .filter(|(_, bytes)| *bytes > 0)
            .collect();
        let watched_total: u64 = watched.values().sum();
        json!({
            "pods": count, "nodes": nodes.len(),
            "watch_bytes_per_pod": watched_total as f64 / count as f64,
            "watch_bytes_per_pod_by_resource": watched.iter()
                .map(|(r, b)| (r.clone(), json!(*b as f64 / count as f64)))
                .collect::<serde_json::Map<String, Value>>(),
            "create_seconds": created.as_secs_f64(),
            "all_running_seconds": all_running.as_secs_f64(),
            "pods_per_second": count as f64 / all_running.as_secs_f64(),
            "lifecycle_seconds": lifecycle.as_secs_f64(),
            "bound_to_run_instances": percentiles(to_launch),
            "agent_running_to_pod_running": percentiles(to_status),
            "ec2_calls": calls.calls, "ec2_throttled": calls.throttled,
            "ec2_calls_per_pod": per_pod(&calls.calls, count),
            "ec2_throttled_per_pod": per_pod(&calls.throttled, count),
            "duplicate_launches": calls.duplicate_launches,
            "k8s_writes": writes, "k8s_writes_per_pod": total(&writes) as f64 / count as f64,
            "k8s_writes_per_pod_by_kind": per_pod(&writes, count),
            "operator_cpu_seconds": cpu, "operator_heap_mib": heap, "process_rss_mib": rss_mib(),
        })
    }

    async fn burst(&mut self) -> Value {
        let (pods, nodes) = (self.args.pods, self.args.nodes);
        println!("\n== burst: {pods} pods created at once on {nodes} nodes (boot latency 0) ==");
        self.cloud.set_boot_latency(Duration::ZERO);
        let figures = self.lifecycle_round("burst", pods, nodes).await;
        let hop = |key: &str| serde_json::from_value::<Percentiles>(figures[key].clone()).unwrap_or_default();
        let (launch, status) = (hop("bound_to_run_instances"), hop("agent_running_to_pod_running"));
        println!(
            "{:<40} {:>9} {:>9} {:>9} {:>9}   target",
            "hop (ms)", "p50", "p90", "p99", "max"
        );
        for (name, p) in [
            ("bound -> RunInstances sent", launch),
            ("agent Running -> pod Running", status),
        ] {
            println!(
                "{name:<40} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   p99 < 50 ms: {}",
                p.p50_ms,
                p.p90_ms,
                p.p99_ms,
                p.max_ms,
                verdict(p.p99_ms < 50.0)
            );
        }
        println!(
            "all {pods} Running after {:.2} s ({:.0} pods/s); operator CPU {:.2} s, heap {:.1} MiB",
            figures["all_running_seconds"].as_f64().unwrap_or(0.0),
            figures["pods_per_second"].as_f64().unwrap_or(0.0),
            figures["operator_cpu_seconds"].as_f64().unwrap_or(0.0),
            figures["operator_heap_mib"].as_f64().unwrap_or(0.0),
        );
        self.record("burst", figures.clone());
        figures
    }

    /// Warm vs cold: with EC2 boot latency `boot_seconds`, time to Running of pods that claim
    /// an instance of a warm pool and of pods whose settings match none (they launch cold).
    async fn warm(&mut self) {
        let (size, boot) = (self.args.warm_pods, Duration::from_secs(self.args.boot_seconds));
        println!(
            "\n== warm: {size} pods served by a warm pool vs {size} cold (boot latency {} s) ==",
            boot.as_secs()
        );
        self.cloud.set_boot_latency(boot);
        let running_before = self.cloud.counters().instances_running;
        let templates: Api<Ec2PodTemplate> = Api::namespaced(self.client.clone(), NAMESPACE);
        let template = serde_json::from_value(json!({
            "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2PodTemplate",
            "metadata": {"name": "warm"},
            "spec": {"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro", "t3.medium"],
                "instanceType": "t3.micro"},
        }))
        .expect("a template");
        templates
            .create(&PostParams::default(), &template)
            .await
            .expect("create template");
        let pools: Api<Ec2NodePool> = Api::all(self.client.clone());
        let pool = serde_json::from_value(json!({
            "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": "bench-warm"},
            "spec": {"nodes": 1, "subnetIds": ["subnet-0be4c4"], "securityGroupIds": ["sg-0be4c4"],
                "maxPodsPerNode": 1000, "templateRef": {"namespace": NAMESPACE, "name": "warm"},
                "warmPool": {"size": size}},
        }))
        .expect("a pool");
        let start = Instant::now();
        pools
            .create(&PostParams::default(), &pool)
            .await
            .expect("create pool");
        let node = loop {
            let status = pools.get("bench-warm").await.expect("get pool").status;
            let status = status.unwrap_or_default();
            let node = status
                .nodes
                .iter()
                .find(|(_, n)| n.ready)
                .map(|(name, _)| name.clone());
            if let Some(node) = node
                && status.warm_ready as usize == size
            {
                break node;
            }
            assert!(
                start.elapsed() < Duration::from_secs(self.args.timeout_seconds),
                "warm pool not filled: {} Ready, {} launching",
                status.warm_ready,
                status.warm_launching
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let filled = start.elapsed();
        let before = self.cloud.counters();
        let nodes = [node];
        let warm_sent = self.create_typed_pods("warm", size, &nodes, "t3.micro").await;
        let cold_sent = self.create_typed_pods("cold", size, &nodes, "t3.medium").await;
        self.wait_running("warm", size).await;
        self.wait_running("cold", size).await;
        let seen = self.tracker.snapshot();
        let to_running = |sent: &HashMap<String, Instant>| {
            percentiles(
                sent.iter()
                    .filter_map(|(name, at)| Some(seen.get(name)?.running_at?.saturating_duration_since(*at)))
                    .collect(),
            )
        };
        let (warm, cold) = (to_running(&warm_sent), to_running(&cold_sent));
        let launched_for = |sent: &HashMap<String, Instant>| {
            sent.keys()
                .filter_map(|name| seen.get(name))
                .filter(|pod| self.cloud.timeline(&pod.uid).run_instances.is_some())
                .count()
        };
        let (warm_launches, cold_launches) = (launched_for(&warm_sent), launched_for(&cold_sent));
        let calls = self.cloud.counters().since(&before);
        println!("warm pool of {size} filled in {:.1} s", filled.as_secs_f64());
        println!(
            "{:<34} {:>9} {:>9} {:>9} {:>9} {:>13}   target",
            "pod created -> Running (s)", "p50", "p90", "p99", "max", "RunInstances"
        );
        for (name, p, launches, target) in [
            (
                "served warm (ClaimedWarmInstance)",
                warm,
                warm_launches,
                Some(2.0),
            ),
            ("cold (LaunchedInstance)", cold, cold_launches, None),
        ] {
            let verdict = target.map_or(String::new(), |t| {
                format!("p99 < {t} s: {}", verdict(p.p99_ms < t * 1000.0))
            });
            println!(
                "{name:<34} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>13}   {verdict}",
                p.p50_ms / 1000.0,
                p.p90_ms / 1000.0,
                p.p99_ms / 1000.0,
                p.max_ms / 1000.0,
                launches,
            );
        }
        println!(
            "RunInstances during the round: {} ({} cold pods + refills of the warm pool)",
            calls.calls.get("RunInstances").copied().unwrap_or(0),
            size
        );
        self.record(
            "warm",
            json!({"pods": size, "boot_seconds": boot.as_secs(), "fill_seconds": filled.as_secs_f64(),
                "warm_to_running": warm, "cold_to_running": cold,
                "run_instances_for_warm_pods": warm_launches, "run_instances_for_cold_pods": cold_launches,
                "ec2_calls": calls.calls}),
        );

        // Deleting the pool releases its pods and terminates their and the warm instances.
        pools
            .delete("bench-warm", &DeleteParams::default())
            .await
            .expect("delete pool");
        let start = Instant::now();
        while pools.get_opt("bench-warm").await.expect("get pool").is_some()
            || self.cloud.counters().instances_running > running_before
        {
            assert!(
                start.elapsed() < Duration::from_secs(self.args.timeout_seconds),
                "the warm pool's instances outlived it"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        templates
            .delete("warm", &DeleteParams::default())
            .await
            .expect("delete template");
        self.cloud.set_boot_latency(Duration::ZERO);
    }

    async fn economy(&mut self, burst: Option<Value>) {
        let (pods, nodes) = (self.args.pods, self.args.nodes);
        let boot = Duration::from_secs(self.args.boot_seconds);
        println!("\n== API economy: calls per pod lifecycle (create, Running, delete, gone) ==");
        let zero = match burst {
            Some(figures) => figures,
            None => {
                self.cloud.set_boot_latency(Duration::ZERO);
                self.lifecycle_round("economy-0", pods, nodes).await
            }
        };
        self.cloud.set_boot_latency(boot);
        let slow = self.lifecycle_round("economy-boot", pods, nodes).await;
        self.cloud.set_boot_latency(Duration::ZERO);
        let boot_label = format!("boot {} s", boot.as_secs());
        println!("{:<44} {:>10} {:>10}", "per pod", "boot 0 s", boot_label);
        let mut kinds: Vec<String> = Vec::new();
        for figures in [&zero, &slow] {
            for key in [
                "ec2_calls_per_pod",
                "ec2_throttled_per_pod",
                "k8s_writes_per_pod_by_kind",
            ] {
                for k in figures[key].as_object().into_iter().flatten().map(|(k, _)| k) {
                    let label = match key {
                        "ec2_calls_per_pod" => format!("EC2 {k}"),
                        "ec2_throttled_per_pod" => format!("EC2 {k} throttled"),
                        _ => format!("k8s {k}"),
                    };
                    if !kinds.contains(&label) {
                        kinds.push(label);
                    }
                }
            }
        }
        kinds.sort();
        let value = |figures: &Value, label: &str| {
            let (key, name) = match label.strip_prefix("EC2 ") {
                Some(name) => match name.strip_suffix(" throttled") {
                    Some(name) => ("ec2_throttled_per_pod", name),
                    None => ("ec2_calls_per_pod", name),
                },
                None => ("k8s_writes_per_pod_by_kind", label.trim_start_matches("k8s ")),
            };
            figures[key][name].as_f64().unwrap_or(0.0)
        };
        for label in &kinds {
            println!(
                "{label:<44} {:>10.2} {:>10.2}",
                value(&zero, label),
                value(&slow, label)
            );
        }
        for (name, figures) in [("boot 0 s", &zero), (boot_label.as_str(), &slow)] {
            // Calls EC2 accepted: a throttled call (RequestLimitExceeded) launches nothing and
            // is retried; the table shows how many there were.
            let accepted = |action: &str| {
                value(figures, &format!("EC2 {action}")) - value(figures, &format!("EC2 {action} throttled"))
            };
            let (run, terminate) = (accepted("RunInstances"), accepted("TerminateInstances"));
            let writes = figures["k8s_writes_per_pod"].as_f64().unwrap_or(0.0);
            let watched = figures["watch_bytes_per_pod"].as_f64().unwrap_or(0.0);
            println!(
                "{name}: bytes sent to watchers {:.1} KiB/pod ({})",
                watched / 1024.0,
                figures["watch_bytes_per_pod_by_resource"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(r, b)| format!("{r} {:.1}", b.as_f64().unwrap_or(0.0) / 1024.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "{name}: RunInstances accepted {run:.2}/pod, TerminateInstances accepted {terminate:.2}/pod (target exactly 1: {}); k8s writes {writes:.2}/pod (target <= 8: {}); duplicates {}",
                verdict((run - 1.0).abs() < 0.005 && (terminate - 1.0).abs() < 0.005),
                verdict(writes <= 8.0),
                figures["duplicate_launches"]
            );
        }
        self.record(
            "economy",
            json!({"boot_0": zero, "boot_slow": slow, "boot_seconds": boot.as_secs()}),
        );
    }

    async fn steady(&mut self) {
        let (pods, nodes) = (self.args.steady_pods, self.args.steady_nodes);
        let seconds = self.args.steady_seconds;
        println!("\n== steady state: {pods} pods Running on {nodes} nodes for {seconds} s ==");
        let node_names = self.ensure_nodes(nodes).await;
        let start = Instant::now();
        let existing = self
            .tracker
            .snapshot()
            .keys()
            .filter(|n| n.starts_with("steady-"))
            .count();
        if existing < pods {
            self.create_pods("steady", pods, &node_names).await;
        }
        self.wait_running("steady", pods).await;
        println!(
            "  {pods} pods Running after {:.1} s; measuring",
            start.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.cluster.take_audit();
        let before = self.cloud.counters();
        let cpu_before = cpu_seconds("operator");
        let window = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let minutes = window.elapsed().as_secs_f64() / 60.0;
        let cpu = (cpu_seconds("operator") - cpu_before) / minutes;
        let calls = self.cloud.counters().since(&before);
        let writes = operator_writes(&self.cluster.take_audit());
        let pools = self.pools.len().max(1) as f64;
        let describes: u64 = calls
            .calls
            .iter()
            .filter(|(k, _)| k.starts_with("Describe"))
            .map(|(_, v)| v)
            .sum();
        let describes_per_pool_min = describes as f64 / pools / minutes;
        let heap = live_mib(OPERATOR);
        let rss = rss_mib();
        let per_min = |m: &BTreeMap<String, u64>| -> BTreeMap<String, f64> {
            m.iter()
                .map(|(k, v)| (k.clone(), (*v as f64 / minutes * 10.0).round() / 10.0))
                .collect()
        };
        println!("{:<44} {:>12}   target", "figure", "value");
        println!(
            "{:<44} {:>12.1}",
            "EC2 calls/min",
            total(&calls.calls) as f64 / minutes
        );
        println!(
            "{:<44} {:>12.2}   <= 2: {}",
            "EC2 describe calls/min per pool",
            describes_per_pool_min,
            verdict(describes_per_pool_min <= 2.0)
        );
        println!(
            "{:<44} {:>12.1}",
            "Kubernetes writes/min",
            total(&writes) as f64 / minutes
        );
        println!(
            "{:<44} {:>12.2}   < 1: {}",
            "operator CPU s/min",
            cpu,
            verdict(cpu < 1.0)
        );
        println!(
            "{:<44} {:>12.1}   < 150: {}",
            "operator heap MiB (live, attributed)",
            heap,
            verdict(heap < 150.0)
        );
        println!(
            "{:<44} {:>12.1}   (dev cluster + simulator + operator)",
            "process RSS MiB", rss
        );
        println!("EC2 calls/min by action: {:?}", per_min(&calls.calls));
        println!("Kubernetes writes/min by kind: {:?}", per_min(&writes));
        self.record(
            "steady",
            json!({
                "pods": pods, "nodes": nodes, "pools": pools, "seconds": seconds,
                "ec2_calls_per_min": per_min(&calls.calls), "ec2_describes_per_pool_per_min": describes_per_pool_min,
                "k8s_writes_per_min": per_min(&writes), "operator_cpu_seconds_per_min": cpu,
                "operator_heap_mib": heap, "process_rss_mib": rss,
                "devcluster_heap_mib": live_mib(CLUSTER), "sim_heap_mib": live_mib(SIM),
            }),
        );
    }

    async fn recovery(&mut self) {
        let pods = self.args.steady_pods;
        println!("\n== recovery: kill the operator with {pods} pods and their records, start it again ==");
        let node_names = self.ensure_nodes(self.args.steady_nodes).await;
        if self
            .tracker
            .snapshot()
            .keys()
            .filter(|n| n.starts_with("steady-"))
            .count()
            < pods
        {
            self.create_pods("steady", pods, &node_names).await;
        }
        self.wait_running("steady", pods).await;
        let records: usize = {
            let api: Api<ec2_kubelet::crd::Ec2Instance> = Api::all(self.client.clone());
            let listed = api
                .list_metadata(&ListParams::default())
                .await
                .expect("list records");
            listed.items.len()
        };
        let before = self.cloud.counters();
        self.cluster.take_audit();
        self.operator.take().expect("a running operator").kill();
        let restart = Instant::now();
        self.start_operator();
        let fresh = self.create_pods("recovery", 1, &node_names[..1]).await;
        let uids: Vec<String> = self
            .tracker
            .snapshot()
            .into_iter()
            .filter(|(n, _)| n.starts_with("steady-"))
            .map(|(_, s)| s.uid)
            .collect();
        let (mut reattached_at, mut first_launch_at, mut first_running_at) = (None, None, None);
        let deadline = Duration::from_secs(self.args.timeout_seconds);
        while reattached_at.is_none() || first_running_at.is_none() {
            assert!(restart.elapsed() < deadline, "recovery did not finish");
            if reattached_at.is_none() {
                let done = uids
                    .iter()
                    .filter(|uid| self.cloud.timeline(uid).watched.is_some_and(|w| w > restart))
                    .count();
                if done == uids.len() {
                    reattached_at = Some(restart.elapsed());
                }
            }
            let seen = self.tracker.snapshot();
            if let Some(pod) = seen.get("recovery-0") {
                if first_launch_at.is_none() {
                    first_launch_at = self
                        .cloud
                        .timeline(&pod.uid)
                        .run_instances
                        .map(|t| t.saturating_duration_since(restart));
                }
                if first_running_at.is_none() {
                    first_running_at = pod.running_at.map(|t| t.saturating_duration_since(restart));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = fresh;
        let calls = self.cloud.counters().since(&before);
        let requests = operator_requests(&self.cluster.take_audit());
        // Orphans: live instances whose pod is gone, and pods without a live instance.
        let seen = self.tracker.snapshot();
        let live_uids: std::collections::HashSet<String> = seen.values().map(|s| s.uid.clone()).collect();
        let instance_uids = self.cloud.live_pod_uids();
        let orphan_instances = instance_uids.iter().filter(|u| !live_uids.contains(*u)).count();
        let instance_set: std::collections::HashSet<&String> = instance_uids.iter().collect();
        let pods_without = live_uids.iter().filter(|u| !instance_set.contains(u)).count();
        let reattached = reattached_at.unwrap_or_default().as_secs_f64();
        println!("{:<44} {:>12}   target", "figure", "value");
        println!("{:<44} {:>12}", "Ec2Instance records", records);
        println!(
            "{:<44} {:>12.2}   < 10 s: {}",
            "every pod re-attached (s)",
            reattached,
            verdict(reattached < 10.0)
        );
        println!(
            "{:<44} {:>12.2}",
            "first new pod: RunInstances sent (s)",
            first_launch_at.unwrap_or_default().as_secs_f64()
        );
        println!(
            "{:<44} {:>12.2}",
            "first new pod: Running (s)",
            first_running_at.unwrap_or_default().as_secs_f64()
        );
        println!(
            "{:<44} {:>12}   0: {}",
            "duplicate launches",
            calls.duplicate_launches,
            verdict(calls.duplicate_launches == 0)
        );
        println!(
            "{:<44} {:>12}   0: {}",
            "orphans (instances without pod + pods without instance)",
            orphan_instances + pods_without,
            verdict(orphan_instances + pods_without == 0)
        );
        println!("EC2 calls during recovery: {:?}", calls.calls);
        println!("Kubernetes requests of the operator during recovery: {requests:?}");
        self.record(
            "recovery",
            json!({
                "records": records, "reattached_seconds": reattached,
                "first_pod_run_instances_seconds": first_launch_at.map(|d| d.as_secs_f64()),
                "first_pod_running_seconds": first_running_at.map(|d| d.as_secs_f64()),
                "duplicate_launches": calls.duplicate_launches,
                "orphan_instances": orphan_instances, "pods_without_instance": pods_without,
                "ec2_calls": calls.calls, "kubernetes_requests": requests,
            }),
        );
    }

    /// The dev cluster's raw write throughput: 16 clients creating and patching ConfigMaps.
    async fn ceiling(&mut self, burst: Option<&Value>) {
        println!("\n== ceiling: the dev cluster's raw write throughput ==");
        let namespace = "bench-ceiling";
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
            )
            .await;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let writes = Arc::new(AtomicIsize::new(0));
        let duration = Duration::from_secs(5);
        let start = Instant::now();
        futures::stream::iter(0..16)
            .for_each_concurrent(16, |worker| {
                let api = api.clone();
                let writes = writes.clone();
                async move {
                    let mut i = 0;
                    while start.elapsed() < duration {
                        let name = format!("c-{worker}-{i}");
                        let cm: ConfigMap =
                            serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}}))
                                .unwrap();
                        api.create(&PostParams::default(), &cm).await.expect("create");
                        let patch = json!({"data": {"k": "w"}});
                        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .expect("patch");
                        writes.fetch_add(2, Ordering::Relaxed);
                        i += 1;
                    }
                }
            })
            .await;
        let per_second = writes.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let _ = api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
        println!("{:<44} {:>12.0}", "dev cluster writes/s (16 clients)", per_second);
        let mut figures = json!({"devcluster_writes_per_second": per_second});
        if let Some(burst) = burst {
            let writes = burst["k8s_writes"]
                .as_object()
                .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum::<f64>());
            let operator_rate = writes / burst["lifecycle_seconds"].as_f64().unwrap_or(1.0);
            let ratio = operator_rate / per_second;
            println!(
                "{:<44} {:>12.0}   {:.0}% of the ceiling: the stand-in {} what limits the burst",
                "operator writes/s during the burst",
                operator_rate,
                ratio * 100.0,
                if ratio < 0.5 { "is not" } else { "may be" }
            );
            figures["operator_writes_per_second"] = json!(operator_rate);
            figures["ratio"] = json!(ratio);
        }
        self.record("ceiling", figures);
    }
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let scenarios: Vec<String> = if args.scenario.iter().any(|s| s == "all") {
        ["burst", "economy", "steady", "recovery", "ceiling", "warm"]
            .map(String::from)
            .to_vec()
    } else {
        args.scenario.clone()
    };
    let cluster_runtime = runtime("devcluster", CLUSTER, 2);
    let sim_runtime = runtime("sim", SIM, 1);
    let bench_runtime = runtime("bench", OTHER, 1);
    let cluster = cluster_runtime
        .block_on(DevCluster::start(DevClusterOptions {
            scheduler: false,
            audit: true,
            ..DevClusterOptions::default()
        }))
        .expect("start the dev cluster");
    let big = scenarios.iter().any(|s| s == "steady" || s == "recovery");
    let limits = RateLimits::default().scaled(if big {
        args.limits_scale.max(10.0)
    } else {
        args.limits_scale
    });
    let cloud = sim_runtime
        .block_on(SimCloud::start(SimOptions {
            cluster: "ec2-kubelet".into(),
            boot_latency: Duration::ZERO,
            boot_jitter: Duration::from_millis(args.boot_jitter_ms),
            capacity_error_rate: args.capacity_error_rate,
            call_latency: Duration::from_millis(args.ec2_latency_ms),
            limits,
            agent_servers: 16,
        }))
        .expect("start the simulated cloud");
    let machine = machine();
    println!(
        "ec2-kubelet-bench {} on {} x {} ({} GiB); EC2 limits x{}",
        machine["version"].as_str().unwrap_or(""),
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or(""),
        machine["memory_gib"],
        if big {
            args.limits_scale.max(10.0)
        } else {
            args.limits_scale
        },
    );
    bench_runtime.block_on(async move {
        let client = Client::try_from(cluster.client_config()).expect("a client");
        let store = cluster.store();
        for definition in ec2_kubelet::crd::crds() {
            let object = serde_json::to_value(&definition).expect("a CRD");
            store
                .create_builtin("apiextensions.k8s.io", "customresourcedefinitions", None, object)
                .expect("install the CRDs");
        }
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for name in [NAMESPACE, "ec2-kubelet-system"] {
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
                )
                .await
                .expect("create namespace");
        }
        let tracker = Tracker::start(client.clone());
        let mut bench = Bench {
            args: args.clone(),
            cluster,
            client,
            cloud,
            tracker,
            operator: None,
            pools: BTreeMap::new(),
            machine,
        };
        bench.start_operator();
        let mut burst = None;
        for scenario in &scenarios {
            match scenario.as_str() {
                "burst" => burst = Some(bench.burst().await),
                "economy" => bench.economy(burst.clone()).await,
                "steady" => bench.steady().await,
                "recovery" => bench.recovery().await,
                "ceiling" => bench.ceiling(burst.as_ref()).await,
                "warm" => bench.warm().await,
                other => {
                    panic!("unknown scenario {other}: burst, economy, steady, recovery, ceiling, warm or all")
                }
            }
        }
        println!("\nresults appended to {}", bench.args.results.display());
        if let Some(operator) = bench.operator.take() {
            operator.kill();
        }
    });
    sim_runtime.shutdown_background();
    cluster_runtime.shutdown_background();
}
