//! `ec2-kubelet-agent`: runs one pod's containers on an instance, for the ec2-kubelet operator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ec2_kubelet_agent::enroll::{self, EnrollConfig};
use ec2_kubelet_agent::imds;
use ec2_kubelet_agent::runtime::{Runtime, RuntimeConfig};
use ec2_kubelet_agent::server;
use ec2_kubelet_agent::shim::{self, ShimArgs};
use ec2_kubelet_protocol::pki;
use ec2_kubelet_protocol::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "ec2-kubelet-agent",
    version,
    about = "Runs a pod's containers on an instance for ec2-kubelet"
)]
struct Cli {
    #[command(subcommand)]
    shim: Option<ShimCommand>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// gRPC listen address (port 0: any free port, printed at start).
    #[arg(long, default_value = "0.0.0.0:8484", env = "EC2_KUBELET_AGENT_LISTEN")]
    listen: SocketAddr,
    /// Where the agent records what it runs (pods, container runs, logs). Keep it across restarts.
    #[arg(long, default_value = "/var/lib/ec2-kubelet-agent")]
    state_dir: PathBuf,
    /// Absolute paths a pod names (volume mount paths, working dirs) are placed under this root.
    #[arg(long, default_value = "/")]
    root_dir: PathBuf,
    /// A container log is rotated when it reaches this size (one rotated file is kept).
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    log_max_bytes: u64,
    /// First restart delay of a crashing container (doubles up to --restart-backoff-max-ms).
    #[arg(long, default_value_t = 10_000)]
    restart_backoff_initial_ms: u64,
    #[arg(long, default_value_t = 300_000)]
    restart_backoff_max_ms: u64,
    /// The operator's enrollment endpoint (`https://host:port`). The agent exchanges its
    /// bootstrap token there for a short-lived certificate naming its instance, then serves
    /// mutual TLS, accepting only the operator's certificate.
    #[arg(long, env = "EC2_KUBELET_AGENT_ENROLL_URL", requires = "ca_file")]
    enroll_url: Option<String>,
    /// The agent CA (PEM) that signed the operator's certificates.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The one-time bootstrap token (from the user data). Not needed while the certificate
    /// stored in the state dir is valid.
    #[arg(long)]
    bootstrap_token_file: Option<PathBuf>,
    /// This instance's id; default: asked of the instance metadata service (--imds-endpoint).
    #[arg(long)]
    instance_id: Option<String>,
    /// Serve plain text with no authentication: anyone who reaches the port controls the pod.
    /// For development and benchmarks on a trusted loopback only.
    #[arg(long, conflicts_with = "enroll_url")]
    insecure: bool,
    /// Poll the instance metadata service here for spot interruption notices (on EC2:
    /// http://169.254.169.254, which the bootstrap passes); unset: no polling.
    #[arg(long, env = "EC2_KUBELET_AGENT_IMDS")]
    imds_endpoint: Option<String>,
    /// How often to poll for a spot interruption notice (EC2 gives two minutes' warning).
    #[arg(long, default_value_t = 5_000)]
    imds_poll_ms: u64,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum ShimCommand {
    /// (internal) Runs one container run and records its logs and exit status.
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        run_dir: PathBuf,
        #[arg(long)]
        log_file: PathBuf,
        #[arg(long)]
        log_max_bytes: u64,
        #[arg(long)]
        working_dir: Option<PathBuf>,
        /// Keep the container's standard input open for attach.
        #[arg(long)]
        stdin: bool,
        /// Close it when the first attach ends.
        #[arg(long)]
        stdin_once: bool,
        /// Run the container on a pseudo-terminal.
        #[arg(long)]
        tty: bool,
        /// The Unix socket attach reaches the container's streams on.
        #[arg(long)]
        attach_socket: Option<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(ShimCommand::Shim {
        run_dir,
        log_file,
        log_max_bytes,
        working_dir,
        stdin,
        stdin_once,
        tty,
        attach_socket,
        command,
    }) = cli.shim
    {
        let code = shim::run(ShimArgs {
            run_dir,
            log_file,
            log_max_bytes,
            working_dir,
            command,
            stdin,
            stdin_once,
            tty,
            attach_socket,
        });
        return ExitCode::from(code as u8);
    }
    let args = cli.agent;
    telemetry::init(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: AgentArgs) -> Result<(), String> {
    let shim_program = std::env::current_exe().map_err(|e| format!("locating the agent binary: {e}"))?;
    let config = RuntimeConfig {
        state_dir: args.state_dir.clone(),
        root_dir: args.root_dir.clone(),
        shim_program,
        log_max_bytes: args.log_max_bytes,
        restart_backoff_initial: Duration::from_millis(args.restart_backoff_initial_ms),
        restart_backoff_max: Duration::from_millis(args.restart_backoff_max_ms),
    };
    let runtime = Runtime::new(config).map_err(|e| format!("state dir {}: {e}", args.state_dir.display()))?;
    let recovered = runtime.recover();
    if let Some(endpoint) = &args.imds_endpoint {
        let endpoint: hyper::Uri = endpoint
            .parse()
            .map_err(|e| format!("--imds-endpoint {endpoint}: {e}"))?;
        let every = Duration::from_millis(args.imds_poll_ms.max(100));
        tokio::spawn(ec2_kubelet_agent::imds::watch_spot(
            runtime.clone(),
            endpoint,
            every,
        ));
    }
    let tls = match &args.enroll_url {
        Some(url) => Some(secure(&args, url).await?),
        None if args.insecure => {
            tracing::warn!("--insecure: serving plain text without authentication");
            None
        }
        None => {
            return Err(
                "the agent serves mutual TLS only: give --enroll-url, --ca-file and \
                        --bootstrap-token-file (the bootstrap user data does), or --insecure on a trusted \
                        development machine"
                    .into(),
            );
        }
    };
    let (listener, address) = server::bind(args.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", args.listen))?;
    // The operator's local backend and the tests read this line to learn a port-0 address.
    println!("ec2-kubelet-agent listening on {address}");
    tracing::info!(%address, recovered_pods = recovered, tls = tls.is_some(), "agent serving");
    server::serve(runtime, listener, tls, shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("agent stopped; containers keep running under their shims");
    Ok(())
}

/// Enrolls (or reuses the stored certificate), keeps the certificate renewed, and returns the
/// TLS configuration to serve with.
async fn secure(args: &AgentArgs, url: &str) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
    let read = |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let ca_pem = read(args.ca_file.as_ref().ok_or("--enroll-url needs --ca-file")?)?;
    let token = match &args.bootstrap_token_file {
        Some(path) => Some(read(path)?.trim().to_string()),
        None => None,
    };
    let instance_id = match (&args.instance_id, &args.imds_endpoint) {
        (Some(id), _) => id.clone(),
        (None, Some(endpoint)) => {
            let endpoint: hyper::Uri = endpoint
                .parse()
                .map_err(|e| format!("--imds-endpoint {endpoint}: {e}"))?;
            imds::instance_id(&endpoint).await?
        }
        (None, None) => return Err("--enroll-url needs --instance-id or --imds-endpoint".into()),
    };
    let config = EnrollConfig {
        url: url.to_string(),
        ca_pem: ca_pem.clone(),
        token,
        instance_id,
        dir: args.state_dir.join("tls"),
    };
    let credentials = enroll::credentials(&config).await?;
    let served = pki::SwappableCert::new(&credentials).map_err(|e| e.to_string())?;
    let tls = pki::agent_server_config(&ca_pem, served.clone()).map_err(|e| e.to_string())?;
    tokio::spawn(enroll::keep_renewed(config, credentials, served));
    Ok(tls)
}

/// SIGTERM or SIGINT. Containers keep running: a restarted agent re-adopts them.
async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
