//! The agent's state directory: everything it started, so that a restarted agent re-adopts
//! running containers instead of starting them again.
//!
//! ```text
//! <state>/pods/<uid>/pod.pb                          the LaunchPod spec (protobuf)
//! <state>/pods/<uid>/accepted_at                     when the pod was accepted (Unix ms)
//! <state>/pods/<uid>/terminated                      TerminatePod finished: nothing restarts
//! <state>/pods/<uid>/volumes/<volume>/...            volume contents
//! <state>/pods/<uid>/containers/<name>/<run>/        one run of a container (run = restart count)
//!        shim.pid  container.pid  started_at  exit.json
//! <state>/pods/<uid>/logs/<name>/<run>.log[.1]       CRI-format log of that run (+ one rotation)
//! ```

use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};

use super::Error;
use super::proto::PodSpec;
pub use ec2_kubelet_protocol::util::{now_ms, write_atomic, write_private};

/// How a container run ended, written by its shim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    /// Exit code; 128 + signal when killed by a signal (as shells report it).
    pub exit_code: i32,
    /// The signal that ended the process, 0 if it exited.
    pub signal: i32,
    /// `Completed`, `Error`, `ContainerCannotRun`.
    pub reason: String,
    pub message: String,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
}

/// Exit code and signal of a finished process: the code, or 128 + the signal that killed it
/// (as shells report it) with that signal.
pub fn exit_code_and_signal(status: std::process::ExitStatus) -> (i32, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, 0),
        (None, Some(signal)) => (128 + signal, signal),
        (None, None) => (255, 0),
    }
}

fn read_i64(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The root of the agent's state.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("pods"))?;
        Ok(StateDir { root })
    }

    pub fn pod(&self, uid: &str) -> Result<PodDir, Error> {
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::InvalidSpec(format!(
                "pod uid {uid:?} must be alphanumeric with '-'"
            )));
        }
        Ok(PodDir {
            root: self.root.join("pods").join(uid),
        })
    }

    /// UIDs of every pod with a saved spec.
    pub fn pod_uids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("pods")) else {
            return Vec::new();
        };
        let mut uids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("pod.pb").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        uids.sort();
        uids
    }
}

impl StateDir {
    /// Process groups of container runs that have not recorded an exit: what must be killed,
    /// besides the agent and its shims, for an instance to leave no process behind.
    pub fn live_container_groups(&self) -> Vec<i32> {
        let mut groups = Vec::new();
        for uid in self.pod_uids() {
            let Ok(pod) = self.pod(&uid) else { continue };
            let Ok(containers) = std::fs::read_dir(pod.root.join("containers")) else {
                continue;
            };
            for container in containers.flatten() {
                let Ok(runs) = std::fs::read_dir(container.path()) else {
                    continue;
                };
                for run in runs.flatten() {
                    let dir = RunDir {
                        root: run.path(),
                        log: PathBuf::new(),
                        run: 0,
                    };
                    if dir.exit().is_none()
                        && let Some(pid) = dir.container_pid()
                    {
                        groups.push(pid);
                    }
                }
            }
        }
        groups
    }

    /// SIGKILLs every live container process group (the processes a killed shim orphaned).
    pub fn kill_container_groups(&self) {
        for group in self.live_container_groups() {
            // SAFETY: signalling a process group the agent created for a container.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
    }
}

/// One pod's directory.
#[derive(Clone, Debug)]
pub struct PodDir {
    pub root: PathBuf,
}

impl PodDir {
    /// Saves the spec (it holds the resolved values of Secrets and ConfigMaps): the pod's
    /// directory is owner-only (0700) and `pod.pb` is 0600, whatever the umask.
    pub fn save_spec(&self, spec: &PodSpec) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        write_atomic(&self.root.join("accepted_at"), now_ms().to_string().as_bytes())?;
        write_private(&self.root.join("pod.pb"), &spec.encode_to_vec())
    }

    pub fn load_spec(&self) -> Result<PodSpec, Error> {
        let bytes = std::fs::read(self.root.join("pod.pb"))?;
        PodSpec::decode(bytes.as_slice()).map_err(|e| Error::State(format!("{}: {e}", self.root.display())))
    }

    pub fn accepted_at(&self) -> i64 {
        read_i64(&self.root.join("accepted_at")).unwrap_or(0)
    }

    pub fn mark_terminated(&self) -> std::io::Result<()> {
        write_atomic(&self.root.join("terminated"), now_ms().to_string().as_bytes())
    }

    pub fn is_terminated(&self) -> bool {
        self.root.join("terminated").exists()
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(name)
    }

    pub fn run(&self, container: &str, run: u32) -> RunDir {
        RunDir {
            root: self.root.join("containers").join(container).join(run.to_string()),
            log: self.log_file(container, run),
            run,
        }
    }

    pub fn log_file(&self, container: &str, run: u32) -> PathBuf {
        self.root.join("logs").join(container).join(format!("{run}.log"))
    }

    /// The highest run number of a container, if it ever ran.
    pub fn latest_run(&self, container: &str) -> Option<u32> {
        std::fs::read_dir(self.root.join("containers").join(container))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse::<u32>().ok())
            .max()
    }
}

/// One run of a container.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
    pub log: PathBuf,
    pub run: u32,
}

impl RunDir {
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        if let Some(parent) = self.log.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(())
    }

    pub fn shim_pid(&self) -> Option<i32> {
        read_i64(&self.root.join("shim.pid")).map(|p| p as i32)
    }

    pub fn set_shim_pid(&self, pid: u32) -> std::io::Result<()> {
        write_atomic(&self.root.join("shim.pid"), pid.to_string().as_bytes())
    }

    pub fn container_pid(&self) -> Option<i32> {
        read_i64(&self.root.join("container.pid")).map(|p| p as i32)
    }

    pub fn set_container_pid(&self, pid: u32) -> std::io::Result<()> {
        write_atomic(&self.root.join("container.pid"), pid.to_string().as_bytes())
    }

    pub fn started_at(&self) -> i64 {
        read_i64(&self.root.join("started_at")).unwrap_or(0)
    }

    pub fn set_started_at(&self, ms: i64) -> std::io::Result<()> {
        write_atomic(&self.root.join("started_at"), ms.to_string().as_bytes())
    }

    pub fn exit(&self) -> Option<ExitRecord> {
        let text = std::fs::read(self.root.join("exit.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn set_exit(&self, record: &ExitRecord) -> std::io::Result<()> {
        let text = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        write_atomic(&self.root.join("exit.json"), &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_write_over_a_stale_temp_file_is_still_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.pb");
        // A crash left a world-readable temp file behind.
        std::fs::write(path.with_extension("tmp"), b"old").unwrap();
        std::fs::set_permissions(path.with_extension("tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!path.with_extension("tmp").exists());
        // A write that cannot land says so, and leaves the old content.
        std::fs::create_dir(dir.path().join("exit.tmp")).unwrap();
        std::fs::write(dir.path().join("exit.json"), b"{}").unwrap();
        assert!(write_atomic(&dir.path().join("exit.json"), b"new").is_err());
        assert_eq!(std::fs::read(dir.path().join("exit.json")).unwrap(), b"{}");
    }

    #[test]
    fn spec_and_runs_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        let pod = state.pod("uid-1").unwrap();
        let spec = PodSpec {
            uid: "uid-1".into(),
            name: "web".into(),
            ..Default::default()
        };
        pod.save_spec(&spec).unwrap();
        let run = pod.run("main", 2);
        run.create().unwrap();
        run.set_exit(&ExitRecord {
            exit_code: 3,
            signal: 0,
            reason: "Error".into(),
            message: String::new(),
            started_at_unix_ms: 1,
            finished_at_unix_ms: 2,
        })
        .unwrap();
        pod.run("main", 0).create().unwrap();

        let again = StateDir::new(dir.path()).unwrap();
        assert_eq!(again.pod_uids(), ["uid-1"]);
        let pod = again.pod("uid-1").unwrap();
        assert_eq!(pod.load_spec().unwrap(), spec);
        assert_eq!(pod.latest_run("main"), Some(2));
        assert_eq!(pod.run("main", 2).exit().unwrap().exit_code, 3);
        pod.run("main", 0).set_container_pid(4242).unwrap();
        pod.run("main", 2).set_container_pid(4343).unwrap();
        assert_eq!(
            again.live_container_groups(),
            [4242],
            "runs with an exit record are not live"
        );
        assert!(pod.latest_run("other").is_none());
    }

    #[test]
    fn the_saved_spec_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        let pod = state.pod("uid-2").unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        // A spec saved twice (the agent re-accepting a pod) keeps the modes.
        for _ in 0..2 {
            pod.save_spec(&PodSpec {
                uid: "uid-2".into(),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(
                mode(&pod.root.join("pod.pb")),
                0o600,
                "pod.pb holds resolved secrets"
            );
            assert_eq!(mode(&pod.root), 0o700, "the pod's directory holds its volumes");
        }
    }

    #[test]
    fn path_traversal_in_uid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path()).unwrap();
        assert!(state.pod("../etc").is_err());
        assert!(state.pod("").is_err());
    }
}
