//! The shim: one small process per container run (the agent binary in `shim` mode), like
//! conmon. It starts the container process, owns its stdout/stderr and writes them as CRI log
//! lines (`<RFC 3339 time> <stream> F <line>`) with size rotation, then records how the
//! container ended. Because the shim, not the agent, holds the pipes, containers keep running
//! and logging while the agent restarts.
//!
//! The container runs in its own process group (the agent signals the whole group) and dies
//! with its shim (`PR_SET_PDEATHSIG` on Linux), so killing an instance leaves nothing behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::state::{ExitRecord, RunDir, exit_code_and_signal, now_ms};

/// What the shim needs to run one container run.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub run_dir: PathBuf,
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    pub working_dir: Option<PathBuf>,
    pub command: Vec<String>,
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

fn pump(reader: impl Read, stream: &'static str, log: Arc<Mutex<LogWriter>>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if let Ok(mut log) = log.lock() {
                    let _ = log.write_line(stream, &line);
                }
            }
        }
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
    command
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(dir) = &args.working_dir {
        command.current_dir(dir);
    }
    // SAFETY: the closure only calls async-signal-safe functions (prctl, signal).
    unsafe {
        command.pre_exec(|| {
            #[cfg(target_os = "linux")]
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
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
    let mut pumps = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let log = log.clone();
        pumps.push(std::thread::spawn(move || pump(stdout, "stdout", log)));
    }
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        pumps.push(std::thread::spawn(move || pump(stderr, "stderr", log)));
    }
    let status = child.wait();
    for pump in pumps {
        let _ = pump.join();
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
