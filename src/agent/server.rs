//! The tonic service of the agent, over plain TCP or (mutual) TLS.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::logs::{FOLLOW_INTERVAL, LogFilter, read_and_follow};
use super::proto::agent_server::{Agent, AgentServer};
use super::proto::{
    AttachInput, AttachOutput, ContainerStats, ExecInput, ExecOutput, GetLogsRequest, GetStatsRequest,
    LaunchPodRequest, LaunchPodResponse, LogChunk, PingRequest, PingResponse, PodStats, PodStatus,
    PortForwardInput, PortForwardOutput, TerminatePodRequest, TerminatePodResponse, WatchPodStatusRequest,
    attach_input, attach_output, exec_input,
};
use super::runtime::Runtime;
use super::state::now_ms;
use super::{Error, attach, exec, portforward, stats};

type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct AgentService {
    runtime: Arc<Runtime>,
}

impl AgentService {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        AgentService { runtime }
    }
}

const LOG_CHUNK_BYTES: usize = 64 * 1024;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_id: self.runtime.boot_id.clone(),
            agent_instance_id: self.runtime.agent_instance_id.clone(),
            pod_uids: self.runtime.pod_uids(),
            started_at_unix_ms: self.runtime.started_at,
        }))
    }

    async fn launch_pod(
        &self,
        request: Request<LaunchPodRequest>,
    ) -> Result<Response<LaunchPodResponse>, Status> {
        let spec = request
            .into_inner()
            .pod
            .ok_or_else(|| Status::invalid_argument("pod: required"))?;
        let already_known = self.runtime.launch(spec)?;
        Ok(Response::new(LaunchPodResponse { already_known }))
    }

    async fn terminate_pod(
        &self,
        request: Request<TerminatePodRequest>,
    ) -> Result<Response<TerminatePodResponse>, Status> {
        let request = request.into_inner();
        let grace = request
            .grace_period_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64));
        let status = self.runtime.terminate(&request.pod_uid, grace).await?;
        Ok(Response::new(TerminatePodResponse { status: Some(status) }))
    }

    type WatchPodStatusStream = ServerStream<PodStatus>;

    async fn watch_pod_status(
        &self,
        request: Request<WatchPodStatusRequest>,
    ) -> Result<Response<Self::WatchPodStatusStream>, Status> {
        let uid = request.into_inner().pod_uid;
        if !uid.is_empty() {
            self.runtime.pod(&uid)?;
        }
        let mut updates = self.runtime.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            let send_snapshot = |tx: mpsc::Sender<Result<PodStatus, Status>>| {
                let snapshot = runtime.snapshot(&uid);
                async move {
                    for status in snapshot {
                        if tx.send(Ok(status)).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            };
            if !send_snapshot(tx.clone()).await {
                return;
            }
            loop {
                tokio::select! {
                    update = updates.recv() => match update {
                        Ok(status) if uid.is_empty() || status.pod_uid == uid => {
                            if tx.send(Ok(status)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if !send_snapshot(tx.clone()).await {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetLogsStream = ServerStream<LogChunk>;

    async fn get_logs(
        &self,
        request: Request<GetLogsRequest>,
    ) -> Result<Response<Self::GetLogsStream>, Status> {
        let request = request.into_inner();
        let pod = self.runtime.pod(&request.pod_uid)?;
        if !pod.spec.containers.iter().any(|c| c.name == request.container) {
            return Err(Error::ContainerNotFound {
                pod: request.pod_uid.clone(),
                container: request.container.clone(),
            }
            .into());
        }
        let latest = pod.dir.latest_run(&request.container);
        let run = match (latest, request.previous) {
            (Some(n), false) => n,
            (Some(n), true) if n > 0 => n - 1,
            (_, true) => {
                return Err(Status::invalid_argument(format!(
                    "previous terminated container {:?} in pod {} not found",
                    request.container, request.pod_uid
                )));
            }
            (None, false) => {
                return Err(Status::failed_precondition(format!(
                    "container {:?} in pod {} is waiting to start",
                    request.container, request.pod_uid
                )));
            }
        };
        let since = match (request.since_unix_ms, request.since_seconds) {
            (Some(ms), _) => jiff::Timestamp::from_millisecond(ms).ok(),
            (None, Some(seconds)) => jiff::Timestamp::from_millisecond(now_ms() - seconds.max(0) * 1000).ok(),
            (None, None) => None,
        };
        let filter = LogFilter {
            tail_lines: request.tail_lines.map(|n| n.max(0) as usize),
            since,
            timestamps: request.timestamps,
            limit_bytes: request.limit_bytes.map(|n| n.max(0) as usize),
        };
        let run_dir = pod.dir.run(&request.container, run);
        let (initial, mut follower) = read_and_follow(&run_dir.log, &filter).map_err(Error::from)?;
        let follow = request.follow && !request.previous;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut budget = filter.limit_bytes.unwrap_or(usize::MAX);
            let send = |mut data: Vec<u8>, budget: &mut usize| {
                data.truncate(*budget);
                *budget -= data.len();
                let tx = tx.clone();
                async move {
                    for chunk in data.chunks(LOG_CHUNK_BYTES) {
                        if tx.send(Ok(LogChunk { data: chunk.to_vec() })).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            };
            if !send(initial, &mut budget).await || !follow {
                return;
            }
            let stream_filter = LogFilter {
                tail_lines: None,
                ..filter
            };
            loop {
                // Read the exit marker first: lines written before it are all in the file.
                let ended = run_dir.exit().is_some();
                match follower.poll(&stream_filter) {
                    Ok(data) if !data.is_empty() => {
                        if !send(data, &mut budget).await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
                if ended || budget == 0 {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = ServerStream<ExecOutput>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut inputs = request.into_inner();
        let start = match inputs.message().await? {
            Some(ExecInput {
                input: Some(exec_input::Input::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "exec: the first message must be `start`",
                ));
            }
        };
        self.runtime.pod(&start.pod_uid)?;
        let (tx, rx) = mpsc::channel(64);
        let runtime = self.runtime.clone();
        tokio::spawn(async move { exec::run(&runtime, start, inputs, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachStream = ServerStream<AttachOutput>;

    /// Connects to the shim of the container's current run, which holds its streams.
    async fn attach(
        &self,
        request: Request<Streaming<AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inputs = request.into_inner();
        let start = match inputs.message().await? {
            Some(AttachInput {
                input: Some(attach_input::Input::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "attach: the first message must be `start`",
                ));
            }
        };
        let pod = self.runtime.pod(&start.pod_uid)?;
        if !pod.spec.containers.iter().any(|c| c.name == start.container) {
            return Err(Error::ContainerNotFound {
                pod: start.pod_uid,
                container: start.container,
            }
            .into());
        }
        let not_running =
            || Status::failed_precondition(format!("container {} is not running", start.container));
        let run = pod
            .dir
            .latest_run(&start.container)
            .map(|n| pod.dir.run(&start.container, n))
            .filter(|run| run.exit().is_none())
            .ok_or_else(not_running)?;
        let socket = tokio::net::UnixStream::connect(pod.attach_socket(&run))
            .await
            .map_err(|_| not_running())?;
        let (mut from_shim, mut to_shim) = socket.into_split();
        let (tx, rx) = mpsc::channel(64);
        let upstream = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(input)) = inputs.message().await {
                let frame = match input.input {
                    Some(attach_input::Input::Stdin(data)) => attach::frame(attach::STDIN, &data),
                    Some(attach_input::Input::Resize(size)) => attach::frame(
                        attach::RESIZE,
                        &attach::resize_payload(size.width as u16, size.height as u16),
                    ),
                    Some(attach_input::Input::CloseStdin(true)) => attach::frame(attach::CLOSE_STDIN, &[]),
                    _ => continue,
                };
                if to_shim.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok(Some((kind, data))) = attach::read_frame_async(&mut from_shim).await {
                let output = match kind {
                    attach::STDOUT => attach_output::Output::Stdout(data),
                    attach::STDERR => attach_output::Output::Stderr(data),
                    _ => continue,
                };
                if tx.send(Ok(AttachOutput { output: Some(output) })).await.is_err() {
                    break;
                }
            }
            // The run ended (or the client left): the client's input goes nowhere now.
            upstream.abort();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type PortForwardStream = ServerStream<PortForwardOutput>;

    /// Dials before answering, so a closed port is the call's error status.
    async fn port_forward(
        &self,
        request: Request<Streaming<PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let mut inputs = request.into_inner();
        let start = portforward::start(&mut inputs).await?;
        self.runtime.pod(&start.pod_uid)?;
        let connection = portforward::dial(start.port as u16).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(portforward::run(connection, inputs, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_stats(&self, request: Request<GetStatsRequest>) -> Result<Response<PodStats>, Status> {
        let uid = request.into_inner().pod_uid;
        let pod = self.runtime.pod(&uid)?;
        let now = now_ms();
        let mut containers = Vec::new();
        let mut samples = pod.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        for container in &pod.spec.containers {
            let usage = pod
                .dir
                .latest_run(&container.name)
                .map(|n| pod.dir.run(&container.name, n))
                .filter(|run| run.exit().is_none())
                .and_then(|run| run.container_pid())
                .map(stats::group_usage)
                .unwrap_or_default();
            let nanocores = match samples.get(&container.name) {
                Some((at, cpu)) if now > *at && usage.cpu_nanoseconds >= *cpu => {
                    ((usage.cpu_nanoseconds - cpu) as u128 * 1000 / (now - at) as u128) as u64
                }
                _ => 0,
            };
            samples.insert(container.name.clone(), (now, usage.cpu_nanoseconds));
            containers.push(ContainerStats {
                name: container.name.clone(),
                cpu_usage_core_nanoseconds: usage.cpu_nanoseconds,
                cpu_usage_nanocores: nanocores,
                memory_working_set_bytes: usage.memory_bytes,
                processes: usage.processes,
            });
        }
        Ok(Response::new(PodStats {
            pod_uid: uid,
            timestamp_unix_ms: now,
            containers,
        }))
    }
}

/// Binds `listen` (port 0 picks a free port) and returns the listener and its address.
pub async fn bind(listen: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    Ok((listener, address))
}

/// Serves the agent API on `listener` until `shutdown` completes: over TLS with `tls` (which
/// decides whom to accept), else in plain text.
pub async fn serve(
    runtime: Arc<Runtime>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let router =
        tonic::transport::Server::builder().add_service(AgentServer::new(AgentService::new(runtime)));
    let served = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
        Some(config) => {
            router
                .serve_with_incoming_shutdown(
                    ec2_kubelet_protocol::pki::tls_incoming(listener, config),
                    shutdown,
                )
                .await
        }
    };
    served.map_err(|e| Error::Transport(e.to_string()))
}
