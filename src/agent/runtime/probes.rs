//! Container probes, as the kubelet runs them: a startup probe gates the others; readiness
//! sets `ready`; a failing liveness (or startup) probe kills the container, which then restarts
//! under the pod's restart policy.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::PodRuntime;
use crate::proto::{Probe, probe::Handler};

/// Probe defaults of the Kubernetes API.
fn period(probe: &Probe) -> Duration {
    Duration::from_secs(if probe.period_seconds > 0 {
        probe.period_seconds as u64
    } else {
        10
    })
}

fn timeout(probe: &Probe) -> Duration {
    Duration::from_secs(if probe.timeout_seconds > 0 {
        probe.timeout_seconds as u64
    } else {
        1
    })
}

fn success_threshold(probe: &Probe) -> u32 {
    probe.success_threshold.max(1) as u32
}

fn failure_threshold(probe: &Probe) -> u32 {
    if probe.failure_threshold > 0 {
        probe.failure_threshold as u32
    } else {
        3
    }
}

/// Runs one check of a probe; `Err` says why it failed.
pub async fn check(pod: &PodRuntime, container_index: usize, probe: &Probe) -> Result<(), String> {
    let limit = timeout(probe);
    let attempt = async {
        match &probe.handler {
            Some(Handler::Exec(exec)) => {
                let container = &pod.spec.containers[container_index];
                let (program, args) = exec.command.split_first().ok_or("exec probe without a command")?;
                let status = tokio::process::Command::new(program)
                    .args(args)
                    .env_clear()
                    .envs(pod.environment(container))
                    .current_dir(pod.working_dir(container))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| format!("exec {program:?}: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("command exited with {status}"))
                }
            }
            Some(Handler::HttpGet(http)) => {
                let host = probe_host(&http.host);
                let path = if http.path.is_empty() {
                    "/"
                } else {
                    http.path.as_str()
                };
                if !http.scheme.is_empty() && !http.scheme.eq_ignore_ascii_case("http") {
                    return Err(format!("scheme {} is not supported", http.scheme));
                }
                let stream = tokio::net::TcpStream::connect((host, http.port as u16))
                    .await
                    .map_err(|e| format!("connect {host}:{}: {e}", http.port))?;
                let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                let mut request = hyper::Request::get(path)
                    .header("host", format!("{host}:{}", http.port))
                    .header("user-agent", "ec2-kubelet-agent-probe");
                for header in &http.headers {
                    request = request.header(header.name.as_str(), header.value.as_str());
                }
                let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
                let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                let code = response.status().as_u16();
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
            Some(Handler::TcpSocket(tcp)) => {
                let host = probe_host(&tcp.host);
                tokio::net::TcpStream::connect((host, tcp.port as u16))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("dial tcp {host}:{}: {e}", tcp.port))
            }
            None => Err("probe has no handler".into()),
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {}s", limit.as_secs())),
    }
}

/// The host a probe dials: the one it names, else the instance itself (the pod is the
/// instance, as a kubelet's default is the pod's IP).
fn probe_host(host: &str) -> &str {
    if host.is_empty() { "127.0.0.1" } else { host }
}

/// Probes one container run until it is aborted (when the run ends).
pub async fn run_probes(pod: Arc<PodRuntime>, index: usize, kill: mpsc::Sender<String>) {
    let container = pod.spec.containers[index].clone();
    if let Some(startup) = &container.startup_probe {
        tokio::time::sleep(Duration::from_secs(startup.initial_delay_seconds.max(0) as u64)).await;
        let mut failures = 0;
        loop {
            match check(&pod, index, startup).await {
                Ok(()) => break,
                Err(reason) => {
                    failures += 1;
                    if failures >= failure_threshold(startup) {
                        let _ = kill.send(format!("Startup probe failed: {reason}")).await;
                        return;
                    }
                }
            }
            tokio::time::sleep(period(startup)).await;
        }
        pod.set_started(index);
    }
    let readiness = container.readiness_probe.clone().map(|probe| {
        let pod = pod.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(probe.initial_delay_seconds.max(0) as u64)).await;
            let (mut successes, mut failures) = (0, 0);
            loop {
                match check(&pod, index, &probe).await {
                    Ok(()) => {
                        successes += 1;
                        failures = 0;
                        if successes >= success_threshold(&probe) {
                            pod.set_ready(index, true);
                        }
                    }
                    Err(_) => {
                        failures += 1;
                        successes = 0;
                        if failures >= failure_threshold(&probe) {
                            pod.set_ready(index, false);
                        }
                    }
                }
                tokio::time::sleep(period(&probe)).await;
            }
        }
    });
    if container.readiness_probe.is_none() {
        pod.set_ready(index, true);
    }
    let liveness = container.liveness_probe.clone().map(|probe| {
        let pod = pod.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(probe.initial_delay_seconds.max(0) as u64)).await;
            let mut failures = 0;
            loop {
                match check(&pod, index, &probe).await {
                    Ok(()) => failures = 0,
                    Err(reason) => {
                        failures += 1;
                        if failures >= failure_threshold(&probe) {
                            let _ = kill.send(format!("Liveness probe failed: {reason}")).await;
                            return;
                        }
                    }
                }
                tokio::time::sleep(period(&probe)).await;
            }
        }
    });
    match (readiness, liveness) {
        (Some(r), Some(l)) => {
            tokio::join!(r, l);
        }
        (Some(r), None) => r.await,
        (None, Some(l)) => l.await,
        (None, None) => {}
    }
}
