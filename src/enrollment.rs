//! The operator's side of the agent PKI (`ec2_kubelet_protocol::pki`): the CA Secret, the enrollment service
//! agents call for their certificates, and how the operator dials agents (its client
//! certificate, and the instance name it requires of the agent's).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Request, Response, Status};

use crate::cloud::{Compute, Enrollment, InstanceFilter};
use crate::config::AgentTlsConfig;
use crate::crd::tags;
use crate::runtime::backoff::retry_transient;
use ec2_kubelet_protocol::pki::{self, Authority, Credentials, SwappableCert};
use ec2_kubelet_protocol::util::now_ms;
use ec2_kubelet_protocol::v1::enrollment_server::{
    Enrollment as EnrollmentApi, EnrollmentServer as EnrollmentGrpc,
};
use ec2_kubelet_protocol::v1::{EnrollRequest, EnrollResponse};

/// Lifetime of the operator's own certificate (client to agents, server to enrolling agents);
/// renewed at two thirds.
const OPERATOR_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a starting replica retries transient API errors while loading the CA.
const PATIENCE: Duration = Duration::from_secs(30);

/// The CA of this cluster's agents: read from the Secret `pki::CA_SECRET` in `namespace`, or
/// created there by the first replica to start (a replica that loses the creation race reads
/// the winner's).
pub async fn load_or_create_authority(client: &kube::Client, namespace: &str) -> Result<Authority, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(secret) = retry_transient("reading the agent CA", PATIENCE, || {
            secrets.get_opt(pki::CA_SECRET)
        })
        .await
        .map_err(|e| format!("reading Secret {namespace}/{}: {e}", pki::CA_SECRET))?
        {
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .map(|v| v.0.clone())
                    .ok_or_else(|| format!("Secret {namespace}/{} has no {key}", pki::CA_SECRET))
            };
            let text = |key: &str| {
                field(key).and_then(|v| String::from_utf8(v).map_err(|_| format!("{key}: not UTF-8")))
            };
            return Authority::from_pem(
                &text(pki::SECRET_CERT)?,
                &text(pki::SECRET_KEY)?,
                &field(pki::SECRET_TOKEN_KEY)?,
            )
            .map_err(|e| format!("Secret {namespace}/{}: {e}", pki::CA_SECRET));
        }
        let authority = Authority::generate().map_err(|e| e.to_string())?;
        let mut secret = Secret {
            type_: Some("Opaque".into()),
            data: Some(
                authority
                    .secret_data()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v)))
                    .collect(),
            ),
            ..Default::default()
        };
        secret.metadata.name = Some(pki::CA_SECRET.into());
        secret.metadata.labels = Some(
            [(
                "app.kubernetes.io/managed-by".to_string(),
                "ec2-kubelet".to_string(),
            )]
            .into(),
        );
        let params = PostParams::default();
        let created = retry_transient("creating the agent CA", PATIENCE, || {
            secrets.create(&params, &secret)
        });
        match created.await {
            Ok(_) => {
                tracing::info!(%namespace, secret = pki::CA_SECRET, "created the agent CA");
                return Ok(authority);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(format!("creating Secret {namespace}/{}: {e}", pki::CA_SECRET)),
        }
    }
    Err(format!(
        "Secret {namespace}/{}: created and deleted concurrently",
        pki::CA_SECRET
    ))
}

/// The agent PKI as the operator uses it.
pub struct AgentTls {
    authority: Authority,
    enroll_url: String,
    certificate_ttl: Duration,
    token_ttl: Duration,
    /// The operator's credentials, and the enrollment server's copy of them.
    operator: RwLock<Credentials>,
    served: Arc<SwappableCert>,
    /// Bootstrap tokens already exchanged, recorded in the API server.
    spent: SpentTokens,
}

impl AgentTls {
    /// `client` and `namespace`: where spent bootstrap tokens are recorded (the operator's
    /// namespace, shared by every replica).
    pub fn new(
        authority: Authority,
        config: &AgentTlsConfig,
        enroll_url: String,
        client: kube::Client,
        namespace: &str,
    ) -> Result<Arc<AgentTls>, String> {
        let operator = authority
            .issue_operator(OPERATOR_CERT_TTL)
            .map_err(|e| e.to_string())?;
        let served = SwappableCert::new(&operator).map_err(|e| e.to_string())?;
        Ok(Arc::new(AgentTls {
            authority,
            enroll_url,
            certificate_ttl: Duration::from_secs(config.certificate_ttl_seconds.into()),
            token_ttl: Duration::from_secs(config.bootstrap_token_ttl_seconds.into()),
            operator: RwLock::new(operator),
            served,
            spent: SpentTokens {
                leases: Api::namespaced(client, namespace),
                swept: Mutex::new(None),
            },
        }))
    }

    pub fn ca_pem(&self) -> &str {
        self.authority.ca_pem()
    }

    pub fn enroll_url(&self) -> &str {
        &self.enroll_url
    }

    /// What a new instance gets in its user data: a fresh nonce (also its `enrollment` tag)
    /// and the bootstrap token for it.
    pub fn enrollment(&self) -> Enrollment {
        let nonce = pki::new_nonce();
        Enrollment {
            token: self.authority.mint_token(&nonce, self.token_ttl),
            nonce,
            ca_pem: self.authority.ca_pem().to_string(),
            url: self.enroll_url.clone(),
        }
    }

    /// The operator's credentials, renewed when due.
    pub fn operator_credentials(&self) -> Credentials {
        let current = self.operator.read().unwrap_or_else(|p| p.into_inner()).clone();
        if !current.due_for_renewal(now_ms()) {
            return current;
        }
        match self.authority.issue_operator(OPERATOR_CERT_TTL) {
            Ok(renewed) => {
                if let Err(error) = self.served.replace(&renewed) {
                    tracing::error!(%error, "the renewed operator certificate is unusable");
                    return current;
                }
                *self.operator.write().unwrap_or_else(|p| p.into_inner()) = renewed.clone();
                renewed
            }
            Err(error) => {
                tracing::error!(%error, "renewing the operator certificate");
                current
            }
        }
    }

    /// How to dial the agent of `instance_id`: present the operator's certificate, trust only
    /// the agent CA, and require the agent's certificate to name `instance_id`.
    pub fn client_config(&self, instance_id: &str) -> Result<ClientTlsConfig, String> {
        let name = pki::agent_name(instance_id).map_err(|e| e.to_string())?;
        let credentials = self.operator_credentials();
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.authority.ca_pem()))
            .identity(Identity::from_pem(credentials.cert_pem, credentials.key_pem))
            .domain_name(name))
    }
}

impl crate::agent_client::AgentPki for AgentTls {
    fn client_config(&self, instance_id: &str) -> Result<ClientTlsConfig, String> {
        AgentTls::client_config(self, instance_id)
    }

    fn enrollment(&self) -> Enrollment {
        AgentTls::enrollment(self)
    }
}

/// The label of the Leases that record spent bootstrap tokens.
pub const SPENT_TOKEN_LABEL: &str = "ec2-kubelet.io/spent-bootstrap-token";

/// Bootstrap tokens already exchanged, so that a token works once, cluster-wide and across
/// restarts: one Lease per spent token in the operator's namespace, named for the token's
/// nonce, held by the instance that spent it until the token expires. Creating it is the
/// compare-and-swap: of two replicas exchanging one token, the second gets a 409.
///
/// The record keeps a fingerprint of the public key the token was exchanged for, so the
/// requester itself may ask again with the same key (its answer was lost: the replica that
/// spent the token died before it replied) and gets a certificate for that key. Anyone else
/// replaying the token has another key and is refused; replaying it with the agent's public
/// key gets a certificate useless without the private half.
struct SpentTokens {
    leases: Api<Lease>,
    /// When expired records were last deleted.
    swept: Mutex<Option<std::time::Instant>>,
}

/// The fingerprint (SHA-256, hex) of the public key a spent token was exchanged for.
const PUBLIC_KEY_ANNOTATION: &str = "ec2-kubelet.io/public-key-sha256";

fn key_fingerprint(public_key: &[u8]) -> String {
    pki::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key).as_ref())
}

/// How often expired spent-token records are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The name of the record of the token of `nonce` (the nonce is hex).
fn spent_token_name(nonce: &str) -> String {
    format!("ec2-kubelet-token-{nonce}")
}

impl SpentTokens {
    /// Marks the token of `nonce` (issued for `instance_id`, expiring at `expires_ms`) spent:
    /// true if this call spent it, false if it already was.
    async fn spend(
        &self,
        nonce: &str,
        instance_id: &str,
        public_key: &[u8],
        expires_ms: i64,
    ) -> Result<bool, kube::Error> {
        self.sweep().await;
        let fingerprint = key_fingerprint(public_key);
        let now = jiff::Timestamp::now();
        let remaining = (expires_ms - now.as_millisecond()).max(0) / 1000 + 1;
        let record = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(spent_token_name(nonce)),
                labels: Some([(SPENT_TOKEN_LABEL.to_string(), "true".to_string())].into()),
                annotations: Some([(PUBLIC_KEY_ANNOTATION.to_string(), fingerprint.clone())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(instance_id.to_string()),
                acquire_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(i32::try_from(remaining).unwrap_or(i32::MAX)),
                ..Default::default()
            }),
        };
        match self.leases.create(&PostParams::default(), &record).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let spent = self.leases.get_opt(&spent_token_name(nonce)).await?;
                let same_requester = spent
                    .as_ref()
                    .and_then(|r| r.metadata.annotations.as_ref())
                    .and_then(|a| a.get(PUBLIC_KEY_ANNOTATION))
                    == Some(&fingerprint);
                Ok(same_requester)
            }
            Err(error) => Err(error),
        }
    }

    /// Deletes the records of expired tokens (at most once a minute; an expired token is
    /// refused by its signature check anyway). Failures are logged and retried next time.
    async fn sweep(&self) {
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if swept.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
                return;
            }
            *swept = Some(std::time::Instant::now());
        }
        let params = ListParams::default().labels(&format!("{SPENT_TOKEN_LABEL}=true"));
        let records = match self.leases.list(&params).await {
            Ok(records) => records.items,
            Err(error) => {
                tracing::warn!(%error, "listing spent bootstrap tokens");
                return;
            }
        };
        let now = jiff::Timestamp::now();
        for record in records {
            let expired = record
                .spec
                .as_ref()
                .is_none_or(|spec| crate::runtime::lease::expired(spec, now));
            if !expired {
                continue;
            }
            let name = record.metadata.name.unwrap_or_default();
            if let Err(error) = self.leases.delete(&name, &DeleteParams::default()).await
                && !matches!(&error, kube::Error::Api(status) if status.is_not_found())
            {
                tracing::warn!(%error, record = %name, "deleting a spent bootstrap token's record");
            }
        }
    }
}

/// The enrollment gRPC service.
pub struct EnrollmentService {
    tls: Arc<AgentTls>,
    compute: Arc<dyn Compute>,
}

impl EnrollmentService {
    /// The live instance `instance_id` of this cluster.
    async fn live_instance(&self, instance_id: &str) -> Result<crate::cloud::Instance, Status> {
        let instances = self
            .compute
            .describe_instances(&InstanceFilter::Ids(vec![instance_id.to_string()]))
            .await
            .map_err(|e| Status::unavailable(format!("describing {instance_id}: {e}")))?;
        instances
            .into_iter()
            .find(|i| i.instance_id == instance_id && i.state.is_alive())
            .ok_or_else(|| {
                Status::permission_denied(format!("{instance_id} is not a live instance of this cluster"))
            })
    }

    async fn check(&self, request: &Request<EnrollRequest>) -> Result<(), Status> {
        let body = request.get_ref();
        let instance_id = body.instance_id.as_str();
        // Malformed requests are refused before a token is spent on them.
        let name = pki::agent_name(instance_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        pki::check_public_key(&body.public_key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if body.bootstrap_token.is_empty() {
            // Renewal: the client certificate (chain verified by the TLS layer) must name the
            // instance.
            let certs = request
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("no bootstrap token and no client certificate"))?;
            let named = certs.first().is_some_and(|cert| pki::names(cert, &name));
            if !named {
                return Err(Status::permission_denied(format!(
                    "the client certificate does not name {instance_id}"
                )));
            }
            self.live_instance(instance_id).await?;
            return Ok(());
        }
        let (nonce, expires) = self
            .tls
            .authority
            .check_token(&body.bootstrap_token, now_ms())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let instance = self.live_instance(instance_id).await?;
        if instance.tag(tags::ENROLLMENT) != Some(nonce.as_str()) {
            return Err(Status::permission_denied(format!(
                "the bootstrap token was not issued for {instance_id}"
            )));
        }
        let spent = self
            .tls
            .spent
            .spend(&nonce, instance_id, &body.public_key, expires)
            .await
            .map_err(|e| Status::unavailable(format!("recording the bootstrap token as spent: {e}")))?;
        if !spent {
            return Err(Status::permission_denied("the bootstrap token was already used"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl EnrollmentApi for EnrollmentService {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let renewal = request.get_ref().bootstrap_token.is_empty();
        let instance_id = request.get_ref().instance_id.clone();
        if let Err(status) = self.check(&request).await {
            tracing::warn!(%instance_id, renewal, reason = %status.message(), "enrollment refused");
            return Err(status);
        }
        let issued = self
            .tls
            .authority
            .issue_agent(
                &instance_id,
                &request.get_ref().public_key,
                self.tls.certificate_ttl,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%instance_id, renewal, not_after_unix_ms = issued.not_after_unix_ms, "agent certificate issued");
        Ok(Response::new(EnrollResponse {
            certificate_pem: issued.cert_pem,
            ca_pem: self.tls.ca_pem().to_string(),
            not_after_unix_ms: issued.not_after_unix_ms,
            issued_unix_ms: issued.issued_unix_ms,
        }))
    }
}

/// The enrollment endpoint, serving until dropped.
pub struct EnrollmentServer {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EnrollmentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `address` (port 0: any free port). Replicas on one host may share the address
/// (`SO_REUSEPORT`): any replica can enroll any agent, as behind a Service.
pub async fn bind(address: &str) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let fail = |e: std::io::Error| format!("server.enrollAddress {address}: {e}");
    let parsed: SocketAddr = address
        .parse()
        .map_err(|e| format!("server.enrollAddress {address}: {e}"))?;
    let socket = if parsed.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.set_reuseport(true).map_err(fail)?;
    socket.bind(parsed).map_err(fail)?;
    let listener = socket.listen(1024).map_err(fail)?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    Ok((listener, bound))
}

/// Serves enrollment on `listener`: TLS with the operator's certificate; a client certificate
/// (renewal) is optional and, when presented, must chain to the agent CA.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<AgentTls>,
    compute: Arc<dyn Compute>,
) -> Result<EnrollmentServer, String> {
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki::root_store(tls.ca_pem()).map_err(|e| e.to_string())?),
        pki::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(tls.served.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    let service = EnrollmentService { tls, compute };
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(EnrollmentGrpc::new(service))
            .serve_with_incoming(pki::tls_incoming(listener, Arc::new(config)))
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the enrollment server stopped");
        }
    });
    Ok(EnrollmentServer { address, task })
}
