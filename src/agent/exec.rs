//! Exec sessions: a command run beside a container (its environment and working directory),
//! with stdin, stdout and stderr streamed, ending with the exit code. With `tty`, the command
//! runs on a pseudo-terminal of its own (its controlling terminal, sized by the client's resize
//! messages), and its output is the terminal's, on stdout.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    let environment = pod.environment(&container);
    let term_set = environment.iter().any(|(k, _)| k == "TERM");
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(environment)
        .current_dir(pod.working_dir(&container))
        .kill_on_drop(true);
    // With a terminal: its master side for us, the slave as the command's stdio.
    let terminal = if start.tty {
        match Terminal::open() {
            Ok(terminal) => Some(terminal),
            Err(e) => {
                let _ = tx
                    .send(exit(126, format!("exec: allocating a terminal: {e}")))
                    .await;
                return;
            }
        }
    } else {
        None
    };
    match &terminal {
        Some(terminal) => {
            if !term_set {
                command.env("TERM", "xterm");
            }
            let stdio = || terminal.slave.try_clone().map(Stdio::from);
            match (stdio(), stdio(), stdio()) {
                (Ok(stdin), Ok(stdout), Ok(stderr)) => {
                    command.stdin(stdin).stdout(stdout).stderr(stderr);
                }
                _ => {
                    let _ = tx.send(exit(126, "exec: sharing the terminal".into())).await;
                    return;
                }
            }
            // SAFETY: setsid and ioctl are async-signal-safe; the child gets a session of its
            // own whose controlling terminal is its stdin, the slave side.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            command
                .stdin(if start.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let spawned = command.spawn();
    drop(command);
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
    let (mut stdin, pumps, resizer): (Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>, Vec<_>, _) =
        match terminal {
            Some(terminal) => {
                // Only the child holds the slave now: its exit ends the master's reads (EIO).
                drop(terminal.slave);
                let reader = terminal.master.try_clone().map(tokio::fs::File::from_std);
                let writer = terminal.master.try_clone().map(tokio::fs::File::from_std);
                let (Ok(reader), Ok(writer)) = (reader, writer) else {
                    let _ = tx.send(exit(126, "exec: sharing the terminal".into())).await;
                    return;
                };
                let writer: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>> =
                    if start.stdin { Some(Box::new(writer)) } else { None };
                (
                    writer,
                    vec![tokio::spawn(pump(reader, tx.clone(), false))],
                    Some(terminal.master),
                )
            }
            None => {
                let stdin = child
                    .stdin
                    .take()
                    .map(|pipe| Box::new(pipe) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
                let mut pumps = Vec::new();
                if let Some(out) = child.stdout.take() {
                    pumps.push(tokio::spawn(pump(out, tx.clone(), false)));
                }
                if let Some(err) = child.stderr.take() {
                    pumps.push(tokio::spawn(pump(err, tx.clone(), true)));
                }
                (stdin, pumps, None)
            }
        };
    let feed = tokio::spawn(async move {
        while let Ok(Some(message)) = inputs.message().await {
            match message.input {
                Some(exec_input::Input::Stdin(data)) => {
                    if let Some(pipe) = stdin.as_mut()
                        && (pipe.write_all(&data).await.is_err() || pipe.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                // A terminal's end of input is its EOF character (Ctrl-D), typed by the user.
                Some(exec_input::Input::CloseStdin(true)) if resizer.is_none() => stdin = None,
                Some(exec_input::Input::Resize(size)) => {
                    if let Some(master) = &resizer {
                        set_window_size(master, size.width, size.height);
                    }
                }
                _ => {}
            }
        }
    });
    let status = child.wait().await;
    feed.abort();
    for pump in pumps {
        let _ = pump.await;
    }
    let code = status.map(|s| exit_code_and_signal(s).0).unwrap_or(255);
    let _ = tx.send(exit(code, String::new())).await;
}

/// A pseudo-terminal pair.
/// A pseudo-terminal: the master side for the agent (or shim), the slave side for the command.
pub(crate) struct Terminal {
    pub(crate) master: std::fs::File,
    pub(crate) slave: OwnedFd,
}

impl Terminal {
    pub(crate) fn open() -> std::io::Result<Terminal> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two new descriptors, which we own from here on.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if opened != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
            // SAFETY: setting close-on-exec on descriptors we own: the command gets the slave
            // only as its stdio.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        Ok(Terminal { master, slave })
    }
}

/// Sets the terminal's size (the command gets SIGWINCH), as a resize message asks.
fn set_window_size(master: &std::fs::File, width: u32, height: u32) {
    let size = libc::winsize {
        ws_row: height.min(u32::from(u16::MAX)) as u16,
        ws_col: width.min(u32::from(u16::MAX)) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, on a descriptor we own.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &size) };
}
