//! What a kubelet needs from the API server to authenticate and authorize its callers, as a
//! kube-apiserver provides it:
//!
//! - a cluster CA, published as `client-ca-file` in the ConfigMap
//!   `kube-system/extension-apiserver-authentication` (where aggregated API servers and
//!   kubelets-by-convention read it), and a kubelet-client certificate signed by it
//!   (`kube-apiserver-kubelet-client`, group `system:masters`) that the log/exec proxy presents;
//! - `TokenReview` (authentication.k8s.io/v1) for bearer tokens the cluster issued
//!   ([`ClusterAuth::issue_token`], the dev cluster's stand-in for a token file);
//! - `SubjectAccessReview` (authorization.k8s.io/v1), decided by the RBAC objects stored in
//!   the cluster: ClusterRoleBindings, RoleBindings, their roles and rules.
//!
//! The dev cluster's own API stays unauthenticated: these only serve the reviews.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};

use super::error::ApiError;
use super::store::{ListOptions, Store};
use ec2_kubelet::kubelet::auth::{AUTHENTICATION_CONFIG_MAP, CLIENT_CA_KEY};

/// Who the log/exec proxy is to kubelets.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";
/// The group RBAC never denies.
pub const MASTERS: &str = "system:masters";

/// A user as TokenReview and SubjectAccessReview carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// The cluster CA, the kubelet-client identity and the issued tokens.
pub struct ClusterAuth {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    kubelet_client: Arc<rustls::ClientConfig>,
    tokens: Mutex<HashMap<String, User>>,
}

/// A certificate and key, PEM.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClusterAuth {
    pub fn generate() -> Result<ClusterAuth, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "ec2-kubelet-dev cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).map_err(|e| e.to_string())?;
        let issuer = Issuer::new(params, key);
        let client = sign_client(&issuer, KUBELET_CLIENT_USER, Some(MASTERS)).map_err(|e| e.to_string())?;
        let kubelet_client = ec2_kubelet::kubelet::tls::insecure_client_config_with_identity(
            &client.cert_pem,
            &client.key_pem,
        )?;
        Ok(ClusterAuth {
            ca_pem: ca.pem(),
            issuer,
            kubelet_client,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// A client certificate for `user` (CommonName) in `group` (Organization), signed by the
    /// cluster CA, as kube-apiserver's `--client-ca-file` users have.
    pub fn issue_certificate(
        &self,
        user: &str,
        group: Option<&str>,
    ) -> Result<ClientCertificate, rcgen::Error> {
        sign_client(&self.issuer, user, group)
    }

    /// A bearer token TokenReview answers for `user` in `groups` (plus
    /// `system:authenticated`).
    pub fn issue_token(&self, user: &str, groups: &[&str]) -> String {
        let token = format!("dev.{}", ec2_kubelet_protocol::pki::new_nonce());
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        groups.push("system:authenticated".into());
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).insert(
            token.clone(),
            User {
                name: user.into(),
                groups,
            },
        );
        token
    }

    /// The TLS client configuration of the log/exec proxy: presents the kubelet-client
    /// certificate; does not verify kubelets' serving certificates (as kube-apiserver without
    /// `--kubelet-certificate-authority`).
    pub fn kubelet_client(&self) -> Arc<rustls::ClientConfig> {
        self.kubelet_client.clone()
    }

    /// The ConfigMap `kube-system/extension-apiserver-authentication`.
    pub fn config_map(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": AUTHENTICATION_CONFIG_MAP, "namespace": "kube-system"},
            "data": {CLIENT_CA_KEY: self.ca_pem},
        })
    }

    /// Answers a `TokenReview`: the status says whether the token is one the cluster issued,
    /// and whose.
    pub fn token_review(&self, mut review: Value) -> Value {
        let token = text(&review["spec"]["token"]);
        let user = self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned();
        review["status"] = match user {
            Some(user) => json!({
                "authenticated": true,
                "user": {"username": user.name, "groups": user.groups},
            }),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        review
    }
}

fn sign_client(
    issuer: &Issuer<'static, KeyPair>,
    user: &str,
    group: Option<&str>,
) -> Result<ClientCertificate, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, user);
    if let Some(group) = group {
        params.distinguished_name.push(DnType::OrganizationName, group);
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer)?;
    Ok(ClientCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a SubjectAccessReview asks about.
struct Attributes<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    subresource: &'a str,
    name: &'a str,
    namespace: &'a str,
    /// Set for non-resource requests.
    path: Option<&'a str>,
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn rule_allows(rule: &Value, attributes: &Attributes) -> bool {
    let verbs = strings(&rule["verbs"]);
    if !verbs.iter().any(|v| *v == "*" || *v == attributes.verb) {
        return false;
    }
    if let Some(path) = attributes.path {
        return strings(&rule["nonResourceURLs"])
            .iter()
            .any(|url| match url.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => *url == path,
            });
    }
    let groups = strings(&rule["apiGroups"]);
    if !groups.iter().any(|g| *g == "*" || *g == attributes.group) {
        return false;
    }
    let wanted = if attributes.subresource.is_empty() {
        attributes.resource.to_string()
    } else {
        format!("{}/{}", attributes.resource, attributes.subresource)
    };
    let resources = strings(&rule["resources"]);
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == wanted
            || (!attributes.subresource.is_empty()
                && (*r == format!("{}/*", attributes.resource)
                    || *r == format!("*/{}", attributes.subresource)))
    });
    let names = strings(&rule["resourceNames"]);
    resource_ok && (names.is_empty() || names.contains(&attributes.name))
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn subject_matches(subject: &Value, user: &User, binding_namespace: &str) -> bool {
    let name = text(&subject["name"]);
    match text(&subject["kind"]) {
        "User" => name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let namespace = subject["namespace"].as_str().unwrap_or(binding_namespace);
            user.name == format!("system:serviceaccount:{namespace}:{name}")
        }
        _ => false,
    }
}

fn list(store: &Store, resource: &str, namespace: Option<&str>) -> Vec<Value> {
    store
        .find_type("rbac.authorization.k8s.io", "v1", resource)
        .and_then(|rt| store.list(&rt, "v1", namespace, &ListOptions::default()).ok())
        .map(|page| page.items)
        .unwrap_or_default()
}

fn role_rules(store: &Store, role_ref: &Value, namespace: &str) -> Vec<Value> {
    let name = text(&role_ref["name"]);
    let (resource, namespace) = match role_ref["kind"].as_str() {
        Some("Role") => ("roles", Some(namespace)),
        _ => ("clusterroles", None),
    };
    store
        .find_type("rbac.authorization.k8s.io", "v1", resource)
        .and_then(|rt| store.get(&rt, "v1", namespace, name).ok())
        .and_then(|role| role["rules"].as_array().cloned())
        .unwrap_or_default()
}

/// Whether RBAC allows it, and which binding did.
fn decide(store: &Store, user: &User, attributes: &Attributes) -> Option<String> {
    if user.groups.iter().any(|g| g == MASTERS) {
        return Some(format!("member of {MASTERS}"));
    }
    let grants = |binding: &Value, namespace: &str| {
        let bound = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| subject_matches(s, user, namespace));
        bound
            && role_rules(store, &binding["roleRef"], namespace)
                .iter()
                .any(|rule| rule_allows(rule, attributes))
    };
    for binding in list(store, "clusterrolebindings", None) {
        if grants(&binding, "") {
            return Some(format!(
                "ClusterRoleBinding {}",
                text(&binding["metadata"]["name"])
            ));
        }
    }
    if !attributes.namespace.is_empty() {
        for binding in list(store, "rolebindings", Some(attributes.namespace)) {
            if grants(&binding, attributes.namespace) {
                return Some(format!(
                    "RoleBinding {}/{}",
                    attributes.namespace,
                    text(&binding["metadata"]["name"])
                ));
            }
        }
    }
    None
}

/// Answers a `SubjectAccessReview` by the cluster's RBAC objects.
pub fn subject_access_review(store: &Store, mut review: Value) -> Result<Value, ApiError> {
    let spec = &review["spec"];
    let user = User {
        name: text(&spec["user"]).to_string(),
        groups: strings(&spec["groups"]).into_iter().map(String::from).collect(),
    };
    if user.name.is_empty() && user.groups.is_empty() {
        return Err(ApiError::unprocessable(
            "spec.user or spec.groups: at least one is required",
        ));
    }
    let resource = &spec["resourceAttributes"];
    let non_resource = &spec["nonResourceAttributes"];
    let attributes = match (resource.is_object(), non_resource.is_object()) {
        (true, false) => Attributes {
            verb: text(&resource["verb"]),
            group: text(&resource["group"]),
            resource: text(&resource["resource"]),
            subresource: text(&resource["subresource"]),
            name: text(&resource["name"]),
            namespace: text(&resource["namespace"]),
            path: None,
        },
        (false, true) => Attributes {
            verb: text(&non_resource["verb"]),
            group: "",
            resource: "",
            subresource: "",
            name: "",
            namespace: "",
            path: Some(text(&non_resource["path"])),
        },
        _ => {
            return Err(ApiError::unprocessable(
                "spec.resourceAttributes or spec.nonResourceAttributes: exactly one is required",
            ));
        }
    };
    let decision = decide(store, &user, &attributes);
    review["status"] = match decision {
        Some(reason) => json!({"allowed": true, "reason": format!("RBAC: allowed by {reason}")}),
        None => json!({"allowed": false, "reason": ""}),
    };
    Ok(review)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes<'a>(
        verb: &'a str,
        resource: &'a str,
        subresource: &'a str,
        name: &'a str,
    ) -> Attributes<'a> {
        Attributes {
            verb,
            group: "",
            resource,
            subresource,
            name,
            namespace: "",
            path: None,
        }
    }

    #[test]
    fn rules_match_verbs_resources_subresources_and_names() {
        let rule = json!({"apiGroups": [""], "resources": ["nodes/proxy", "nodes/stats"], "verbs": ["get", "create"]});
        assert!(rule_allows(&rule, &attributes("get", "nodes", "proxy", "n1")));
        assert!(rule_allows(&rule, &attributes("create", "nodes", "stats", "n1")));
        assert!(!rule_allows(&rule, &attributes("delete", "nodes", "proxy", "n1")));
        assert!(
            !rule_allows(&rule, &attributes("get", "nodes", "", "n1")),
            "the node itself is another resource"
        );
        assert!(!rule_allows(&rule, &attributes("get", "nodes", "log", "n1")));
        let wildcard =
            json!({"apiGroups": ["*"], "resources": ["nodes/*"], "verbs": ["*"], "resourceNames": ["n2"]});
        assert!(rule_allows(
            &wildcard,
            &attributes("patch", "nodes", "proxy", "n2")
        ));
        assert!(
            !rule_allows(&wildcard, &attributes("patch", "nodes", "proxy", "n1")),
            "only the named node"
        );
        let urls = json!({"nonResourceURLs": ["/healthz", "/metrics/*"], "verbs": ["get"]});
        let path = |p| Attributes {
            path: Some(p),
            ..attributes("get", "", "", "")
        };
        assert!(rule_allows(&urls, &path("/healthz")));
        assert!(rule_allows(&urls, &path("/metrics/cadvisor")));
        assert!(!rule_allows(&urls, &path("/logs")));
    }

    #[test]
    fn tokens_review_as_issued() {
        let auth = ClusterAuth::generate().unwrap();
        let token = auth.issue_token("alice", &["ops"]);
        let review = auth.token_review(json!({"spec": {"token": token}}));
        assert_eq!(review["status"]["authenticated"], true);
        assert_eq!(review["status"]["user"]["username"], "alice");
        assert_eq!(
            review["status"]["user"]["groups"],
            json!(["ops", "system:authenticated"])
        );
        let review = auth.token_review(json!({"spec": {"token": "dev.forged"}}));
        assert_eq!(review["status"]["authenticated"], false);
    }
}
