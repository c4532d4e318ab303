//! Attach: a running container's standard streams, reached through its shim. The shim (which
//! holds the container's stdio) listens on `attach.sock` in the run's directory; the agent's
//! `Attach` call connects there. Both directions carry frames: a kind byte, a big-endian `u32`
//! length, the payload.
//!
//! * agent -> shim: [`STDIN`] bytes, [`RESIZE`] (width and height, `u16` each), [`CLOSE_STDIN`].
//! * shim -> agent: [`STDOUT`] and [`STDERR`] bytes, raw, as the container writes them.
//!
//! With `tty`, the container runs on a pseudo-terminal the shim opened: input goes to the
//! terminal, resizes set its size, and its output is stdout. With `stdin` (no `tty`), input goes
//! to the container's standard input, a pipe the shim keeps open (closed after the first attach
//! with `stdin_once`). The socket closes when the container's run ends.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const STDIN: u8 = 0;
pub const RESIZE: u8 = 1;
pub const CLOSE_STDIN: u8 = 2;
pub const STDOUT: u8 = 3;
pub const STDERR: u8 = 4;
/// Larger frames are refused.
const MAX_FRAME: usize = 1 << 20;
/// A client that does not take the container's output within this time is dropped: the
/// container never waits on an attached client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The socket of the run in `run_dir`: under `<state-dir>/attach/`, named by a hash of the
/// run's directory (Unix socket paths are limited to about 100 bytes, which a run's directory
/// can exceed). FNV-1a: stable across builds, so an upgraded agent finds its shims' sockets.
pub fn socket_path(state_dir: &Path, run_dir: &Path) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in run_dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state_dir.join("attach").join(format!("{hash:016x}.sock"))
}

/// A frame on the wire.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The payload length a frame's head announces (refused past [`MAX_FRAME`]).
fn payload_length(head: &[u8; 5]) -> std::io::Result<usize> {
    let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if length > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {length} bytes")));
    }
    Ok(length)
}

/// Reads one frame; `None` at the end of the stream.
pub fn read_frame(reader: &mut impl Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match reader.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut payload = vec![0u8; payload_length(&head)?];
    reader.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// A resize payload.
pub fn resize_payload(width: u16, height: u16) -> Vec<u8> {
    let mut payload = width.to_be_bytes().to_vec();
    payload.extend_from_slice(&height.to_be_bytes());
    payload
}

/// Where attached input goes, in the shim.
pub enum Input {
    /// The terminal's master side (input, and resizes).
    Terminal(std::fs::File),
    /// The container's standard input pipe; `None` once closed.
    Pipe(Option<std::process::ChildStdin>),
}

/// The shim's side: the attached clients and the container's input.
pub struct Streams {
    clients: Mutex<Vec<UnixStream>>,
    input: Mutex<Input>,
    stdin_once: bool,
}

impl Streams {
    pub fn new(input: Input, stdin_once: bool) -> Arc<Streams> {
        Arc::new(Streams {
            clients: Mutex::new(Vec::new()),
            input: Mutex::new(input),
            stdin_once,
        })
    }

    /// Sends the container's output (`STDOUT` or `STDERR`) to every client; a client that
    /// fails or lags is dropped.
    pub fn broadcast(&self, kind: u8, data: &[u8]) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients.is_empty() {
            return;
        }
        let bytes = frame(kind, data);
        clients.retain_mut(|client| client.write_all(&bytes).is_ok());
    }

    /// Closes every client (the run ended).
    pub fn close(&self) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for client in clients.drain(..) {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }

    fn input(&self, kind: u8, payload: &[u8]) {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        match (&mut *input, kind) {
            (Input::Terminal(master), STDIN) => {
                let _ = master.write_all(payload);
            }
            (Input::Terminal(master), RESIZE) if payload.len() == 4 => {
                let size = libc::winsize {
                    ws_col: u16::from_be_bytes([payload[0], payload[1]]),
                    ws_row: u16::from_be_bytes([payload[2], payload[3]]),
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the descriptor is
                // the terminal's master side, open while `input` is held. The foreground
                // process group gets SIGWINCH from the kernel.
                unsafe {
                    libc::ioctl(
                        std::os::fd::AsRawFd::as_raw_fd(master),
                        libc::TIOCSWINSZ as _,
                        &size,
                    )
                };
            }
            (Input::Pipe(pipe), STDIN) => {
                if let Some(writer) = pipe.as_mut()
                    && writer.write_all(payload).is_err()
                {
                    *pipe = None;
                }
            }
            (Input::Pipe(pipe), CLOSE_STDIN) => *pipe = None,
            _ => {}
        }
    }

    /// A client left: with `stdin_once`, the container's input ends with it.
    fn detached(&self) {
        if self.stdin_once
            && let Input::Pipe(pipe) = &mut *self.input.lock().unwrap_or_else(|p| p.into_inner())
        {
            *pipe = None;
        }
    }

    /// Serves the socket at `path` on threads of its own; the listener lives as long as the
    /// process.
    pub fn serve(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let streams = self.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(writer) = client.try_clone() else { continue };
                let _ = writer.set_write_timeout(Some(WRITE_TIMEOUT));
                streams
                    .clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(writer);
                let streams = streams.clone();
                std::thread::spawn(move || {
                    let mut client = client;
                    while let Ok(Some((kind, payload))) = read_frame(&mut client) {
                        streams.input(kind, &payload);
                    }
                    streams.detached();
                });
            }
        });
        Ok(())
    }
}

/// Reads one frame from an async stream; `None` at its end.
pub async fn read_frame_async(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    match reader.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut payload = vec![0u8; payload_length(&head)?];
    reader.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_have_short_stable_paths() {
        let state = Path::new("/var/lib/ec2-kubelet-agent");
        let run = state.join(format!("pods/{}/containers/{}/0", "u".repeat(36), "c".repeat(63)));
        let path = socket_path(state, &run);
        assert!(path.as_os_str().len() < 100, "{}", path.display());
        assert_eq!(path, socket_path(state, &run));
        assert_ne!(path, socket_path(state, &run.with_file_name("1")));
    }

    #[test]
    fn frames_round_trip() {
        let mut wire = frame(STDIN, b"hello");
        wire.extend(frame(RESIZE, &resize_payload(132, 44)));
        wire.extend(frame(CLOSE_STDIN, &[]));
        let mut reader = wire.as_slice();
        assert_eq!(read_frame(&mut reader).unwrap(), Some((STDIN, b"hello".to_vec())));
        assert_eq!(
            read_frame(&mut reader).unwrap(),
            Some((RESIZE, vec![0, 132, 0, 44]))
        );
        assert_eq!(read_frame(&mut reader).unwrap(), Some((CLOSE_STDIN, vec![])));
        assert_eq!(read_frame(&mut reader).unwrap(), None);
    }
}
