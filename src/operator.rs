//! The operator process: node tasks in every replica (each node run by the replica holding its
//! lease), and the pool controller in the replica holding the controller lease.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tokio::sync::watch;

use crate::controller::{pool, template};
use crate::crd::{Ec2NodePool, Ec2PodTemplate, labels};
use crate::node::supervisor;
use crate::runtime::Context;
use crate::runtime::lease::LeaseLock;
use crate::runtime::synced::Synced;
use crate::task::stopped;

/// How the operator introduces itself to the API server (audit logs, API priority and fairness).
pub const USER_AGENT: &str = concat!("ec2-kubelet/", env!("CARGO_PKG_VERSION"));

/// Idle connections to the API server kept for reuse. kube speaks HTTP/1.1, one request per
/// connection at a time, and its default pool keeps every connection a burst opened (hundreds
/// after a few thousand pods start at once, each with its buffers on both ends) for as long as
/// the server keeps it open. client-go keeps 25 (`MaxIdleConnsPerHost`); watches are not idle
/// and do not count.
pub const IDLE_CONNECTIONS: usize = 25;

/// How long an idle connection is kept (hyper's and Go's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A Kubernetes client for the operator: `config` with the operator's User-Agent, and without
/// kube's own retry of 429 and 503 answers (up to 15 times, minutes in all): every caller has
/// its own backoff (`Retry-After` included), and a 429 can be an answer to act on, such as an
/// eviction a PodDisruptionBudget refuses.
///
/// The HTTP stack is kube's default one (TLS, the config's timeouts, base URI, credentials and
/// headers) with a bounded connection pool ([`IDLE_CONNECTIONS`]). Through a proxy, kube's own
/// stack is used as it is.
pub fn client(mut config: kube::Config) -> kube::Result<kube::Client> {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    let agent = hyper::header::HeaderValue::from_static(USER_AGENT);
    config.headers.push((hyper::header::USER_AGENT, agent));
    config.default_retry = false;
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config);
    }
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // As kube does: the process's provider, unless one is installed (an error means one was,
        // meanwhile).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let mut connector =
        hyper_timeout::TimeoutConnector::new(config.rustls_https_connector_with_connector(http)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(IDLE_CONNECTIONS)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The lease whose holder runs the pool controller.
pub const CONTROLLER_LEASE: &str = "ec2-kubelet-controller";

/// Runs the pool and template controllers until their streams end.
async fn run_controller(ctx: Arc<Context>) {
    let templates: Api<Ec2PodTemplate> = Api::all(ctx.client.clone());
    let template_controller = Controller::new(templates, watcher::Config::default())
        .run(
            |template, ctx| async move {
                let metrics = ctx.metrics.clone();
                metrics
                    .reconcile("template", template::reconcile(template, ctx))
                    .await
            },
            template::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "template controller");
            }
        });
    let pools: Api<Ec2NodePool> = Api::all(ctx.client.clone());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let templates: Api<Ec2PodTemplate> = Api::all(ctx.client.clone());
    // Only the Controller waits on a store's own readiness; the rest wait on these (see
    // runtime::synced: a store wakes one waiter).
    let (pools_synced, nodes_synced, pods_synced) = (Synced::default(), Synced::default(), Synced::default());
    // Every pod and pool event turns this: the counts task recounts on it.
    let (touched, touched_rx) = watch::channel(0u64);
    let touched = Arc::new(touched);
    let touch = |touched: &watch::Sender<u64>| touched.send_modify(|n| *n = n.wrapping_add(1));
    let (reader, writer) = reflector::store();
    // The counts in the status change with every pod: they trigger nothing (the counts task
    // writes them); spec, deletion and node readiness do.
    let (observed, pools_touched) = (pools_synced.clone(), touched.clone());
    let pool_events = watcher(pools, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| {
            observed.observe(event);
            touch(&pools_touched);
        })
        .applied_objects()
        .predicate_filter(pool_trigger, Default::default());
    // The controller reads the pools' nodes from this store. Node heartbeats change nothing for
    // the pool: readiness and cordoning do.
    let (node_reader, node_writer) = reflector::store();
    let observed = nodes_synced.clone();
    let node_events = watcher(nodes, watcher::Config::default().labels(labels::POOL))
        .default_backoff()
        .reflect(node_writer)
        .inspect_ok(move |event| observed.observe(event))
        .touched_objects()
        .predicate_filter(node_trigger, Default::default());
    // And every pod's node and phase from this one (not whole pods: pool::PodPlacement). Pod
    // changes trigger nothing (the resync and the node tasks' writes do).
    let (pod_reader, pod_writer) = reflector::store();
    let pod_events = watcher(Api::<Pod>::all(ctx.client.clone()), watcher::Config::default())
        .default_backoff()
        .map_ok(pool::PodPlacement::event);
    let observed = pods_synced.clone();
    let pod_store = reflector::reflector(pod_writer, pod_events).for_each(move |event| {
        if let Ok(event) = &event {
            observed.observe(event);
            touch(&touched);
        }
        std::future::ready(())
    });
    let warm_pools = crate::warm::run(ctx.clone(), reader.clone(), pools_synced.clone());
    let finalizer = crate::controller::instance::run(ctx.clone());
    let counts = crate::controller::counts::run(
        ctx.clone(),
        (reader.clone(), pools_synced),
        (pod_reader.clone(), pods_synced.clone()),
        touched_rx,
    );
    // Serving certificates are issued while this replica leads.
    let _serving = serving_certificates_from_csr(&ctx.config)
        .then(|| crate::task::AbortOnDrop(tokio::spawn(crate::kubelet::serving::run(ctx.clone()))));
    let referring = reader.clone();
    let pool_controller = Controller::for_stream(pool_events, reader)
        .owns_stream(node_events)
        .watches(templates, watcher::Config::default(), move |template| {
            let (namespace, name) = (template.namespace().unwrap_or_default(), template.name_any());
            referring
                .state()
                .into_iter()
                .filter(|pool| {
                    pool.spec
                        .template_ref
                        .as_ref()
                        .is_some_and(|r| r.namespace == namespace && r.name == name)
                })
                .map(|pool| ObjectRef::from_obj(&*pool))
                .collect::<Vec<_>>()
        })
        .run(
            |pool, pc| async move {
                let metrics = pc.ctx.metrics.clone();
                metrics.reconcile("pool", pool::reconcile(pool, pc)).await
            },
            pool::error_policy,
            Arc::new(pool::PoolContext {
                ctx,
                nodes: node_reader,
                pods: pod_reader,
                synced: (nodes_synced, pods_synced),
            }),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "pool controller");
            }
        });
    futures::join!(
        pool_controller,
        template_controller,
        warm_pools,
        pod_store,
        finalizer,
        counts
    );
}

fn hash_of(value: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What of a pool makes the pool controller reconcile it.
fn pool_trigger(pool: &Ec2NodePool) -> Option<u64> {
    let readiness: Vec<(&String, bool)> = pool
        .status
        .iter()
        .flat_map(|s| s.nodes.iter().map(|(name, node)| (name, node.ready)))
        .collect();
    Some(hash_of((
        pool.metadata.generation,
        pool.metadata.deletion_timestamp.is_some(),
        &pool.metadata.finalizers,
        readiness,
    )))
}

/// What of a pool's node makes the pool controller reconcile the pool.
fn node_trigger(node: &Node) -> Option<u64> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    Some(hash_of((
        ready,
        node.spec.as_ref().and_then(|s| s.unschedulable),
        node.metadata.deletion_timestamp.is_some(),
    )))
}

/// Renews the controller lease until another holds it or no renewal succeeded for `deadline`.
async fn keep_leading(lease: &LeaseLock, every: Duration, deadline: Duration) {
    let mut ticker = tokio::time::interval(every);
    let mut renewed = tokio::time::Instant::now();
    let mut retry = crate::runtime::backoff::Backoff::new(Duration::from_secs(1), every);
    loop {
        ticker.tick().await;
        match lease.try_acquire_or_renew().await {
            Ok(true) => {
                renewed = tokio::time::Instant::now();
                retry.reset();
            }
            Ok(false) => return,
            // A failed renewal is retried, sooner than the next renewal, until the renew
            // deadline: flaky responses do not cost the leadership, and leading stops well
            // before the lease can pass to another.
            Err(error) if renewed.elapsed() < deadline => {
                let delay = retry.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "renewing the controller lease; retrying");
                ticker.reset_after(delay);
            }
            Err(error) => {
                tracing::warn!(%error, ?deadline, "renewing the controller lease failed past the renew deadline");
                return;
            }
        }
    }
}

/// Runs the operator until `stop` turns true; then stops every node task and releases the
/// leases this replica holds.
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let records = ctx.records.clone();
    let client = ctx.client.clone();
    let _records = crate::task::AbortOnDrop(tokio::spawn(async move { records.run(client).await }));
    let nodes = tokio::spawn(supervisor::run(ctx.clone(), stop.clone()));
    let renew = Duration::from_secs(u64::from(ctx.config.lease.renew_interval_seconds.max(1)));
    let duration = Duration::from_secs(u64::from(ctx.config.lease.duration_seconds.max(1)));
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let leader = LeaseLock::new(leases, CONTROLLER_LEASE, &ctx.identity, duration);
    let mut ticker = tokio::time::interval(renew);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = ticker.tick() => {}
        }
        match leader.try_acquire_or_renew().await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                tracing::warn!(%error, "acquiring the controller lease");
                continue;
            }
        }
        tracing::info!(identity = %ctx.identity, "leading: running the pool controller");
        tokio::select! {
            _ = run_controller(ctx.clone()) => {}
            _ = keep_leading(&leader, renew, duration * 2 / 3) => tracing::warn!("lost the controller lease"),
            _ = stopped(&mut stop) => break,
        }
    }
    leader.release_on_stop().await;
    if let Err(error) = nodes.await {
        tracing::warn!(%error, "the node supervisor ended abnormally");
    }
}

/// Whether each virtual node gets its serving certificate from the cluster's kubelet-serving
/// signer (`server.kubeletServing.mode: CSR` and no `kubeletTlsCertFile`).
pub fn serving_certificates_from_csr(config: &crate::config::OperatorConfig) -> bool {
    config.server.kubelet_tls_cert_file.is_none()
        && config.server.kubelet_serving.mode == crate::config::KubeletServingMode::Csr
}

/// Starts the kubelet API of the virtual nodes on `server.kubeletAddress`: with the configured
/// certificate, or each node's from the cluster's signer (`server.kubeletServing`) with a
/// self-signed one until it is issued; and its callers' authentication (`server.kubeletAuth`).
pub async fn start_kubelet(ctx: Arc<Context>) -> Result<crate::kubelet::KubeletServer, String> {
    let server = &ctx.config.server;
    let auth = crate::kubelet::auth::Authenticator::new(ctx.client.clone(), server.kubelet_auth.clone());
    let client_ca = auth.client_ca().await?;
    let fallback = crate::kubelet::tls::server_config(
        server.kubelet_tls_cert_file.as_deref(),
        server.kubelet_tls_key_file.as_deref(),
        client_ca.as_deref(),
    )?;
    let certificates = crate::kubelet::serving::Certificates::new(fallback, client_ca);
    let follow = serving_certificates_from_csr(&ctx.config).then(|| {
        certificates
            .clone()
            .watch(ctx.client.clone(), ctx.config.namespace.clone())
    });
    let address = server.kubelet_address.clone();
    crate::kubelet::KubeletServer::start(ctx, &address, certificates, follow, Arc::new(auth))
        .await
        .map_err(|e| format!("serving the kubelet API on {address}: {e}"))
}

/// The operator's context, with the operator <-> agent channel set up as `agentTls` says, and
/// the enrollment server (it serves until dropped; `None` when agent TLS is disabled).
pub async fn context(
    client: kube::Client,
    compute: Arc<dyn crate::cloud::Compute>,
    config: crate::config::OperatorConfig,
    identity: &str,
) -> Result<(Arc<Context>, Option<crate::enrollment::EnrollmentServer>), String> {
    let mut ctx = Context::new(client, compute, config, identity);
    let enrollment = secure_agents(&mut ctx).await?;
    Ok((Arc::new(ctx), enrollment))
}

/// Sets up the operator <-> agent channel (`agentTls`): loads or creates the agent CA, serves
/// enrollment on `server.enrollAddress`, and has `ctx` dial agents over mutual TLS. Returns the
/// enrollment server (it serves until dropped); `None` when agent TLS is disabled.
async fn secure_agents(ctx: &mut Context) -> Result<Option<crate::enrollment::EnrollmentServer>, String> {
    use crate::config::AgentTlsMode;
    use crate::enrollment::{self, AgentTls};
    let config = &ctx.config;
    if config.agent_tls.mode == AgentTlsMode::Disabled {
        tracing::warn!(
            "agentTls.mode is disabled: agents serve plain text and accept anyone who reaches them"
        );
        return Ok(None);
    }
    let authority = enrollment::load_or_create_authority(&ctx.client, &config.namespace).await?;
    let (listener, address) = enrollment::bind(&config.server.enroll_address).await?;
    let url = match &config.agent_tls.enroll_url {
        Some(url) => url.clone(),
        // Local instances reach the operator on loopback.
        None => {
            let ip = if address.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                address.ip()
            };
            format!("https://{}", std::net::SocketAddr::new(ip, address.port()))
        }
    };
    let tls = AgentTls::new(
        authority,
        &config.agent_tls,
        url,
        ctx.client.clone(),
        &config.namespace,
    )?;
    let server = enrollment::serve(listener, tls.clone(), ctx.compute.clone())?;
    tracing::info!(address = %server.address, url = %tls.enroll_url(), "serving agent enrollment");
    ctx.agents = crate::agent_client::Connections::with_tls(tls);
    Ok(Some(server))
}

/// A replica identity: `$POD_NAME` in a cluster, else the host name, plus a random suffix so two
/// processes on one host differ.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "ec2-kubelet".into());
    format!("{base}-{:08x}", rand::random::<u32>())
}

/// The compute backend the configuration asks for. The `local` backend keeps its records in
/// `local.stateDir` (default: `<tmp>/ec2-kubelet-local-<cluster>`, stable across restarts) and
/// starts `local.agentBinary` (default: `ec2-kubelet-agent` beside this binary).
pub async fn compute(
    config: &crate::config::OperatorConfig,
) -> Result<Arc<dyn crate::cloud::Compute>, String> {
    use crate::cloud::aws::AwsCompute;
    use crate::cloud::local::{LocalCompute, LocalOptions};
    use crate::config::ComputeBackend;
    match config.compute {
        ComputeBackend::Aws => {
            let compute = AwsCompute::new(
                &config.cluster_name,
                &config.region,
                config.ec2_endpoint.as_deref(),
                &config.ec2_client,
            )
            .await;
            Ok(Arc::new(compute))
        }
        ComputeBackend::Local => {
            let dir = config.local.state_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("ec2-kubelet-local-{}", config.cluster_name))
            });
            let agent_binary = match &config.local.agent_binary {
                Some(path) => path.clone(),
                None => std::env::current_exe()
                    .map_err(|e| format!("locating this binary: {e}"))?
                    .with_file_name("ec2-kubelet-agent"),
            };
            let options = LocalOptions {
                cluster: config.cluster_name.clone(),
                dir,
                agent_binary,
                imds_endpoint: config.local.imds_endpoint.clone(),
            };
            let compute = LocalCompute::new(options).map_err(|e| format!("local compute backend: {e}"))?;
            Ok(Arc::new(compute))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every request on every connection with `{}`, once `release` says so, and counts
    /// the connections open.
    async fn serve(
        listener: tokio::net::TcpListener,
        open: Arc<AtomicUsize>,
        release: watch::Receiver<bool>,
    ) {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (open, mut release) = (open.clone(), release.clone());
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                'connection: loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 'connection,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    let _ = release.wait_for(|go| *go).await;
                    let answer =
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if socket.write_all(answer).await.is_err() {
                        break;
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    #[tokio::test]
    async fn a_burst_of_requests_leaves_a_bounded_pool_of_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let open = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        tokio::spawn(serve(listener, open.clone(), released));
        let client = client(kube::Config::new(url.parse().unwrap())).unwrap();
        // Requests that are all in flight at once: one connection each (HTTP/1.1).
        let burst = 4 * IDLE_CONNECTIONS;
        let requests: Vec<_> = (0..burst)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let request = hyper::Request::get("/version").body(Vec::new()).unwrap();
                    client.request_text(request).await
                })
            })
            .collect();
        // A guard against a hang, not a measurement.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while open.load(Ordering::SeqCst) < burst {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} connections opened",
                open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        release.send_replace(true);
        for request in requests {
            assert_eq!(request.await.unwrap().unwrap(), "{}");
        }
        // The connections past the pool's size are closed as they come back.
        while open.load(Ordering::SeqCst) > IDLE_CONNECTIONS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} connections still open, {IDLE_CONNECTIONS} kept",
                open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And the pool is used: another burst of as many requests opens no new connection.
        let before = open.load(Ordering::SeqCst);
        for _ in 0..IDLE_CONNECTIONS {
            let request = hyper::Request::get("/version").body(Vec::new()).unwrap();
            assert_eq!(client.request_text(request).await.unwrap(), "{}");
        }
        assert_eq!(open.load(Ordering::SeqCst), before);
    }
}
