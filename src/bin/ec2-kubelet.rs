//! `ec2-kubelet`: the operator binary and its tools (CRD generation, manifest validation, config check).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ec2_kubelet::config::{ComputeBackend, LogFormat, OperatorConfig};
use ec2_kubelet::devcluster::{DevCluster, DevClusterOptions};
use ec2_kubelet::operator;
use ec2_kubelet::schema::manifests;
use ec2_kubelet::{crd, telemetry};

#[derive(Parser)]
#[command(
    name = "ec2-kubelet",
    version,
    about = "Makes EC2 instances look like Kubernetes pods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRDs generated from the Rust types into ./crds and the Helm chart.
    Crdgen {
        /// Directory to write `<plural>.<group>.yaml` files into.
        #[arg(long, default_value = "crds")]
        out: PathBuf,
        /// The Helm chart whose `crds/` folder gets the same CRDs ("" to skip).
        #[arg(long, default_value = "charts/ec2-kubelet")]
        chart: PathBuf,
        /// Print the CRDs as one YAML stream instead of writing files.
        #[arg(long)]
        stdout: bool,
        /// Print the CRD reference (Markdown, as in docs/crds.md) instead of writing files.
        #[arg(long)]
        reference: bool,
    },
    /// Check Ec2NodePool / Ec2PodTemplate manifests against the CRD schemas, strictly
    /// (unknown fields are errors). Directories stand for their *.yaml files.
    Validate {
        /// Files or directories.
        #[arg(short = 'f', long = "filename", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the effective operator configuration (file, then flags), or the field at fault.
    Config(ConfigArgs),
    /// The main job on the embedded default (no AWS account, no cluster): a dev cluster, the
    /// operator on the local backend, and the samples; prints the virtual nodes and the pods,
    /// each on its own (local) instance.
    Demo(DemoArgs),
    /// Run the operator against the cluster of $KUBECONFIG (or the in-cluster configuration).
    Run(ConfigArgs),
    /// Run the dev cluster: a Kubernetes API server stand-in on loopback (no auth, in memory),
    /// with the project's CRDs installed, and write a kubeconfig for kubectl and helm.
    Dev(DevArgs),
}

#[derive(Args, Clone, Debug)]
struct DemoArgs {
    /// Address of the dev cluster (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: std::net::SocketAddr,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = ".ec2-kubelet/dev/kubeconfig")]
    kubeconfig: PathBuf,
    /// The sample manifests.
    #[arg(long, default_value = "config/samples")]
    samples: PathBuf,
    /// Address of the virtual nodes' kubelet API (`kubectl logs` and `exec` go there); default
    /// 127.0.0.1:10250 with the dev cluster, 0.0.0.0:10250 with the real control plane (its API
    /// server dials each node's own loopback address, 127.0.x.y).
    #[arg(long)]
    kubelet_listen: Option<std::net::SocketAddr>,
    /// Run on the real control plane (etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler) of this binary, built from e2e/control-plane by `make tools`; without it
    /// the demo runs on the dev cluster.
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// Stop once the nodes are shown instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
}

#[derive(Args, Clone, Debug)]
struct DevArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: std::net::SocketAddr,
    /// Where to write the kubeconfig.
    #[arg(long, default_value = ".ec2-kubelet/dev/kubeconfig")]
    kubeconfig: PathBuf,
    /// Do not bind pending pods to nodes (tests that schedule pods themselves).
    #[arg(long)]
    no_scheduler: bool,
    /// Do not install the Ec2NodePool and Ec2PodTemplate CRDs at start.
    #[arg(long)]
    no_crds: bool,
    /// Changes a watch can replay before it gets 410 Gone.
    #[arg(long, default_value_t = ec2_kubelet::devcluster::store::DEFAULT_HISTORY)]
    history: usize,
    /// Share of resource requests answered with an injected fault (0.0-1.0): try a client
    /// against a flaky API server.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// The faults to inject, comma-separated: server-error, too-many-requests, conflict, gone,
    /// drop-watch, slow (default: all).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<ec2_kubelet::devcluster::faults::Fault>,
    /// Inject faults only into requests whose User-Agent starts with this (e.g. ec2-kubelet/).
    #[arg(long)]
    fault_user_agent: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// Where the configuration comes from; flags override the file.
#[derive(Args, Clone, Debug)]
struct ConfigArgs {
    /// Operator config file (YAML).
    #[arg(long, env = "EC2_KUBELET_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster name (the ec2-kubelet.io/cluster tag).
    #[arg(long)]
    cluster_name: Option<String>,
    /// AWS region.
    #[arg(long)]
    region: Option<String>,
    /// EC2 endpoint override, e.g. http://127.0.0.1:5000.
    #[arg(long)]
    ec2_endpoint: Option<String>,
    /// Compute backend.
    #[arg(long, value_enum)]
    compute: Option<ComputeBackend>,
    /// The https:// URL at which instances reach the enrollment endpoint (agentTls.enrollUrl).
    #[arg(long)]
    agent_enroll_url: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

impl ConfigArgs {
    fn load(&self) -> Result<OperatorConfig, ec2_kubelet::config::ConfigError> {
        let mut config = match &self.config {
            Some(path) => OperatorConfig::from_file(path)?,
            None => OperatorConfig::default(),
        };
        if let Some(v) = &self.cluster_name {
            config.cluster_name = v.clone();
        }
        if let Some(v) = &self.region {
            config.region = v.clone();
        }
        if let Some(v) = &self.ec2_endpoint {
            config.ec2_endpoint = Some(v.clone());
        }
        if let Some(v) = self.compute {
            config.compute = v;
        }
        if let Some(v) = &self.agent_enroll_url {
            config.agent_tls.enroll_url = Some(v.clone());
        }
        if let Some(v) = self.log_format {
            config.log_format = v;
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen { reference: true, .. } => {
            print!("{}", crd::reference::markdown());
            ExitCode::SUCCESS
        }
        Command::Crdgen {
            out, chart, stdout, ..
        } => crdgen(&out, &chart, stdout),
        Command::Validate { paths } => validate(&paths),
        Command::Config(args) => match args.load() {
            Ok(config) => {
                telemetry::init(config.log_format);
                print!("{}", serde_yaml::to_string(&config).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
        Command::Dev(args) => dev(args),
        Command::Demo(args) => demo(args),
        Command::Run(args) => match args.load() {
            Ok(config) => run(config),
            Err(e) => fail(&e.to_string()),
        },
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    telemetry::init_with_default(LogFormat::Text, "warn");
    block_on(async move {
        let state = match tempfile_dir() {
            Ok(dir) => dir,
            Err(e) => return fail(&e),
        };
        let options = ec2_kubelet::demo::DemoOptions {
            listen: args.listen,
            kubeconfig: args.kubeconfig.clone(),
            samples: args.samples.clone(),
            state_dir: state.clone(),
            kubelet: args.kubelet_listen.unwrap_or_else(|| match args.control_plane {
                Some(_) => "0.0.0.0:10250".parse().expect("an address"),
                None => "127.0.0.1:10250".parse().expect("an address"),
            }),
            control_plane: args.control_plane.clone(),
        };
        let demo = match ec2_kubelet::demo::start(&options).await {
            Ok(running) => running,
            Err(e) => return fail(&e),
        };
        if !args.once {
            println!();
            println!("Explore with kubectl (Ctrl-C stops the demo):");
            println!("  export KUBECONFIG={}", args.kubeconfig.display());
            println!("  kubectl get ecnp,nodes,pods -o wide");
            println!("  kubectl logs -f worker-0");
            println!("  kubectl exec hello -- uname -a");
            println!("  kubectl patch ecnp default --type merge -p '{{\"spec\":{{\"nodes\":3}}}}'");
            if args.control_plane.is_some() {
                println!(
                    "  kubectl create deployment web --image=local/shell --replicas=2 -- sh -c 'while true; do date; sleep 5; done'"
                );
                println!(
                    "  kubectl patch deployment web -p '{{\"spec\":{{\"template\":{{\"spec\":{{\"tolerations\":[{{\"key\":\"virtual-kubelet.io/provider\",\"operator\":\"Exists\"}}]}}}}}}}}'"
                );
            }
            wait_for_termination().await;
        }
        demo.shutdown().await;
        let _ = std::fs::remove_dir_all(&state);
        ExitCode::SUCCESS
    })
}

/// A fresh directory for the demo's local instances.
fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("ec2-kubelet-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

fn run(config: OperatorConfig) -> ExitCode {
    telemetry::init(config.log_format);
    block_on(async move {
        let client = match kube::Config::infer().await {
            Ok(kube_config) => match operator::client(kube_config) {
                Ok(client) => client,
                Err(e) => return fail(&format!("connecting to Kubernetes: {e}")),
            },
            Err(e) => return fail(&format!("finding the Kubernetes configuration: {e}")),
        };
        let compute = match operator::compute(&config).await {
            Ok(compute) => compute,
            Err(e) => return fail(&e),
        };
        let identity = operator::identity();
        tracing::info!(%identity, backend = compute.backend(), cluster = %config.cluster_name, "starting");
        let (ctx, enrollment) = match operator::context(client, compute, config, &identity).await {
            Ok(started) => started,
            Err(e) => return fail(&e),
        };
        let kubelet = match operator::start_kubelet(ctx.clone()).await {
            Ok(kubelet) => kubelet,
            Err(e) => return fail(&e),
        };
        let server = &ctx.config.server;
        let metrics =
            match ec2_kubelet::metrics::serve_metrics(&server.metrics_address, ctx.metrics.clone()).await {
                Ok(metrics) => metrics,
                Err(e) => return fail(&format!("serving metrics on {}: {e}", server.metrics_address)),
            };
        let health =
            match ec2_kubelet::metrics::serve_health(&server.health_address, ctx.client.clone()).await {
                Ok(health) => health,
                Err(e) => return fail(&format!("serving health on {}: {e}", server.health_address)),
            };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(operator::run(ctx, stopped));
        wait_for_termination().await;
        tracing::info!("stopping: releasing leases");
        let _ = stop.send(true);
        let _ = running.await;
        kubelet.shutdown().await;
        metrics.shutdown().await;
        health.shutdown().await;
        drop(enrollment);
        ExitCode::SUCCESS
    })
}

fn dev(args: DevArgs) -> ExitCode {
    telemetry::init(args.log_format);
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return fail(&format!(
            "--fault-rate {}: must be between 0.0 and 1.0",
            args.fault_rate
        ));
    }
    block_on(async move {
        let mut faults = ec2_kubelet::devcluster::faults::FaultOptions {
            rate: args.fault_rate,
            user_agent: args.fault_user_agent.clone(),
            ..Default::default()
        };
        if !args.faults.is_empty() {
            faults.kinds = args.faults.clone();
        }
        // With faults, clients reach the dev cluster through the fault proxy on the address
        // asked for, and the cluster itself listens on a free loopback port behind it.
        let proxied = faults.rate > 0.0;
        let options = DevClusterOptions {
            address: if proxied {
                std::net::SocketAddr::from(([127, 0, 0, 1], 0))
            } else {
                args.listen
            },
            scheduler: !args.no_scheduler,
            history: args.history,
            ..DevClusterOptions::default()
        };
        let cluster = match DevCluster::start(options).await {
            Ok(cluster) => cluster,
            Err(e) => return fail(&format!("listening on {}: {e}", args.listen)),
        };
        let proxy = if proxied {
            match ec2_kubelet::devcluster::proxy::FaultProxy::start(
                args.listen,
                cluster.client_config(),
                faults,
            )
            .await
            {
                Ok(proxy) => Some(proxy),
                Err(e) => return fail(&format!("listening on {}: {e}", args.listen)),
            }
        } else {
            None
        };
        let url = proxy.as_ref().map_or_else(|| cluster.url(), |p| p.url());
        if !args.no_crds {
            for definition in crd::crds() {
                let object = serde_json::to_value(&definition).unwrap_or_default();
                if let Err(e) = cluster.store().create_builtin(
                    "apiextensions.k8s.io",
                    "customresourcedefinitions",
                    None,
                    object,
                ) {
                    return fail(&format!("installing CRDs: {}", e.message));
                }
            }
        }
        if let Err(e) = ec2_kubelet::devcluster::write_plain_kubeconfig(&url, &args.kubeconfig) {
            return fail(&format!("writing {}: {e}", args.kubeconfig.display()));
        }
        let kubeconfig = std::fs::canonicalize(&args.kubeconfig).unwrap_or(args.kubeconfig.clone());
        match &proxy {
            Some(_) => println!(
                "ec2-kubelet dev cluster listening on {url}, through the fault proxy (rate {}; exec, attach and port-forward need the cluster itself: {})",
                args.fault_rate,
                cluster.url()
            ),
            None => println!("ec2-kubelet dev cluster listening on {url}"),
        }
        println!(
            "kubeconfig written to {}; point kubectl and helm at it with:",
            kubeconfig.display()
        );
        println!("  export KUBECONFIG={}", kubeconfig.display());
        println!("  kubectl get nodes,ec2nodepools");
        println!("Stop with Ctrl-C.");
        wait_for_termination().await;
        ExitCode::SUCCESS
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_termination() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// Runs `main` on a multi-threaded tokio runtime.
fn block_on(main: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => fail(&format!("starting the async runtime: {e}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn crdgen(out: &std::path::Path, chart: &std::path::Path, stdout: bool) -> ExitCode {
    if stdout {
        for crd in crd::crds() {
            match crd::crd_yaml(&crd) {
                Ok(yaml) => print!("---\n{yaml}"),
                Err(e) => return fail(&e.to_string()),
            }
        }
        return ExitCode::SUCCESS;
    }
    let written = crd::write_crds(out).and_then(|mut paths| {
        if !chart.as_os_str().is_empty() {
            paths.extend(crd::write_crd_files(&chart.join("crds"))?);
        }
        Ok(paths)
    });
    match written {
        Ok(paths) => {
            for path in paths {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("writing CRDs: {e}")),
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let reports = match manifests::validate_files(paths) {
        Ok(reports) => reports,
        Err(e) => return fail(&e.to_string()),
    };
    for report in &reports {
        println!("{report}");
    }
    let invalid = reports.iter().filter(|r| r.is_invalid()).count();
    if invalid > 0 {
        return fail(&format!("{invalid} of {} documents invalid", reports.len()));
    }
    ExitCode::SUCCESS
}
