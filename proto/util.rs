//! Small utilities the operator and the agent share: the clock, durable files, DNS names.

use std::path::Path;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes a file atomically and durably: a temp file, synced, renamed over `path`, and the
/// directory synced. Readers never see half of it, and after a crash or a power loss the file
/// has its old content or its new one: the agent re-adopts its containers from these files.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    write_durable(path, content, 0o644)
}

/// [`write_atomic`] for a file only its owner can read (mode 0600).
pub fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    write_durable(path, content, 0o600)
}

fn write_durable(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A temp file left by a crash keeps its old mode: start from a new one.
    match std::fs::remove_file(&tmp) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// A DNS-1123 label: lowercase alphanumerics and '-', at most 63, starting and ending
/// alphanumeric (namespace names, container names, instance ids in certificates; also a safe
/// EC2 tag value).
pub fn is_dns_label(name: &str) -> bool {
    is_dns_name(name, 63, false)
}

/// A DNS-1123 subdomain as object names use it: lowercase alphanumerics, '-' and '.', at most
/// 253, starting and ending alphanumeric.
pub fn is_dns_subdomain(name: &str) -> bool {
    is_dns_name(name, 253, true)
}

fn is_dns_name(name: &str, max: usize, dots: bool) -> bool {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= max
                && bytes.iter().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || (dots && *b == b'.')
                })
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
        }
        _ => false,
    }
}
