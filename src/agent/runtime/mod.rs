//! The agent's runtime: every pod it was given, each container supervised by its own task
//! (start through a shim, restart policy with exponential backoff, probes, SIGTERM then SIGKILL),
//! and a broadcast of every status change. Everything it starts is recorded in the state dir,
//! and `recover` re-adopts it after an agent restart.

pub mod probes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

use super::Error;
use super::proto::{
    self, ContainerSpec, ContainerState, ContainerStatus, PodPhase, PodSpec, PodStatus, RestartPolicy,
    container_state,
};
use super::state::{ExitRecord, PodDir, RunDir, StateDir, now_ms};

/// Settings of the runtime, from the agent's flags.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub state_dir: PathBuf,
    /// Absolute paths a pod names (mount paths, working dirs) are placed under this root
    /// (`/` on an instance; a directory of its own for a local instance).
    pub root_dir: PathBuf,
    /// The program run in `shim` mode for every container run (the agent binary itself).
    pub shim_program: PathBuf,
    pub log_max_bytes: u64,
    pub restart_backoff_initial: Duration,
    pub restart_backoff_max: Duration,
}

/// A container that ran this long without trouble starts its next backoff from the beginning.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// Every pod on the agent.
pub struct Runtime {
    config: Arc<RuntimeConfig>,
    state: StateDir,
    pods: Mutex<HashMap<String, Arc<PodRuntime>>>,
    hub: broadcast::Sender<PodStatus>,
    pub boot_id: String,
    pub agent_instance_id: String,
    pub started_at: i64,
    /// When the instance is reclaimed (a spot interruption notice), once one was seen.
    spot_notice: Mutex<Option<i64>>,
}

/// One pod: its spec, its live status, and the signal that stops it.
pub struct PodRuntime {
    pub spec: PodSpec,
    pub dir: PodDir,
    config: Arc<RuntimeConfig>,
    status: Mutex<PodState>,
    hub: broadcast::Sender<PodStatus>,
    /// Set to the grace period when the pod is terminated.
    stop: watch::Sender<Option<Duration>>,
    /// True once every container task has ended.
    done: watch::Sender<bool>,
    /// Previous CPU reading per container (time, CPU nanoseconds), for GetStats' nanocores.
    pub cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
}

struct PodState {
    status: PodStatus,
    /// Per container: will not run again.
    finished: Vec<bool>,
}

fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        state: Some(container_state::State::Waiting(proto::Waiting {
            reason: reason.into(),
            message: message.into(),
        })),
    }
}

fn running(started_at: i64) -> ContainerState {
    ContainerState {
        state: Some(container_state::State::Running(proto::Running {
            started_at_unix_ms: started_at,
        })),
    }
}

fn terminated(exit: &ExitRecord) -> ContainerState {
    ContainerState {
        state: Some(container_state::State::Terminated(proto::Terminated {
            exit_code: exit.exit_code,
            signal: exit.signal,
            reason: exit.reason.clone(),
            message: exit.message.clone(),
            started_at_unix_ms: exit.started_at_unix_ms,
            finished_at_unix_ms: exit.finished_at_unix_ms,
        })),
    }
}

fn exit_code_of(state: &Option<ContainerState>) -> Option<i32> {
    match state.as_ref()?.state.as_ref()? {
        container_state::State::Terminated(t) => Some(t.exit_code),
        _ => None,
    }
}

/// The pod phase from its containers, as the kubelet computes it.
fn phase_of(containers: &[ContainerStatus], finished: &[bool]) -> PodPhase {
    if !finished.is_empty() && finished.iter().all(|f| *f) {
        let all_zero = containers.iter().all(|c| exit_code_of(&c.state) == Some(0));
        return if all_zero {
            PodPhase::Succeeded
        } else {
            PodPhase::Failed
        };
    }
    let never_started = containers.iter().any(|c| {
        c.restart_count == 0
            && matches!(
                c.state.as_ref().and_then(|s| s.state.as_ref()),
                Some(container_state::State::Waiting(_)) | None
            )
    });
    if never_started {
        PodPhase::Pending
    } else {
        PodPhase::Running
    }
}

/// Whether a container that exited with `exit_code` runs again under `policy`.
pub fn should_restart(policy: RestartPolicy, exit_code: i32) -> bool {
    match policy {
        RestartPolicy::Unspecified | RestartPolicy::Always => true,
        RestartPolicy::OnFailure => exit_code != 0,
        RestartPolicy::Never => false,
    }
}

/// The delay before restart number `restarts` (1-based), doubling from `initial` up to `max`.
pub fn backoff_delay(initial: Duration, max: Duration, restarts: u32) -> Duration {
    let factor = 1u32
        .checked_shl(restarts.saturating_sub(1).min(20))
        .unwrap_or(u32::MAX);
    initial.saturating_mul(factor).min(max)
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Arc<Self>, Error> {
        let state = StateDir::new(&config.state_dir)?;
        std::fs::create_dir_all(&config.root_dir)?;
        let (hub, _) = broadcast::channel(1024);
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Arc::new(Runtime {
            config: Arc::new(config),
            state,
            pods: Mutex::new(HashMap::new()),
            hub,
            boot_id,
            agent_instance_id: format!("{:016x}", rand::random::<u64>()),
            started_at: now_ms(),
            spot_notice: Mutex::new(None),
        }))
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PodRuntime>>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-adopts every pod in the state dir: running containers are watched again, not restarted.
    pub fn recover(self: &Arc<Self>) -> usize {
        let mut recovered = 0;
        for uid in self.state.pod_uids() {
            let Ok(dir) = self.state.pod(&uid) else { continue };
            let spec = match dir.load_spec() {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::warn!(pod_uid = %uid, error = %e, "cannot read saved pod; leaving it");
                    continue;
                }
            };
            let pod = PodRuntime::new(spec, dir, self.config.clone(), self.hub.clone());
            self.pods().insert(uid.clone(), pod.clone());
            pod.start(true);
            recovered += 1;
        }
        recovered
    }

    /// Starts a pod. Idempotent: a known UID (running or finished) is left alone.
    pub fn launch(self: &Arc<Self>, spec: PodSpec) -> Result<bool, Error> {
        validate_spec(&spec)?;
        let dir = self.state.pod(&spec.uid)?;
        let pod = {
            let mut pods = self.pods();
            if pods.contains_key(&spec.uid) {
                return Ok(true);
            }
            dir.save_spec(&spec)?;
            let pod = PodRuntime::new(spec, dir, self.config.clone(), self.hub.clone());
            pods.insert(pod.spec.uid.clone(), pod.clone());
            pod
        };
        if let Err(e) = pod.prepare_volumes() {
            self.pods().remove(&pod.spec.uid);
            let _ = std::fs::remove_dir_all(&pod.dir.root);
            return Err(e);
        }
        tracing::info!(pod = %format!("{}/{}", pod.spec.namespace, pod.spec.name), pod_uid = %pod.spec.uid, "launching pod");
        if let Some(at) = self.spot_notice() {
            pod.mark_spot_interruption(at);
        }
        pod.start(false);
        Ok(false)
    }

    /// Stops a pod's containers (SIGTERM, SIGKILL after `grace`) and returns its final status.
    pub async fn terminate(&self, uid: &str, grace: Option<Duration>) -> Result<PodStatus, Error> {
        let pod = self.pod(uid)?;
        let grace = grace.unwrap_or(Duration::from_secs(
            pod.spec.termination_grace_period_seconds.max(0) as u64,
        ));
        pod.stop.send_replace(Some(grace));
        let mut done = pod.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
        pod.dir.mark_terminated()?;
        pod.set_reason("Terminated", "the pod was terminated");
        Ok(pod.status())
    }

    pub fn pod(&self, uid: &str) -> Result<Arc<PodRuntime>, Error> {
        self.pods()
            .get(uid)
            .cloned()
            .ok_or_else(|| Error::PodNotFound(uid.to_string()))
    }

    pub fn pod_uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.pods().keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Current status of one pod (`uid`) or all pods (empty `uid`).
    pub fn snapshot(&self, uid: &str) -> Vec<PodStatus> {
        let pods = self.pods();
        let mut statuses: Vec<PodStatus> = pods
            .values()
            .filter(|p| uid.is_empty() || p.spec.uid == uid)
            .map(|p| p.status())
            .collect();
        statuses.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
        statuses
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PodStatus> {
        self.hub.subscribe()
    }

    /// The instance got a spot interruption notice (reclaimed at `at_unix_ms`): every pod's
    /// status says so from now on, pods launched later included.
    pub fn spot_interruption(&self, at_unix_ms: i64) {
        *self.spot_notice.lock().unwrap_or_else(|p| p.into_inner()) = Some(at_unix_ms);
        let pods: Vec<Arc<PodRuntime>> = self.pods().values().cloned().collect();
        for pod in pods {
            pod.mark_spot_interruption(at_unix_ms);
        }
    }

    fn spot_notice(&self) -> Option<i64> {
        *self.spot_notice.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A relative path with no `..`: safe to join under a directory the agent owns.
fn is_safe_relative(path: &str) -> bool {
    let path = Path::new(path);
    !path.as_os_str().is_empty()
        && path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Refuses specs the agent cannot run, naming the field.
pub fn validate_spec(spec: &PodSpec) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::InvalidSpec(message));
    if spec.containers.is_empty() {
        return invalid("containers: at least one container is required".into());
    }
    let mut names = std::collections::HashSet::new();
    for (i, container) in spec.containers.iter().enumerate() {
        if !ec2_kubelet_protocol::util::is_dns_label(&container.name) {
            return invalid(format!(
                "containers[{i}].name: {:?} is not a DNS label",
                container.name
            ));
        }
        if !names.insert(&container.name) {
            return invalid(format!(
                "containers[{i}].name: duplicate name {:?}",
                container.name
            ));
        }
        if container.command.is_empty() && container.args.is_empty() {
            return invalid(format!(
                "containers[{i}].command: required (instances run processes, there is no image entrypoint)"
            ));
        }
        for (j, mount) in container.volume_mounts.iter().enumerate() {
            if !spec.volumes.iter().any(|v| v.name == mount.name) {
                return invalid(format!(
                    "containers[{i}].volumeMounts[{j}].name: no volume {:?}",
                    mount.name
                ));
            }
            if !mount.mount_path.starts_with('/') || mount.mount_path.split('/').any(|c| c == "..") {
                return invalid(format!(
                    "containers[{i}].volumeMounts[{j}].mountPath: {:?} must be absolute, without '..'",
                    mount.mount_path
                ));
            }
            if !mount.sub_path.is_empty() && !is_safe_relative(&mount.sub_path) {
                return invalid(format!(
                    "containers[{i}].volumeMounts[{j}].subPath: {:?}",
                    mount.sub_path
                ));
            }
        }
    }
    let mut volumes = std::collections::HashSet::new();
    for (i, volume) in spec.volumes.iter().enumerate() {
        if !ec2_kubelet_protocol::util::is_dns_label(&volume.name) || !volumes.insert(&volume.name) {
            return invalid(format!(
                "volumes[{i}].name: {:?} is not a unique DNS label",
                volume.name
            ));
        }
        if let Some(proto::volume::Source::Files(files)) = &volume.source {
            for (j, file) in files.files.iter().enumerate() {
                if !is_safe_relative(&file.path) {
                    return invalid(format!(
                        "volumes[{i}].files[{j}].path: {:?} must be relative, without '..'",
                        file.path
                    ));
                }
            }
        }
    }
    Ok(())
}

impl PodRuntime {
    fn new(
        spec: PodSpec,
        dir: PodDir,
        config: Arc<RuntimeConfig>,
        hub: broadcast::Sender<PodStatus>,
    ) -> Arc<Self> {
        let containers = spec
            .containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                state: Some(waiting("ContainerCreating", "")),
                ..Default::default()
            })
            .collect();
        let finished = vec![false; spec.containers.len()];
        let status = PodStatus {
            pod_uid: spec.uid.clone(),
            phase: PodPhase::Pending as i32,
            containers,
            started_at_unix_ms: dir.accepted_at(),
            ..Default::default()
        };
        Arc::new(PodRuntime {
            spec,
            dir,
            config,
            status: Mutex::new(PodState { status, finished }),
            hub,
            stop: watch::Sender::new(None),
            done: watch::Sender::new(false),
            cpu_samples: Mutex::new(HashMap::new()),
        })
    }

    pub fn status(&self) -> PodStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .clone()
    }

    /// Applies `change` to one container's status, recomputes the phase and publishes it.
    fn update(&self, index: usize, change: impl FnOnce(&mut ContainerStatus, &mut bool)) {
        let snapshot = {
            let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
            let PodState { status, finished } = &mut *guard;
            change(&mut status.containers[index], &mut finished[index]);
            status.phase = phase_of(&status.containers, finished) as i32;
            status.revision += 1;
            status.clone()
        };
        let _ = self.hub.send(snapshot);
    }

    fn is_running(&self, index: usize) -> bool {
        let guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        matches!(
            guard.status.containers[index]
                .state
                .as_ref()
                .and_then(|s| s.state.as_ref()),
            Some(container_state::State::Running(_))
        )
    }

    /// Readiness from probes; ignored once the run has ended.
    pub(crate) fn set_ready(&self, index: usize, ready: bool) {
        let changed = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status
            .containers[index]
            .ready
            != ready;
        if changed && self.is_running(index) {
            self.update(index, |c, _| c.ready = ready);
        }
    }

    /// The startup probe passed.
    pub(crate) fn set_started(&self, index: usize) {
        if self.is_running(index) {
            self.update(index, |c, _| c.started = true);
        }
    }

    fn mark_spot_interruption(&self, at_unix_ms: i64) {
        let snapshot = {
            let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if guard.status.spot_interruption {
                return;
            }
            guard.status.spot_interruption = true;
            guard.status.spot_interruption_at_unix_ms = at_unix_ms;
            guard.status.revision += 1;
            guard.status.clone()
        };
        let _ = self.hub.send(snapshot);
    }

    fn set_reason(&self, reason: &str, message: &str) {
        let snapshot = {
            let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
            guard.status.reason = reason.into();
            guard.status.message = message.into();
            guard.status.revision += 1;
            guard.status.clone()
        };
        let _ = self.hub.send(snapshot);
    }

    /// Where an absolute path named by the pod lives on this host.
    pub fn host_path(&self, absolute: &str) -> PathBuf {
        self.config.root_dir.join(absolute.trim_start_matches('/'))
    }

    /// The working directory of a container.
    pub fn working_dir(&self, container: &ContainerSpec) -> PathBuf {
        if container.working_dir.is_empty() {
            self.dir.root.join("workdir")
        } else {
            self.host_path(&container.working_dir)
        }
    }

    /// The environment a container's processes (and its exec sessions and probes) get.
    pub fn environment(&self, container: &ContainerSpec) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("HOSTNAME".to_string(), self.spec.name.clone()),
        ];
        if let Ok(home) = std::env::var("HOME") {
            env.push(("HOME".into(), home));
        }
        env.extend(container.env.iter().map(|e| (e.name.clone(), e.value.clone())));
        env
    }

    /// Writes volumes and links them at their mount paths.
    fn prepare_volumes(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.dir.root.join("workdir"))?;
        for volume in &self.spec.volumes {
            let root = self.dir.volume(&volume.name);
            std::fs::create_dir_all(&root)?;
            if let Some(proto::volume::Source::Files(files)) = &volume.source {
                for file in &files.files {
                    let path = root.join(&file.path);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&path, &file.content)?;
                    let mode = if file.mode != 0 {
                        file.mode
                    } else if files.default_mode != 0 {
                        files.default_mode
                    } else {
                        0o644
                    };
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
                }
            }
        }
        for container in &self.spec.containers {
            for mount in &container.volume_mounts {
                let mut source = self.dir.volume(&mount.name);
                if !mount.sub_path.is_empty() {
                    source = source.join(&mount.sub_path);
                }
                let target = self.host_path(&mount.mount_path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match std::fs::symlink_metadata(&target) {
                    Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&target)?,
                    Ok(_) => {
                        return Err(Error::InvalidSpec(format!(
                            "mountPath {}: {} exists and is not a volume link",
                            mount.mount_path,
                            target.display()
                        )));
                    }
                    Err(_) => {}
                }
                std::os::unix::fs::symlink(&source, &target)?;
            }
        }
        Ok(())
    }

    /// Spawns one supervising task per container; `recovering` re-adopts what runs already.
    fn start(self: &Arc<Self>, recovering: bool) {
        let terminated = recovering && self.dir.is_terminated();
        let mut tasks = JoinSet::new();
        for index in 0..self.spec.containers.len() {
            let pod = self.clone();
            tasks.spawn(async move { pod.supervise(index, terminated).await });
        }
        let pod = self.clone();
        tokio::spawn(async move {
            while tasks.join_next().await.is_some() {}
            if terminated {
                pod.set_reason("Terminated", "the pod was terminated");
            }
            pod.done.send_replace(true);
        });
    }

    fn stopping(&self) -> Option<Duration> {
        *self.stop.borrow()
    }

    /// Runs one container for the life of the pod.
    async fn supervise(self: Arc<Self>, index: usize, pod_terminated: bool) {
        let container = self.spec.containers[index].clone();
        let policy = RestartPolicy::try_from(self.spec.restart_policy).unwrap_or(RestartPolicy::Always);
        let mut stop = self.stop.subscribe();
        let mut next_run: u32 = 0;
        let mut adopted: Option<RunDir> = None;
        let mut pending_exit: Option<ExitRecord> = None;

        if let Some(latest) = self.dir.latest_run(&container.name) {
            let run = self.dir.run(&container.name, latest);
            next_run = latest + 1;
            self.update(index, |c, _| c.restart_count = latest as i32);
            match run.exit() {
                Some(exit) => pending_exit = Some(exit),
                None if run.shim_pid().is_some_and(shim_alive) => adopted = Some(run),
                None => pending_exit = Some(lost_exit(&run)),
            }
        }
        if pod_terminated {
            if let Some(run) = adopted.take() {
                pending_exit = Some(stop_run(&run, Duration::ZERO, None).await);
            }
            let exit = pending_exit.unwrap_or_else(|| ExitRecord {
                exit_code: 0,
                signal: 0,
                reason: "Completed".into(),
                message: "never started".into(),
                started_at_unix_ms: 0,
                finished_at_unix_ms: 0,
            });
            self.update(index, |c, finished| {
                c.state = Some(terminated(&exit));
                c.ready = false;
                *finished = true;
            });
            return;
        }

        loop {
            // Either a run to wait on (adopted or new), or the exit of a run that ended unseen.
            let exit = if let Some(exit) = pending_exit.take() {
                exit
            } else {
                if self.stopping().is_some() {
                    self.finish(index, None);
                    return;
                }
                let (run, child) = match adopted.take() {
                    Some(run) => (run, None),
                    None => {
                        let run = self.dir.run(&container.name, next_run);
                        next_run += 1;
                        match self.spawn_run(&container, &run).await {
                            Ok(child) => (run, Some(child)),
                            Err(e) => {
                                let exit = ExitRecord {
                                    exit_code: 128,
                                    signal: 0,
                                    reason: "ContainerCannotRun".into(),
                                    message: e.to_string(),
                                    started_at_unix_ms: now_ms(),
                                    finished_at_unix_ms: now_ms(),
                                };
                                let exit = match run.create().and_then(|_| run.set_exit(&exit)) {
                                    Ok(()) => exit,
                                    Err(error) => {
                                        tracing::warn!(pod_uid = %self.spec.uid, container = %container.name, %error, "recording a run that could not start");
                                        ExitRecord {
                                            message: format!(
                                                "{} (not persisted on the instance: {error})",
                                                exit.message
                                            ),
                                            ..exit
                                        }
                                    }
                                };
                                self.update(index, |c, _| c.restart_count = run.run as i32);
                                pending_exit = Some(exit);
                                continue;
                            }
                        }
                    }
                };
                let started_at = run.started_at();
                let has_startup = container.startup_probe.is_some();
                let has_readiness = container.readiness_probe.is_some();
                self.update(index, |c, _| {
                    c.state = Some(running(started_at));
                    c.started = !has_startup;
                    c.ready = !has_startup && !has_readiness;
                    c.restart_count = run.run as i32;
                });
                let (kill_tx, mut kill_rx) = mpsc::channel::<String>(1);
                let probe_task = tokio::spawn(probes::run_probes(self.clone(), index, kill_tx));
                let exit = tokio::select! {
                    exit = wait_run(&run, child) => exit,
                    _ = stop_requested(&mut stop) => {
                        let grace = self.stopping().unwrap_or_default();
                        stop_run(&run, grace, None).await
                    }
                    Some(reason) = kill_rx.recv() => {
                        let grace = Duration::from_secs(self.spec.termination_grace_period_seconds.max(0) as u64);
                        tracing::info!(pod_uid = %self.spec.uid, container = %container.name, %reason, "killing container");
                        stop_run(&run, grace, Some(reason)).await
                    }
                };
                probe_task.abort();
                exit
            };

            let ran_for =
                Duration::from_millis((exit.finished_at_unix_ms - exit.started_at_unix_ms).max(0) as u64);
            let restart = self.stopping().is_none() && should_restart(policy, exit.exit_code);
            self.update(index, |c, finished| {
                c.state = Some(terminated(&exit));
                c.ready = false;
                *finished = !restart;
            });
            if !restart {
                return;
            }
            let restarts = if ran_for >= BACKOFF_RESET_AFTER {
                1
            } else {
                next_run.max(1)
            };
            let delay = backoff_delay(
                self.config.restart_backoff_initial,
                self.config.restart_backoff_max,
                restarts,
            );
            self.update(index, |c, _| {
                c.last_state = c.state.take();
                c.state = Some(waiting(
                    "CrashLoopBackOff",
                    &format!(
                        "back-off {}ms restarting container {}",
                        delay.as_millis(),
                        container.name
                    ),
                ));
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut stop) => {
                    self.finish(index, Some(exit));
                    return;
                }
            }
        }
    }

    /// Marks a container as done for good (the pod is being terminated).
    fn finish(&self, index: usize, last: Option<ExitRecord>) {
        self.update(index, |c, finished| {
            if let Some(exit) = last {
                c.state = Some(terminated(&exit));
            } else if !matches!(
                c.state.as_ref().and_then(|s| s.state.as_ref()),
                Some(container_state::State::Terminated(_))
            ) {
                let now = now_ms();
                c.state = Some(terminated(&ExitRecord {
                    exit_code: 0,
                    signal: 0,
                    reason: "Completed".into(),
                    message: "stopped before it started".into(),
                    started_at_unix_ms: now,
                    finished_at_unix_ms: now,
                }));
            }
            c.ready = false;
            *finished = true;
        });
    }

    /// The socket on which the shim of `run` serves attach.
    pub fn attach_socket(&self, run: &RunDir) -> std::path::PathBuf {
        super::attach::socket_path(&self.config.state_dir, &run.root)
    }

    /// Starts a run of `container` under a shim.
    async fn spawn_run(
        &self,
        container: &ContainerSpec,
        run: &RunDir,
    ) -> Result<tokio::process::Child, Error> {
        run.create()?;
        let mut argv: Vec<String> = container.command.clone();
        argv.extend(container.args.iter().cloned());
        let shim_log = std::fs::File::create(run.root.join("shim.log"))?;
        let mut command = tokio::process::Command::new(&self.config.shim_program);
        command
            .arg("shim")
            .arg("--run-dir")
            .arg(&run.root)
            .arg("--log-file")
            .arg(&run.log)
            .arg("--log-max-bytes")
            .arg(self.config.log_max_bytes.to_string())
            .arg("--working-dir")
            .arg(self.working_dir(container));
        command.arg("--attach-socket").arg(self.attach_socket(run));
        for (on, flag) in [
            (container.stdin, "--stdin"),
            (container.stdin_once, "--stdin-once"),
            (container.tty, "--tty"),
        ] {
            if on {
                command.arg(flag);
            }
        }
        command
            .arg("--")
            .args(&argv)
            .env_clear()
            .envs(self.environment(container))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(shim_log)
            .kill_on_drop(false);
        std::fs::create_dir_all(self.working_dir(container))?;
        let mut child = command.spawn()?;
        if let Err(error) = record_start(run, &child).await {
            // A run whose shim pid or start time is not on disk could not be re-adopted after an
            // agent restart: it must not go on unrecorded. The container dies with its shim.
            if let Some(pid) = run.container_pid() {
                // SAFETY: signalling the process group created for this run's container.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            if let Err(kill) = child.kill().await {
                tracing::warn!(run = %run.root.display(), error = %kill, "stopping a shim whose run could not be recorded");
            }
            return Err(Error::State(format!(
                "recording the run in {}: {error}",
                run.root.display()
            )));
        }
        Ok(child)
    }
}

/// Records a run's shim pid, then (once the shim has started the container, or said it could
/// not) its start time.
async fn record_start(run: &RunDir, shim: &tokio::process::Child) -> std::io::Result<()> {
    if let Some(pid) = shim.id() {
        run.set_shim_pid(pid)?;
    }
    // "Running" means the container process exists: wait until the shim has recorded its pid
    // (or that it could not start it). Bounded, in case the shim itself dies first.
    for _ in 0..500 {
        if run.container_pid().is_some() || run.exit().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.set_started_at(now_ms())
}

/// Resolves once the pod is being terminated (the watch guard is not held past it).
async fn stop_requested(stop: &mut watch::Receiver<Option<Duration>>) {
    let _ = stop.wait_for(|s| s.is_some()).await;
}

/// Whether a shim process is alive (and not a reused pid of something else).
fn shim_alive(pid: i32) -> bool {
    if !super::stats::process_alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline.split(|b| *b == 0).any(|arg| arg == b"shim"),
        Err(_) => !cfg!(target_os = "linux"),
    }
}

/// The exit of a run whose shim vanished without recording one.
fn lost_exit(run: &RunDir) -> ExitRecord {
    ExitRecord {
        exit_code: 255,
        signal: 0,
        reason: "Unknown".into(),
        message: "the container's shim ended without recording an exit status".into(),
        started_at_unix_ms: run.started_at(),
        finished_at_unix_ms: now_ms(),
    }
}

/// How a run ended when its shim could not record it but exited on its own: the shim's exit
/// code is the container's (see `shim::record_exit`), and the pod's status says the record
/// is missing and why (the shim's last words in `shim.log`).
fn unrecorded_exit(run: &RunDir, code: i32) -> ExitRecord {
    let log = std::fs::read_to_string(run.root.join("shim.log")).unwrap_or_default();
    let why = log
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("the shim left no word");
    ExitRecord {
        exit_code: code,
        signal: 0,
        reason: if code == 0 { "Completed" } else { "Error" }.into(),
        message: format!("the exit status was not persisted on the instance: {why}"),
        started_at_unix_ms: run.started_at(),
        finished_at_unix_ms: now_ms(),
    }
}

/// Waits until a run ends and returns how. `child` is the shim when this agent started it.
async fn wait_run(run: &RunDir, child: Option<tokio::process::Child>) -> ExitRecord {
    match child {
        Some(mut child) => {
            let shim = child.wait().await;
            match (run.exit(), shim.map(|status| status.code())) {
                (Some(exit), _) => exit,
                (None, Ok(Some(code))) => {
                    let exit = unrecorded_exit(run, code);
                    tracing::warn!(run = %run.root.display(), message = %exit.message, "a container's exit was not recorded");
                    exit
                }
                (None, _) => lost_exit(run),
            }
        }
        None => {
            while run.exit().is_none() && run.shim_pid().is_some_and(shim_alive) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            run.exit().unwrap_or_else(|| lost_exit(run))
        }
    }
}

/// Signals a run's process group: SIGTERM, then SIGKILL after `grace`; waits for the end.
async fn stop_run(run: &RunDir, grace: Duration, reason: Option<String>) -> ExitRecord {
    // The shim writes container.pid right after spawning; give it a moment if we are early.
    let mut pid = run.container_pid();
    for _ in 0..50 {
        if pid.is_some() || run.exit().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        pid = run.container_pid();
    }
    let ended = |run: &RunDir| run.exit().is_some() || !run.shim_pid().is_some_and(shim_alive);
    if let Some(pid) = pid.filter(|_| !ended(run)) {
        // SAFETY: signalling a process group we created; a stale group only yields ESRCH.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + grace;
        while !ended(run) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ended(run) {
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
    let mut exit = loop {
        if let Some(exit) = run.exit() {
            break exit;
        }
        if !run.shim_pid().is_some_and(shim_alive) {
            break lost_exit(run);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(reason) = reason {
        exit.message = reason;
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policy_decisions() {
        assert!(should_restart(RestartPolicy::Always, 0));
        assert!(should_restart(RestartPolicy::Unspecified, 0));
        assert!(should_restart(RestartPolicy::OnFailure, 1));
        assert!(!should_restart(RestartPolicy::OnFailure, 0));
        assert!(!should_restart(RestartPolicy::Never, 1));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let initial = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        let delays: Vec<u64> = (1..=7)
            .map(|n| backoff_delay(initial, max, n).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff_delay(initial, max, 1000), max);
    }

    fn status(state: ContainerState, restarts: i32) -> ContainerStatus {
        ContainerStatus {
            state: Some(state),
            restart_count: restarts,
            ..Default::default()
        }
    }

    fn exited(code: i32) -> ContainerState {
        terminated(&ExitRecord {
            exit_code: code,
            signal: 0,
            reason: String::new(),
            message: String::new(),
            started_at_unix_ms: 0,
            finished_at_unix_ms: 0,
        })
    }

    #[test]
    fn phase_follows_containers() {
        assert_eq!(
            phase_of(&[status(waiting("ContainerCreating", ""), 0)], &[false]),
            PodPhase::Pending
        );
        assert_eq!(phase_of(&[status(running(1), 0)], &[false]), PodPhase::Running);
        assert_eq!(
            phase_of(&[status(waiting("CrashLoopBackOff", ""), 2)], &[false]),
            PodPhase::Running
        );
        assert_eq!(
            phase_of(&[status(exited(0), 0), status(exited(0), 0)], &[true, true]),
            PodPhase::Succeeded
        );
        assert_eq!(
            phase_of(&[status(exited(0), 0), status(exited(2), 0)], &[true, true]),
            PodPhase::Failed
        );
        assert_eq!(
            phase_of(&[status(exited(1), 0), status(running(1), 0)], &[true, false]),
            PodPhase::Running
        );
    }

    fn container(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            command: vec!["/bin/true".into()],
            ..Default::default()
        }
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut spec = PodSpec {
            uid: "u".into(),
            containers: vec![container("a"), container("a")],
            ..Default::default()
        };
        assert!(
            validate_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("containers[1].name: duplicate")
        );
        spec.containers[1].name = "b".into();
        spec.containers[1].command.clear();
        assert!(
            validate_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("containers[1].command")
        );
        spec.containers[1] = container("b");
        spec.containers[1].volume_mounts.push(proto::VolumeMount {
            name: "v".into(),
            mount_path: "/etc/x".into(),
            ..Default::default()
        });
        assert!(
            validate_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("volumeMounts[0].name")
        );
        spec.volumes.push(proto::Volume {
            name: "v".into(),
            source: Some(proto::volume::Source::Files(proto::FilesVolume {
                files: vec![proto::File {
                    path: "../escape".into(),
                    ..Default::default()
                }],
                default_mode: 0,
            })),
        });
        assert!(
            validate_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("volumes[0].files[0].path")
        );
    }
}
