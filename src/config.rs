//! Operator configuration: a YAML file (`config/operator.yaml`), then CLI flags on top.
//! A bad file or value is refused with the field it concerns, before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which `Compute` backend runs pods' instances.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputeBackend {
    /// Real EC2 through aws-sdk-ec2.
    Aws,
    /// Each instance is an agent process on 127.0.0.1: no AWS account needed.
    #[default]
    Local,
}

pub use ec2_kubelet_protocol::telemetry::LogFormat;

/// Everything the operator needs to know before it starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OperatorConfig {
    /// Name of this cluster, written as the `ec2-kubelet.io/cluster` tag on everything the
    /// operator creates; instances without it are never touched.
    pub cluster_name: String,
    /// AWS region.
    pub region: String,
    /// EC2 endpoint override (e.g. a local EC2 emulator); default: the region's endpoint.
    pub ec2_endpoint: Option<String>,
    /// Timeouts and retries of every EC2 request.
    pub ec2_client: Ec2ClientConfig,
    /// Compute backend.
    pub compute: ComputeBackend,
    /// Namespace of the operator: node-ownership leases and its CA Secret live there.
    pub namespace: String,
    /// Node leases (`kube-node-lease`) and node-ownership leases between operator replicas.
    pub lease: LeaseConfig,
    /// How often things are re-checked.
    pub sync: SyncConfig,
    /// Listen addresses.
    pub server: ServerConfig,
    /// Settings of the `local` compute backend.
    pub local: LocalConfig,
    /// The operator <-> agent channel: mutual TLS with certificates from the operator's CA.
    pub agent_tls: AgentTlsConfig,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            cluster_name: "ec2-kubelet".into(),
            region: "us-east-1".into(),
            ec2_endpoint: None,
            ec2_client: Ec2ClientConfig::default(),
            compute: ComputeBackend::Local,
            namespace: "ec2-kubelet-system".into(),
            lease: LeaseConfig::default(),
            sync: SyncConfig::default(),
            server: ServerConfig::default(),
            local: LocalConfig::default(),
            agent_tls: AgentTlsConfig::default(),
            log_format: LogFormat::Text,
        }
    }
}

/// How the EC2 client treats a slow or failing EC2: every request is retried (adaptive mode:
/// exponential backoff with jitter, and a client-side rate that drops while EC2 throttles) up
/// to `maxAttempts`, each attempt bounded by `attemptTimeoutSeconds` and the whole by
/// `operationTimeoutSeconds`. What still fails goes to the pod worker or the pool controller,
/// which retry with their own backoff.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ec2ClientConfig {
    /// One attempt (connect, send, answer) that takes longer is abandoned and retried.
    pub attempt_timeout_seconds: u32,
    /// A request, all attempts and their backoff included, that takes longer fails.
    pub operation_timeout_seconds: u32,
    /// Attempts per request (1: no retries).
    pub max_attempts: u32,
}

impl Default for Ec2ClientConfig {
    fn default() -> Self {
        Ec2ClientConfig {
            attempt_timeout_seconds: 20,
            operation_timeout_seconds: 90,
            max_attempts: 3,
        }
    }
}

/// Lease timing, as a kubelet has it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a lease is valid without renewal.
    pub duration_seconds: u32,
    /// How often a lease is renewed; must be well below `durationSeconds`.
    pub renew_interval_seconds: u32,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            duration_seconds: 40,
            renew_interval_seconds: 10,
        }
    }
}

/// Periodic work.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Node status is patched on change and at least this often.
    pub node_status_seconds: u32,
    /// Pools are re-reconciled at least this often.
    pub pool_resync_seconds: u32,
    /// Templates are re-validated against EC2 this often (images get deregistered).
    pub template_resync_seconds: u32,
    /// Pod status writes on one node are coalesced within this window.
    pub pod_status_batch_millis: u32,
    /// A running pod whose agent stops answering turns Ready=False after this long.
    pub agent_unreachable_seconds: u32,
    /// A pod whose agent stays unreachable this long is marked Failed (`InstanceLost`).
    pub agent_lost_seconds: u32,
    /// Scale-down waits this long for a cordoned node's pods to leave before removing it anyway.
    pub drain_timeout_seconds: u32,
    /// An instance of the pool whose pod no longer exists is terminated once it is this old.
    pub orphan_grace_seconds: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            node_status_seconds: 60,
            pool_resync_seconds: 300,
            template_resync_seconds: 600,
            pod_status_batch_millis: 20,
            agent_unreachable_seconds: 30,
            agent_lost_seconds: 300,
            drain_timeout_seconds: 600,
            orphan_grace_seconds: 120,
        }
    }
}

/// Listen addresses of the operator's servers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Prometheus `/metrics`.
    pub metrics_address: String,
    /// `/healthz` and `/readyz`.
    pub health_address: String,
    /// The kubelet API of the virtual nodes (logs, exec, stats).
    pub kubelet_address: String,
    /// Agents' enrollment endpoint (gRPC over TLS), with `agentTls.mode: mutual`.
    pub enroll_address: String,
    /// PEM certificate chain the kubelet API serves for every node (with `kubeletTlsKeyFile`);
    /// when set, `kubeletServing` is not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubelet_tls_cert_file: Option<PathBuf>,
    /// PEM private key of `kubeletTlsCertFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubelet_tls_key_file: Option<PathBuf>,
    /// Who may call the kubelet API, and how they prove it.
    pub kubelet_auth: KubeletAuthConfig,
    /// Where each virtual node's kubelet serving certificate comes from (without
    /// `kubeletTlsCertFile`).
    pub kubelet_serving: KubeletServingConfig,
}

/// Each virtual node's kubelet serving certificate, as a kubelet with `serverTLSBootstrap`
/// gets it: a CertificateSigningRequest to `kubernetes.io/kubelet-serving` (subject
/// `system:node:<node>` in `system:nodes`, the node's name and InternalIP as SANs), signed by the
/// cluster's CA, kept in a Secret per node and renewed before it expires. Until it is issued,
/// and with `mode: SelfSigned`, the node serves a self-signed certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubeletServingConfig {
    pub mode: KubeletServingMode,
    /// Approve the operator's own CSRs (after checking they are its nodes'), as no built-in
    /// controller approves kubelet-serving requests. Off: an approver of the cluster's does.
    pub approve: bool,
}

impl Default for KubeletServingConfig {
    fn default() -> Self {
        KubeletServingConfig {
            mode: KubeletServingMode::Csr,
            approve: true,
        }
    }
}

/// Where the kubelet serving certificates come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeletServingMode {
    /// A certificate per node from the cluster's `kubernetes.io/kubelet-serving` signer.
    #[serde(rename = "CSR")]
    Csr,
    /// One self-signed certificate made at start (API servers without
    /// `--kubelet-certificate-authority` accept it).
    SelfSigned,
}

/// Authentication and authorization of the kubelet API's callers, as a kubelet's
/// `authentication` (x509, webhook, anonymous) and `authorization` (Webhook, AlwaysAllow).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubeletAuthConfig {
    /// PEM bundle that client certificates must be signed by (the API server's
    /// kubelet-client certificate is). Default: `client-ca-file` of the ConfigMap
    /// `kube-system/extension-apiserver-authentication`, read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Bearer tokens are checked with a TokenReview (metrics-server, Prometheus with a service
    /// account token).
    pub token_review: bool,
    /// Serve callers with neither a certificate nor a token as `system:anonymous` (still
    /// subject to authorization). Off (the default): they get 401.
    pub anonymous: bool,
    /// `Webhook`: every request is checked with a SubjectAccessReview on `nodes/<subresource>`
    /// of the node it is addressed to, as a kubelet does. `AlwaysAllow`: any authenticated
    /// caller.
    pub authorization: KubeletAuthorization,
}

impl Default for KubeletAuthConfig {
    fn default() -> Self {
        KubeletAuthConfig {
            client_ca_file: None,
            token_review: true,
            anonymous: false,
            authorization: KubeletAuthorization::Webhook,
        }
    }
}

/// How the kubelet API authorizes an authenticated caller.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeletAuthorization {
    Webhook,
    AlwaysAllow,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            metrics_address: "0.0.0.0:9090".into(),
            health_address: "0.0.0.0:8080".into(),
            kubelet_address: "0.0.0.0:10250".into(),
            enroll_address: "0.0.0.0:8443".into(),
            kubelet_tls_cert_file: None,
            kubelet_tls_key_file: None,
            kubelet_auth: KubeletAuthConfig::default(),
            kubelet_serving: KubeletServingConfig::default(),
        }
    }
}

/// How the operator and agents authenticate each other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AgentTlsMode {
    /// Mutual TLS: agents enroll with a one-time bootstrap token for a certificate naming their
    /// instance and accept only the operator's certificate.
    #[default]
    Mutual,
    /// Plain text, no authentication (agents run with `--insecure`): benchmarks and trusted
    /// development machines only.
    Disabled,
}

/// The operator <-> agent channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentTlsConfig {
    pub mode: AgentTlsMode,
    /// The enrollment URL instances dial (`https://host:port` of `server.enrollAddress` as
    /// seen from the instances' subnets, e.g. an internal load balancer). Required with the
    /// `aws` backend; the `local` backend uses the bound address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_url: Option<String>,
    /// Lifetime of an agent's certificate; agents renew at two thirds of it.
    pub certificate_ttl_seconds: u32,
    /// How long a new instance's bootstrap token is good for (covers the instance's boot).
    pub bootstrap_token_ttl_seconds: u32,
}

impl Default for AgentTlsConfig {
    fn default() -> Self {
        AgentTlsConfig {
            mode: AgentTlsMode::Mutual,
            enroll_url: None,
            certificate_ttl_seconds: 24 * 3600,
            bootstrap_token_ttl_seconds: 3600,
        }
    }
}

/// The `local` backend: instances are agent processes on this machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalConfig {
    /// The `ec2-kubelet-agent` binary (default: beside the operator binary).
    pub agent_binary: Option<PathBuf>,
    /// Where instances keep their state and logs (default: a temporary directory).
    pub state_dir: Option<PathBuf>,
    /// A stand-in instance metadata service the local agents poll for spot interruption
    /// notices (default: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imds_endpoint: Option<String>,
}

/// A configuration that cannot be used, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

impl OperatorConfig {
    /// Reads and validates a config file. Unknown fields are errors (a typo must not be ignored).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: OperatorConfig = if text.trim().is_empty() {
            OperatorConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: PathBuf::new(),
                message: e.to_string(),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the first field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::crd::is_dns_label(&self.cluster_name) {
            return Err(invalid(
                "clusterName",
                format!(
                    "{:?} must be 1-63 characters of lowercase letters, digits and '-', starting and ending alphanumeric",
                    self.cluster_name
                ),
            ));
        }
        if !is_region(&self.region) {
            return Err(invalid(
                "region",
                format!("{:?} is not an AWS region name such as us-east-1", self.region),
            ));
        }
        if let Some(endpoint) = &self.ec2_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "ec2Endpoint",
                format!("{endpoint:?} must be an http:// or https:// URL"),
            ));
        }
        let client = &self.ec2_client;
        if client.max_attempts == 0 {
            return Err(invalid("ec2Client.maxAttempts", "must be at least 1"));
        }
        if client.attempt_timeout_seconds == 0 {
            return Err(invalid(
                "ec2Client.attemptTimeoutSeconds",
                "must be greater than 0",
            ));
        }
        if client.operation_timeout_seconds < client.attempt_timeout_seconds {
            return Err(invalid(
                "ec2Client.operationTimeoutSeconds",
                format!(
                    "{} must be at least ec2Client.attemptTimeoutSeconds ({})",
                    client.operation_timeout_seconds, client.attempt_timeout_seconds
                ),
            ));
        }
        if !crate::crd::is_dns_label(&self.namespace) {
            return Err(invalid(
                "namespace",
                format!("{:?} is not a valid namespace name", self.namespace),
            ));
        }
        if self.lease.renew_interval_seconds == 0 {
            return Err(invalid("lease.renewIntervalSeconds", "must be at least 1"));
        }
        if self.lease.duration_seconds < 2 * self.lease.renew_interval_seconds {
            return Err(invalid(
                "lease.durationSeconds",
                format!(
                    "{} must be at least twice lease.renewIntervalSeconds ({}), or a single late renewal loses the lease",
                    self.lease.duration_seconds, self.lease.renew_interval_seconds
                ),
            ));
        }
        let positive = [
            ("sync.nodeStatusSeconds", self.sync.node_status_seconds),
            ("sync.poolResyncSeconds", self.sync.pool_resync_seconds),
            ("sync.templateResyncSeconds", self.sync.template_resync_seconds),
            ("sync.podStatusBatchMillis", self.sync.pod_status_batch_millis),
            ("sync.agentLostSeconds", self.sync.agent_lost_seconds),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(field, "must be greater than 0"));
        }
        if self.sync.agent_unreachable_seconds >= self.sync.agent_lost_seconds {
            return Err(invalid(
                "sync.agentUnreachableSeconds",
                format!(
                    "{} must be less than sync.agentLostSeconds ({}): a pod turns unready before it is given up",
                    self.sync.agent_unreachable_seconds, self.sync.agent_lost_seconds
                ),
            ));
        }
        for (field, address) in [
            ("server.metricsAddress", &self.server.metrics_address),
            ("server.healthAddress", &self.server.health_address),
            ("server.kubeletAddress", &self.server.kubelet_address),
            ("server.enrollAddress", &self.server.enroll_address),
        ] {
            if address.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    field,
                    format!("{address:?} is not a host:port socket address such as 0.0.0.0:8080"),
                ));
            }
        }
        if self.agent_tls.mode == AgentTlsMode::Mutual {
            match &self.agent_tls.enroll_url {
                Some(url) if !url.starts_with("https://") || url.parse::<hyper::Uri>().is_err() => {
                    return Err(invalid(
                        "agentTls.enrollUrl",
                        format!("{url:?} must be an https:// URL such as https://10.0.0.10:8443"),
                    ));
                }
                None if self.compute == ComputeBackend::Aws => {
                    return Err(invalid(
                        "agentTls.enrollUrl",
                        "required with compute: aws and agentTls.mode: mutual: the https:// URL at which instances reach server.enrollAddress",
                    ));
                }
                _ => {}
            }
            if self.agent_tls.certificate_ttl_seconds < 10 {
                return Err(invalid("agentTls.certificateTtlSeconds", "must be at least 10"));
            }
            if self.agent_tls.bootstrap_token_ttl_seconds < 60 {
                return Err(invalid(
                    "agentTls.bootstrapTokenTtlSeconds",
                    "must be at least 60",
                ));
            }
        }
        Ok(())
    }

    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease.duration_seconds.into())
    }

    pub fn lease_renew_interval(&self) -> Duration {
        Duration::from_secs(self.lease.renew_interval_seconds.into())
    }
}

fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(OperatorConfig::from_yaml("").unwrap(), OperatorConfig::default());
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/operator.yaml");
        let config = OperatorConfig::from_file(&path).expect("config/operator.yaml is valid");
        assert_eq!(config.compute, ComputeBackend::Local);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = OperatorConfig::from_yaml("clusterNme: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `clusterNme`"), "{err}");
    }

    #[test]
    fn nested_unknown_field_is_named() {
        let err = OperatorConfig::from_yaml("lease:\n  durationSecs: 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `durationSecs`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("clusterName: Prod_1\n", "clusterName"),
            ("region: mars\n", "region"),
            ("ec2Endpoint: localhost:5000\n", "ec2Endpoint"),
            (
                "lease: {durationSeconds: 15, renewIntervalSeconds: 10}\n",
                "lease.durationSeconds",
            ),
            ("lease: {renewIntervalSeconds: 0}\n", "lease.renewIntervalSeconds"),
            ("sync: {podStatusBatchMillis: 0}\n", "sync.podStatusBatchMillis"),
            (
                "sync: {agentUnreachableSeconds: 300}\n",
                "sync.agentUnreachableSeconds",
            ),
            ("server: {healthAddress: 'localhost'}\n", "server.healthAddress"),
            ("agentTls: {enrollUrl: 'http://x:1'}\n", "agentTls.enrollUrl"),
            ("compute: aws\n", "agentTls.enrollUrl"),
            (
                "agentTls: {certificateTtlSeconds: 5}\n",
                "agentTls.certificateTtlSeconds",
            ),
            (
                "agentTls: {bootstrapTokenTtlSeconds: 0}\n",
                "agentTls.bootstrapTokenTtlSeconds",
            ),
        ];
        for (yaml, field) in cases {
            match OperatorConfig::from_yaml(yaml) {
                Err(ConfigError::Invalid { field: named, .. }) => assert_eq!(named, field, "{yaml}"),
                other => panic!("{yaml}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_type_is_a_parse_error_with_location() {
        let err = OperatorConfig::from_yaml("compute: gcp\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `gcp`"), "{err}");
        assert!(err.contains("compute"), "{err}");
    }
}
