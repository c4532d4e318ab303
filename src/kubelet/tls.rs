//! The kubelet API's serving certificate: the PEM files the configuration names (e.g. a Secret
//! mounted by the Helm chart), or a self-signed one made at start. The API server does not
//! verify kubelet serving certificates unless it is given `--kubelet-certificate-authority`,
//! so a self-signed certificate works out of the box; a cluster that verifies them mounts one
//! signed by that authority.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use ec2_kubelet_protocol::pki::provider;

/// A TLS server configuration (HTTP/1.1) for the kubelet API. With `client_ca` (PEM), client
/// certificates are asked for and, when presented, must be signed by it (a caller may instead
/// authenticate with a bearer token, as with a kubelet's `--client-ca-file`).
pub fn server_config(
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (certs, key) = match (cert_file, key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("server.kubeletTlsCertFile {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("server.kubeletTlsKeyFile {}: {e}", key.display()))?;
            (certs, key)
        }
        (None, None) => self_signed()?,
        _ => {
            return Err(
                "server.kubeletTlsCertFile and server.kubeletTlsKeyFile go together: set both or neither"
                    .into(),
            );
        }
    };
    with_certificate(certs, key, client_ca)
}

/// A kubelet API server configuration serving `certs` (a chain) with `key`; client
/// certificates as [`server_config`] says.
pub fn with_certificate(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(pem) => {
            let roots =
                ec2_kubelet_protocol::pki::root_store(pem).map_err(|e| format!("kubelet client CA: {e}"))?;
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("kubelet client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("kubelet serving certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`with_certificate`] from PEM text (a chain and its key).
pub fn with_pem_certificate(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    with_certificate(certs, key, client_ca)
}

/// A self-signed certificate for `ec2-kubelet`, `localhost` and 127.0.0.1.
fn self_signed() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let names = vec!["ec2-kubelet".to_string(), "localhost".into(), "127.0.0.1".into()];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| format!("self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).map_err(|e| e.to_string())?;
    Ok((vec![certified.cert.der().clone()], key))
}

/// A TLS client configuration that accepts any server certificate: what the dev cluster uses
/// to reach kubelets, as an API server without `--kubelet-certificate-authority` does.
pub fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    Arc::new(insecure_client_builder().with_no_client_auth())
}

/// [`insecure_client_config`] presenting a client certificate (PEM chain and key): the API
/// server's kubelet-client identity, or a test's caller.
pub fn insecure_client_config_with_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("client certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("client key: {e}"))?;
    let config = insecure_client_builder()
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("client certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

fn insecure_client_builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyServer(provider.clone()));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
