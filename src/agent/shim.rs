//! The shim: one small process per container run (the agent binary in `shim` mode), like
//! conmon. It starts the container process, owns its stdout/stderr and writes them as CRI log
//! lines (`<RFC 3339 time> <stream> F <line>`) with size rotation, then records how the
//! container ended. Because the shim, not the agent, holds the pipes, containers keep running
//! and logging while the agent restarts.
//!
//! The container runs in its own process group (the agent signals the whole group) and dies
//! with its shim (`PR_SET_PDEATHSIG` on Linux), so killing an instance leaves nothing behind.
//! With `tty`, it runs on a pseudo-terminal whose master side the shim holds; with `stdin`, its
//! standard input is a pipe the shim holds. Attach reaches both through the shim ([`attach`]).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::attach;
use super::exec::Terminal;
use super::state::{ExitRecord, RunDir, exit_code_and_signal, now_ms};

/// What the shim needs to run one container run.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub run_dir: PathBuf,
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    pub working_dir: Option<PathBuf>,
    pub command: Vec<String>,
    /// Keep the container's standard input open for attach (closed after the first with
    /// `stdin_once`).
    pub stdin: bool,
    pub stdin_once: bool,
    /// Run the container on a pseudo-terminal of its own.
    pub tty: bool,
    /// Where attach reaches the container's streams (none: no attach).
    pub attach_socket: Option<PathBuf>,
}

/// Appends CRI log lines to a file, rotating it to `<file>.1` when it grows past the limit.
pub struct LogWriter {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    max_bytes: u64,
}

impl LogWriter {
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            written,
            max_bytes: max_bytes.max(1024),
        })
    }

    /// Writes one line (without its newline) from `stream` (`stdout` or `stderr`).
    pub fn write_line(&mut self, stream: &str, line: &[u8]) -> std::io::Result<()> {
        let timestamp = jiff::Timestamp::now();
        let mut record = Vec::with_capacity(line.len() + 48);
        write!(record, "{timestamp:.9} {stream} F ")?;
        record.extend_from_slice(line);
        record.push(b'\n');
        if self.written > 0 && self.written + record.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&record)?;
        self.written += record.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let rotated = rotated_path(&self.path);
        std::fs::rename(&self.path, rotated)?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

/// Where the older half of a rotated log lives.
pub fn rotated_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// A line longer than this without a newline is logged in pieces.
const MAX_LINE: usize = 16 * 1024;

/// Copies one output stream of the container to the log, line by line, and raw to the attached
/// clients. On a terminal, lines end with `\r\n`: the log keeps the line without either.
fn pump(
    mut reader: impl Read,
    stream: &'static str,
    kind: u8,
    terminal: bool,
    log: Arc<Mutex<LogWriter>>,
    streams: Arc<attach::Streams>,
) {
    let mut buffer = vec![0u8; 32 * 1024];
    let mut line = Vec::new();
    let write = |line: &mut Vec<u8>| {
        if terminal && line.last() == Some(&b'\r') {
            line.pop();
        }
        if let Ok(mut log) = log.lock() {
            let _ = log.write_line(stream, line);
        }
        line.clear();
    };
    loop {
        // A terminal's master side reads EIO once the container side is closed.
        let n = match reader.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        streams.broadcast(kind, chunk);
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&rest[..end]);
            write(&mut line);
            rest = &rest[end + 1..];
        }
        line.extend_from_slice(rest);
        if line.len() >= MAX_LINE {
            write(&mut line);
        }
    }
    if !line.is_empty() {
        write(&mut line);
    }
}

/// Records how a run ended. When the record cannot be written (a full or failing disk), the
/// shim says why on its stderr (`shim.log`) and exits with the container's exit code, so the
/// agent that started it still learns the code and reports the failure in the pod's status.
fn record_exit(run: &RunDir, record: &ExitRecord) -> i32 {
    match run.set_exit(record) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!(
                "ec2-kubelet-agent shim: cannot record the exit status ({}) in {}: {error}",
                record.exit_code,
                run.root.join("exit.json").display()
            );
            record.exit_code
        }
    }
}

/// Runs the shim to completion; returns the process exit code of the shim itself: 0 once the
/// exit record is written, else the container's exit code (see [`record_exit`]).
pub fn run(args: ShimArgs) -> i32 {
    // A terminal hang-up or Ctrl-C aimed at the agent must not take containers with it.
    // SAFETY: setting signal dispositions to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let run = RunDir {
        root: args.run_dir.clone(),
        log: args.log_file.clone(),
        run: 0,
    };
    let started_at = now_ms();
    let record_failure = |message: String| {
        let record = ExitRecord {
            exit_code: 128,
            signal: 0,
            reason: "ContainerCannotRun".into(),
            message,
            started_at_unix_ms: started_at,
            finished_at_unix_ms: now_ms(),
        };
        record_exit(&run, &record)
    };
    let log = match LogWriter::open(&args.log_file, args.log_max_bytes) {
        Ok(log) => Arc::new(Mutex::new(log)),
        Err(e) => return record_failure(format!("cannot open log {}: {e}", args.log_file.display())),
    };
    let Some((program, rest)) = args.command.split_first() else {
        return record_failure("the container has no command".into());
    };
    let mut command = Command::new(program);
    command.args(rest);
    // With a terminal: the container's stdio is its slave side, in a session of its own (and so
    // a process group of its own) whose controlling terminal it is; the master side is ours.
    let terminal = if args.tty {
        match Terminal::open() {
            Ok(terminal) => Some(terminal),
            Err(e) => return record_failure(format!("cannot allocate a terminal: {e}")),
        }
    } else {
        None
    };
    match &terminal {
        Some(terminal) => {
            let stdio = || terminal.slave.try_clone().map(Stdio::from);
            match (stdio(), stdio(), stdio()) {
                (Ok(stdin), Ok(stdout), Ok(stderr)) => {
                    command.stdin(stdin).stdout(stdout).stderr(stderr);
                }
                _ => return record_failure("cannot share the terminal".into()),
            }
            if std::env::var_os("TERM").is_none() {
                command.env("TERM", "xterm");
            }
        }
        None => {
            command
                .stdin(if args.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
        }
    }
    if let Some(dir) = &args.working_dir {
        command.current_dir(dir);
    }
    let tty = args.tty;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, signal, setsid, ioctl).
    unsafe {
        command.pre_exec(move || {
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            if tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    // The parent keeps no copy of the terminal's slave side: the master reads EIO once the
    // container's processes have closed theirs.
    drop(command);
    let master = terminal.map(|terminal| terminal.master);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Ok(mut log) = log.lock() {
                let _ = log.write_line(
                    "stderr",
                    format!("ec2-kubelet-agent: cannot start {program:?}: {e}").as_bytes(),
                );
            }
            return record_failure(format!("cannot start {program:?}: {e}"));
        }
    };
    if let Err(error) = run.set_container_pid(child.id()) {
        // Without its pid on disk the agent could neither stop this container nor re-adopt
        // it after a restart: it must not run.
        // SAFETY: signalling the process group this shim just created for the container.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        if let Err(wait) = child.wait() {
            eprintln!("ec2-kubelet-agent shim: reaping the container: {wait}");
        }
        return record_failure(format!("cannot record the container's pid: {error}"));
    }
    // Attach: input to the terminal or the stdin pipe, output from the pumps.
    let (input, output) = match master {
        Some(master) => match master.try_clone() {
            Ok(reader) => (attach::Input::Terminal(master), Some(reader)),
            Err(e) => {
                eprintln!("ec2-kubelet-agent shim: sharing the terminal: {e}");
                (attach::Input::Terminal(master), None)
            }
        },
        None => (attach::Input::Pipe(child.stdin.take()), None),
    };
    let streams = attach::Streams::new(input, args.stdin_once);
    if let Some(socket) = &args.attach_socket
        && let Err(error) = streams.serve(socket)
    {
        // Attach is unavailable; the container runs and logs all the same.
        eprintln!(
            "ec2-kubelet-agent shim: serving attach on {}: {error}",
            socket.display()
        );
    }
    let mut pumps = Vec::new();
    let mut start_pump = |reader: Box<dyn Read + Send>, stream: &'static str, kind: u8| {
        let (log, streams) = (log.clone(), streams.clone());
        pumps.push(std::thread::spawn(move || {
            pump(reader, stream, kind, tty, log, streams)
        }));
    };
    if let Some(terminal) = output {
        start_pump(Box::new(terminal), "stdout", attach::STDOUT);
    }
    if let Some(stdout) = child.stdout.take() {
        start_pump(Box::new(stdout), "stdout", attach::STDOUT);
    }
    if let Some(stderr) = child.stderr.take() {
        start_pump(Box::new(stderr), "stderr", attach::STDERR);
    }
    let status = child.wait();
    for pump in pumps {
        let _ = pump.join();
    }
    streams.close();
    if let Some(socket) = &args.attach_socket {
        let _ = std::fs::remove_file(socket);
    }
    let (exit_code, signal) = status.map(exit_code_and_signal).unwrap_or((255, 0));
    let reason = if exit_code == 0 { "Completed" } else { "Error" };
    let message = if signal != 0 {
        format!("killed by signal {signal}")
    } else {
        String::new()
    };
    let record = ExitRecord {
        exit_code,
        signal,
        reason: reason.into(),
        message,
        started_at_unix_ms: started_at,
        finished_at_unix_ms: now_ms(),
    };
    record_exit(&run, &record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_writer_rotates_past_the_limit_and_keeps_lines_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = LogWriter::open(&path, 1024).unwrap();
        for i in 0..40 {
            log.write_line("stdout", format!("line {i:03} {}", "x".repeat(40)).as_bytes())
                .unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let rotated = std::fs::read_to_string(rotated_path(&path)).unwrap();
        assert!(current.len() <= 1024 && rotated.len() <= 1024);
        assert!(current.ends_with(&format!("stdout F line 039 {}\n", "x".repeat(40))));
        for line in current.lines().chain(rotated.lines()) {
            let mut parts = line.splitn(4, ' ');
            let time = parts.next().unwrap();
            assert!(time.parse::<jiff::Timestamp>().is_ok(), "{line}");
            assert_eq!(parts.next(), Some("stdout"));
            assert_eq!(parts.next(), Some("F"));
        }
    }
}
