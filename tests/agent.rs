//! The agent as the operator uses it: the real `ec2-kubelet-agent` binary on loopback, driven
//! through the generated gRPC client.

mod common;

use std::time::Duration;

use ec2_kubelet_protocol::v1::agent_client::AgentClient;
use ec2_kubelet_protocol::v1::{
    AttachInput, AttachStart, ContainerSpec, ContainerStatus, EnvVar, ExecAction, ExecInput, ExecStart, File,
    FilesVolume, GetLogsRequest, GetStatsRequest, HttpGetAction, LaunchPodRequest, PingRequest, PodPhase,
    PodSpec, PodStatus, PortForwardInput, PortForwardStart, Probe, RestartPolicy, TerminalSize,
    TerminatePodRequest, Volume, VolumeMount, WatchPodStatusRequest, attach_input, attach_output,
    container_state, exec_input, exec_output, port_forward_input, probe, volume,
};
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(30);

struct Fixture {
    agent: common::AgentProcess,
    client: AgentClient<Channel>,
    _dirs: tempfile::TempDir,
}

async fn connect(agent: &common::AgentProcess) -> AgentClient<Channel> {
    AgentClient::connect(agent.endpoint())
        .await
        .expect("connect to agent")
}

async fn start_agent() -> Fixture {
    let dirs = tempfile::tempdir().unwrap();
    let agent = common::AgentProcess::start(&dirs.path().join("state"), &dirs.path().join("root"));
    let client = connect(&agent).await;
    Fixture {
        agent,
        client,
        _dirs: dirs,
    }
}

fn shell(name: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn pod(uid: &str, policy: RestartPolicy, containers: Vec<ContainerSpec>) -> PodSpec {
    PodSpec {
        uid: uid.into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        containers,
        restart_policy: policy as i32,
        termination_grace_period_seconds: 30,
        ..Default::default()
    }
}

async fn launch(client: &mut AgentClient<Channel>, spec: PodSpec) -> bool {
    client
        .launch_pod(LaunchPodRequest { pod: Some(spec) })
        .await
        .expect("LaunchPod")
        .into_inner()
        .already_known
}

/// Watches one pod until `done` accepts a status; returns every status seen.
async fn watch_until(
    client: &mut AgentClient<Channel>,
    uid: &str,
    done: impl Fn(&PodStatus) -> bool,
) -> Vec<PodStatus> {
    let mut stream = client
        .watch_pod_status(WatchPodStatusRequest { pod_uid: uid.into() })
        .await
        .expect("WatchPodStatus")
        .into_inner();
    let mut seen = Vec::new();
    let result = tokio::time::timeout(DEADLINE, async {
        while let Some(status) = stream.message().await.expect("status stream") {
            let finished = done(&status);
            seen.push(status);
            if finished {
                return;
            }
        }
        panic!("status stream ended");
    })
    .await;
    assert!(
        result.is_ok(),
        "condition not reached; last status: {:#?}",
        seen.last()
    );
    seen
}

fn container<'a>(status: &'a PodStatus, name: &str) -> &'a ContainerStatus {
    status
        .containers
        .iter()
        .find(|c| c.name == name)
        .expect("container status")
}

fn state(status: &ContainerStatus) -> Option<&container_state::State> {
    status.state.as_ref().and_then(|s| s.state.as_ref())
}

fn terminated(status: &ContainerStatus) -> Option<&ec2_kubelet_protocol::v1::Terminated> {
    match state(status) {
        Some(container_state::State::Terminated(t)) => Some(t),
        _ => None,
    }
}

fn is_running(status: &ContainerStatus) -> bool {
    matches!(state(status), Some(container_state::State::Running(_)))
}

async fn read_logs(client: &mut AgentClient<Channel>, request: GetLogsRequest) -> String {
    let mut stream = client.get_logs(request).await.expect("GetLogs").into_inner();
    let mut text = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = stream.message().await.expect("log stream") {
            text.extend_from_slice(&chunk.data);
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "log stream did not end; got {:?}",
        String::from_utf8_lossy(&text)
    );
    String::from_utf8(text).expect("utf-8 logs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_stream_shows_running_then_terminated_with_the_exit_code() {
    let mut f = start_agent().await;
    let ping = f.client.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(ping.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(
        !launch(
            &mut f.client,
            pod(
                "p1",
                RestartPolicy::Never,
                vec![shell("main", "sleep 0.5; exit 3")]
            )
        )
        .await
    );
    let seen = watch_until(&mut f.client, "p1", |s| s.phase == PodPhase::Failed as i32).await;
    assert!(
        seen.iter().any(|s| is_running(container(s, "main"))),
        "never seen Running: {seen:#?}"
    );
    let last = seen.last().unwrap();
    let exit = terminated(container(last, "main")).expect("terminated");
    assert_eq!(exit.exit_code, 3);
    assert_eq!(exit.reason, "Error");
    assert!(exit.finished_at_unix_ms >= exit.started_at_unix_ms);
    assert_eq!(container(last, "main").restart_count, 0, "Never does not restart");

    // A pod whose containers exit 0 under Never ends Succeeded.
    launch(
        &mut f.client,
        pod(
            "p2",
            RestartPolicy::Never,
            vec![shell("a", "exit 0"), shell("b", "sleep 0.2")],
        ),
    )
    .await;
    let seen = watch_until(&mut f.client, "p2", |s| s.phase >= PodPhase::Succeeded as i32).await;
    assert_eq!(seen.last().unwrap().phase, PodPhase::Succeeded as i32);

    // LaunchPod is idempotent per UID.
    assert!(
        launch(
            &mut f.client,
            pod("p2", RestartPolicy::Never, vec![shell("a", "exit 9")])
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_with_follow_tail_timestamps_and_previous() {
    let mut f = start_agent().await;
    let script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.3; done; echo oops >&2; exit 1";
    launch(
        &mut f.client,
        pod("logs", RestartPolicy::OnFailure, vec![shell("main", script)]),
    )
    .await;
    watch_until(&mut f.client, "logs", |s| is_running(container(s, "main"))).await;

    // Follow from the start of a live run: every line arrives, then the stream ends with the run.
    let followed = read_logs(
        &mut f.client,
        GetLogsRequest {
            pod_uid: "logs".into(),
            container: "main".into(),
            follow: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(followed, "line 1\nline 2\nline 3\nline 4\nline 5\nline 6\noops\n");

    // The container restarted (OnFailure); `previous` reads the finished run.
    watch_until(&mut f.client, "logs", |s| container(s, "main").restart_count >= 1).await;
    let previous = read_logs(
        &mut f.client,
        GetLogsRequest {
            pod_uid: "logs".into(),
            container: "main".into(),
            previous: true,
            tail_lines: Some(2),
            timestamps: true,
            ..Default::default()
        },
    )
    .await;
    let lines: Vec<&str> = previous.lines().collect();
    assert_eq!(lines.len(), 2, "{previous}");
    let (time, text) = lines[1].split_once(' ').unwrap();
    assert!(time.parse::<jiff::Timestamp>().is_ok(), "{time}");
    assert_eq!(text, "oops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_stdin_stdout_stderr_and_the_exit_code() {
    let mut f = start_agent().await;
    let mut main = shell("main", "sleep 60");
    main.env.push(EnvVar {
        name: "GREETING".into(),
        value: "from-env".into(),
    });
    launch(&mut f.client, pod("exec", RestartPolicy::Always, vec![main])).await;
    watch_until(&mut f.client, "exec", |s| is_running(container(s, "main"))).await;

    let start = ExecStart {
        pod_uid: "exec".into(),
        container: "main".into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat; echo $GREETING; echo bad >&2; exit 7".into(),
        ],
        stdin: true,
        tty: false,
    };
    let inputs = vec![
        exec_input::Input::Stdin(b"hello stdin\n".to_vec()),
        exec_input::Input::CloseStdin(true),
    ];
    let (stdout, stderr, code) = exec_session(&mut f.client, start, inputs).await;
    assert_eq!(stdout, "hello stdin\nfrom-env\n");
    assert_eq!(stderr, "bad\n");
    assert_eq!(code, 7);
}

/// An attach call to `container` of `pod_uid`: a sender for its input, and its output.
async fn attach(
    client: &mut AgentClient<Channel>,
    pod_uid: &str,
    container: &str,
) -> (
    tokio::sync::mpsc::Sender<AttachInput>,
    tonic::Streaming<ec2_kubelet_protocol::v1::AttachOutput>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let start = attach_input::Input::Start(AttachStart {
        pod_uid: pod_uid.into(),
        container: container.into(),
    });
    tx.send(AttachInput { input: Some(start) }).await.unwrap();
    let outputs = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Attach")
        .into_inner();
    (tx, outputs)
}

/// Reads attach output until it contains every one of `wanted` (or the stream ends); returns it.
async fn read_until(
    outputs: &mut tonic::Streaming<ec2_kubelet_protocol::v1::AttachOutput>,
    wanted: &[&str],
) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while !wanted.iter().all(|w| String::from_utf8_lossy(&seen).contains(w)) {
            match outputs.message().await.expect("attach stream") {
                Some(output) => match output.output {
                    Some(attach_output::Output::Stdout(data) | attach_output::Output::Stderr(data)) => {
                        seen.extend(data)
                    }
                    None => {}
                },
                None => break,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {wanted:?} in: {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_reaches_a_terminal_container_and_a_stdin_container() {
    let mut f = start_agent().await;
    // `tty: true`: the container runs on a terminal; attach types into it and resizes it.
    let mut interactive = shell("main", "exec sh -i");
    (interactive.tty, interactive.stdin) = (true, true);
    launch(&mut f.client, pod("tty", RestartPolicy::Never, vec![interactive])).await;
    watch_until(&mut f.client, "tty", |s| is_running(container(s, "main"))).await;
    let (input, mut outputs) = attach(&mut f.client, "tty", "main").await;
    let send = |i| AttachInput { input: Some(i) };
    input
        .send(send(attach_input::Input::Resize(TerminalSize {
            width: 120,
            height: 40,
        })))
        .await
        .unwrap();
    input
        .send(send(attach_input::Input::Stdin(b"stty size; tty\n".to_vec())))
        .await
        .unwrap();
    let seen = read_until(&mut outputs, &["40 120", "/dev/pts/"]).await;
    assert!(seen.contains("\r\n"), "a terminal's output: {seen:?}");
    input
        .send(send(attach_input::Input::Stdin(b"exit 3\n".to_vec())))
        .await
        .unwrap();
    // The shell's end ends the attach stream.
    let ended = tokio::time::timeout(DEADLINE, async {
        while outputs.message().await.expect("attach stream").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the attach stream ends with the container");
    let statuses = watch_until(&mut f.client, "tty", |s| {
        terminated(container(s, "main")).is_some()
    })
    .await;
    let status = statuses.last().unwrap();
    assert_eq!(terminated(container(status, "main")).unwrap().exit_code, 3);
    // The terminal's output is the container's log (stdout), lines without their \r.
    let logs = read_logs(
        &mut f.client,
        GetLogsRequest {
            pod_uid: "tty".into(),
            container: "main".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(logs.lines().any(|l| l.ends_with("40 120")), "{logs:?}");

    // `stdin: true, stdinOnce: true` (no terminal): attach feeds the container's standard
    // input, and its end closes it.
    let mut cat = shell("main", "cat; echo cat-done");
    (cat.stdin, cat.stdin_once) = (true, true);
    launch(&mut f.client, pod("stdin", RestartPolicy::Never, vec![cat])).await;
    watch_until(&mut f.client, "stdin", |s| is_running(container(s, "main"))).await;
    let (input, mut outputs) = attach(&mut f.client, "stdin", "main").await;
    input
        .send(send(attach_input::Input::Stdin(
            b"hello through attach\n".to_vec(),
        )))
        .await
        .unwrap();
    read_until(&mut outputs, &["hello through attach\n"]).await;
    drop(input);
    read_until(&mut outputs, &["cat-done"]).await;
    let statuses = watch_until(&mut f.client, "stdin", |s| {
        terminated(container(s, "main")).is_some()
    })
    .await;
    let status = statuses.last().unwrap();
    assert_eq!(terminated(container(status, "main")).unwrap().exit_code, 0);
    // A container that is not running has nothing to attach to.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let start = attach_input::Input::Start(AttachStart {
        pod_uid: "stdin".into(),
        container: "main".into(),
    });
    tx.send(AttachInput { input: Some(start) }).await.unwrap();
    let refused = f
        .client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
}

/// One port-forward call of `inputs` (after its start): the bytes the port sent, until the
/// stream ended, or the call's error status.
async fn port_forward_session(
    client: &mut AgentClient<Channel>,
    pod_uid: &str,
    port: u32,
    inputs: Vec<port_forward_input::Input>,
) -> Result<Vec<u8>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let start = PortForwardStart {
        pod_uid: pod_uid.into(),
        port,
    };
    let input = |i| PortForwardInput { input: Some(i) };
    tx.send(input(port_forward_input::Input::Start(start)))
        .await
        .unwrap();
    for i in inputs {
        tx.send(input(i)).await.unwrap();
    }
    let mut outputs = client
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(output) = outputs.message().await? {
            received.extend(output.data);
        }
        Ok::<_, tonic::Status>(())
    })
    .await
    .expect("the port-forward stream ends")?;
    Ok(received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_carries_bytes_both_ways_and_half_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut f = start_agent().await;
    launch(
        &mut f.client,
        pod("pf", RestartPolicy::Always, vec![shell("main", "sleep 60")]),
    )
    .await;
    watch_until(&mut f.client, "pf", |s| is_running(container(s, "main"))).await;
    // A server that answers once its client has sent everything (it reads to EOF): only a
    // half-close (the client's `close_write`) gets the answer back on the same connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        for _ in 0..3 {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            socket.read_to_end(&mut request).await.unwrap();
            let answer = [b"got ".as_slice(), &request].concat();
            socket.write_all(&answer).await.unwrap();
        }
    });
    let sent = vec![
        port_forward_input::Input::Data(b"hello ".to_vec()),
        port_forward_input::Input::Data(vec![b'x'; 100_000]),
        port_forward_input::Input::CloseWrite(true),
    ];
    let received = port_forward_session(&mut f.client, "pf", port.into(), sent)
        .await
        .expect("PortForward");
    assert_eq!(received.len(), 4 + 6 + 100_000);
    assert!(received.starts_with(b"got hello xxx"));
    // Two calls at once are two connections.
    let mut other = f.client.clone();
    let (a, b) = tokio::join!(
        port_forward_session(
            &mut f.client,
            "pf",
            port.into(),
            vec![
                port_forward_input::Input::Data(b"a".to_vec()),
                port_forward_input::Input::CloseWrite(true),
            ]
        ),
        port_forward_session(
            &mut other,
            "pf",
            port.into(),
            vec![
                port_forward_input::Input::Data(b"b".to_vec()),
                port_forward_input::Input::CloseWrite(true),
            ]
        ),
    );
    assert_eq!((a.unwrap(), b.unwrap()), (b"got a".to_vec(), b"got b".to_vec()));
    server.await.unwrap();

    // A port nobody listens on: the call fails, saying so.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused = port_forward_session(&mut f.client, "pf", closed_port.into(), vec![])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("dial tcp localhost:{closed_port}: connect: connection refused")
    );
    // Another pod's UID, or a port that is not one: refused before any dial.
    let unknown = port_forward_session(&mut f.client, "nope", port.into(), vec![])
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let zero = port_forward_session(&mut f.client, "pf", 0, vec![])
        .await
        .unwrap_err();
    assert_eq!(zero.code(), tonic::Code::InvalidArgument, "{zero:?}");
}

/// Runs one exec session of `inputs` (after its start) and returns stdout, stderr and the exit.
async fn exec_session(
    client: &mut AgentClient<Channel>,
    start: ExecStart,
    inputs: Vec<exec_input::Input>,
) -> (String, String, i32) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let input = |i| ExecInput { input: Some(i) };
    tx.send(input(exec_input::Input::Start(start))).await.unwrap();
    for i in inputs {
        tx.send(input(i)).await.unwrap();
    }
    let mut outputs = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Exec")
        .into_inner();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    tokio::time::timeout(DEADLINE, async {
        while let Some(message) = outputs.message().await.expect("exec stream") {
            match message.output {
                Some(exec_output::Output::Stdout(data)) => stdout.extend(data),
                Some(exec_output::Output::Stderr(data)) => stderr.extend(data),
                Some(exec_output::Output::Exit(e)) => exit = Some(e),
                None => {}
            }
        }
    })
    .await
    .expect("exec finishes");
    drop(tx);
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        exit.expect("exit message").exit_code,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_terminal_gets_a_tty_its_size_and_eof_from_ctrl_d() {
    let mut f = start_agent().await;
    launch(
        &mut f.client,
        pod("tty", RestartPolicy::Always, vec![shell("main", "sleep 60")]),
    )
    .await;
    watch_until(&mut f.client, "tty", |s| is_running(container(s, "main"))).await;
    let start = |script: &str| ExecStart {
        pod_uid: "tty".into(),
        container: "main".into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        stdin: true,
        tty: true,
    };
    // The terminal names a device, takes the size of a resize sent before the line that
    // lets the script go on, and echoes what is typed; stderr goes to the terminal too.
    let (out, err, code) = exec_session(
        &mut f.client,
        start("tty; read x; stty size; echo got-$x; echo to-stderr >&2; exit 5"),
        vec![
            exec_input::Input::Resize(TerminalSize {
                width: 100,
                height: 30,
            }),
            exec_input::Input::Stdin(b"go\n".to_vec()),
        ],
    )
    .await;
    // The echo of the line typed ahead and the `tty` line come in either order.
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert!(lines.iter().any(|l| l.starts_with("/dev/pts/")), "{out:?}");
    assert!(lines.contains(&"go"), "the terminal echoes input: {out:?}");
    assert!(out.ends_with("30 100\r\ngot-go\r\nto-stderr\r\n"), "{out:?}");
    assert_eq!(err, "", "a terminal has one output");
    assert_eq!(code, 5);
    // Ctrl-D on an empty line is the end of input: cat ends, and the session with its code.
    let (out, _, code) = exec_session(
        &mut f.client,
        start("cat; echo cat-done; exit 4"),
        vec![exec_input::Input::Stdin(b"abc\n\x04".to_vec())],
    )
    .await;
    assert!(out.ends_with("cat-done\r\n"), "{out:?}");
    assert_eq!(code, 4);
    // Without a terminal, stdin is not one.
    let mut plain = start("tty");
    plain.tty = false;
    let (out, _, code) = exec_session(&mut f.client, plain, vec![]).await;
    assert_eq!((out.as_str(), code), ("not a tty\n", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_sends_sigterm_then_sigkill_after_the_grace_period() {
    let mut f = start_agent().await;
    // One container exits cleanly on SIGTERM; the other ignores it and must be killed.
    let polite = shell(
        "polite",
        "trap 'echo got TERM; exit 0' TERM; while true; do sleep 0.1; done",
    );
    let stubborn = shell("stubborn", "trap '' TERM; while true; do sleep 0.1; done");
    launch(
        &mut f.client,
        pod("term", RestartPolicy::Always, vec![polite, stubborn]),
    )
    .await;
    watch_until(&mut f.client, "term", |s| s.containers.iter().all(is_running)).await;

    let status = f
        .client
        .terminate_pod(TerminatePodRequest {
            pod_uid: "term".into(),
            grace_period_seconds: Some(1),
        })
        .await
        .expect("TerminatePod")
        .into_inner()
        .status
        .unwrap();
    let polite = terminated(container(&status, "polite")).expect("polite terminated");
    assert_eq!(
        (polite.exit_code, polite.signal),
        (0, 0),
        "handled SIGTERM itself"
    );
    let stubborn = terminated(container(&status, "stubborn")).expect("stubborn terminated");
    assert_eq!(
        stubborn.signal,
        libc::SIGKILL,
        "killed after the grace period: {stubborn:?}"
    );
    assert_eq!(status.reason, "Terminated");
    let logs = read_logs(
        &mut f.client,
        GetLogsRequest {
            pod_uid: "term".into(),
            container: "polite".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(logs.contains("got TERM"), "{logs}");
    // Nothing restarts after termination.
    let again = watch_until(&mut f.client, "term", |_| true).await;
    assert!(again[0].containers.iter().all(|c| terminated(c).is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_container_restarts_under_always_with_backoff() {
    let mut f = start_agent().await;
    launch(
        &mut f.client,
        pod(
            "crash",
            RestartPolicy::Always,
            vec![shell("main", "echo start; exit 1")],
        ),
    )
    .await;
    let seen = watch_until(&mut f.client, "crash", |s| {
        container(s, "main").restart_count >= 3
    })
    .await;
    let backoffs: Vec<String> = seen
        .iter()
        .filter_map(|s| match state(container(s, "main")) {
            Some(container_state::State::Waiting(w)) if w.reason == "CrashLoopBackOff" => {
                Some(w.message.clone())
            }
            _ => None,
        })
        .collect();
    assert!(
        backoffs.len() >= 2,
        "CrashLoopBackOff seen between restarts: {seen:#?}"
    );
    assert!(backoffs[0].contains("back-off 200ms"), "{backoffs:?}");
    assert!(
        backoffs[1].contains("back-off 400ms"),
        "backoff doubles: {backoffs:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(
        last.phase,
        PodPhase::Running as i32,
        "a crash-looping pod stays Running"
    );
    let previous = container(last, "main")
        .last_state
        .as_ref()
        .and_then(|s| s.state.as_ref());
    assert!(
        matches!(previous, Some(container_state::State::Terminated(t)) if t.exit_code == 1),
        "{previous:?}"
    );
}

/// A test HTTP server answering 200 while `healthy` holds, else 500.
async fn health_server(healthy: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let healthy = healthy.load(std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                let status = if healthy {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = socket
                    .write_all(
                        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_flip_readiness_and_liveness_restarts() {
    let mut f = start_agent().await;
    let flags = tempfile::tempdir().unwrap();
    let ready_flag = flags.path().join("ready");
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let port = health_server(healthy.clone()).await;

    let mut main = shell("main", "sleep 600");
    main.readiness_probe = Some(Probe {
        handler: Some(probe::Handler::Exec(ExecAction {
            command: vec!["test".into(), "-f".into(), ready_flag.display().to_string()],
        })),
        period_seconds: 1,
        failure_threshold: 1,
        ..Default::default()
    });
    main.liveness_probe = Some(Probe {
        handler: Some(probe::Handler::HttpGet(HttpGetAction {
            port: port.into(),
            path: "/healthz".into(),
            ..Default::default()
        })),
        period_seconds: 1,
        failure_threshold: 2,
        ..Default::default()
    });
    let mut spec = pod("probes", RestartPolicy::Always, vec![main]);
    spec.termination_grace_period_seconds = 1;
    launch(&mut f.client, spec).await;

    let seen = watch_until(&mut f.client, "probes", |s| is_running(container(s, "main"))).await;
    assert!(
        !container(seen.last().unwrap(), "main").ready,
        "not ready before the probe passes"
    );
    std::fs::write(&ready_flag, b"").unwrap();
    watch_until(&mut f.client, "probes", |s| container(s, "main").ready).await;
    std::fs::remove_file(&ready_flag).unwrap();
    watch_until(&mut f.client, "probes", |s| !container(s, "main").ready).await;

    // Liveness: the HTTP endpoint fails -> the container is killed and restarted.
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let seen = watch_until(&mut f.client, "probes", |s| {
        container(s, "main").restart_count >= 1
    })
    .await;
    let last = container(seen.last().unwrap(), "main");
    let killed = last
        .last_state
        .as_ref()
        .and_then(|s| s.state.as_ref())
        .or(state(last));
    match killed {
        Some(container_state::State::Terminated(t)) => {
            assert!(t.message.contains("Liveness probe failed"), "{t:?}")
        }
        other => panic!("expected the killed run's termination, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_env_and_stats() {
    let mut f = start_agent().await;
    let mut main = shell(
        "main",
        "cat /etc/app/config.txt; cat /etc/app/nested/x; echo $MODE; sleep 600",
    );
    main.env.push(EnvVar {
        name: "MODE".into(),
        value: "production".into(),
    });
    main.volume_mounts.push(VolumeMount {
        name: "config".into(),
        mount_path: "/etc/app".into(),
        ..Default::default()
    });
    let mut spec = pod("vol", RestartPolicy::Always, vec![main]);
    spec.volumes.push(Volume {
        name: "config".into(),
        source: Some(volume::Source::Files(FilesVolume {
            files: vec![
                File {
                    path: "config.txt".into(),
                    content: b"key=value\n".to_vec(),
                    mode: 0,
                },
                File {
                    path: "nested/x".into(),
                    content: b"deep\n".to_vec(),
                    mode: 0o600,
                },
            ],
            default_mode: 0o644,
        })),
    });
    // Mount paths are under the agent's --root-dir, so the container reads them there.
    let root = f.agent.root_dir.display().to_string();
    spec.containers[0].command[2] =
        spec.containers[0].command[2].replace("/etc/app", &format!("{root}/etc/app"));
    launch(&mut f.client, spec).await;
    watch_until(&mut f.client, "vol", |s| is_running(container(s, "main"))).await;

    let request = GetLogsRequest {
        pod_uid: "vol".into(),
        container: "main".into(),
        ..Default::default()
    };
    let mut logs = String::new();
    for _ in 0..100 {
        logs = read_logs(&mut f.client, request.clone()).await;
        if logs.lines().count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(logs, "key=value\ndeep\nproduction\n");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(f.agent.root_dir.join("etc/app/nested/x"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let stats = f
        .client
        .get_stats(GetStatsRequest {
            pod_uid: "vol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let main_stats = &stats.containers[0];
    assert_eq!(main_stats.name, "main");
    assert!(main_stats.processes >= 1, "{main_stats:?}");
    assert!(main_stats.memory_working_set_bytes > 0, "{main_stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_readopts_running_containers_without_relaunching() {
    let mut f = start_agent().await;
    let script = "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done";
    launch(
        &mut f.client,
        pod("keep", RestartPolicy::Always, vec![shell("main", script)]),
    )
    .await;
    let before = watch_until(&mut f.client, "keep", |s| is_running(container(s, "main"))).await;
    let started_before = match state(container(before.last().unwrap(), "main")) {
        Some(container_state::State::Running(r)) => r.started_at_unix_ms,
        other => panic!("{other:?}"),
    };
    let container_pid = std::fs::read_to_string(
        f.agent
            .state_dir
            .join("pods/keep/containers/main/0/container.pid"),
    )
    .unwrap();

    f.agent.kill_agent_only();
    let second = common::AgentProcess::start(&f.agent.state_dir, &f.agent.root_dir);
    let mut client = connect(&second).await;
    let ping = client.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(ping.pod_uids, ["keep"]);

    let after = watch_until(&mut client, "keep", |s| is_running(container(s, "main"))).await;
    let main = container(after.last().unwrap(), "main");
    assert_eq!(main.restart_count, 0, "re-adopted, not relaunched");
    assert!(
        matches!(state(main), Some(container_state::State::Running(r)) if r.started_at_unix_ms == started_before)
    );
    let pid_after =
        std::fs::read_to_string(second.state_dir.join("pods/keep/containers/main/0/container.pid")).unwrap();
    assert_eq!(pid_after, container_pid, "the same process keeps running");
    assert!(
        !second.state_dir.join("pods/keep/containers/main/1").exists(),
        "no second run was started"
    );

    // Logs kept flowing while the agent was away, and still flow.
    let request = GetLogsRequest {
        pod_uid: "keep".into(),
        container: "main".into(),
        ..Default::default()
    };
    let first = read_logs(&mut client, request.clone()).await.lines().count();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = read_logs(&mut client, request).await.lines().count();
    assert!(later > first, "log grew from {first} to {later} lines");

    // Terminate through the new agent stops the adopted container.
    let status = client
        .terminate_pod(TerminatePodRequest {
            pod_uid: "keep".into(),
            grace_period_seconds: Some(2),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(terminated(container(&status, "main")).is_some());
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pod_is_refused_with_the_field() {
    let mut f = start_agent().await;
    let error = f
        .client
        .launch_pod(LaunchPodRequest {
            pod: Some(pod(
                "bad",
                RestartPolicy::Always,
                vec![ContainerSpec {
                    name: "Main".into(),
                    command: vec!["true".into()],
                    ..Default::default()
                }],
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("containers[0].name"),
        "{}",
        error.message()
    );
    let missing = f
        .client
        .get_stats(GetStatsRequest {
            pod_uid: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_that_cannot_be_persisted_still_reaches_the_pod_status_with_its_code() {
    let mut f = start_agent().await;
    let go = f._dirs.path().join("go");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done; exit 3", go.display());
    launch(
        &mut f.client,
        pod("unrecorded", RestartPolicy::Never, vec![shell("main", &script)]),
    )
    .await;
    watch_until(&mut f.client, "unrecorded", |s| is_running(container(s, "main"))).await;
    // Now the run's exit record cannot be written: its temp file's place is taken by a
    // directory (as root, permissions would not stop the write; a full disk fails the same way).
    let run_dir = f._dirs.path().join("state/pods/unrecorded/containers/main/0");
    assert!(run_dir.join("container.pid").exists(), "the run's directory");
    std::fs::create_dir_all(run_dir.join("exit.tmp")).unwrap();
    std::fs::write(&go, "").unwrap();
    let seen = watch_until(&mut f.client, "unrecorded", |s| {
        s.phase == PodPhase::Failed as i32
    })
    .await;
    let exit = terminated(container(seen.last().unwrap(), "main")).expect("terminated");
    assert_eq!(
        exit.exit_code, 3,
        "the container's own code, not a guess: {exit:?}"
    );
    assert_eq!(exit.reason, "Error");
    assert!(
        exit.message.contains("not persisted") && exit.message.contains("exit.json: Is a directory"),
        "the status says the record is missing and why: {exit:?}"
    );
    assert!(!run_dir.join("exit.json").exists());
}
