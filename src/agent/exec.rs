//! Exec sessions: a command run beside a container (its environment and working directory),
//! with stdin, stdout and stderr streamed, ending with the exit code.

use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

use super::proto::{ExecExit, ExecInput, ExecOutput, ExecStart, exec_input, exec_output};
use super::runtime::Runtime;
use super::state::exit_code_and_signal;

fn output(kind: exec_output::Output) -> Result<ExecOutput, Status> {
    Ok(ExecOutput { output: Some(kind) })
}

async fn pump(
    mut reader: impl AsyncReadExt + Unpin,
    tx: mpsc::Sender<Result<ExecOutput, Status>>,
    stderr: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = buffer[..n].to_vec();
                let message = if stderr {
                    exec_output::Output::Stderr(data)
                } else {
                    exec_output::Output::Stdout(data)
                };
                if tx.send(output(message)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs an exec session: `start` says what, `inputs` brings stdin; output goes to `tx`.
pub async fn run(
    runtime: &Runtime,
    start: ExecStart,
    mut inputs: tonic::Streaming<ExecInput>,
    tx: mpsc::Sender<Result<ExecOutput, Status>>,
) {
    let exit = |code: i32, error: String| {
        output(exec_output::Output::Exit(ExecExit {
            exit_code: code,
            error,
        }))
    };
    let pod = match runtime.pod(&start.pod_uid) {
        Ok(pod) => pod,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let Some(container) = pod
        .spec
        .containers
        .iter()
        .find(|c| c.name == start.container)
        .cloned()
    else {
        let _ = tx
            .send(Err(Status::not_found(format!(
                "container {:?} not found in pod {}",
                start.container, start.pod_uid
            ))))
            .await;
        return;
    };
    let Some((program, args)) = start.command.split_first() else {
        let _ = tx
            .send(Err(Status::invalid_argument("exec: command is required")))
            .await;
        return;
    };
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(pod.environment(&container))
        .current_dir(pod.working_dir(&container))
        .stdin(if start.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let message = format!("exec {program:?}: {e}");
            let _ = tx
                .send(output(exec_output::Output::Stderr(
                    format!("{message}\n").into_bytes(),
                )))
                .await;
            let _ = tx.send(exit(126, message)).await;
            return;
        }
    };
    let mut stdin = child.stdin.take();
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(pump(out, tx.clone(), false)));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(pump(err, tx.clone(), true)));
    let feed = tokio::spawn(async move {
        while let Ok(Some(message)) = inputs.message().await {
            match message.input {
                Some(exec_input::Input::Stdin(data)) => {
                    if let Some(pipe) = stdin.as_mut()
                        && pipe.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(exec_input::Input::CloseStdin(true)) => stdin = None,
                _ => {}
            }
        }
    });
    let status = child.wait().await;
    feed.abort();
    for pump in [stdout, stderr].into_iter().flatten() {
        let _ = pump.await;
    }
    let code = status.map(|s| exit_code_and_signal(s).0).unwrap_or(255);
    let _ = tx.send(exit(code, String::new())).await;
}
