//! Shared test fixtures: the project's tools (installed by `e2e/tools.sh`) and a local EC2
//! emulator (moto's server) on a free loopback port.
#![allow(dead_code)]

pub mod cluster;
pub mod ec2_faults;
pub mod relay;

pub use cluster::TestCluster;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool installed by `e2e/tools.sh` (`kubectl`, `helm`, or `venv/bin/moto_server`).
/// A missing tool fails the test with the command that installs it: tests never skip.
pub fn tool(relative: &str) -> PathBuf {
    let path = repo_root().join(".tools").join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `bash e2e/tools.sh` (`make test` does it first)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (the OS picks it; a race with another process is retried by callers).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free loopback port")
}

/// Waits until something accepts TCP connections on `address`, or the deadline passes.
pub fn wait_for_port(address: SocketAddr, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// moto's EC2 emulator, running for the life of this value.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts `moto_server` on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        let moto_server = tool("venv/bin/moto_server");
        let dir = tempfile::tempdir().expect("temp dir");
        for _attempt in 0..3 {
            let port = free_port();
            let log = dir.path().join(format!("moto-{port}.log"));
            let log_file = std::fs::File::create(&log).expect("moto log file");
            let mut child = Command::new(&moto_server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log handle"))
                .stderr(log_file)
                .spawn()
                .expect("spawn moto_server");
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if wait_for_port(address, Duration::from_secs(60)) {
                return Moto {
                    child,
                    endpoint: format!("http://127.0.0.1:{port}"),
                    log,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "moto_server did not start on 127.0.0.1; see its logs in {}",
            dir.path().display()
        );
    }

    /// An EC2 client of the real aws-sdk-ec2, pointed at this emulator with dummy static credentials.
    pub fn ec2_client(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::from_conf(self.ec2_config(&self.endpoint).build())
    }

    /// The configuration of such a client for `endpoint` (this emulator, or a proxy before it).
    pub fn ec2_config(&self, endpoint: &str) -> aws_sdk_ec2::config::Builder {
        let credentials = aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "static");
        aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(credentials)
    }

    /// What moto printed so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// A VPC with one subnet and one security group in the emulator: what node ENIs need.
pub struct Network {
    pub vpc_id: String,
    pub subnet_id: String,
    pub group_id: String,
}

impl Moto {
    /// Creates `<prefix>.0.0/16` with subnet `<prefix>.1.0/24` and a security group `nodes`.
    pub async fn network(&self, prefix: &str) -> Network {
        let ec2 = self.ec2_client();
        let vpc = ec2
            .create_vpc()
            .cidr_block(format!("{prefix}.0.0/16"))
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("{prefix}.1.0/24"))
            .send()
            .await
            .unwrap();
        let subnet_id = subnet.subnet().and_then(|s| s.subnet_id()).unwrap().to_string();
        let group = ec2
            .create_security_group()
            .vpc_id(&vpc_id)
            .group_name("nodes")
            .description("nodes")
            .send()
            .await
            .unwrap();
        let group_id = group.group_id().unwrap().to_string();
        Network {
            vpc_id,
            subnet_id,
            group_id,
        }
    }
}

/// Polls `check` (every 50 ms) until it returns `Some`, failing the test after `seconds`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `ec2-kubelet-agent` process on a free loopback port, in its own process group so
/// that dropping it kills the agent, its shims and (through them) its containers.
pub struct AgentProcess {
    child: Child,
    pub address: SocketAddr,
    pub state_dir: PathBuf,
    pub root_dir: PathBuf,
}

impl AgentProcess {
    /// Starts a plain-text agent on `state_dir` with fast restart backoff (200 ms doubling to
    /// 2 s), and waits for its address.
    pub fn start(state_dir: &Path, root_dir: &Path) -> AgentProcess {
        use std::io::BufRead;
        let mut child = Self::spawn(state_dir, root_dir, "127.0.0.1:0", &["--insecure".into()]);
        let stdout = child.stdout.take().expect("agent stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("agent prints its address");
        let address = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("agent said {line:?}"));
        AgentProcess {
            child,
            address,
            state_dir: state_dir.to_path_buf(),
            root_dir: root_dir.to_path_buf(),
        }
    }

    /// Starts an agent of `instance_id` that enrolls at `url` with a bootstrap token for
    /// `nonce` (as the user data would give it), on a free loopback port. Returns at once: the
    /// agent serves once enrolled.
    pub fn start_enrolling(
        home: &Path,
        authority: &ec2_kubelet_protocol::pki::Authority,
        url: &str,
        instance_id: &str,
        nonce: &str,
    ) -> AgentProcess {
        std::fs::create_dir_all(home).unwrap();
        let enrollment = ec2_kubelet::cloud::Enrollment {
            nonce: nonce.into(),
            token: authority.mint_token(nonce, Duration::from_secs(3600)),
            ca_pem: authority.ca_pem().into(),
            url: url.into(),
        };
        let mut args = enrollment.write_files(home).unwrap();
        args.extend(["--instance-id".into(), instance_id.into()]);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let (state_dir, root_dir) = (home.join("state"), home.join("root"));
        let child = Self::spawn(&state_dir, &root_dir, &address.to_string(), &args);
        AgentProcess {
            child,
            address,
            state_dir,
            root_dir,
        }
    }

    fn spawn(state_dir: &Path, root_dir: &Path, listen: &str, security: &[String]) -> Child {
        use std::os::unix::process::CommandExt;
        Command::new(ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent"))
            .args(security)
            .args([
                "--listen",
                listen,
                "--restart-backoff-initial-ms",
                "200",
                "--restart-backoff-max-ms",
                "2000",
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--root-dir")
            .arg(root_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("spawn ec2-kubelet-agent")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// SIGKILLs the agent process only: its shims and containers keep running.
    pub fn kill_agent_only(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The pid of the agent process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: killing the process group this fixture created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        // What the containers forked outlives their shims; kill it by process group, as
        // terminating an instance would.
        if let Ok(state) = ec2_kubelet_agent::state::StateDir::new(&self.state_dir) {
            state.kill_container_groups();
        }
    }
}

/// One operator replica, on its own runtime as if it were its own process.
pub struct Replica {
    pub identity: String,
    /// The replica's metrics, as its `/metrics` serves them.
    pub metrics: std::sync::Arc<ec2_kubelet::metrics::Metrics>,
    stop: tokio::sync::watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
    runtime: tokio::runtime::Runtime,
}

impl Replica {
    /// Starts a replica that reaches `cluster` through its fault proxy.
    pub fn start(
        cluster: &TestCluster,
        config: ec2_kubelet::config::OperatorConfig,
        compute: std::sync::Arc<dyn ec2_kubelet::cloud::Compute>,
        identity: &str,
    ) -> Replica {
        Replica::start_with(cluster.operator_config(), config, compute, identity)
    }

    /// `start`, with the replica's own client configuration (e.g. through a relay).
    pub fn start_with(
        kube_config: kube::Config,
        config: ec2_kubelet::config::OperatorConfig,
        compute: std::sync::Arc<dyn ec2_kubelet::cloud::Compute>,
        identity: &str,
    ) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let name = identity.to_string();
        let (metrics_tx, metrics_rx) = std::sync::mpsc::channel();
        // The replica's own client, created on its runtime: nothing of it outlives a crash.
        let handle = runtime.spawn(async move {
            let client = ec2_kubelet::operator::client(kube_config).unwrap();
            let (ctx, _enrollment) = ec2_kubelet::operator::context(client, compute, config, &name)
                .await
                .unwrap();
            let _ = metrics_tx.send(ctx.metrics.clone());
            ec2_kubelet::operator::run(ctx, stopped).await
        });
        Replica {
            identity: identity.into(),
            metrics: metrics_rx.recv().expect("the replica starts"),
            stop,
            handle,
            runtime,
        }
    }

    /// A clean stop: node tasks end and leases are released.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle.await.unwrap();
        self.runtime.shutdown_background();
    }

    /// A crash: every task of the replica vanishes mid-flight and its leases stay held until
    /// they expire.
    pub fn kill(self) {
        self.runtime.shutdown_background();
        drop(self.stop);
    }
}

/// The operator's namespace in tests (node-ownership and controller leases live there).
pub const OPERATOR_NAMESPACE: &str = "ec2-kubelet-system";

/// A test cluster (see [`cluster`]) ready for the operator: our CRDs installed and established,
/// and the operator namespace created. Also routes the operator's logs to the test output
/// (`warn,ec2_kubelet=info` unless `RUST_LOG` says otherwise). `scheduler` turns the dev cluster's scheduler on or off
/// (the real control plane's always runs).
pub async fn operator_cluster(scheduler: bool) -> TestCluster {
    operator_cluster_with(ec2_kubelet_testbed::devcluster::DevClusterOptions {
        scheduler,
        ..Default::default()
    })
    .await
}

/// `operator_cluster` with the dev cluster's options (e.g. its request audit).
pub async fn operator_cluster_with(
    options: ec2_kubelet_testbed::devcluster::DevClusterOptions,
) -> TestCluster {
    operator_cluster_on(cluster::Flavour::from_env(), options, &[]).await
}

/// `operator_cluster_with` on the given server, whatever the switch says, with extra flags for
/// the control plane's launcher.
pub async fn operator_cluster_on(
    flavour: cluster::Flavour,
    options: ec2_kubelet_testbed::devcluster::DevClusterOptions,
    control_plane_args: &[&str],
) -> TestCluster {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, PostParams};
    // Without RUST_LOG, the operator's info and everyone's warnings: captured per test, and
    // printed with a failing test's output, so a failure in CI carries the operator's story.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ec2_kubelet=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    let cluster = TestCluster::start_on(flavour, options, control_plane_args).await;
    let client = cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in ec2_kubelet::crd::crds() {
        names.push(crd.metadata.name.clone().unwrap_or_default());
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    // A real API server serves a new resource once it has established its CRD.
    for name in names {
        eventually(60, &format!("CRD {name} established"), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": OPERATOR_NAMESPACE}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    cluster
}

/// Runs the project's kubectl against a test cluster (its own kubeconfig and cache in a temp
/// dir) off the async runtime, with `stdin` if given; returns what it printed and its status.
pub async fn kubectl_output(
    cluster: &TestCluster,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Output {
    let home = tempfile::tempdir().expect("kubectl home");
    cluster.write_kubeconfig(&home.path().join("kubeconfig"));
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(String::from);
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(tool("bin/kubectl"))
            .args(&args)
            .env("KUBECONFIG", home.path().join("kubeconfig"))
            .env("KUBECACHEDIR", home.path().join("cache"))
            .env("HOME", home.path())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("kubectl stdin");
            pipe.write_all(text.as_bytes()).expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
    })
    .await
    .unwrap()
}

/// `kubectl_output` for a command that must succeed: its stdout.
pub async fn kubectl(cluster: &TestCluster, args: &[&str]) -> String {
    let output = kubectl_output(cluster, args, None).await;
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A cloud that answers like EC2 on a bad day, in front of a real backend: no capacity for
/// some instance types, and `RequestLimitExceeded` for the next few launches. Counts launches.
pub struct FlakyCompute {
    pub inner: std::sync::Arc<dyn ec2_kubelet::cloud::Compute>,
    pub no_capacity: std::sync::Mutex<Vec<String>>,
    pub throttle_launches: std::sync::atomic::AtomicU32,
    pub launch_calls: std::sync::atomic::AtomicU32,
    /// The next this many launches make instances that stay `pending` for good (no agent ever
    /// answers on them); they end when terminated.
    pub never_running: std::sync::atomic::AtomicU32,
    /// The instances made so, as EC2 would list them.
    pub stuck: std::sync::Mutex<Vec<ec2_kubelet::cloud::Instance>>,
    /// When set, the operator reaches each agent through a [`relay::Relay`] (by instance id)
    /// whose connections the test can cut.
    pub relay_agents: std::sync::atomic::AtomicBool,
    pub relays: std::sync::Mutex<std::collections::HashMap<String, relay::Relay>>,
}

impl FlakyCompute {
    pub fn new(inner: std::sync::Arc<dyn ec2_kubelet::cloud::Compute>) -> FlakyCompute {
        FlakyCompute {
            inner,
            no_capacity: Default::default(),
            throttle_launches: Default::default(),
            launch_calls: Default::default(),
            never_running: Default::default(),
            stuck: Default::default(),
            relay_agents: Default::default(),
            relays: Default::default(),
        }
    }

    fn is_stuck(&self, instance_id: &str) -> bool {
        self.stuck
            .lock()
            .unwrap()
            .iter()
            .any(|i| i.instance_id == instance_id)
    }
}

#[async_trait::async_trait]
impl ec2_kubelet::cloud::Compute for FlakyCompute {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ensure_eni(
        &self,
        request: &ec2_kubelet::cloud::EniRequest,
    ) -> ec2_kubelet::cloud::Result<ec2_kubelet::cloud::Eni> {
        self.inner.ensure_eni(request).await
    }
    async fn delete_eni(&self, eni_id: &str) -> ec2_kubelet::cloud::Result<()> {
        self.inner.delete_eni(eni_id).await
    }
    async fn describe_enis(&self, pool: &str) -> ec2_kubelet::cloud::Result<Vec<ec2_kubelet::cloud::Eni>> {
        self.inner.describe_enis(pool).await
    }
    async fn instance_types(
        &self,
        names: &[String],
    ) -> ec2_kubelet::cloud::Result<Vec<ec2_kubelet::cloud::InstanceTypeInfo>> {
        self.inner.instance_types(names).await
    }
    async fn launch_instance(
        &self,
        request: &ec2_kubelet::cloud::LaunchRequest,
    ) -> ec2_kubelet::cloud::Result<ec2_kubelet::cloud::Instance> {
        use std::sync::atomic::Ordering;
        self.launch_calls.fetch_add(1, Ordering::SeqCst);
        let throttled = self
            .throttle_launches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if throttled {
            return Err(ec2_kubelet::cloud::Error::Throttled {
                action: "RunInstances".into(),
            });
        }
        if self.no_capacity.lock().unwrap().contains(&request.instance_type) {
            return Err(ec2_kubelet::cloud::Error::InsufficientCapacity {
                instance_type: request.instance_type.clone(),
            });
        }
        let stuck = self
            .never_running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if stuck {
            let mut all = self.stuck.lock().unwrap();
            let instance = ec2_kubelet::cloud::Instance {
                instance_id: format!("i-0stuck{:011x}", all.len()),
                state: ec2_kubelet::cloud::InstanceState::Pending,
                instance_type: request.instance_type.clone(),
                private_ip: Some("127.0.0.1".into()),
                launch_time: jiff::Timestamp::now().as_millisecond(),
                tags: ec2_kubelet::cloud::instance_tags("test", request),
            };
            all.push(instance.clone());
            return Ok(instance);
        }
        self.inner.launch_instance(request).await
    }
    async fn describe_instances(
        &self,
        filter: &ec2_kubelet::cloud::InstanceFilter,
    ) -> ec2_kubelet::cloud::Result<Vec<ec2_kubelet::cloud::Instance>> {
        use ec2_kubelet::cloud::InstanceFilter;
        let mut found = self.inner.describe_instances(filter).await?;
        found.extend(
            self.stuck
                .lock()
                .unwrap()
                .iter()
                .filter(|i| match filter {
                    InstanceFilter::Ids(ids) => ids.contains(&i.instance_id),
                    InstanceFilter::Pool(pool) => i.tag(ec2_kubelet::crd::tags::POOL) == Some(pool.as_str()),
                    InstanceFilter::Cluster => true,
                })
                .cloned(),
        );
        Ok(found)
    }
    async fn terminate_instances(&self, instance_ids: &[String]) -> ec2_kubelet::cloud::Result<()> {
        let (stuck, others): (Vec<String>, Vec<String>) =
            instance_ids.iter().cloned().partition(|id| self.is_stuck(id));
        for instance in self.stuck.lock().unwrap().iter_mut() {
            if stuck.contains(&instance.instance_id) {
                instance.state = ec2_kubelet::cloud::InstanceState::Terminated;
            }
        }
        if others.is_empty() {
            return Ok(());
        }
        self.inner.terminate_instances(&others).await
    }
    async fn tag_instance(
        &self,
        instance_id: &str,
        tags: &ec2_kubelet::crd::TagMap,
    ) -> ec2_kubelet::cloud::Result<()> {
        self.inner.tag_instance(instance_id, tags).await
    }
    fn agent_endpoint(
        &self,
        instance: &ec2_kubelet::cloud::Instance,
        port: u16,
    ) -> ec2_kubelet::cloud::Result<String> {
        if self.is_stuck(&instance.instance_id) {
            // Nothing listens there: a pending instance has no agent yet.
            return Ok("127.0.0.1:1".into());
        }
        let endpoint = self.inner.agent_endpoint(instance, port)?;
        if !self.relay_agents.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(endpoint);
        }
        // `http://host:port`: the relay takes the host and port, the operator the scheme.
        let (scheme, target) = endpoint.split_once("://").expect("an endpoint URL");
        let mut relays = self.relays.lock().unwrap();
        let relay = relays
            .entry(instance.instance_id.clone())
            .or_insert_with(|| relay::Relay::start(target.to_string()));
        Ok(format!("{scheme}://{}", relay.address))
    }
    async fn describe_images(
        &self,
        query: &ec2_kubelet::cloud::ImageQuery,
    ) -> ec2_kubelet::cloud::Result<Vec<ec2_kubelet::cloud::ImageInfo>> {
        self.inner.describe_images(query).await
    }
    async fn existing_subnets(&self, ids: &[String]) -> ec2_kubelet::cloud::Result<Vec<String>> {
        self.inner.existing_subnets(ids).await
    }
    async fn existing_security_groups(&self, ids: &[String]) -> ec2_kubelet::cloud::Result<Vec<String>> {
        self.inner.existing_security_groups(ids).await
    }
}

/// The operator's config in tests: cluster `test`, the test namespace, and leases (3 s, renewed
/// every second) and node status (2 s) fast enough to see renewals and takeovers in seconds.
pub fn fast_config() -> ec2_kubelet::config::OperatorConfig {
    let mut config = ec2_kubelet::config::OperatorConfig {
        cluster_name: "test".into(),
        namespace: OPERATOR_NAMESPACE.into(),
        ..Default::default()
    };
    config.lease.duration_seconds = 3;
    config.lease.renew_interval_seconds = 1;
    config.sync.node_status_seconds = 2;
    config.server.enroll_address = enroll_address();
    // The dev cluster has no CSR signer (make e2e checks serving certificates from one).
    config.server.kubelet_serving.mode = ec2_kubelet::config::KubeletServingMode::SelfSigned;
    config
}

/// [`fast_config`] plus fast pool resyncs and orphan collection, and 30 s before a silent
/// agent's pod is lost: the config of the pod-lifecycle tests.
pub fn lifecycle_config() -> ec2_kubelet::config::OperatorConfig {
    let mut config = fast_config();
    config.sync.agent_lost_seconds = 30;
    config.sync.pool_resync_seconds = 2;
    config.sync.orphan_grace_seconds = 1;
    config
}

thread_local! {
    static ENROLL_PORT: u16 = free_port();
}

/// The enrollment address of this test's replicas: one per test (thread), shared by its
/// replicas and their successors as a Service would be, so an agent enrolling across an
/// operator crash reaches the next replica.
pub fn enroll_address() -> String {
    format!("127.0.0.1:{}", ENROLL_PORT.with(|port| *port))
}

/// A plain HTTP GET on loopback (HTTP/1.0, read to the end): status and body.
pub async fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Terminates every instance of a `local` backend when dropped, even when the test fails.
pub struct LocalInstances(pub std::sync::Arc<ec2_kubelet::cloud::local::LocalCompute>);

impl Drop for LocalInstances {
    fn drop(&mut self) {
        use ec2_kubelet::cloud::{Compute, InstanceFilter};
        let compute = self.0.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(instances) = compute.describe_instances(&InstanceFilter::Cluster).await {
                    let ids: Vec<String> = instances.into_iter().map(|i| i.instance_id).collect();
                    let _ = compute.terminate_instances(&ids).await;
                }
            });
        })
        .join();
    }
}

/// A `local` backend for cluster `test` in `dir`, running real agent processes, and the guard
/// that terminates them.
pub fn local_compute(
    dir: &Path,
) -> (
    std::sync::Arc<ec2_kubelet::cloud::local::LocalCompute>,
    LocalInstances,
) {
    let compute = std::sync::Arc::new(
        ec2_kubelet::cloud::local::LocalCompute::new(ec2_kubelet::cloud::local::LocalOptions {
            cluster: "test".into(),
            dir: dir.to_path_buf(),
            agent_binary: ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent"),
            imds_endpoint: None,
        })
        .unwrap(),
    );
    (compute.clone(), LocalInstances(compute))
}

/// Creates an `Ec2PodTemplate` in `default`.
pub async fn create_template(client: &kube::Client, name: &str, spec: serde_json::Value) {
    let template: ec2_kubelet::crd::Ec2PodTemplate = serde_json::from_value(serde_json::json!({
        "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2PodTemplate",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec,
    }))
    .unwrap();
    kube::Api::<ec2_kubelet::crd::Ec2PodTemplate>::namespaced(client.clone(), "default")
        .create(&Default::default(), &template)
        .await
        .unwrap();
}

/// Creates an `Ec2NodePool`.
pub async fn create_pool(client: &kube::Client, name: &str, spec: serde_json::Value) {
    let pool: ec2_kubelet::crd::Ec2NodePool = serde_json::from_value(serde_json::json!({
        "apiVersion": "ec2-kubelet.io/v1alpha1", "kind": "Ec2NodePool", "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    kube::Api::<ec2_kubelet::crd::Ec2NodePool>::all(client.clone())
        .create(&Default::default(), &pool)
        .await
        .unwrap();
}

/// What a test needs to run the real `ec2-kubelet run` binary against a test cluster: a
/// kubeconfig (its fault proxy), a config file (the `local` backend under `<dir>/local`, every server on a
/// loopback port of its own, then `extra` top-level YAML), and the servers' addresses.
pub struct RunFiles {
    pub config: PathBuf,
    pub kubeconfig: PathBuf,
    pub local: PathBuf,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub kubelet: SocketAddr,
}

impl RunFiles {
    pub fn new(cluster: &TestCluster, dir: &Path, cluster_name: &str, extra: &str) -> RunFiles {
        let kubeconfig = dir.join("kubeconfig");
        cluster.write_operator_kubeconfig(&kubeconfig);
        let loopback = || SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let (metrics, health, kubelet, enroll) = (loopback(), loopback(), loopback(), loopback());
        let local = dir.join("local");
        let config = dir.join("operator.yaml");
        std::fs::write(
            &config,
            format!(
                "clusterName: {cluster_name}\nnamespace: {OPERATOR_NAMESPACE}\n\
                 server:\n  metricsAddress: {metrics}\n  healthAddress: {health}\n  kubeletAddress: {kubelet}\n  enrollAddress: {enroll}\n\
                 local:\n  stateDir: {}\n  agentBinary: {}\n{extra}",
                local.display(),
                ec2_kubelet_testbed::binaries::binary("ec2-kubelet-agent").display(),
            ),
        )
        .unwrap();
        RunFiles {
            config,
            kubeconfig,
            local,
            metrics,
            health,
            kubelet,
        }
    }

    /// Starts the operator binary (killed when dropped) at log level `rust_log`, its output
    /// appended to `log`, or the test's own output without one.
    pub fn spawn(&self, rust_log: &str, log: Option<&Path>) -> tokio::process::Child {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ec2-kubelet"));
        command
            .args(["run", "--config"])
            .arg(&self.config)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", rust_log)
            .kill_on_drop(true);
        if let Some(log) = log {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            command.stdout(out.try_clone().unwrap()).stderr(out);
        }
        command.spawn().expect("start the operator")
    }
}

/// The template `default/general` (t3.micro, an agent port of its own) and a pool of `nodes`
/// nodes using it: what most tests on the `local` backend start from.
pub async fn local_template_and_pool(client: &kube::Client, pool: &str, nodes: i32) {
    create_template(
        client,
        "general",
        serde_json::json!({"imageId": "ami-0123456789abcdef0", "instanceTypes": ["t3.micro"], "agentPort": free_port()}),
    )
    .await;
    create_pool(
        client,
        pool,
        serde_json::json!({"nodes": nodes, "subnetIds": ["subnet-0a"], "securityGroupIds": ["sg-0a"],
            "templateRef": {"namespace": "default", "name": "general"}}),
    )
    .await;
}

/// A one-container pod (`local/shell`) for virtual nodes: it tolerates their taint and selects
/// them (or the nodes of `pool`).
pub fn virtual_pod(
    name: &str,
    pool: Option<&str>,
    command: &[&str],
    extra: serde_json::Value,
) -> k8s_openapi::api::core::v1::Pod {
    let selector = match pool {
        Some(pool) => serde_json::json!({"ec2-kubelet.io/pool": pool}),
        None => serde_json::json!({"type": "virtual-kubelet"}),
    };
    let mut pod = serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": selector,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
            "containers": [{"name": "main", "image": "local/shell", "command": command}],
        },
    });
    json_patch::merge(&mut pod, &extra);
    serde_json::from_value(pod).unwrap()
}

/// Waits (up to `seconds`) until `pods` lists none: every pod released.
pub async fn no_pods_left(pods: &kube::Api<k8s_openapi::api::core::v1::Pod>, seconds: u64) {
    eventually(seconds, "every pod released", || {
        let pods = pods.clone();
        async move {
            pods.list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await
}

/// Waits (up to 60 s) until the pod is in `phase`, and returns it.
pub async fn phase_of(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    phase: &str,
) -> k8s_openapi::api::core::v1::Pod {
    eventually(60, &format!("pod {name} to be {phase}"), || {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.ok()?;
            (pod.status.as_ref()?.phase.as_deref() == Some(phase)).then_some(pod)
        }
    })
    .await
}

/// Agent processes by instance id.
pub type AgentFarm = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, AgentProcess>>>;

/// The agents of instances that only exist in the EC2 emulator: the first time the operator asks
/// for an instance's agent, a real agent process starts on loopback for it (under `root`), so
/// the emulator's 10.x addresses are never dialled. Each enrolls with the operators of this test
/// (at `enroll_address()`) as its user data would have it: a bootstrap token for the nonce the
/// instance is tagged with, signed with the cluster's CA Secret (`authority`). The resolver for
/// the `aws` backend, and the agents it started.
pub fn loopback_agents(
    root: &Path,
    authority: std::sync::Arc<ec2_kubelet_protocol::pki::Authority>,
) -> (ec2_kubelet::cloud::aws::EndpointResolver, AgentFarm) {
    let agents: AgentFarm = Default::default();
    let (farm, root) = (agents.clone(), root.to_path_buf());
    let url = format!("https://{}", enroll_address());
    let resolver = std::sync::Arc::new(move |instance: &ec2_kubelet::cloud::Instance, _port: u16| {
        let mut farm = farm.lock().unwrap();
        if let Some(agent) = farm.get(&instance.instance_id) {
            return Some(agent.address.to_string());
        }
        // An instance launched without enrollment has no agent here: a port that refuses (never
        // the emulator's 10.x address).
        let Some(nonce) = instance.tag(ec2_kubelet::crd::tags::ENROLLMENT) else {
            return Some("127.0.0.1:1".into());
        };
        let home = root.join(&instance.instance_id);
        let agent = AgentProcess::start_enrolling(&home, &authority, &url, &instance.instance_id, nonce);
        let address = agent.address.to_string();
        farm.insert(instance.instance_id.clone(), agent);
        Some(address)
    });
    (resolver, agents)
}

/// The agent CA of the cluster `client` reaches, created in the operator namespace if it is not
/// there yet (the operator replicas load the same one).
pub async fn agent_authority(client: &kube::Client) -> std::sync::Arc<ec2_kubelet_protocol::pki::Authority> {
    std::sync::Arc::new(
        ec2_kubelet::enrollment::load_or_create_authority(client, OPERATOR_NAMESPACE)
            .await
            .expect("the agent CA"),
    )
}

/// An operator cluster whose `aws` backend runs against the EC2 emulator, with a network, an
/// image, and agents on loopback (see [`loopback_agents`]).
pub struct MotoCloud {
    _moto: Moto,
    pub ec2: aws_sdk_ec2::Client,
    pub network: Network,
    /// An image the emulator offers.
    pub image_id: String,
    pub cluster: TestCluster,
    pub client: kube::Client,
    pub aws: std::sync::Arc<ec2_kubelet::cloud::aws::AwsCompute>,
    pub agents: AgentFarm,
    /// With [`MotoCloud::start_behind_proxy`]: what `aws` talks to.
    pub proxy: Option<ec2_faults::Ec2FaultProxy>,
    _dir: tempfile::TempDir,
}

impl MotoCloud {
    /// The emulator, a network `<prefix>.0.0/16`, and a dev cluster with its scheduler.
    pub async fn start(prefix: &str) -> MotoCloud {
        MotoCloud::start_with(prefix, None).await
    }

    /// `start`, with the operator's backend (`aws`) talking to the emulator through an
    /// [`ec2_faults::Ec2FaultProxy`], with the operator's own retries and timeouts (`settings`,
    /// through `aws::tune`). The test's view (`ec2`) goes to the emulator directly.
    pub async fn start_behind_proxy(
        prefix: &str,
        settings: &ec2_kubelet::config::Ec2ClientConfig,
    ) -> MotoCloud {
        MotoCloud::start_with(prefix, Some(settings)).await
    }

    async fn start_with(prefix: &str, proxied: Option<&ec2_kubelet::config::Ec2ClientConfig>) -> MotoCloud {
        let moto = Moto::start();
        let ec2 = moto.ec2_client();
        let network = moto.network(prefix).await;
        let images = ec2.describe_images().owners("amazon").send().await.unwrap();
        let image_id = images.images()[0].image_id().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let cluster = operator_cluster(true).await;
        let client = cluster.client();
        let (resolver, agents) = loopback_agents(dir.path(), agent_authority(&client).await);
        let (operator_ec2, proxy) = match proxied {
            None => (ec2.clone(), None),
            Some(settings) => {
                let proxy = ec2_faults::Ec2FaultProxy::start(&moto.endpoint).await;
                let config = ec2_kubelet::cloud::aws::tune(moto.ec2_config(&proxy.endpoint), settings);
                (aws_sdk_ec2::Client::from_conf(config.build()), Some(proxy))
            }
        };
        let aws = std::sync::Arc::new(ec2_kubelet::cloud::aws::AwsCompute::from_client(
            operator_ec2,
            "test",
            Some(resolver),
        ));
        MotoCloud {
            _moto: moto,
            ec2,
            network,
            image_id,
            cluster,
            client,
            aws,
            agents,
            proxy,
            _dir: dir,
        }
    }
}

/// The reason and message of every event about objects named `name`.
pub async fn events_of(client: &kube::Client, name: &str) -> Vec<(String, String)> {
    use kube::api::{Api, ListParams};
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::all(client.clone());
    events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Waits until an event about objects named `name` has `reason` and a message that satisfies
/// `matches`; returns every event about them then. A controller records an event after the
/// effect it reports (a status written, an instance terminated), so a test that saw the effect
/// waits for the event rather than reading once.
pub async fn wait_event(
    client: &kube::Client,
    name: &str,
    reason: &str,
    matches: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let matches = &matches;
    eventually(30, &format!("a {reason} event about {name}"), || async move {
        let events = events_of(client, name).await;
        events
            .iter()
            .any(|(r, message)| r == reason && matches(message))
            .then_some(events)
    })
    .await
}

/// How a test calls the kubelet API.
pub enum As<'a> {
    Anonymous,
    Token(&'a str),
    Certificate(&'a ec2_kubelet_testbed::devcluster::auth::ClientCertificate),
}

/// A GET over TLS (any server certificate) with the given `Host`, as the API server and
/// metrics-server reach a kubelet; `Err` when the TLS handshake or the request is refused.
pub async fn kubelet_get(
    address: std::net::SocketAddr,
    host: &str,
    path: &str,
    caller: As<'_>,
) -> Result<(u16, String), String> {
    let tls = match &caller {
        As::Certificate(cert) => {
            ec2_kubelet::kubelet::tls::insecure_client_config_with_identity(&cert.cert_pem, &cert.key_pem)?
        }
        _ => ec2_kubelet::kubelet::tls::insecure_client_config(),
    };
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(hyper::header::HOST, host);
    if let As::Token(token) = caller {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    // TLS 1.3 reports a refused client certificate only when the server's alert arrives.
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What the cluster and the cloud say about the pods of the default namespace and `pool`,
/// checked against the invariants: every pod Running on exactly one live instance with
/// exactly one binding, no binding without a pod, no live instance without a pod, no pod
/// launched twice (a panic: it cannot heal), no pod stuck Terminating. `Ok((pods, launches))`; `Err` names the first
/// violation (the caller retries until the operator has converged).
pub async fn check_invariants(
    client: &kube::Client,
    compute: &ec2_kubelet::cloud::local::LocalCompute,
    pool: &str,
) -> Result<(usize, usize), String> {
    use ec2_kubelet::cloud::{Compute, InstanceFilter};
    use ec2_kubelet::crd::{Ec2Instance, tags};
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    use kube::api::Api;
    use std::collections::{BTreeMap, BTreeSet};
    let pods: Vec<Pod> = Api::<Pod>::default_namespaced(client.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?
        .items;
    // (record name, pod UID, instance id) of the pool's records.
    let records: Vec<(String, String, Option<String>)> = Api::<Ec2Instance>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .filter(|r| r.spec.pool == pool)
        .map(|r| {
            let uid = r.pod_uid().unwrap_or_default().to_string();
            let id = r.instance_id().map(String::from);
            (r.name_any(), uid, id)
        })
        .collect();
    let instances = compute
        .describe_instances(&InstanceFilter::Cluster)
        .await
        .map_err(|e| e.to_string())?;
    let mut launched: BTreeMap<String, usize> = BTreeMap::new();
    for instance in &instances {
        *launched
            .entry(instance.tag(tags::POD_UID).unwrap_or("").to_string())
            .or_default() += 1;
    }
    let live: Vec<_> = instances.iter().filter(|i| i.state.is_alive()).collect();
    let uids: BTreeSet<String> = pods.iter().filter_map(|p| p.uid()).collect();

    if let Some((uid, n)) = launched.iter().find(|(_, n)| **n > 1) {
        // Permanent: fail at once rather than wait.
        panic!("pod {uid} was launched {n} times");
    }
    for pod in &pods {
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(format!("pod {name} is Terminating"));
        }
        let uid = pod.uid().unwrap_or_default();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase != "Running" {
            return Err(format!("pod {name} is {phase:?}"));
        }
        let on: Vec<&str> = live
            .iter()
            .filter(|i| i.tag(tags::POD_UID) == Some(uid.as_str()))
            .map(|i| i.instance_id.as_str())
            .collect();
        if on.len() != 1 {
            return Err(format!("pod {name} has {} live instances", on.len()));
        }
        let recorded: Vec<&Option<String>> = records
            .iter()
            .filter(|(_, b, _)| *b == uid)
            .map(|(_, _, id)| id)
            .collect();
        if recorded.len() != 1 {
            return Err(format!("pod {name} has {} records", recorded.len()));
        }
        if recorded[0].as_deref() != Some(on[0]) {
            return Err(format!(
                "pod {name} runs on {} but its record says {:?}",
                on[0], recorded[0]
            ));
        }
    }
    if let Some((record, uid, _)) = records.iter().find(|(_, uid, _)| !uids.contains(uid)) {
        return Err(format!("record {record} names pod {uid}, which does not exist"));
    }
    if let Some(orphan) = live
        .iter()
        .find(|i| !i.tag(tags::POD_UID).is_some_and(|uid| uids.contains(uid)))
    {
        return Err(format!("instance {} is live without a pod", orphan.instance_id));
    }
    Ok((pods.len(), launched.len()))
}

/// Operator config (YAML) with fast leases and resyncs: a dead replica's nodes are taken over
/// and a pool re-reconciled within seconds.
pub const FAST_TAKEOVER: &str = "lease: {durationSeconds: 3, renewIntervalSeconds: 1}\n\
                    sync: {nodeStatusSeconds: 2, poolResyncSeconds: 2, orphanGraceSeconds: 1, agentLostSeconds: 60}\n";

/// The real operator binary on a test cluster with a `local` pool: its files, log, and the
/// test's own view of the local cloud (which terminates whatever is left when dropped).
pub struct BinaryRun {
    pub files: RunFiles,
    pub log: PathBuf,
    pub compute: std::sync::Arc<ec2_kubelet::cloud::local::LocalCompute>,
    _cleanup: LocalInstances,
    _dir: tempfile::TempDir,
}

impl BinaryRun {
    /// Writes the files (fast takeover) and creates a local template and `pool` of two nodes.
    pub async fn prepare(cluster: &TestCluster, pool: &str) -> BinaryRun {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::new(cluster, dir.path(), "test", FAST_TAKEOVER);
        let log = dir.path().join("operator.log");
        let (compute, cleanup) = local_compute(&files.local);
        local_template_and_pool(&cluster.client(), pool, 2).await;
        BinaryRun {
            files,
            log,
            compute,
            _cleanup: cleanup,
            _dir: dir,
        }
    }

    /// Starts an operator process logging warnings to the log file.
    pub fn spawn(&self) -> tokio::process::Child {
        self.files.spawn("warn", Some(&self.log))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An environment variable's value, or `default` when unset or unparsable (soak knobs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `Ec2Instance` record of the pod with this UID, if any (by its `pod-uid` label: a
/// claimed warm instance's record is not named after the pod).
pub async fn record_of(client: &kube::Client, uid: &str) -> Option<ec2_kubelet::crd::Ec2Instance> {
    let records: kube::Api<ec2_kubelet::crd::Ec2Instance> = kube::Api::all(client.clone());
    let selector = format!("{}={uid}", ec2_kubelet::crd::labels::POD_UID);
    records
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
}

/// Every `Ec2Instance` record of the cluster.
pub async fn all_records(client: &kube::Client) -> Vec<ec2_kubelet::crd::Ec2Instance> {
    let records: kube::Api<ec2_kubelet::crd::Ec2Instance> = kube::Api::all(client.clone());
    records
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
}

/// The id of the instance the pod's `Ec2Instance` record names.
pub async fn instance_of(client: &kube::Client, pod: &k8s_openapi::api::core::v1::Pod) -> String {
    let uid = pod.metadata.uid.as_deref().expect("a created pod");
    let record = record_of(client, uid).await.expect("the pod's record");
    record
        .instance_id()
        .expect("the record names an instance")
        .to_string()
}

/// The template `default/general` most pool tests use: one image, `t3.micro`, an agent port
/// of its own.
pub async fn create_general_template(client: &kube::Client) {
    create_template(
        client,
        "general",
        serde_json::json!({"imageId": "ami-0123456789abcdef0", "instanceType": "t3.micro",
            "agentPort": free_port()}),
    )
    .await;
}

/// The ids of the live instances the backend has (of this test's cluster), sorted.
pub async fn live_instance_ids(compute: &dyn ec2_kubelet::cloud::Compute) -> Vec<String> {
    let mut ids: Vec<String> = compute
        .describe_instances(&ec2_kubelet::cloud::InstanceFilter::Cluster)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state.is_alive())
        .map(|i| i.instance_id)
        .collect();
    ids.sort();
    ids
}
