//! Kubelet serving certificates from the cluster (`server.kubeletServing.mode: CSR`), as a
//! kubelet with `serverTLSBootstrap` gets its own: per virtual node, a CertificateSigningRequest
//! to the `kubernetes.io/kubelet-serving` signer (subject `system:node:<node>` in
//! `system:nodes`; the node's name and InternalIPs as SANs; usages digital signature and server
//! auth), approved by the operator itself (`approve`, after checking the request is its own)
//! or by an approver of the cluster's, signed by the cluster's CA.
//!
//! * **Issue** ([`run`], in the replica holding the controller lease): when a node appears or
//!   its address changes, and every 30 s, each virtual
//!   node without a certificate for its current addresses, or past 70% of its certificate's
//!   lifetime (a kubelet renews between 70% and 90%), gets a new key and CSR. The issued chain
//!   and the key go into the Secret `<node>-kubelet-serving` (type `kubernetes.io/tls`, in the
//!   operator's namespace, owned by the Node so it goes with it).
//! * **Serve** ([`Certificates`], in every replica): the kubelet API watches those Secrets and
//!   answers each connection with the certificate of the node whose address the connection was
//!   made to (the API server and metrics-server dial a node's InternalIP, which a TLS client does
//!   not send as SNI). Other connections, and nodes whose certificate is not issued yet, get the
//!   fallback certificate (self-signed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use super::internal_ips;
use crate::crd::labels;
use crate::runtime::Context;

/// The signer a kubelet's serving certificate comes from.
pub const SIGNER: &str = "kubernetes.io/kubelet-serving";
/// Label of the Secrets holding serving certificates (its value: `true`).
pub const SECRET_LABEL: &str = "ec2-kubelet.io/kubelet-serving";
/// Annotation naming the node a Secret's (or CSR's) certificate is for.
pub const NODE_ANNOTATION: &str = "ec2-kubelet.io/node";
const FIELD_MANAGER: &str = "ec2-kubelet-serving";
const PERIOD: Duration = Duration::from_secs(30);
/// How long an issued certificate may take (approval, then the signing controller).
const ISSUE_TIMEOUT: Duration = Duration::from_secs(120);
/// Renewal starts once this share of a certificate's lifetime has passed.
const RENEW_AT: f64 = 0.7;

/// The Secret holding `node`'s serving certificate.
pub fn secret_name(node: &str) -> String {
    format!("{node}-kubelet-serving")
}

/// What an issued certificate covers and when it is valid (Unix seconds).
#[derive(Debug, PartialEq)]
struct Issued {
    ips: Vec<IpAddr>,
    not_before: i64,
    not_after: i64,
}

/// Reads the first certificate of a PEM chain.
fn issued(chain_pem: &[u8]) -> Option<Issued> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(chain_pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let ips = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?)),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Issued {
        ips,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Why `node` (with `ips`) needs a new certificate, given the one it has; `None` when it
/// does not.
fn renewal_reason(current: Option<&Issued>, ips: &[IpAddr], now: i64) -> Option<&'static str> {
    let Some(current) = current else {
        return Some("no certificate yet");
    };
    if ips.iter().any(|ip| !current.ips.contains(ip)) {
        return Some("the node's addresses changed");
    }
    let lifetime = (current.not_after - current.not_before).max(1) as f64;
    if (now - current.not_before) as f64 >= lifetime * RENEW_AT {
        return Some("70% of its lifetime has passed");
    }
    None
}

/// The chain in a serving Secret.
fn secret_chain(secret: &Secret) -> Option<&[u8]> {
    secret.data.as_ref()?.get("tls.crt").map(|b| b.0.as_slice())
}

/// Keeps every virtual node's serving certificate issued and fresh, until the task is dropped.
/// A failing pass is retried later and later (a cluster without the signer, a CSR nobody
/// approves), up to this.
const MAX_RETRY: Duration = Duration::from_secs(300);
/// How long node changes are gathered before the pass they call for.
const COALESCE: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<Context>) {
    // A node that appears or changes address is served at once, not at the next period.
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut addressed = watcher(nodes, watcher::Config::default().labels(labels::POOL))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut seen: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut retry = PERIOD;
    loop {
        let wait = match pass(&ctx).await {
            Ok(()) => {
                retry = PERIOD;
                PERIOD
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?retry, "kubelet serving certificates (nodes serve a self-signed one meanwhile)");
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
        };
        let mut deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                node = addressed.next() => match node {
                    Some(Ok(node)) => {
                        let ips = internal_ips(&node);
                        if !ips.is_empty() && seen.insert(node.name_any(), ips.clone()).as_ref() != Some(&ips) {
                            // Nodes come in bursts (a pool scaled up, the first listing): one
                            // pass a moment later serves them all.
                            deadline = deadline.min(tokio::time::Instant::now() + COALESCE);
                        }
                    }
                    Some(Err(error)) => tracing::debug!(%error, "watching virtual nodes"),
                    None => tokio::time::sleep_until(deadline).await,
                },
            }
        }
    }
}

/// One look at every virtual node: requests what is missing or due, four at a time.
async fn pass(ctx: &Arc<Context>) -> Result<(), String> {
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default().labels(labels::POOL))
        .await
        .map_err(|e| format!("listing nodes: {e}"))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let have: HashMap<String, Secret> = secrets
        .list(&ListParams::default().labels(SECRET_LABEL))
        .await
        .map_err(|e| format!("listing serving certificates: {e}"))?
        .items
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let now = jiff::Timestamp::now().as_second();
    let due: Vec<(Node, Vec<IpAddr>, &'static str)> = nodes
        .items
        .into_iter()
        .filter(|node| node.metadata.deletion_timestamp.is_none())
        .filter_map(|node| {
            let ips = internal_ips(&node);
            if ips.is_empty() {
                return None;
            }
            let current = have
                .get(&secret_name(&node.name_any()))
                .and_then(secret_chain)
                .and_then(issued);
            let reason = renewal_reason(current.as_ref(), &ips, now)?;
            Some((node, ips, reason))
        })
        .collect();
    let requests: Vec<futures::future::BoxFuture<'static, Result<(), String>>> = due
        .into_iter()
        .map(|(node, ips, reason)| {
            let ctx = ctx.clone();
            async move {
                let name = node.name_any();
                tracing::info!(node = %name, reason, "requesting a kubelet serving certificate");
                request(&ctx, &node, &ips)
                    .await
                    .map_err(|e| format!("node {name}: {e}"))
            }
            .boxed()
        })
        .collect();
    // One first: a cluster that cannot issue refuses it, and the others are not tried.
    let mut requests = requests.into_iter();
    if let Some(first) = requests.next() {
        first.await?;
    }
    let results: Vec<Result<(), String>> = futures::stream::iter(requests)
        .buffer_unordered(4)
        .collect()
        .await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, String>>()
        .map(|_| ())
}

/// A new key and CSR for `node`; once issued, its Secret.
async fn request(ctx: &Context, node: &Node, ips: &[IpAddr]) -> Result<(), String> {
    let name = node.name_any();
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.clone()]).map_err(|e| e.to_string())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("certificate request: {e}"))?;
    let csrs: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let mut csr = CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        ..Default::default()
    };
    csr.metadata.generate_name = Some("ec2-kubelet-serving-".into());
    csr.metadata.annotations = Some([(NODE_ANNOTATION.to_string(), name.clone())].into());
    csr.metadata.labels = Some([(SECRET_LABEL.to_string(), "true".to_string())].into());
    let created = csrs
        .create(&PostParams::default(), &csr)
        .await
        .map_err(|e| format!("creating a CertificateSigningRequest: {e}"))?;
    let csr_name = created.name_any();
    if ctx.config.server.kubelet_serving.approve {
        let approval = json!({"status": {"conditions": [{
            "type": "Approved", "status": "True", "reason": "Ec2KubeletServing",
            "message": format!("the serving certificate of virtual node {name}, requested by ec2-kubelet"),
        }]}});
        csrs.patch_subresource(
            "approval",
            &csr_name,
            &PatchParams::default(),
            &Patch::Merge(&approval),
        )
        .await
        .map_err(|e| format!("approving {csr_name}: {e}"))?;
    }
    let chain = issued_chain(&csrs, &csr_name).await?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(&name),
            "namespace": ctx.config.namespace,
            "labels": {SECRET_LABEL: "true"},
            "annotations": {NODE_ANNOTATION: name, "ec2-kubelet.io/csr": csr_name},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name,
                "uid": node.uid().unwrap_or_default(),
            }],
        },
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": ByteString(chain),
            "tls.key": ByteString(key.serialize_pem().into_bytes()),
        },
    }))
    .map_err(|e| e.to_string())?;
    Api::<Secret>::namespaced(ctx.client.clone(), &ctx.config.namespace)
        .patch(
            &secret_name(&name),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| format!("storing the certificate: {e}"))?;
    tracing::info!(node = %name, csr = %csr_name, "kubelet serving certificate issued");
    Ok(())
}

/// Waits for the signer's certificate (or a denial, or a failure) of CSR `name`.
async fn issued_chain(csrs: &Api<CertificateSigningRequest>, name: &str) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + ISSUE_TIMEOUT;
    loop {
        let csr = csrs.get(name).await.map_err(|e| format!("reading {name}: {e}"))?;
        let status = csr.status.unwrap_or_default();
        if let Some(refused) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(format!(
                "{name} {}: {}",
                refused.type_,
                refused.message.clone().unwrap_or_default()
            ));
        }
        if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
            return Ok(certificate.0);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{name} was not issued in {ISSUE_TIMEOUT:?} (is it approved? `kubectl certificate approve {name}`)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The kubelet API's certificates: each node's issued one by address, and the fallback.
pub struct Certificates {
    fallback: Arc<rustls::ServerConfig>,
    client_ca: Option<String>,
    by_ip: RwLock<HashMap<IpAddr, Arc<rustls::ServerConfig>>>,
}

impl Certificates {
    pub fn new(fallback: Arc<rustls::ServerConfig>, client_ca: Option<String>) -> Arc<Certificates> {
        Arc::new(Certificates {
            fallback,
            client_ca,
            by_ip: RwLock::new(HashMap::new()),
        })
    }

    /// The configuration for a connection made to `local`.
    pub fn for_address(&self, local: IpAddr) -> Arc<rustls::ServerConfig> {
        let map = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        map.get(&local.to_canonical())
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }

    /// The addresses `secret` serves and its configuration, if it holds a usable certificate.
    fn entry(&self, secret: &Secret) -> Option<(Vec<IpAddr>, Arc<rustls::ServerConfig>)> {
        let data = secret.data.as_ref()?;
        let (chain, key) = (data.get("tls.crt")?, data.get("tls.key")?);
        let ips = issued(&chain.0)?.ips;
        match super::tls::with_pem_certificate(&chain.0, &key.0, self.client_ca.as_deref()) {
            Ok(config) => Some((ips, config)),
            Err(error) => {
                tracing::warn!(secret = %secret.name_any(), %error, "unusable kubelet serving certificate");
                None
            }
        }
    }

    fn rebuild(&self, secrets: &HashMap<String, (Vec<IpAddr>, Arc<rustls::ServerConfig>)>) {
        let map = secrets
            .values()
            .flat_map(|(ips, config)| ips.iter().map(move |ip| (*ip, config.clone())))
            .collect();
        *self.by_ip.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Follows the serving Secrets of `namespace` until the task is dropped.
    pub async fn watch(self: Arc<Self>, client: kube::Client, namespace: String) {
        let secrets: Api<Secret> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().labels(SECRET_LABEL);
        let mut events = watcher(secrets, config).default_backoff().boxed();
        let mut live: HashMap<String, (Vec<IpAddr>, Arc<rustls::ServerConfig>)> = HashMap::new();
        let mut listing: HashMap<String, (Vec<IpAddr>, Arc<rustls::ServerConfig>)> = HashMap::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(secret)) => {
                    if let Some(entry) = self.entry(&secret) {
                        listing.insert(secret.name_any(), entry);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    live = std::mem::take(&mut listing);
                    self.rebuild(&live);
                }
                Ok(watcher::Event::Apply(secret)) => {
                    match self.entry(&secret) {
                        Some(entry) => live.insert(secret.name_any(), entry),
                        None => live.remove(&secret.name_any()),
                    };
                    self.rebuild(&live);
                }
                Ok(watcher::Event::Delete(secret)) => {
                    live.remove(&secret.name_any());
                    self.rebuild(&live);
                }
                Err(error) => tracing::debug!(%error, "watching kubelet serving certificates"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(ips: &[&str], days: i64) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node-a".to_string()]).unwrap();
        for ip in ips {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(ip.parse().unwrap()));
        }
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = params.not_before + std::time::Duration::from_secs(days as u64 * 86_400);
        params.self_signed(&key).unwrap().pem().into_bytes()
    }

    #[test]
    fn issued_certificates_are_read_for_their_addresses_and_lifetime() {
        let read = issued(&certificate(&["10.0.1.7", "fd00::7"], 10)).unwrap();
        assert_eq!(
            read.ips,
            vec!["10.0.1.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]
        );
        assert_eq!(read.not_after - read.not_before, 10 * 86_400);
        assert_eq!(issued(b"not a certificate"), None);
    }

    #[test]
    fn a_certificate_is_renewed_when_missing_moved_or_70_percent_through() {
        let current = issued(&certificate(&["10.0.1.7"], 10)).unwrap();
        let ip: Vec<IpAddr> = vec!["10.0.1.7".parse().unwrap()];
        let start = current.not_before;
        assert_eq!(renewal_reason(None, &ip, start), Some("no certificate yet"));
        assert_eq!(renewal_reason(Some(&current), &ip, start + 6 * 86_400), None);
        assert_eq!(
            renewal_reason(Some(&current), &ip, start + 7 * 86_400),
            Some("70% of its lifetime has passed")
        );
        let moved: Vec<IpAddr> = vec!["10.0.1.8".parse().unwrap()];
        assert_eq!(
            renewal_reason(Some(&current), &moved, start),
            Some("the node's addresses changed")
        );
    }

    #[test]
    fn connections_get_their_nodes_certificate_or_the_fallback() {
        let config = |ip: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["n".to_string()]).unwrap();
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(ip.parse().unwrap()));
            let cert = params.self_signed(&key).unwrap();
            super::super::tls::with_pem_certificate(
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
                None,
            )
            .unwrap()
        };
        let fallback = config("127.0.0.1");
        let certificates = Certificates::new(fallback.clone(), None);
        let node = config("10.0.1.7");
        let mut secrets = HashMap::new();
        secrets.insert("a".to_string(), (vec!["10.0.1.7".parse().unwrap()], node.clone()));
        certificates.rebuild(&secrets);
        assert!(Arc::ptr_eq(
            &certificates.for_address("10.0.1.7".parse().unwrap()),
            &node
        ));
        // An IPv4 address seen on an IPv6 socket is the same address.
        assert!(Arc::ptr_eq(
            &certificates.for_address("::ffff:10.0.1.7".parse().unwrap()),
            &node
        ));
        assert!(Arc::ptr_eq(
            &certificates.for_address("10.0.1.8".parse().unwrap()),
            &fallback
        ));
    }
}
