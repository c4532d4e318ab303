//! Who may call the kubelet API: callers are authenticated and authorized as a kubelet does it
//! (`--client-ca-file`, `--authentication-token-webhook`, `--authorization-mode=Webhook`,
//! `--anonymous-auth=false`):
//!
//! 1. **Authentication.** A client certificate signed by the client CA (the API server's
//!    kubelet-client certificate is) names the user (CommonName) and groups (Organization); else
//!    a bearer token is checked with a `TokenReview`; else the caller is anonymous: 401 unless
//!    `anonymous` is on.
//! 2. **Authorization.** A `SubjectAccessReview` for the verb of the HTTP method on
//!    `nodes/<subresource>` of the node the request is addressed to: `stats` for `/stats/...`,
//!    `log` for `/logs/...`, `metrics` for `/metrics/...`, `proxy` for everything else (exec,
//!    attach, containerLogs). 403 when denied.
//!
//! Results are cached as the kubelet caches them: authenticated tokens 2 minutes, failed ones
//! 10 seconds; allowed decisions 5 minutes, denied ones 30 seconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::header::{AUTHORIZATION, HeaderMap};
use hyper::{Method, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rustls::pki_types::CertificateDer;

use super::Reply;
use crate::config::{KubeletAuthConfig, KubeletAuthorization};

/// Where clusters publish the CA of client certificates (kube-apiserver writes it).
pub const AUTHENTICATION_CONFIG_MAP: &str = "extension-apiserver-authentication";
pub const CLIENT_CA_KEY: &str = "client-ca-file";

const TOKEN_TTL: Duration = Duration::from_secs(120);
const TOKEN_FAILURE_TTL: Duration = Duration::from_secs(10);
const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);
/// Caches are emptied when they grow past this many entries (bounded memory under a flood of
/// distinct tokens).
const CACHE_LIMIT: usize = 4096;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Caller {
    fn anonymous() -> Caller {
        Caller {
            name: "system:anonymous".into(),
            uid: None,
            groups: vec!["system:unauthenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    /// The user a verified client certificate names: CommonName, and each Organization as a
    /// group (plus `system:authenticated`, as the API server adds it). `None` without a
    /// CommonName.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<Caller> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let subject = parsed.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(String::from))
            .collect();
        groups.push("system:authenticated".into());
        Some(Caller {
            name,
            uid: None,
            groups,
            extra: BTreeMap::new(),
        })
    }
}

/// A cache entry: the value and when it stops counting.
struct Cached<T> {
    value: T,
    until: Instant,
}

struct Cache<K, T>(Mutex<HashMap<K, Cached<T>>>);

impl<K: std::hash::Hash + Eq, T: Clone> Cache<K, T> {
    fn new() -> Self {
        Cache(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &K) -> Option<T> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|c| c.until > Instant::now())
            .map(|c| c.value.clone())
    }

    fn put(&self, key: K, value: T, ttl: Duration) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= CACHE_LIMIT {
            map.retain(|_, c| c.until > now);
            if map.len() >= CACHE_LIMIT {
                map.clear();
            }
        }
        map.insert(
            key,
            Cached {
                value,
                until: now + ttl,
            },
        );
    }
}

/// The node subresource and verb a kubelet request is authorized as.
pub fn attributes(method: &Method, path: &str) -> (&'static str, &'static str) {
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    };
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    let subresource = if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else {
        "proxy"
    };
    (verb, subresource)
}

/// Authenticates and authorizes the kubelet API's callers.
pub struct Authenticator {
    client: kube::Client,
    config: KubeletAuthConfig,
    /// By SHA-256 of the token: who it is, or `None` for a refused token.
    tokens: Cache<Vec<u8>, Option<Caller>>,
    /// By caller and attributes: allowed, and the reviewer's reason.
    decisions: Cache<String, (bool, String)>,
}

impl Authenticator {
    pub fn new(client: kube::Client, config: KubeletAuthConfig) -> Authenticator {
        Authenticator {
            client,
            config,
            tokens: Cache::new(),
            decisions: Cache::new(),
        }
    }

    /// The CA client certificates are verified against (PEM): `clientCaFile`, else the
    /// cluster's `kube-system/extension-apiserver-authentication`. `None` (certificates are then
    /// not asked for, with a warning) when that ConfigMap or its key is missing or forbidden;
    /// transient errors are retried for 30 s, then fail the start.
    pub async fn client_ca(&self) -> Result<Option<String>, String> {
        if let Some(path) = &self.config.client_ca_file {
            return std::fs::read_to_string(path)
                .map(Some)
                .map_err(|e| format!("server.kubeletAuth.clientCaFile {}: {e}", path.display()));
        }
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), "kube-system");
        let fallback = "the kubelet API accepts no client certificates (set server.kubeletAuth.clientCaFile)";
        // A transient failure is retried: giving up would silently turn certificates off.
        let read = crate::runtime::backoff::retry_transient(
            "reading the kubelet API's client CA",
            Duration::from_secs(30),
            || config_maps.get_opt(AUTHENTICATION_CONFIG_MAP),
        );
        let map = match read.await {
            Ok(map) => map,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                tracing::warn!(message = %status.message, "reading kube-system/{AUTHENTICATION_CONFIG_MAP}: {fallback}");
                return Ok(None);
            }
            Err(error) => {
                return Err(format!(
                    "reading kube-system/{AUTHENTICATION_CONFIG_MAP} (the client CA of the kubelet API): {error}"
                ));
            }
        };
        let ca = map.and_then(|m| m.data).and_then(|mut d| d.remove(CLIENT_CA_KEY));
        if ca.is_none() {
            tracing::warn!("no {CLIENT_CA_KEY} in kube-system/{AUTHENTICATION_CONFIG_MAP}: {fallback}");
        }
        Ok(ca)
    }

    /// Who is calling: the certificate's user, the token's, or anonymous (if allowed).
    pub(crate) async fn authenticate(
        &self,
        certified: Option<&Caller>,
        headers: &HeaderMap,
    ) -> Result<Caller, Reply> {
        if let Some(caller) = certified {
            return Ok(caller.clone());
        }
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match bearer {
            Some(token) if self.config.token_review => self
                .review_token(token)
                .await?
                .ok_or_else(|| Reply(StatusCode::UNAUTHORIZED, "Unauthorized".into())),
            _ if self.config.anonymous => Ok(Caller::anonymous()),
            _ => Err(Reply(StatusCode::UNAUTHORIZED, "Unauthorized".into())),
        }
    }

    /// Creates a review (`TokenReview`, `SubjectAccessReview`): the API server's answer.
    async fn review<K>(&self, review: &K, what: &str) -> Result<K, Reply>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::<K>::all(self.client.clone())
            .create(&PostParams::default(), review)
            .await
            .map_err(|e| Reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}")))
    }

    async fn review_token(&self, token: &str) -> Result<Option<Caller>, Reply> {
        let key = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
            .as_ref()
            .to_vec();
        if let Some(known) = self.tokens.get(&key) {
            return Ok(known);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = self.review(&review, "reviewing the bearer token").await?;
        let status = answer.status.unwrap_or_default();
        let caller = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => Some(Caller {
                name: user.username.unwrap_or_default(),
                uid: user.uid,
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            }),
            _ => None,
        };
        let ttl = if caller.is_some() {
            TOKEN_TTL
        } else {
            TOKEN_FAILURE_TTL
        };
        self.tokens.put(key, caller.clone(), ttl);
        Ok(caller)
    }

    /// Whether `caller` may `verb` `nodes/<subresource>` of `node`: 403 when not.
    pub(crate) async fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        subresource: &str,
        node: &str,
    ) -> Result<(), Reply> {
        if self.config.authorization == KubeletAuthorization::AlwaysAllow {
            return Ok(());
        }
        let key = format!(
            "{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{verb}\u{0}{subresource}\u{0}{node}",
            caller.name,
            caller.uid.as_deref().unwrap_or_default(),
            caller.groups,
            caller.extra
        );
        let (allowed, reason) = match self.decisions.get(&key) {
            Some(decision) => decision,
            None => {
                let decision = self.review_access(caller, verb, subresource, node).await?;
                let ttl = if decision.0 { ALLOWED_TTL } else { DENIED_TTL };
                self.decisions.put(key, decision.clone(), ttl);
                decision
            }
        };
        if allowed {
            return Ok(());
        }
        let mut message = format!(
            "Forbidden (user={}, verb={verb}, resource=nodes, subresource={subresource})",
            caller.name
        );
        if !reason.is_empty() {
            message.push_str(": ");
            message.push_str(&reason);
        }
        Err(Reply(StatusCode::FORBIDDEN, message))
    }

    async fn review_access(
        &self,
        caller: &Caller,
        verb: &str,
        subresource: &str,
        node: &str,
    ) -> Result<(bool, String), Reply> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.name.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(String::new()),
                    version: Some("v1".into()),
                    resource: Some("nodes".into()),
                    subresource: Some(subresource.into()),
                    name: Some(node.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = self.review(&review, "authorizing the request").await?;
        let status = answer.status.unwrap_or_default();
        Ok((status.allowed, status.reason.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_node_subresources_as_a_kubelet_maps_them() {
        assert_eq!(attributes(&Method::GET, "/stats/summary"), ("get", "stats"));
        assert_eq!(attributes(&Method::GET, "/metrics/resource"), ("get", "metrics"));
        assert_eq!(attributes(&Method::GET, "/logs/messages"), ("get", "log"));
        assert_eq!(
            attributes(&Method::GET, "/containerLogs/default/web/main"),
            ("get", "proxy")
        );
        assert_eq!(
            attributes(&Method::POST, "/exec/default/web/main"),
            ("create", "proxy")
        );
        assert_eq!(
            attributes(&Method::GET, "/statsx"),
            ("get", "proxy"),
            "only whole segments"
        );
    }

    #[test]
    fn a_certificate_names_its_user_and_groups() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver-kubelet-client");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        let cert = params.self_signed(&key).unwrap();
        let caller = Caller::from_certificate(cert.der()).unwrap();
        assert_eq!(caller.name, "kube-apiserver-kubelet-client");
        assert_eq!(caller.groups, ["system:masters", "system:authenticated"]);
        let mut nameless = rcgen::CertificateParams::default();
        nameless.distinguished_name = rcgen::DistinguishedName::new();
        let cert = nameless.self_signed(&key).unwrap();
        assert!(
            Caller::from_certificate(cert.der()).is_none(),
            "no CommonName, no user"
        );
    }
}
