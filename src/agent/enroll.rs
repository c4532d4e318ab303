//! The agent's side of enrollment (see `ec2_kubelet_protocol::pki`): a certificate from the operator for the
//! bootstrap token of the user data, kept in the state dir (a restarted agent reuses it) and
//! renewed at two thirds of its lifetime with the current certificate as the credential.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::proto::EnrollRequest;
use super::proto::enrollment_client::EnrollmentClient;
use ec2_kubelet_protocol::pki::{self, Credentials, SwappableCert};

/// Where and how the agent enrolls.
#[derive(Clone, Debug)]
pub struct EnrollConfig {
    /// The operator's enrollment endpoint (`https://...`).
    pub url: String,
    /// The agent CA (PEM): verifies the operator, and the operator's client certificates.
    pub ca_pem: String,
    /// The bootstrap token (first enrollment).
    pub token: Option<String>,
    pub instance_id: String,
    /// `<state dir>/tls`.
    pub dir: PathBuf,
}

/// What the agent keeps on disk (mode 0600).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    instance_id: String,
    ca_pem: String,
    credentials: Credentials,
}

fn stored_path(dir: &Path) -> PathBuf {
    dir.join("credentials.json")
}

fn load(config: &EnrollConfig) -> Option<Credentials> {
    let text = std::fs::read_to_string(stored_path(&config.dir)).ok()?;
    let stored: Stored = serde_json::from_str(&text).ok()?;
    let now = super::state::now_ms();
    (stored.instance_id == config.instance_id
        && stored.ca_pem == config.ca_pem
        && stored.credentials.not_after_unix_ms > now)
        .then_some(stored.credentials)
}

fn store(config: &EnrollConfig, credentials: &Credentials) -> Result<(), String> {
    std::fs::create_dir_all(&config.dir).map_err(|e| format!("{}: {e}", config.dir.display()))?;
    let stored = Stored {
        instance_id: config.instance_id.clone(),
        ca_pem: config.ca_pem.clone(),
        credentials: credentials.clone(),
    };
    let path = stored_path(&config.dir);
    let text = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
    super::state::write_private(&path, &text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Why an enrollment failed.
#[derive(Debug, thiserror::Error)]
enum EnrollError {
    /// The operator said no (bad or spent token, wrong instance): asking again will not help.
    #[error("enrollment refused: {0}")]
    Refused(String),
    /// Anything else (the operator unreachable, a dropped connection, a timeout): try again.
    #[error("enrollment failed: {0}")]
    Failed(String),
}

/// The key of the first enrollment, kept (mode 0600) until it is certified: every retry, even
/// after an agent restart, sends the same public key, and the operator answers a retry of a
/// spent token only for the key it was spent for (the answer to the first try may have been
/// lost with the replica that gave it).
fn enrollment_key(config: &EnrollConfig) -> Result<rcgen::KeyPair, String> {
    let path = config.dir.join("enroll-key.pem");
    if let Some(key) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok())
    {
        return Ok(key);
    }
    let key = pki::new_key().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&config.dir).map_err(|e| format!("{}: {e}", config.dir.display()))?;
    super::state::write_private(&path, key.serialize_pem().as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// One enrollment of `key` (its public half is sent): with the token or, when `current` is
/// given, over a connection authenticated by it.
async fn enroll(
    config: &EnrollConfig,
    current: Option<&Credentials>,
    key: &rcgen::KeyPair,
) -> Result<Credentials, EnrollError> {
    use EnrollError::Failed;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.ca_pem))
        .domain_name(pki::OPERATOR_NAME);
    if let Some(current) = current {
        tls = tls.identity(Identity::from_pem(&current.cert_pem, &current.key_pem));
    }
    let channel = Endpoint::from_shared(config.url.clone())
        .map_err(|e| Failed(format!("enrollment URL {}: {e}", config.url)))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .tls_config(tls)
        .map_err(|e| Failed(format!("enrollment TLS: {e}")))?
        .connect()
        .await
        .map_err(|e| Failed(format!("connecting to {}: {e:?}", config.url)))?;
    let request = EnrollRequest {
        instance_id: config.instance_id.clone(),
        bootstrap_token: match current {
            Some(_) => String::new(),
            None => config.token.clone().unwrap_or_default(),
        },
        public_key: key.public_key_raw().to_vec(),
    };
    let response = EnrollmentClient::new(channel)
        .enroll(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::InvalidArgument => {
                EnrollError::Refused(status.message().to_string())
            }
            _ => Failed(format!("{}: {}", status.code(), status.message())),
        })?
        .into_inner();
    let credentials = Credentials::new(
        key,
        pki::Issued {
            cert_pem: response.certificate_pem,
            issued_unix_ms: response.issued_unix_ms,
            not_after_unix_ms: response.not_after_unix_ms,
        },
    );
    credentials
        .certified_key()
        .map_err(|e| Failed(format!("the issued certificate: {e}")))?;
    store(config, &credentials).map_err(Failed)?;
    Ok(credentials)
}

/// The agent's credentials: the stored ones while valid, else a first enrollment with the
/// token, retried (the operator may not be reachable yet while the instance boots).
pub async fn credentials(config: &EnrollConfig) -> Result<Credentials, String> {
    if let Some(credentials) = load(config) {
        tracing::info!(
            not_after_unix_ms = credentials.not_after_unix_ms,
            "reusing the stored certificate"
        );
        return Ok(credentials);
    }
    if config.token.is_none() {
        return Err("no valid stored certificate and no bootstrap token to enroll with".into());
    }
    let key = enrollment_key(config)?;
    let mut delay = Duration::from_millis(200);
    for attempt in 1.. {
        match enroll(config, None, &key).await {
            Ok(credentials) => {
                tracing::info!(instance_id = %config.instance_id, "enrolled: certificate issued");
                let pending = config.dir.join("enroll-key.pem");
                if let Err(error) = std::fs::remove_file(&pending) {
                    tracing::warn!(%error, path = %pending.display(), "removing the certified enrollment key");
                }
                return Ok(credentials);
            }
            // A refusal is final: the token will not get better.
            Err(error @ EnrollError::Refused(_)) => return Err(error.to_string()),
            Err(error) if attempt < 60 => {
                tracing::warn!(%error, attempt, "enrollment failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error.to_string()),
        }
    }
    unreachable!("the loop returns")
}

/// Renews `current` at two thirds of its lifetime, for as long as the agent runs, swapping the
/// served certificate each time.
pub async fn keep_renewed(config: EnrollConfig, mut current: Credentials, served: Arc<SwappableCert>) {
    loop {
        let wait = current.renewal_due_unix_ms() - super::state::now_ms();
        tokio::time::sleep(Duration::from_millis(wait.max(0) as u64)).await;
        // A renewal is authenticated by the current certificate: a new key each time.
        let renewed = match pki::new_key() {
            Ok(key) => enroll(&config, Some(&current), &key).await,
            Err(error) => Err(EnrollError::Failed(error.to_string())),
        };
        match renewed {
            Ok(renewed) => match served.replace(&renewed) {
                Ok(()) => {
                    tracing::info!(
                        not_after_unix_ms = renewed.not_after_unix_ms,
                        "certificate renewed"
                    );
                    current = renewed;
                }
                Err(error) => tracing::error!(%error, "the renewed certificate is unusable"),
            },
            Err(error) => {
                // Try again after a tenth of what is left (at least a second).
                let left = (current.not_after_unix_ms - super::state::now_ms()).max(0) as u64;
                tracing::warn!(%error, left_ms = left, "certificate renewal failed; retrying");
                tokio::time::sleep(Duration::from_millis((left / 10).max(1000))).await;
                // Due again at once: the loop computes a due time in the past.
            }
        }
    }
}
