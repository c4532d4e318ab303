//! The operator's Prometheus metrics (prefix `ec2_kubelet_`), served as text on
//! `server.metricsAddress` `/metrics`, and the health endpoints (`/healthz`, `/readyz`) on
//! `server.healthAddress`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolPhaseLabels {
    pub pool: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub action: String,
    pub outcome: String,
}

fn duration_histogram() -> Histogram {
    // 5 ms .. ~164 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub pods: Family<PoolPhaseLabels, Gauge>,
    pub nodes_ready: Family<PoolLabels, Gauge>,
    pub launch_duration: Family<PoolLabels, Histogram, fn() -> Histogram>,
    pub cloud_calls: Family<CallLabels, Counter>,
    pub throttled: Family<PoolLabels, Counter>,
    pub agent_reconnects: Family<PoolLabels, Counter>,
    pub pod_status_writes: Counter,
    pub record_writes: Counter,
    pub warm_hits: Family<PoolLabels, Counter>,
    pub warm_misses: Family<PoolLabels, Counter>,
    pub warm_refill_duration: Family<PoolLabels, Histogram, fn() -> Histogram>,
    pub warm_instances: Family<PoolPhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ec2_kubelet");
        let metrics = Metrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            pods: Family::default(),
            nodes_ready: Family::default(),
            launch_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            cloud_calls: Family::default(),
            throttled: Family::default(),
            agent_reconnects: Family::default(),
            pod_status_writes: Counter::default(),
            record_writes: Counter::default(),
            warm_hits: Family::default(),
            warm_misses: Family::default(),
            warm_refill_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            warm_instances: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "warm_hits",
            "Pods that claimed a warm instance, by pool",
            metrics.warm_hits.clone(),
        );
        registry.register(
            "warm_misses",
            "Pods of a pool with a warm pool that found no matching warm instance and launched cold",
            metrics.warm_misses.clone(),
        );
        registry.register(
            "warm_refill_duration_seconds",
            "Time from launching a warm instance until its agent answered, by pool",
            metrics.warm_refill_duration.clone(),
        );
        registry.register(
            "warm_instances",
            "Warm instances by pool and state (Launching, Ready)",
            metrics.warm_instances.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and reason",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took, by controller",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "pods",
            "Pods on the pool's virtual nodes, by phase",
            metrics.pods.clone(),
        );
        registry.register(
            "nodes_ready",
            "Ready virtual nodes of the pool",
            metrics.nodes_ready.clone(),
        );
        registry.register(
            "pod_launch_duration_seconds",
            "From a pod bound to a virtual node to its status Running",
            metrics.launch_duration.clone(),
        );
        registry.register(
            "cloud_calls",
            "Calls to the compute backend (EC2), by action and outcome",
            metrics.cloud_calls.clone(),
        );
        registry.register(
            "cloud_throttled",
            "EC2 calls throttled (RequestLimitExceeded), by pool",
            metrics.throttled.clone(),
        );
        registry.register(
            "agent_stream_reconnects",
            "Agent status streams lost and reconnected, by pool",
            metrics.agent_reconnects.clone(),
        );
        registry.register(
            "pod_status_writes",
            "Pod status patches sent to the API server",
            metrics.pod_status_writes.clone(),
        );
        registry.register(
            "record_writes",
            "Writes of Ec2Instance records (create, status, finalizer, delete)",
            metrics.record_writes.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts one cloud call and its outcome (`ok` or the error's reason).
    pub fn cloud_call<T, E: ReasonOf>(&self, action: &str, result: &Result<T, E>) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(error) => error.reason_of().to_string(),
        };
        self.cloud_calls
            .get_or_create(&CallLabels {
                action: action.into(),
                outcome,
            })
            .inc();
    }

    /// Times a reconcile and counts it (and its error, if any).
    pub async fn reconcile<T, E: ReasonOf>(
        &self,
        controller: &str,
        run: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let labels = ControllerLabels {
            controller: controller.into(),
        };
        let start = std::time::Instant::now();
        let result = run.await;
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        if let Err(error) = &result {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: controller.into(),
                    reason: error.reason_of().into(),
                })
                .inc();
        }
        result
    }
}

/// An error with a short reason for metric labels; each error type implements it next to its
/// definition, so that metrics depend on none of them.
pub trait ReasonOf {
    fn reason_of(&self) -> &'static str;
}

type Handler =
    Arc<dyn Fn(&str) -> std::pin::Pin<Box<dyn Future<Output = (StatusCode, String)> + Send>> + Send + Sync>;

/// A small plain-text HTTP server (metrics, health), running until `shutdown`.
pub struct HttpServer {
    pub address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Serves `handler(path)` on `address`.
    pub async fn start(address: &str, handler: Handler) -> std::io::Result<HttpServer> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut backoff = ec2_kubelet_protocol::net::AcceptBackoff::default();
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = backoff.accept("metrics", || listener.accept()) => accepted,
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let handler = handler.clone();
                        async move {
                            let (status, body) = handler(request.uri().path()).await;
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            response.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "text/plain; version=0.0.4; charset=utf-8",
                                ),
                            );
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(HttpServer { address, stop, task })
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// `/metrics` on `server.metricsAddress`.
pub async fn serve_metrics(address: &str, metrics: Arc<Metrics>) -> std::io::Result<HttpServer> {
    HttpServer::start(
        address,
        Arc::new(move |path: &str| {
            let answer = match path {
                "/metrics" => (StatusCode::OK, metrics.encode()),
                _ => (StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
            };
            Box::pin(async move { answer })
        }),
    )
    .await
}

/// `/healthz` (the process serves) and `/readyz` (it reaches the API server) on
/// `server.healthAddress`.
pub async fn serve_health(address: &str, client: kube::Client) -> std::io::Result<HttpServer> {
    HttpServer::start(
        address,
        Arc::new(move |path: &str| {
            let (path, client) = (path.to_string(), client.clone());
            Box::pin(async move {
                match path.as_str() {
                    "/healthz" => (StatusCode::OK, "ok\n".into()),
                    "/readyz" => {
                        match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
                            Ok(Ok(_)) => (StatusCode::OK, "ok\n".into()),
                            Ok(Err(error)) => {
                                (StatusCode::SERVICE_UNAVAILABLE, format!("API server: {error}\n"))
                            }
                            Err(_) => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "API server: no answer in 5 s\n".into(),
                            ),
                        }
                    }
                    _ => (
                        StatusCode::NOT_FOUND,
                        "not found: try /healthz or /readyz\n".into(),
                    ),
                }
            })
        }),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_the_prefix() {
        struct Throttled;
        impl ReasonOf for Throttled {
            fn reason_of(&self) -> &'static str {
                "Throttled"
            }
        }
        let metrics = Metrics::new();
        metrics.cloud_call("RunInstances", &Ok::<(), Throttled>(()));
        metrics.cloud_call("RunInstances", &Err::<(), _>(Throttled));
        metrics
            .pods
            .get_or_create(&PoolPhaseLabels {
                pool: "p".into(),
                phase: "Running".into(),
            })
            .set(2);
        metrics
            .launch_duration
            .get_or_create(&PoolLabels { pool: "p".into() })
            .observe(0.25);
        let text = metrics.encode();
        assert!(
            text.contains("ec2_kubelet_cloud_calls_total{action=\"RunInstances\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ec2_kubelet_cloud_calls_total{action=\"RunInstances\",outcome=\"Throttled\"} 1")
        );
        assert!(text.contains("ec2_kubelet_pods{pool=\"p\",phase=\"Running\"} 2"));
        assert!(text.contains("# TYPE ec2_kubelet_pod_launch_duration_seconds histogram"));
        assert!(text.contains("ec2_kubelet_pod_launch_duration_seconds_count{pool=\"p\"} 1"));
    }
}
