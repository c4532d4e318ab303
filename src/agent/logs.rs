//! Reading container logs back from the shims' CRI-format files: tail, since, timestamps,
//! byte limits, the previous run, and following a live run across rotations.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::shim::rotated_path;

/// One parsed CRI log line.
#[derive(Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub timestamp: &'a str,
    pub stream: &'a str,
    pub content: &'a [u8],
}

/// Parses `<time> <stream> <tag> <content>`; lines that are not in that format are returned
/// whole as content (a log written by something else must still be readable).
pub fn parse_line(line: &[u8]) -> LogLine<'_> {
    let mut fields = line.splitn(4, |b| *b == b' ');
    let (Some(time), Some(stream), Some(_tag)) = (fields.next(), fields.next(), fields.next()) else {
        return LogLine {
            timestamp: "",
            stream: "stdout",
            content: line,
        };
    };
    let content = fields.next().unwrap_or(b"");
    match (std::str::from_utf8(time), std::str::from_utf8(stream)) {
        (Ok(timestamp), Ok(stream)) if timestamp.parse::<jiff::Timestamp>().is_ok() => LogLine {
            timestamp,
            stream,
            content,
        },
        _ => LogLine {
            timestamp: "",
            stream: "stdout",
            content: line,
        },
    }
}

/// Which lines to return and how.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub tail_lines: Option<usize>,
    /// Only lines at or after this instant.
    pub since: Option<jiff::Timestamp>,
    pub timestamps: bool,
    pub limit_bytes: Option<usize>,
}

impl LogFilter {
    fn keep(&self, line: &LogLine<'_>) -> bool {
        match (&self.since, line.timestamp.parse::<jiff::Timestamp>()) {
            (Some(since), Ok(at)) => at >= *since,
            _ => true,
        }
    }

    /// Renders one line for the client: content, or `<time> <content>` with timestamps.
    pub fn render(&self, line: &LogLine<'_>, out: &mut Vec<u8>) {
        if self.timestamps && !line.timestamp.is_empty() {
            out.extend_from_slice(line.timestamp.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(line.content);
        out.push(b'\n');
    }
}

/// The files of one run's log, oldest first.
pub fn log_files(log: &Path) -> Vec<PathBuf> {
    [rotated_path(log), log.to_path_buf()]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
}

/// Everything currently in a run's log that passes the filter, rendered.
pub fn read_filtered(log: &Path, filter: &LogFilter) -> std::io::Result<Vec<u8>> {
    read_and_follow(log, filter).map(|(out, _)| out)
}

/// Inode plus the first bytes of a log file. Inode numbers are reused once a rotated file is
/// deleted; the first line (which starts with a nanosecond timestamp) tells files apart.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    inode: u64,
    head: Vec<u8>,
}

impl FileIdentity {
    const HEAD: usize = 64;

    fn of(file: &mut std::fs::File) -> std::io::Result<Self> {
        let inode = file.metadata()?.ino();
        let mut head = Vec::with_capacity(Self::HEAD);
        file.seek(SeekFrom::Start(0))?;
        file.by_ref().take(Self::HEAD as u64).read_to_end(&mut head)?;
        Ok(FileIdentity { inode, head })
    }

    /// The same file, possibly grown since `self` was taken.
    fn same_file(&self, now: &FileIdentity) -> bool {
        self.inode == now.inode && now.head.starts_with(&self.head)
    }
}

/// Everything in a run's log that passes the filter (up to the last complete line), and a
/// follower that continues exactly where that left off.
pub fn read_and_follow(log: &Path, filter: &LogFilter) -> std::io::Result<(Vec<u8>, Follower)> {
    let mut raw = Vec::new();
    if let Ok(mut rotated) = std::fs::File::open(rotated_path(log)) {
        rotated.read_to_end(&mut raw)?;
    }
    let (offset, identity) = match std::fs::File::open(log) {
        Ok(mut current) => {
            let identity = FileIdentity::of(&mut current)?;
            current.seek(SeekFrom::Start(0))?;
            let start = raw.len();
            current.read_to_end(&mut raw)?;
            let whole = raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let offset = whole.saturating_sub(start) as u64;
            raw.truncate(whole.max(start));
            (offset, Some(identity))
        }
        Err(_) => (0, None),
    };
    let lines: Vec<LogLine<'_>> = raw
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(parse_line)
        .filter(|l| filter.keep(l))
        .collect();
    let skip = filter.tail_lines.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = Vec::new();
    for line in &lines[skip..] {
        filter.render(line, &mut out);
    }
    if let Some(limit) = filter.limit_bytes {
        out.truncate(limit);
    }
    let follower = Follower {
        path: log.to_path_buf(),
        offset,
        identity,
        partial: Vec::new(),
    };
    Ok((out, follower))
}

/// Follows a log file from `offset`: yields rendered new complete lines as they are written,
/// until `finished()` says the run ended and everything has been read.
pub struct Follower {
    path: PathBuf,
    offset: u64,
    /// Identity of the file `offset` points into; another identity at `path` means it was rotated.
    identity: Option<FileIdentity>,
    partial: Vec<u8>,
}

impl Follower {
    /// Starts at the current end of the log (what exists was already sent).
    pub fn at_end(path: &Path) -> Self {
        let mut file = std::fs::File::open(path).ok();
        Follower {
            path: path.to_path_buf(),
            offset: file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len()),
            identity: file.as_mut().and_then(|f| FileIdentity::of(f).ok()),
            partial: Vec::new(),
        }
    }

    /// New complete lines since the last call, rendered with `filter` (tail/limit do not apply).
    pub fn poll(&mut self, filter: &LogFilter) -> std::io::Result<Vec<u8>> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Ok(Vec::new());
        };
        let identity = FileIdentity::of(&mut file)?;
        let mut fresh = Vec::new();
        if let Some(known) = self.identity.as_ref().filter(|known| !known.same_file(&identity)) {
            // Rotated: the rest of the file we were reading is now `<log>.1` (if it was rotated
            // only once since the last poll; older lines are gone, as with kubelet rotation).
            let mut old = std::fs::File::open(rotated_path(&self.path)).ok();
            let old_identity = old.as_mut().and_then(|f| FileIdentity::of(f).ok());
            if let (Some(old), Some(old_identity)) = (old.as_mut(), old_identity)
                && known.same_file(&old_identity)
            {
                old.seek(SeekFrom::Start(self.offset))?;
                old.read_to_end(&mut fresh)?;
            } else {
                self.partial.clear();
            }
            self.offset = 0;
        }
        self.identity = Some(identity);
        file.seek(SeekFrom::Start(self.offset))?;
        let read = file.read_to_end(&mut fresh)?;
        self.offset += read as u64;
        self.partial.extend_from_slice(&fresh);
        let mut out = Vec::new();
        if let Some(last_newline) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
            for raw in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let line = parse_line(raw);
                if filter.keep(&line) {
                    filter.render(&line, &mut out);
                }
            }
        }
        Ok(out)
    }
}

/// How often a follower looks for new lines.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::LogWriter;

    fn write(path: &Path, lines: &[(&str, &str)]) {
        let mut log = LogWriter::open(path, 1 << 20).unwrap();
        for (stream, text) in lines {
            log.write_line(stream, text.as_bytes()).unwrap();
        }
    }

    #[test]
    fn tail_timestamps_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        write(
            &path,
            &[("stdout", "one"), ("stderr", "two"), ("stdout", "three")],
        );
        let all = read_filtered(&path, &LogFilter::default()).unwrap();
        assert_eq!(all, b"one\ntwo\nthree\n");
        let tail = read_filtered(
            &path,
            &LogFilter {
                tail_lines: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(tail, b"two\nthree\n");
        let stamped = read_filtered(
            &path,
            &LogFilter {
                timestamps: true,
                ..Default::default()
            },
        )
        .unwrap();
        let first = String::from_utf8(stamped).unwrap();
        let (time, text) = first.lines().next().unwrap().split_once(' ').unwrap();
        assert!(time.parse::<jiff::Timestamp>().is_ok());
        assert_eq!(text, "one");
        let limited = read_filtered(
            &path,
            &LogFilter {
                limit_bytes: Some(6),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(limited, b"one\ntw");
    }

    #[test]
    fn since_drops_older_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(
            &path,
            "2026-01-01T00:00:00.000000000Z stdout F old\n2026-01-01T00:10:00.000000000Z stdout F new\n",
        )
        .unwrap();
        let since = "2026-01-01T00:05:00Z".parse().unwrap();
        let out = read_filtered(
            &path,
            &LogFilter {
                since: Some(since),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(out, b"new\n");
    }

    #[test]
    fn follower_sees_appended_lines_and_survives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        write(&path, &[("stdout", "before")]);
        let mut follower = Follower::at_end(&path);
        assert_eq!(follower.poll(&LogFilter::default()).unwrap(), b"");
        let mut log = LogWriter::open(&path, 1024).unwrap();
        log.write_line("stdout", b"after").unwrap();
        assert_eq!(follower.poll(&LogFilter::default()).unwrap(), b"after\n");
        for i in 0..30 {
            log.write_line("stdout", format!("fill {i:02} {}", "y".repeat(30)).as_bytes())
                .unwrap();
        }
        let seen = String::from_utf8(follower.poll(&LogFilter::default()).unwrap()).unwrap();
        assert!(seen.ends_with(&format!("fill 29 {}\n", "y".repeat(30))), "{seen}");
        for line in seen.lines() {
            assert!(
                line.starts_with("fill "),
                "only whole lines are returned: {line:?}"
            );
        }
        log.write_line("stdout", b"last").unwrap();
        assert_eq!(follower.poll(&LogFilter::default()).unwrap(), b"last\n");
    }

    #[test]
    fn foreign_lines_are_kept_whole() {
        assert_eq!(parse_line(b"plain text here").content, b"plain text here");
    }
}
