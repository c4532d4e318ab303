//! The agent PKI: the operator's certificate authority for the operator <-> agent channel.
//!
//! - The CA (and the key of bootstrap tokens) lives in a Secret the operator creates in its
//!   namespace; every replica loads the same one.
//! - A new instance gets a one-time bootstrap token in its user data. Its agent exchanges the
//!   token (over TLS, verifying the operator against the CA) for a short-lived certificate
//!   naming its instance: `<instance-id>.agent.ec2-kubelet.internal`. The token is an HMAC by
//!   the CA Secret's token key over a nonce that is also a tag of the instance, so a token is
//!   only good for the instance launched with it.
//! - The operator's client certificate names `operator.ec2-kubelet.internal`. Agents accept no
//!   other client certificate (an agent's certificate is signed by the same CA but names its
//!   instance); the operator accepts an agent only if its certificate names the instance it
//!   dials.
//!
//! Keys are ECDSA P-256. An agent sends only its public key: the private key never leaves the
//! instance.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The name in the operator's certificate.
pub const OPERATOR_NAME: &str = "operator.ec2-kubelet.internal";
/// Agents' certificates name `<instance-id>.` this.
pub const AGENT_DOMAIN: &str = "agent.ec2-kubelet.internal";
/// Name of the Secret (in the operator's namespace) holding the CA.
pub const CA_SECRET: &str = "ec2-kubelet-agent-ca";
/// Keys of that Secret.
pub const SECRET_CERT: &str = "ca.crt";
pub const SECRET_KEY: &str = "ca.key";
pub const SECRET_TOKEN_KEY: &str = "token.key";

const TOKEN_PREFIX: &str = "ekb1";
const CA_COMMON_NAME: &str = "ec2-kubelet agent CA";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from a little before they are issued (clocks differ).
const CLOCK_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Invalid(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("bootstrap token refused: {0}")]
    Token(&'static str),
}

type Result<T> = std::result::Result<T, PkiError>;

/// The DNS name in the certificate of the agent of `instance_id`. Refuses ids that are not a
/// DNS label (`i-0123abcd`): nothing else may end up in a certificate.
pub fn agent_name(instance_id: &str) -> Result<String> {
    if !crate::util::is_dns_label(instance_id) {
        return Err(PkiError::Invalid(format!(
            "instance id {instance_id:?} is not a DNS label (expected something like i-0123456789abcdef0)"
        )));
    }
    Ok(format!("{instance_id}.{AGENT_DOMAIN}"))
}

fn now_ms() -> i64 {
    crate::util::now_ms()
}

fn offset_time(unix_ms: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .map_err(|e| PkiError::Invalid(format!("time {unix_ms}: {e}")))
}

/// A certificate and the private key it certifies (PEM), and when it expires.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    pub cert_pem: String,
    pub key_pem: String,
    pub issued_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

impl Credentials {
    /// A new key pair and `certificate` (PEM, issued for that key's public half).
    pub fn new(key: &KeyPair, issued: Issued) -> Credentials {
        Credentials {
            cert_pem: issued.cert_pem,
            key_pem: key.serialize_pem(),
            issued_unix_ms: issued.issued_unix_ms,
            not_after_unix_ms: issued.not_after_unix_ms,
        }
    }

    /// When two thirds of the lifetime have passed: time to renew.
    pub fn renewal_due_unix_ms(&self) -> i64 {
        let lifetime = self.not_after_unix_ms - self.issued_unix_ms;
        self.issued_unix_ms + lifetime * 2 / 3
    }

    pub fn due_for_renewal(&self, now_unix_ms: i64) -> bool {
        now_unix_ms >= self.renewal_due_unix_ms()
    }

    /// The rustls form: certificate chain and signing key.
    pub fn certified_key(&self) -> Result<rustls::sign::CertifiedKey> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Invalid(format!("certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("key PEM: {e}")))?;
        rustls::sign::CertifiedKey::from_der(certs, key, &provider())
            .map_err(|e| PkiError::Invalid(format!("certificate and key: {e}")))
    }
}

/// A certificate the authority signed.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub issued_unix_ms: i64,
    pub not_after_unix_ms: i64,
}

/// A new ECDSA P-256 key pair (what agents and the operator hold).
pub fn new_key() -> Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// An agent's public key as sent in an enrollment: an uncompressed P-256 point.
struct RawP256(Vec<u8>);

impl PublicKeyData for RawP256 {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The crypto provider every TLS configuration of ours uses (aws-lc-rs, as the rest of the tree).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The operator's certificate authority and bootstrap-token key.
pub struct Authority {
    ca_cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    token_key_bytes: Vec<u8>,
    token_key: hmac::Key,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    name.push(DnType::OrganizationName, "ec2-kubelet");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Authority {
    /// A new CA (valid ten years) and token key.
    pub fn generate() -> Result<Authority> {
        let key = new_key()?;
        let mut params = ca_params();
        params.not_before = offset_time(now_ms() - CLOCK_SKEW.as_millis() as i64)?;
        params.not_after = offset_time(now_ms() + CA_LIFETIME.as_millis() as i64)?;
        let ca_cert_pem = params.self_signed(&key)?.pem();
        let token_key_bytes: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        Ok(Self::assemble(ca_cert_pem, key, token_key_bytes))
    }

    /// The authority of a Secret's data.
    pub fn from_pem(ca_cert_pem: &str, ca_key_pem: &str, token_key: &[u8]) -> Result<Authority> {
        if token_key.len() < 32 {
            return Err(PkiError::Invalid(format!(
                "{SECRET_TOKEN_KEY}: {} bytes, expected at least 32",
                token_key.len()
            )));
        }
        CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("{SECRET_CERT}: {e}")))?;
        let key =
            KeyPair::from_pem(ca_key_pem).map_err(|e| PkiError::Invalid(format!("{SECRET_KEY}: {e}")))?;
        Ok(Self::assemble(ca_cert_pem.to_string(), key, token_key.to_vec()))
    }

    fn assemble(ca_cert_pem: String, key: KeyPair, token_key_bytes: Vec<u8>) -> Authority {
        Authority {
            ca_cert_pem,
            // The issuer's name and key identifier are the CA certificate's: same parameters,
            // same key.
            issuer: Issuer::new(ca_params(), key),
            token_key: hmac::Key::new(hmac::HMAC_SHA256, &token_key_bytes),
            token_key_bytes,
        }
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// What goes into the CA Secret: certificate, key, token key.
    pub fn secret_data(&self) -> [(&'static str, Vec<u8>); 3] {
        [
            (SECRET_CERT, self.ca_cert_pem.clone().into_bytes()),
            (SECRET_KEY, self.issuer.key().serialize_pem().into_bytes()),
            (SECRET_TOKEN_KEY, self.token_key_bytes.clone()),
        ]
    }

    fn sign(&self, name: &str, public_key: &impl PublicKeyData, ttl: Duration) -> Result<Issued> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Both: agents serve with theirs and present it when renewing; the operator serves the
        // enrollment endpoint with its own and presents it to agents.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = now_ms();
        let not_after = now + ttl.as_millis() as i64;
        params.not_before = offset_time(now - CLOCK_SKEW.as_millis() as i64)?;
        params.not_after = offset_time(not_after)?;
        params.serial_number = Some(rand::random::<u64>().into());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            issued_unix_ms: now,
            not_after_unix_ms: not_after,
        })
    }

    /// The certificate of the agent of `instance_id` for `public_key` (an uncompressed P-256
    /// point), valid for `ttl`.
    pub fn issue_agent(&self, instance_id: &str, public_key: &[u8], ttl: Duration) -> Result<Issued> {
        check_public_key(public_key)?;
        self.sign(&agent_name(instance_id)?, &RawP256(public_key.to_vec()), ttl)
    }

    /// New operator credentials (a fresh key), valid for `ttl`.
    pub fn issue_operator(&self, ttl: Duration) -> Result<Credentials> {
        let key = new_key()?;
        let issued = self.sign(OPERATOR_NAME, &key, ttl)?;
        Ok(Credentials::new(&key, issued))
    }

    fn token_mac(&self, nonce: &str, expires_ms: i64) -> String {
        let tag = hmac::sign(
            &self.token_key,
            format!("{TOKEN_PREFIX}.{nonce}.{expires_ms}").as_bytes(),
        );
        hex(tag.as_ref())
    }

    /// A bootstrap token for the instance tagged with `nonce`, valid for `ttl`.
    pub fn mint_token(&self, nonce: &str, ttl: Duration) -> String {
        let expires = now_ms() + ttl.as_millis() as i64;
        format!(
            "{TOKEN_PREFIX}.{nonce}.{expires}.{}",
            self.token_mac(nonce, expires)
        )
    }

    /// The nonce and expiry of a genuine, unexpired token.
    pub fn check_token(&self, token: &str, now_unix_ms: i64) -> Result<(String, i64)> {
        let mut parts = token.split('.');
        let (Some(TOKEN_PREFIX), Some(nonce), Some(expires), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(PkiError::Token("malformed"));
        };
        let expires: i64 = expires.parse().map_err(|_| PkiError::Token("malformed"))?;
        let mac = unhex(mac).ok_or(PkiError::Token("malformed"))?;
        hmac::verify(
            &self.token_key,
            format!("{TOKEN_PREFIX}.{nonce}.{expires}").as_bytes(),
            &mac,
        )
        .map_err(|_| PkiError::Token("not signed by this cluster's CA Secret"))?;
        if now_unix_ms > expires {
            return Err(PkiError::Token("expired"));
        }
        Ok((nonce.to_string(), expires))
    }
}

/// Refuses what is not an uncompressed ECDSA P-256 point (what agents send).
pub fn check_public_key(public_key: &[u8]) -> Result<()> {
    if public_key.len() != 65 || public_key[0] != 4 {
        return Err(PkiError::Invalid(
            "public_key: expected an uncompressed ECDSA P-256 point (65 bytes, first 0x04)".into(),
        ));
    }
    Ok(())
}

/// A random nonce for a new instance's bootstrap token (also its `enrollment` tag).
pub fn new_nonce() -> String {
    hex(&rand::random::<[u8; 16]>())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The certificates of a PEM bundle as a root store.
pub fn root_store(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| PkiError::Invalid(format!("CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| PkiError::Invalid(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(PkiError::Invalid("CA PEM: no certificate".into()));
    }
    Ok(roots)
}

/// Whether the (already chain-verified) certificate `cert` names `name`.
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&server_name).is_ok())
}

/// A client-certificate verifier that accepts only certificates signed by the CA *and* naming
/// `name`: agents accept the operator and nobody else (not another agent, whose certificate
/// the same CA signed).
#[derive(Debug)]
pub struct RequireName {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    name: String,
}

impl RequireName {
    pub fn new(ca_pem: &str, name: &str) -> Result<Arc<RequireName>> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(ca_pem)?),
            provider(),
        )
        .build()
        .map_err(|e| PkiError::Invalid(format!("client verifier: {e}")))?;
        Ok(Arc::new(RequireName {
            inner,
            name: name.to_string(),
        }))
    }
}

impl rustls::server::danger::ClientCertVerifier for RequireName {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if names(end_entity, &self.name) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server certificate that can be replaced while serving (an agent renews its own).
#[derive(Debug)]
pub struct SwappableCert(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl SwappableCert {
    pub fn new(credentials: &Credentials) -> Result<Arc<SwappableCert>> {
        Ok(Arc::new(SwappableCert(std::sync::RwLock::new(Arc::new(
            credentials.certified_key()?,
        )))))
    }

    pub fn replace(&self, credentials: &Credentials) -> Result<()> {
        let key = Arc::new(credentials.certified_key()?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The agent's TLS server configuration: serves `cert`, accepts only the operator.
pub fn agent_server_config(ca_pem: &str, cert: Arc<SwappableCert>) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Invalid(e.to_string()))?
        .with_client_cert_verifier(RequireName::new(ca_pem, OPERATOR_NAME)?)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connections of `listener` after their TLS handshake, each handshake in its own task (a slow
/// or hostile peer holds up nobody) and bounded in time. Refused handshakes are logged.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    tls_incoming_with(listener, move |_| config.clone())
}

/// [`tls_incoming`] with the configuration `choose` picks for each connection (by the address
/// it was made to, say: one listener serving several identities).
pub fn tls_incoming_with(
    listener: tokio::net::TcpListener,
    choose: impl Fn(&tokio::net::TcpStream) -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut backoff = crate::net::AcceptBackoff::default();
    tokio::spawn(async move {
        loop {
            // The listener closes as soon as nobody takes connections any more.
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = backoff.accept("TLS", || listener.accept()) => accepted,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(choose(&stream));
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::warn!(%peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_bound_to_key_nonce_and_time() {
        let authority = Authority::generate().unwrap();
        let nonce = new_nonce();
        let token = authority.mint_token(&nonce, Duration::from_secs(60));
        assert_eq!(authority.check_token(&token, now_ms()).unwrap().0, nonce);
        // Expired.
        let later = now_ms() + 61_000;
        assert!(matches!(
            authority.check_token(&token, later),
            Err(PkiError::Token("expired"))
        ));
        // Another cluster's key.
        let other = Authority::generate().unwrap();
        assert!(other.check_token(&token, now_ms()).is_err());
        // A changed nonce or expiry breaks the MAC.
        let forged = token.replacen(&nonce, &new_nonce(), 1);
        assert!(authority.check_token(&forged, now_ms()).is_err());
        for bad in [
            "",
            "ekb1",
            "ekb1.a.b.c",
            "ekb1.a.1.zz",
            "x.a.1.00",
            "ekb1.a.1.00.extra",
        ] {
            assert!(authority.check_token(bad, now_ms()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_secret_round_trips_and_signs_verifiable_certificates() {
        let authority = Authority::generate().unwrap();
        let data = authority.secret_data();
        let reloaded = Authority::from_pem(
            std::str::from_utf8(&data[0].1).unwrap(),
            std::str::from_utf8(&data[1].1).unwrap(),
            &data[2].1,
        )
        .unwrap();
        let key = new_key().unwrap();
        let issued = reloaded
            .issue_agent("i-0abc", key.public_key_raw(), Duration::from_secs(60))
            .unwrap();
        let credentials = Credentials::new(&key, issued);
        credentials.certified_key().unwrap();
        let cert = CertificateDer::from_pem_slice(credentials.cert_pem.as_bytes()).unwrap();
        // Chains to the original CA (same name and key), for the instance's name only.
        let roots = root_store(authority.ca_pem()).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
        let name = ServerName::try_from("i-0abc.agent.ec2-kubelet.internal").unwrap();
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .unwrap();
        let other = ServerName::try_from("i-0abd.agent.ec2-kubelet.internal").unwrap();
        assert!(
            verifier
                .verify_server_cert(&cert, &[], &other, &[], UnixTime::now())
                .is_err()
        );
        assert!(names(&cert, "i-0abc.agent.ec2-kubelet.internal"));
        assert!(!names(&cert, OPERATOR_NAME));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let authority = Authority::generate().unwrap();
        let key = new_key().unwrap();
        for id in ["", "I-UPPER", "i-0abc.evil.com", "-i", "i_0", &"a".repeat(64)] {
            assert!(
                authority
                    .issue_agent(id, key.public_key_raw(), Duration::from_secs(1))
                    .is_err(),
                "{id:?}"
            );
        }
        assert!(
            authority
                .issue_agent("i-1", &[4; 10], Duration::from_secs(1))
                .is_err()
        );
        assert!(Authority::from_pem("junk", "junk", &[0; 32]).is_err());
        assert!(Authority::from_pem(authority.ca_pem(), "junk", &[0; 32]).is_err());
        assert!(Authority::from_pem(authority.ca_pem(), &key.serialize_pem(), &[0; 8]).is_err());
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let c = Credentials {
            cert_pem: String::new(),
            key_pem: String::new(),
            issued_unix_ms: 0,
            not_after_unix_ms: 3000,
        };
        assert!(!c.due_for_renewal(1999));
        assert!(c.due_for_renewal(2000));
    }
}
