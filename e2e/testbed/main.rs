//! `ec2-kubelet-dev`: the test bed on the command line. `demo` runs the main job on an embedded
//! default (no AWS account, no cluster); `cluster` runs the dev cluster for kubectl and helm.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ec2_kubelet::cli::{block_on, fail, wait_for_termination};
use ec2_kubelet::config::LogFormat;
use ec2_kubelet::crd;
use ec2_kubelet_protocol::telemetry;
use ec2_kubelet_testbed::devcluster::{DevCluster, DevClusterOptions};

#[derive(Parser)]
#[command(
    name = "ec2-kubelet-dev",
    version,
    about = "The ec2-kubelet test bed: the demo and the dev cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on the embedded default (no AWS account, no cluster): a dev cluster, the
    /// operator on the local backend, and the samples; prints the virtual nodes and the pods,
    /// each on its own (local) instance.
    Demo(DemoArgs),
    /// Run the dev cluster: a Kubernetes API server stand-in on loopback (no auth, in memory),
    /// with the project's CRDs installed, and write a kubeconfig for kubectl and helm.
    Cluster(ClusterArgs),
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
struct ClusterArgs {
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
    #[arg(long, default_value_t = ec2_kubelet_testbed::devcluster::store::DEFAULT_HISTORY)]
    history: usize,
    /// Share of resource requests answered with an injected fault (0.0-1.0): try a client
    /// against a flaky API server.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// The faults to inject, comma-separated: server-error, too-many-requests, conflict, gone,
    /// drop-watch, slow (default: all).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<ec2_kubelet_testbed::devcluster::faults::Fault>,
    /// Inject faults only into requests whose User-Agent starts with this (e.g. ec2-kubelet/).
    #[arg(long)]
    fault_user_agent: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo(args) => demo(args),
        Command::Cluster(args) => cluster(args),
    }
}

fn demo(args: DemoArgs) -> ExitCode {
    telemetry::init_with_default(LogFormat::Text, "warn");
    block_on(async move {
        let state = match tempfile_dir() {
            Ok(dir) => dir,
            Err(e) => return fail(&e),
        };
        let options = ec2_kubelet_testbed::demo::DemoOptions {
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
        let demo = match ec2_kubelet_testbed::demo::start(&options).await {
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
            println!("  kubectl exec -it hello -- sh");
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

fn cluster(args: ClusterArgs) -> ExitCode {
    telemetry::init(args.log_format);
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return fail(&format!(
            "--fault-rate {}: must be between 0.0 and 1.0",
            args.fault_rate
        ));
    }
    block_on(async move {
        let mut faults = ec2_kubelet_testbed::devcluster::faults::FaultOptions {
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
            match ec2_kubelet_testbed::devcluster::proxy::FaultProxy::start(
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
        if let Err(e) = ec2_kubelet_testbed::devcluster::write_plain_kubeconfig(&url, &args.kubeconfig) {
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
