//! The `local` backend: a small cloud on this machine. Every "instance" is an
//! `ec2-kubelet-agent` process (in its own process group) listening on a loopback address of its
//! own (`127.1.x.y`), so the agent endpoint is `private_ip:port` exactly as on EC2. ENIs are
//! loopback addresses (`127.0.x.y`). Like EC2, this cloud outlives the operator: its ENIs and
//! instances are recorded in a directory, and a new `LocalCompute` on that directory sees them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{
    Compute, Eni, EniRequest, Error, ImageInfo, ImageQuery, Instance, InstanceFilter, InstanceState,
    InstanceTypeInfo, LaunchRequest, Result, eni_tags, instance_tags,
};
use crate::crd::{TagMap, tags};
use ec2_kubelet_agent::stats::process_alive;

/// Where the local cloud lives and what it runs.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub cluster: String,
    /// Records of ENIs and instances, and each instance's agent state.
    pub dir: PathBuf,
    /// The `ec2-kubelet-agent` binary started for every instance.
    pub agent_binary: PathBuf,
    /// Passed to every agent as `--imds-endpoint` (a stand-in metadata service: tests send spot
    /// interruption notices through it); `None`: agents do not poll.
    pub imds_endpoint: Option<String>,
}

/// The built-in instance type catalogue: (name, vCPUs, memory MiB, GPUs, architecture).
const CATALOGUE: &[(&str, u32, u64, u32, &str)] = &[
    ("t3.micro", 2, 1024, 0, "x86_64"),
    ("t3.small", 2, 2048, 0, "x86_64"),
    ("t3.medium", 2, 4096, 0, "x86_64"),
    ("t3.large", 2, 8192, 0, "x86_64"),
    ("m5.large", 2, 8192, 0, "x86_64"),
    ("m5.xlarge", 4, 16384, 0, "x86_64"),
    ("m5.2xlarge", 8, 32768, 0, "x86_64"),
    ("c5.xlarge", 4, 8192, 0, "x86_64"),
    ("t4g.small", 2, 2048, 0, "arm64"),
    ("m7g.large", 2, 8192, 0, "arm64"),
    ("g5.xlarge", 4, 16384, 1, "x86_64"),
    ("g5.2xlarge", 8, 32768, 1, "x86_64"),
    ("g6.xlarge", 4, 16384, 1, "x86_64"),
    ("mac2.metal", 12, 32768, 0, "arm64_mac"),
];

/// The built-in catalogue's facts about these types (unknown names are left out); shared by
/// the `sim` backend.
pub fn catalogue(names: &[String]) -> Vec<InstanceTypeInfo> {
    CATALOGUE
        .iter()
        .filter(|(name, ..)| names.iter().any(|n| n == name))
        .map(|(name, vcpus, memory_mib, gpus, arch)| InstanceTypeInfo {
            name: (*name).into(),
            vcpus: *vcpus,
            memory_mib: *memory_mib,
            gpus: *gpus,
            architectures: vec![(*arch).into()],
        })
        .collect()
}

/// Whether the built-in catalogue has this type.
pub fn offered(instance_type: &str) -> bool {
    CATALOGUE.iter().any(|(name, ..)| *name == instance_type)
}

/// An instance record: what EC2 would report, plus the agent process behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceRecord {
    instance: Instance,
    agent_pid: Option<i32>,
}

pub struct LocalCompute {
    options: LocalOptions,
    /// Serialises changes to the records (allocation of ids and addresses).
    lock: Mutex<()>,
}

fn random_hex(len: usize) -> String {
    let value: u128 = rand::random();
    format!("{value:032x}")[..len].to_string()
}

fn io_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("local cloud: {context}: {e}"))
}

fn read_records<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Vec<T>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("read records", e)),
    };
    let mut records = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read(&path).map_err(|e| io_error("read record", e))?;
            records
                .push(serde_json::from_slice(&text).map_err(|e| io_error(&path.display().to_string(), e))?);
        }
    }
    Ok(records)
}

/// Writes the calling process's pid to `path`, for use between fork and exec: only
/// async-signal-safe calls, no allocation.
fn write_own_pid(path: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: getpid, open, write and close are async-signal-safe; `path` is a valid C string
    // and `digits` outlives the write.
    unsafe {
        let mut pid = libc::getpid() as u32;
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (pid % 10) as u8;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
        let fd = libc::open(path.as_ptr(), flags, 0o644 as libc::c_uint);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let length = digits.len() - start;
        let written = libc::write(fd, digits[start..].as_ptr().cast(), length);
        libc::close(fd);
        if written != length as isize {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn write_record(path: &Path, record: &impl Serialize) -> Result<()> {
    let text = serde_json::to_vec_pretty(record).map_err(|e| io_error("encode record", e))?;
    ec2_kubelet_protocol::util::write_atomic(path, &text).map_err(|e| io_error("write record", e))
}

/// The first free address `prefix.x.y` (x, y in 1..=254) not in `used`.
fn allocate_address(prefix: &str, used: &[String]) -> Result<String> {
    for x in 0..=255u32 {
        for y in 1..=254u32 {
            let candidate = format!("{prefix}.{x}.{y}");
            if !used.contains(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(Error::Internal(format!(
        "local cloud: no free address in {prefix}.0.0/16"
    )))
}

impl LocalCompute {
    pub fn new(options: LocalOptions) -> Result<Self> {
        for sub in ["enis", "instances"] {
            std::fs::create_dir_all(options.dir.join(sub)).map_err(|e| io_error("create dir", e))?;
        }
        Ok(LocalCompute {
            options,
            lock: Mutex::new(()),
        })
    }

    fn eni_path(&self, eni_id: &str) -> PathBuf {
        self.options.dir.join("enis").join(format!("{eni_id}.json"))
    }

    fn instance_path(&self, instance_id: &str) -> PathBuf {
        self.options
            .dir
            .join("instances")
            .join(format!("{instance_id}.json"))
    }

    fn instance_dir(&self, instance_id: &str) -> PathBuf {
        self.options.dir.join("instances").join(instance_id)
    }

    fn enis(&self) -> Result<Vec<Eni>> {
        read_records(&self.options.dir.join("enis"))
    }

    /// Instance records with their state refreshed from the agent processes.
    fn instances(&self) -> Result<Vec<InstanceRecord>> {
        let mut records: Vec<InstanceRecord> = read_records(&self.options.dir.join("instances"))?;
        for record in &mut records {
            // A launch cut short after the agent started has its pid only in the agent's file.
            if record.agent_pid.is_none() {
                record.agent_pid = self.started_agent(&record.instance.instance_id);
            }
            let alive = record.agent_pid.is_some_and(process_alive);
            record.instance.state = match (record.instance.state, alive) {
                (InstanceState::Pending | InstanceState::Running, true) => InstanceState::Running,
                // The agent process died without being terminated: the instance stopped.
                (InstanceState::Pending | InstanceState::Running, false) => InstanceState::Stopped,
                (other, _) => other,
            };
        }
        records.sort_by(|a, b| a.instance.instance_id.cmp(&b.instance.instance_id));
        Ok(records)
    }

    /// The pid an instance's agent process wrote before it ran (see `start_agent`), if it was
    /// ever started.
    fn started_agent(&self, instance_id: &str) -> Option<i32> {
        let path = self.instance_dir(instance_id).join("agent.pid");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Starts the instance's agent as the bootstrap of the user data would: enrolling with
    /// the bootstrap token (written, as on an instance, to a file only its owner reads), or in
    /// plain text when the operator runs without agent TLS.
    fn start_agent(
        &self,
        instance_id: &str,
        address: &str,
        port: u16,
        enrollment: Option<&super::Enrollment>,
    ) -> Result<i32> {
        use std::os::unix::process::CommandExt;
        let dir = self.instance_dir(instance_id);
        std::fs::create_dir_all(&dir).map_err(|e| io_error("instance dir", e))?;
        let security = match enrollment {
            Some(enrollment) => {
                let mut flags = enrollment
                    .write_files(&dir)
                    .map_err(|e| io_error("enrollment files", e))?;
                flags.extend(["--instance-id".into(), instance_id.into()]);
                flags
            }
            None => vec!["--insecure".into()],
        };
        let log = std::fs::File::create(dir.join("agent.log")).map_err(|e| io_error("agent log", e))?;
        let log_err = log.try_clone().map_err(|e| io_error("agent log", e))?;
        let pid_file = std::ffi::CString::new(dir.join("agent.pid").into_os_string().into_encoded_bytes())
            .map_err(|e| io_error("agent pid file", e))?;
        let mut command = std::process::Command::new(&self.options.agent_binary);
        // The child records its own pid before it runs the agent, and `spawn` returns only
        // after that: however the operator dies, a started agent is never unaccounted for.
        // SAFETY: the closure makes only async-signal-safe calls (getpid, open, write, close)
        // and allocates nothing.
        unsafe {
            command.pre_exec(move || write_own_pid(&pid_file));
        }
        let mut child = command
            .arg("--listen")
            .arg(format!("{address}:{port}"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--root-dir")
            .arg(dir.join("root"))
            .args(security)
            .args(
                self.options
                    .imds_endpoint
                    .iter()
                    .flat_map(|endpoint| ["--imds-endpoint", endpoint.as_str(), "--imds-poll-ms", "200"]),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| io_error(&format!("start {}", self.options.agent_binary.display()), e))?;
        let pid = child.id() as i32;
        // Reap the agent when it exits, so a dead agent never looks alive.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(pid)
    }
}

#[async_trait::async_trait]
impl Compute for LocalCompute {
    fn backend(&self) -> &'static str {
        "local"
    }

    async fn ensure_eni(&self, request: &EniRequest) -> Result<Eni> {
        let _guard = self.lock.lock().await;
        let enis = self.enis()?;
        if let Some(existing) = enis
            .iter()
            .find(|e| e.pool == request.pool && e.index == request.index)
        {
            return Ok(existing.clone());
        }
        let used: Vec<String> = enis.iter().map(|e| e.private_ip.clone()).collect();
        let eni_tags = eni_tags(&self.options.cluster, request);
        let eni = Eni {
            eni_id: format!("eni-{}", random_hex(17)),
            private_ip: allocate_address("127.0", &used)?,
            subnet_id: request.subnet_id.clone(),
            pool: request.pool.clone(),
            index: request.index,
            tags: eni_tags,
        };
        write_record(&self.eni_path(&eni.eni_id), &eni)?;
        Ok(eni)
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        let _guard = self.lock.lock().await;
        match std::fs::remove_file(self.eni_path(eni_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error("delete eni", e)),
            _ => Ok(()),
        }
    }

    async fn describe_enis(&self, pool: &str) -> Result<Vec<Eni>> {
        let mut enis: Vec<Eni> = self.enis()?.into_iter().filter(|e| e.pool == pool).collect();
        enis.sort_by_key(|e| e.index);
        Ok(enis)
    }

    async fn instance_types(&self, names: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        Ok(catalogue(names))
    }

    async fn launch_instance(&self, request: &LaunchRequest) -> Result<Instance> {
        if !offered(&request.instance_type) {
            return Err(Error::InstanceTypeNotFound {
                instance_type: request.instance_type.clone(),
            });
        }
        let _guard = self.lock.lock().await;
        let records = self.instances()?;
        let ours = |r: &&InstanceRecord| r.instance.tag(tags::POD_UID) == Some(request.pod_uid.as_str());
        if let Some(existing) = records.iter().filter(ours).find(|r| r.instance.state.is_alive()) {
            return Ok(existing.instance.clone());
        }
        // A launch cut short before its agent started (the operator died in between): the
        // retry completes it, as EC2 completes a launch its caller did not see through and
        // answers the retry (same ClientToken) with the same instance.
        if let Some(interrupted) = records
            .iter()
            .filter(ours)
            .find(|r| r.agent_pid.is_none() && r.instance.state != InstanceState::Terminated)
        {
            let mut record = interrupted.clone();
            let address = record.instance.private_ip.clone().unwrap_or_default();
            let port = record
                .instance
                .tag(tags::AGENT_PORT)
                .and_then(|p| p.parse().ok())
                .unwrap_or(request.agent_port);
            // The bootstrap token of the first try died with its caller: the instance boots
            // with this request's, and its enrollment tag names that token's nonce.
            if let Some(enrollment) = &request.enrollment {
                record
                    .instance
                    .tags
                    .insert(tags::ENROLLMENT.into(), enrollment.nonce.clone());
            }
            write_record(&self.instance_path(&record.instance.instance_id), &record)?;
            let pid = self.start_agent(
                &record.instance.instance_id,
                &address,
                port,
                request.enrollment.as_ref(),
            )?;
            record.agent_pid = Some(pid);
            record.instance.state = InstanceState::Pending;
            write_record(&self.instance_path(&record.instance.instance_id), &record)?;
            return Ok(record.instance);
        }
        let used: Vec<String> = records
            .iter()
            .filter_map(|r| r.instance.private_ip.clone())
            .collect();
        let address = allocate_address("127.1", &used)?;
        let instance_id = format!("i-{}", random_hex(17));
        let instance_tags = instance_tags(&self.options.cluster, request);
        let mut record = InstanceRecord {
            instance: Instance {
                instance_id: instance_id.clone(),
                state: InstanceState::Pending,
                instance_type: request.instance_type.clone(),
                private_ip: Some(address.clone()),
                launch_time: ec2_kubelet_protocol::util::now_ms(),
                tags: instance_tags,
            },
            agent_pid: None,
        };
        // Recorded before the process starts: a crash in between leaves a record, not a stray
        // process, and the retry of the launch completes it.
        write_record(&self.instance_path(&instance_id), &record)?;
        let subject = format!("{}/{}", request.namespace, request.name);
        crate::faults::point(crate::faults::LOCAL_INSTANCE_RECORDED, &subject).await;
        let pid = self.start_agent(
            &instance_id,
            &address,
            request.agent_port,
            request.enrollment.as_ref(),
        )?;
        crate::faults::point(crate::faults::LOCAL_AGENT_STARTED, &subject).await;
        record.agent_pid = Some(pid);
        write_record(&self.instance_path(&instance_id), &record)?;
        Ok(record.instance)
    }

    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let cluster = self.options.cluster.as_str();
        Ok(self
            .instances()?
            .into_iter()
            .map(|r| r.instance)
            .filter(|i| match filter {
                InstanceFilter::Ids(ids) => ids.contains(&i.instance_id),
                InstanceFilter::Pool(pool) => {
                    i.tag(tags::POOL) == Some(pool.as_str()) && i.tag(tags::CLUSTER) == Some(cluster)
                }
                InstanceFilter::Cluster => i.tag(tags::CLUSTER) == Some(cluster),
            })
            .collect())
    }

    async fn tag_instance(&self, instance_id: &str, new_tags: &TagMap) -> Result<()> {
        let _guard = self.lock.lock().await;
        let Some(mut record) = self
            .instances()?
            .into_iter()
            .find(|r| r.instance.instance_id == instance_id)
        else {
            return Err(Error::NotFound {
                resource: format!("instance {instance_id}"),
            });
        };
        record.instance.tags.extend(new_tags.clone());
        write_record(&self.instance_path(instance_id), &record)
    }

    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<()> {
        let _guard = self.lock.lock().await;
        for mut record in self
            .instances()?
            .into_iter()
            .filter(|r| instance_ids.contains(&r.instance.instance_id))
        {
            if let Some(pid) = record.agent_pid.filter(|pid| process_alive(*pid)) {
                // The agent's process group holds the agent and its shims; containers die with their shims.
                // SAFETY: signalling the process group this backend created for the instance.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            // Processes the containers forked outlive their shims unless killed by group.
            if let Ok(state) = ec2_kubelet_agent::state::StateDir::new(
                self.instance_dir(&record.instance.instance_id).join("state"),
            ) {
                state.kill_container_groups();
            }
            record.instance.state = InstanceState::Terminated;
            write_record(&self.instance_path(&record.instance.instance_id), &record)?;
        }
        Ok(())
    }

    fn agent_endpoint(&self, instance: &Instance, port: u16) -> Result<String> {
        let ip = instance.private_ip.as_deref().ok_or_else(|| Error::NotFound {
            resource: format!("private IP of {}", instance.instance_id),
        })?;
        Ok(format!("http://{ip}:{port}"))
    }

    /// Every well-formed AMI id exists here (instances run this machine's binaries); a
    /// selector matches one image of its architecture.
    async fn describe_images(&self, query: &ImageQuery) -> Result<Vec<ImageInfo>> {
        let image = |id: &str, name: &str, architecture: &str| ImageInfo {
            image_id: id.to_string(),
            name: name.to_string(),
            architecture: architecture.to_string(),
            creation_date: "2026-01-01T00:00:00.000Z".into(),
        };
        Ok(match query {
            ImageQuery::Ids(ids) => ids
                .iter()
                .filter(|id| id.starts_with("ami-"))
                .map(|id| image(id, "local", "x86_64"))
                .collect(),
            ImageQuery::Selector {
                name, architecture, ..
            } => {
                let architecture = architecture.as_deref().unwrap_or("x86_64");
                vec![image(
                    "ami-0000000000000000a",
                    name.as_deref().unwrap_or("local"),
                    architecture,
                )]
            }
        })
    }

    /// Subnets and security groups are not modelled here: every well-formed id exists.
    async fn existing_subnets(&self, subnet_ids: &[String]) -> Result<Vec<String>> {
        Ok(subnet_ids
            .iter()
            .filter(|s| s.starts_with("subnet-"))
            .cloned()
            .collect())
    }

    async fn existing_security_groups(&self, group_ids: &[String]) -> Result<Vec<String>> {
        Ok(group_ids
            .iter()
            .filter(|g| g.starts_with("sg-"))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_allocated_first_free() {
        assert_eq!(allocate_address("127.1", &[]).unwrap(), "127.1.0.1");
        let used = vec!["127.1.0.1".to_string(), "127.1.0.2".to_string()];
        assert_eq!(allocate_address("127.1", &used).unwrap(), "127.1.0.3");
    }
}
