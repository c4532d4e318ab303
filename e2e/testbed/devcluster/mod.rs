//! The dev cluster: a Kubernetes API server stand-in on loopback, for the fast integration
//! tests and `make demo-dev` on machines without Go (the real control plane in
//! `e2e/control-plane` serves everything else). It keeps
//! the semantics the operator, kubectl and helm rely on: discovery, generic storage of the
//! built-in kinds, CRDs that become servable and validate against their schema, selectors,
//! paging, watches with resume/bookmarks/410, the four patch types, status subresources,
//! finalizers, graceful pod deletion, namespace cascade, a minimal scheduler, the pod log and
//! exec proxy to the node's kubelet endpoint (with a kubelet-client certificate), and the
//! TokenReview and SubjectAccessReview (by RBAC) that kubelets authenticate callers with.

pub mod auth;
mod builtin;
mod convert;
pub mod error;
pub mod faults;
mod logs;
mod openapi;
pub mod patch;
mod protobuf;
pub mod proxy;
pub mod registry;
mod scheduler;
pub mod selector;
mod server;
pub mod store;
mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, watch};

pub use server::AuditRecord;
pub use store::Store;

/// How to run a dev cluster.
#[derive(Clone, Debug)]
pub struct DevClusterOptions {
    /// Where to listen; port 0 picks a free port.
    pub address: SocketAddr,
    /// Run the built-in scheduler (tests that bind pods themselves turn it off).
    pub scheduler: bool,
    /// How many changes watches can replay before answering `410 Gone`.
    pub history: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// The host every node's kubelet endpoint is dialled on (logs). `None` dials each node's
    /// InternalIP, as a real API server does; a dev cluster's nodes are all served from this
    /// machine, so the default is 127.0.0.1.
    pub kubelet_host: Option<String>,
    /// Record every resource request (`DevCluster::audit`): tests check RBAC rules with it.
    pub audit: bool,
}

impl Default for DevClusterOptions {
    fn default() -> Self {
        DevClusterOptions {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            scheduler: true,
            history: store::DEFAULT_HISTORY,
            bookmark_interval: Duration::from_secs(5),
            kubelet_host: Some("127.0.0.1".into()),
            audit: false,
        }
    }
}

/// A running dev cluster; stops when dropped (or on [`DevCluster::shutdown`]).
pub struct DevCluster {
    address: SocketAddr,
    state: Arc<server::State>,
    stop: watch::Sender<bool>,
}

/// While held, every open watch has been ended and new watches wait (see
/// [`DevCluster::interrupt_watches`]).
pub struct WatchInterruption {
    _gate: OwnedRwLockWriteGuard<()>,
}

impl DevCluster {
    /// Binds the listener and starts serving (and scheduling, if enabled).
    pub async fn start(options: DevClusterOptions) -> std::io::Result<DevCluster> {
        let listener = tokio::net::TcpListener::bind(options.address).await?;
        let address = listener.local_addr()?;
        let store = Arc::new(Store::new(options.history));
        let auth = auth::ClusterAuth::generate().map_err(std::io::Error::other)?;
        store
            .create_builtin("", "configmaps", Some("kube-system"), auth.config_map())
            .map_err(|e| std::io::Error::other(e.message))?;
        let (stop, stop_rx) = watch::channel(false);
        let (watch_epoch, _) = watch::channel(0u64);
        let state = Arc::new(server::State {
            store: store.clone(),
            options: options.clone(),
            address,
            watch_epoch,
            watch_gate: Arc::new(RwLock::new(())),
            audit: std::sync::Mutex::new(Vec::new()),
            watch_bytes: Default::default(),
            auth,
        });
        let accept_state = state.clone();
        let mut accept_stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped(&mut accept_stop) => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(server::serve_connection(accept_state.clone(), stream, accept_stop.clone()));
                        }
                        Err(error) => tracing::warn!(%error, "dev cluster accept failed"),
                    },
                }
            }
        });
        if options.scheduler {
            tokio::spawn(scheduler::run(store, stop_rx));
        }
        Ok(DevCluster { address, state, stop })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The storage, for server-side checks in tests and benchmarks.
    /// The resource requests recorded so far (with `DevClusterOptions::audit`).
    pub fn audit(&self) -> Vec<server::AuditRecord> {
        self.state.audit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes the resource requests recorded so far, leaving none (long benchmarks count them in
    /// rounds).
    pub fn take_audit(&self) -> Vec<server::AuditRecord> {
        std::mem::take(&mut *self.state.audit.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Bytes of watch events sent so far, by resource (`pods`, `ec2nodepools.ec2-kubelet.io`).
    pub fn watch_bytes(&self) -> std::collections::BTreeMap<String, u64> {
        self.state
            .watch_bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cluster CA, tokens and client certificates callers of kubelets authenticate with.
    pub fn auth(&self) -> &auth::ClusterAuth {
        &self.state.auth
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.state.store
    }

    /// A kube client configuration for this cluster (no credentials: the stand-in has no auth).
    pub fn client_config(&self) -> kube::Config {
        plain_client_config(&self.url())
    }

    /// A kube client for this cluster.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config()).expect("a plain HTTP client needs no TLS setup")
    }

    /// A kubeconfig for kubectl, helm and kube clients.
    pub fn kubeconfig(&self) -> String {
        plain_kubeconfig(&self.url())
    }

    /// Writes [`DevCluster::kubeconfig`] to `path` (owner-only permissions).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        write_plain_kubeconfig(&self.url(), path)
    }

    /// Ends every open watch and makes new watches wait until the returned guard is dropped:
    /// lets a test make changes while its watchers are disconnected (resume, 410).
    pub async fn interrupt_watches(&self) -> WatchInterruption {
        let gate = self.state.watch_gate.clone().write_owned().await;
        self.state.watch_epoch.send_modify(|epoch| *epoch += 1);
        WatchInterruption { _gate: gate }
    }

    /// Stops accepting, ends open connections and the scheduler.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

/// A kube client configuration for a plain-HTTP endpoint on loopback without credentials (the
/// dev cluster, or a fault proxy that forwards with its own), namespace `default`, no read
/// timeout (watches stay open).
pub fn plain_client_config(url: &str) -> kube::Config {
    let uri = url.parse().expect("a loopback URL is a valid URI");
    let mut config = kube::Config::new(uri);
    config.default_namespace = "default".into();
    config.read_timeout = None;
    config
}

/// A kubeconfig for kubectl, helm and kube clients of such an endpoint.
pub fn plain_kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ec2-kubelet-dev\n  cluster:\n    server: {url}\n\
         contexts:\n- name: ec2-kubelet-dev\n  context:\n    cluster: ec2-kubelet-dev\n    user: developer\n    namespace: default\n\
         current-context: ec2-kubelet-dev\nusers:\n- name: developer\n  user: {{}}\npreferences: {{}}\n"
    )
}

/// Writes [`plain_kubeconfig`] to `path` (owner-only permissions), creating its directory.
pub fn write_plain_kubeconfig(url: &str, path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, plain_kubeconfig(url))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// A request header's value as text (empty when absent or not text).
fn header_text(headers: &hyper::HeaderMap, name: hyper::header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
