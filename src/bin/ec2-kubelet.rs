//! `ec2-kubelet`: the operator binary and its tools (CRD generation, manifest validation, config check).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ec2_kubelet::cli::{block_on, fail, wait_for_termination};
use ec2_kubelet::config::{ComputeBackend, LogFormat, OperatorConfig};
use ec2_kubelet::crd;
use ec2_kubelet::operator;
use ec2_kubelet::schema::manifests;
use ec2_kubelet_protocol::telemetry;

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
    /// Run the operator against the cluster of $KUBECONFIG (or the in-cluster configuration).
    Run(ConfigArgs),
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
        Command::Run(args) => match args.load() {
            Ok(config) => run(config),
            Err(e) => fail(&e.to_string()),
        },
    }
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
