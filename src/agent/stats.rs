//! CPU and memory of a container: the sum over the processes of its process group, from /proc.

use std::sync::OnceLock;

/// CPU time (nanoseconds), resident memory (bytes) and process count of process group `pgid`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupUsage {
    pub cpu_nanoseconds: u64,
    pub memory_bytes: u64,
    pub processes: u32,
}

fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *TICKS.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    })
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// Fields after the command name of /proc/<pid>/stat (the name may contain spaces).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().collect())
}

/// Whether `pid` exists and is not a zombie (an exited process nobody has reaped yet).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_fields(&stat).is_none_or(|fields| fields.first() != Some(&"Z"))
}

/// Usage of every process whose process group is `pgid`, with its reaped children's CPU time.
pub fn group_usage(pgid: i32) -> GroupUsage {
    let mut usage = GroupUsage::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = stat_fields(&stat) else {
            continue;
        };
        // After the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13)
        // cstime(14) ... rss(21). The children's times are those of reaped children: a shell
        // loop's short-lived commands count, as a cgroup counts them.
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) != Some(pgid) || fields.first() == Some(&"Z") {
            continue;
        }
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let ticks = number(11) + number(12) + number(13) + number(14);
        usage.cpu_nanoseconds += ticks * 1_000_000_000 / clock_ticks_per_second();
        usage.memory_bytes += number(21) * page_size();
        usage.processes += 1;
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_group_is_measured() {
        // SAFETY: getpgrp has no preconditions.
        let pgid = unsafe { libc::getpgrp() };
        let usage = group_usage(pgid);
        assert!(usage.processes >= 1);
        assert!(usage.memory_bytes > 0);
    }

    #[test]
    fn reaped_childrens_cpu_time_counts() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        // A subshell that burns CPU and is reaped; then only `sh` and `sleep` are left, idle.
        let script = format!(
            "(i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done); touch {}; sleep 30",
            done.display()
        );
        let mut group = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .process_group(0)
            .spawn()
            .unwrap();
        while !done.exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let usage = group_usage(group.id() as i32);
        let _ = group.kill();
        let _ = group.wait();
        assert!(
            usage.cpu_nanoseconds >= 20_000_000,
            "the reaped subshell's CPU time: {usage:?}"
        );
    }

    #[test]
    fn liveness_tells_running_from_reaped_processes() {
        assert!(process_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn command_names_with_spaces_parse() {
        let fields = stat_fields("42 (my prog) S 1 42 42 0").unwrap();
        assert_eq!(fields[2], "42");
    }
}
