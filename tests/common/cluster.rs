//! The cluster a test runs against: the dev cluster (in-process, the default) or the real
//! control plane (`e2e/control-plane`, kube-apiserver, kube-controller-manager and
//! kube-scheduler built from Kubernetes' own modules), chosen by `EC2_KUBELET_TEST_CLUSTER`
//! (`dev` or `real`). Either way the system under test reaches it through a fault proxy
//! ([`ec2_kubelet_testbed::devcluster::proxy::FaultProxy`]) that injects nothing until a test asks,
//! and the test's own client goes to the server directly, for a reliable view.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ec2_kubelet_testbed::devcluster::faults::FaultOptions;
use ec2_kubelet_testbed::devcluster::proxy::FaultProxy;
use ec2_kubelet_testbed::devcluster::{DevCluster, DevClusterOptions};

/// The environment variable that picks the server.
pub const SWITCH: &str = "EC2_KUBELET_TEST_CLUSTER";

/// Which server the tests of this run use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Dev,
    Real,
}

impl Flavour {
    /// From [`SWITCH`]; unset is `dev`, anything else but `dev` or `real` fails the test.
    pub fn from_env() -> Flavour {
        match std::env::var(SWITCH).as_deref() {
            Err(_) | Ok("") | Ok("dev") => Flavour::Dev,
            Ok("real") => Flavour::Real,
            Ok(other) => panic!("{SWITCH}={other:?}: use `dev` (the default) or `real`"),
        }
    }
}

/// A server and the fault proxy in front of it for the system under test.
pub struct TestCluster {
    server: Server,
    proxy: FaultProxy,
}

enum Server {
    Dev(DevCluster),
    Real(Box<ControlPlane>),
}

impl TestCluster {
    /// Starts the server [`Flavour::from_env`] names (the dev cluster with `options`; the real
    /// control plane ignores them: its scheduler always runs) and the proxy.
    pub async fn start(options: DevClusterOptions) -> TestCluster {
        TestCluster::start_on(Flavour::from_env(), options, &[]).await
    }

    /// `start` on the given server, whatever the switch says (the differential test runs both),
    /// with extra flags for the control plane's launcher (`--apiserver-arg=...`).
    pub async fn start_on(
        flavour: Flavour,
        options: DevClusterOptions,
        control_plane_args: &[&str],
    ) -> TestCluster {
        let server = match flavour {
            Flavour::Dev => Server::Dev(DevCluster::start(options).await.expect("start the dev cluster")),
            Flavour::Real => Server::Real(Box::new(ControlPlane::start(control_plane_args).await)),
        };
        let upstream = match &server {
            Server::Dev(cluster) => cluster.client_config(),
            Server::Real(plane) => plane.config.clone(),
        };
        let proxy = FaultProxy::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            FaultOptions::default(),
        )
        .await
        .expect("start the fault proxy");
        TestCluster { server, proxy }
    }

    pub fn flavour(&self) -> Flavour {
        match self.server {
            Server::Dev(_) => Flavour::Dev,
            Server::Real(_) => Flavour::Real,
        }
    }

    /// The dev cluster, for what only it offers (its request audit, its kubelet-caller
    /// identities, its store). On the real control plane this fails the test with `why`.
    pub fn dev(&self, why: &str) -> &DevCluster {
        match &self.server {
            Server::Dev(cluster) => cluster,
            Server::Real(_) => {
                panic!("this test needs the dev cluster ({why}); run it without {SWITCH}=real")
            }
        }
    }

    /// The test's own view: straight to the server.
    pub fn client_config(&self) -> kube::Config {
        match &self.server {
            Server::Dev(cluster) => cluster.client_config(),
            Server::Real(plane) => plane.config.clone(),
        }
    }

    /// A client for the test's own view.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config()).expect("a client for the test cluster")
    }

    /// A kubeconfig of the test's own view (kubectl, helm).
    pub fn write_kubeconfig(&self, path: &Path) {
        match &self.server {
            Server::Dev(cluster) => cluster.write_kubeconfig(path).expect("write the kubeconfig"),
            Server::Real(plane) => {
                std::fs::copy(&plane.kubeconfig, path).expect("copy the admin kubeconfig");
            }
        }
    }

    /// What the system under test (an operator replica) uses: the fault proxy.
    pub fn operator_config(&self) -> kube::Config {
        self.proxy.client_config()
    }

    /// The fault proxy's address (a relay in front of it can cut the operator off).
    pub fn operator_address(&self) -> std::net::SocketAddr {
        self.proxy.address()
    }

    /// A kubeconfig for the operator binary: the fault proxy.
    pub fn write_operator_kubeconfig(&self, path: &Path) {
        self.proxy
            .write_kubeconfig(path)
            .expect("write the operator's kubeconfig");
    }

    /// The fault proxy itself (its request log).
    pub fn proxy(&self) -> &FaultProxy {
        &self.proxy
    }

    /// Changes the faults the proxy injects from now on.
    pub fn set_faults(&self, options: FaultOptions) {
        self.proxy.set(options);
    }

    /// How many of each fault the proxy injected so far.
    pub fn injected_faults(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.proxy.counts()
    }
}

/// The real control plane (`.tools/bin/control-plane`, built by `e2e/tools.sh`), for the life
/// of this value: SIGTERM when dropped (it then stops its components and removes its state).
/// It also dies with the thread that started it (the test's), so a test killed outright leaves
/// nothing running.
pub struct ControlPlane {
    child: Child,
    pub kubeconfig: PathBuf,
    /// A client configuration from its admin kubeconfig (TLS, a client certificate).
    pub config: kube::Config,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    pub async fn start(args: &[&str]) -> ControlPlane {
        use std::os::unix::process::CommandExt;
        let binary = super::tool("bin/control-plane");
        let dir = tempfile::tempdir().expect("a directory for the control plane");
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let out = dir.path().join("control-plane.out");
        let log = std::fs::File::create(&out).expect("the control plane's output file");
        let mut command = Command::new(binary);
        command
            .arg("--dir")
            .arg(dir.path().join("state"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start the control plane");
        let started = Instant::now();
        loop {
            let said = std::fs::read_to_string(&out).unwrap_or_default();
            if said.contains("control-plane: ready") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the control plane exited ({status}) before it was ready:\n{said}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "the control plane was not ready in 180 s:\n{said}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let parsed = kube::config::Kubeconfig::read_from(&kubeconfig).expect("read the admin kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
            .await
            .expect("a client configuration from the admin kubeconfig");
        config.read_timeout = None;
        ControlPlane {
            child,
            kubeconfig,
            config,
            dir,
        }
    }

    /// Where its state (and its components' logs, under `state/logs`) is.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // SAFETY: signalling the child this value started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
