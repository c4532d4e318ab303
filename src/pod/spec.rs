//! The agent's `PodSpec` for a Kubernetes pod: containers with their environment resolved
//! (values, `valueFrom` ConfigMap/Secret keys and pod fields, `envFrom`), ConfigMap, Secret,
//! downwardAPI and projected volumes as files (a projected `serviceAccountToken` is a token the
//! API server issued for the pod, as the kubelet writes it: every pod of a real cluster has one,
//! `kube-api-access-*`), emptyDir volumes, restart policy, grace period and probes. The
//! ConfigMaps, Secrets and tokens are fetched by the caller (see [`references`] and
//! [`token_requests`]), so this stays a pure function.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, DownwardAPIVolumeFile, Pod, Probe as KubeProbe, ServiceAccountTokenProjection, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use ec2_kubelet_protocol::v1 as proto;

/// ConfigMap and Secret contents in the pod's namespace, by name (values as bytes).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Service-account tokens issued for the pod, by [`TokenRequest`].
    pub tokens: BTreeMap<TokenRequest, String>,
}

/// A token a projected `serviceAccountToken` source asks for: its audience (empty: the API
/// server's own) and lifetime.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenRequest {
    pub audience: String,
    pub expiration_seconds: i64,
}

/// The lifetime of a projected token that names none (the API's default).
const DEFAULT_TOKEN_SECONDS: i64 = 3600;

impl TokenRequest {
    /// The token a projected `serviceAccountToken` source asks for.
    fn of(projection: &ServiceAccountTokenProjection) -> TokenRequest {
        TokenRequest {
            audience: projection.audience.clone().unwrap_or_default(),
            expiration_seconds: projection.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
        }
    }
}

/// The service-account tokens the pod's projected volumes need, to request before [`agent_spec`].
pub fn token_requests(pod: &Pod) -> BTreeSet<TokenRequest> {
    let spec = pod.spec.clone().unwrap_or_default();
    spec.volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|source| source.service_account_token.as_ref())
        .map(TokenRequest::of)
        .collect()
}

/// Where the pod runs, for `fieldRef`s to `status.podIP`, `status.hostIP` and `spec.nodeName`.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub pod_ip: String,
    pub host_ip: String,
}

/// A pod the agent cannot run as written: the field and why (`CreateContainerConfigError`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn error(field: String, message: impl Into<String>) -> SpecError {
    SpecError {
        field,
        message: message.into(),
    }
}

/// The ConfigMaps and Secrets a pod refers to (env, envFrom, volumes), to fetch before [`agent_spec`].
pub fn references(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut config_maps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for container in containers {
        for env in container.env.iter().flatten() {
            if let Some(source) = &env.value_from {
                if let Some(r) = &source.config_map_key_ref {
                    config_maps.insert(r.name.clone());
                }
                if let Some(r) = &source.secret_key_ref {
                    secrets.insert(r.name.clone());
                }
            }
        }
        for from in container.env_from.iter().flatten() {
            if let Some(r) = &from.config_map_ref {
                config_maps.insert(r.name.clone());
            }
            if let Some(r) = &from.secret_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(cm) = &volume.config_map {
            config_maps.insert(cm.name.clone());
        }
        if let Some(secret) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(secret);
        }
        for source in volume.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &source.config_map {
                config_maps.insert(cm.name.clone());
            }
            if let Some(secret) = &source.secret {
                secrets.insert(secret.name.clone());
            }
        }
    }
    (config_maps, secrets)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `metadata.labels['app']` and friends.
fn field_ref(pod: &Pod, placement: &Placement, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let indexed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(|key| map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(value) = indexed("metadata.labels['", &meta.labels) {
        return Some(value);
    }
    if let Some(value) = indexed("metadata.annotations['", &meta.annotations) {
        return Some(value);
    }
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => placement.pod_ip.clone(),
        "status.hostIP" => placement.host_ip.clone(),
        _ => return None,
    })
}

fn container_env(
    pod: &Pod,
    container: &Container,
    field: &str,
    sources: &Sources,
    placement: &Placement,
) -> Result<Vec<proto::EnvVar>, SpecError> {
    let mut env: Vec<proto::EnvVar> = Vec::new();
    let mut set = |name: String, value: String| {
        env.retain(|e| e.name != name);
        env.push(proto::EnvVar { name, value });
    };
    for (i, from) in container.env_from.iter().flatten().enumerate() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (kind, name, optional, map) = if let Some(r) = &from.config_map_ref {
            ("ConfigMap", &r.name, r.optional, sources.config_maps.get(&r.name))
        } else if let Some(r) = &from.secret_ref {
            ("Secret", &r.name, r.optional, sources.secrets.get(&r.name))
        } else {
            continue;
        };
        match map {
            Some(map) => {
                for (key, value) in map {
                    set(format!("{prefix}{key}"), text(value));
                }
            }
            None if optional == Some(true) => {}
            None => {
                return Err(error(
                    format!("{field}.envFrom[{i}]"),
                    format!("{kind} {name:?} not found"),
                ));
            }
        }
    }
    for (i, var) in container.env.iter().flatten().enumerate() {
        let at = format!("{field}.env[{i}]");
        let value = match &var.value_from {
            None => var.value.clone().unwrap_or_default(),
            Some(source) => {
                if let Some(r) = &source.config_map_key_ref {
                    match sources.config_maps.get(&r.name).and_then(|m| m.get(&r.key)) {
                        Some(value) => text(value),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(error(
                                at,
                                format!("key {:?} of ConfigMap {:?} not found", r.key, r.name),
                            ));
                        }
                    }
                } else if let Some(r) = &source.secret_key_ref {
                    match sources.secrets.get(&r.name).and_then(|m| m.get(&r.key)) {
                        Some(value) => text(value),
                        None if r.optional == Some(true) => continue,
                        None => {
                            return Err(error(
                                at,
                                format!("key {:?} of Secret {:?} not found", r.key, r.name),
                            ));
                        }
                    }
                } else if let Some(r) = &source.field_ref {
                    field_ref(pod, placement, &r.field_path).ok_or_else(|| {
                        error(
                            at.clone(),
                            format!("fieldRef {:?} is not supported", r.field_path),
                        )
                    })?
                } else {
                    return Err(error(
                        at,
                        "only configMapKeyRef, secretKeyRef and fieldRef are supported in valueFrom",
                    ));
                }
            }
        };
        set(var.name.clone(), value);
    }
    Ok(env)
}

fn port_number(container: &Container, port: &IntOrString, field: &str) -> Result<i32, SpecError> {
    match port {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| error(field.to_string(), format!("no container port named {name:?}"))),
    }
}

fn probe(
    container: &Container,
    probe: Option<&KubeProbe>,
    field: &str,
) -> Result<Option<proto::Probe>, SpecError> {
    let Some(probe) = probe else {
        return Ok(None);
    };
    use proto::probe::Handler;
    let handler = if let Some(exec) = &probe.exec {
        Handler::Exec(proto::ExecAction {
            command: exec.command.clone().unwrap_or_default(),
        })
    } else if let Some(http) = &probe.http_get {
        Handler::HttpGet(proto::HttpGetAction {
            host: http.host.clone().unwrap_or_default(),
            port: port_number(container, &http.port, &format!("{field}.httpGet.port"))?,
            path: http.path.clone().unwrap_or_else(|| "/".into()),
            scheme: http.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            headers: http
                .http_headers
                .iter()
                .flatten()
                .map(|h| proto::HttpHeader {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
        })
    } else if let Some(tcp) = &probe.tcp_socket {
        Handler::TcpSocket(proto::TcpSocketAction {
            host: tcp.host.clone().unwrap_or_default(),
            port: port_number(container, &tcp.port, &format!("{field}.tcpSocket.port"))?,
        })
    } else {
        return Err(error(
            field.to_string(),
            "only exec, httpGet and tcpSocket probes are supported",
        ));
    };
    Ok(Some(proto::Probe {
        handler: Some(handler),
        initial_delay_seconds: probe.initial_delay_seconds.unwrap_or(0),
        period_seconds: probe.period_seconds.unwrap_or(0),
        timeout_seconds: probe.timeout_seconds.unwrap_or(0),
        success_threshold: probe.success_threshold.unwrap_or(0),
        failure_threshold: probe.failure_threshold.unwrap_or(0),
    }))
}

/// Files of a ConfigMap or Secret volume: every key, or the listed `items` (key -> path, mode).
fn files(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    field: &str,
) -> Result<Vec<proto::File>, SpecError> {
    match items {
        None => Ok(data
            .iter()
            .map(|(key, value)| proto::File {
                path: key.clone(),
                content: value.clone(),
                mode: 0,
            })
            .collect()),
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let content = data.get(&item.key).ok_or_else(|| {
                    error(
                        format!("{field}.items[{i}].key"),
                        format!("key {:?} not found", item.key),
                    )
                })?;
                Ok(proto::File {
                    path: item.path.clone(),
                    content: content.clone(),
                    mode: item.mode.unwrap_or(0) as u32,
                })
            })
            .collect(),
    }
}

/// The files of a ConfigMap (`kind`) volume or projection: `None` when it is missing and optional.
fn object_files(
    kind: &str,
    name: &str,
    data: Option<&BTreeMap<String, Vec<u8>>>,
    optional: Option<bool>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    field: &str,
) -> Result<Vec<proto::File>, SpecError> {
    match data {
        Some(data) => files(data, items, field),
        None if optional == Some(true) => Ok(Vec::new()),
        None => Err(error(field.to_string(), format!("{kind} {name:?} not found"))),
    }
}

/// Files of a downwardAPI volume or projection: pod fields (`fieldRef`) by path.
fn downward_files(
    pod: &Pod,
    placement: &Placement,
    items: &[DownwardAPIVolumeFile],
    field: &str,
) -> Result<Vec<proto::File>, SpecError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{field}.items[{i}]");
            let Some(r) = &item.field_ref else {
                return Err(error(at, "only fieldRef is supported in downwardAPI items"));
            };
            let value = if r.field_path == "metadata.labels" || r.field_path == "metadata.annotations" {
                let map = if r.field_path == "metadata.labels" {
                    &pod.metadata.labels
                } else {
                    &pod.metadata.annotations
                };
                // The kubelet's format: one key="value" per line, sorted, values quoted.
                map.iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect::<String>()
            } else {
                field_ref(pod, placement, &r.field_path).ok_or_else(|| {
                    error(
                        format!("{at}.fieldRef"),
                        format!("fieldRef {:?} is not supported", r.field_path),
                    )
                })?
            };
            Ok(proto::File {
                path: item.path.clone(),
                content: value.into_bytes(),
                mode: item.mode.unwrap_or(0) as u32,
            })
        })
        .collect()
}

/// One volume of the pod as the agent materializes it.
fn volume_source(
    pod: &Pod,
    volume: &Volume,
    field: &str,
    sources: &Sources,
    placement: &Placement,
) -> Result<proto::volume::Source, SpecError> {
    use proto::volume::Source;
    let files_volume = |files, default_mode: Option<i32>| {
        Source::Files(proto::FilesVolume {
            files,
            default_mode: default_mode.unwrap_or(0o644) as u32,
        })
    };
    if volume.empty_dir.is_some() {
        Ok(Source::EmptyDir(proto::EmptyDirVolume {}))
    } else if let Some(cm) = &volume.config_map {
        let files = object_files(
            "ConfigMap",
            &cm.name,
            sources.config_maps.get(&cm.name),
            cm.optional,
            cm.items.as_ref(),
            &format!("{field}.configMap"),
        )?;
        Ok(files_volume(files, cm.default_mode))
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let files = object_files(
            "Secret",
            &name,
            sources.secrets.get(&name),
            secret.optional,
            secret.items.as_ref(),
            &format!("{field}.secret"),
        )?;
        Ok(files_volume(files, secret.default_mode))
    } else if let Some(downward) = &volume.downward_api {
        let items = downward.items.as_deref().unwrap_or_default();
        let files = downward_files(pod, placement, items, &format!("{field}.downwardAPI"))?;
        Ok(files_volume(files, downward.default_mode))
    } else if let Some(projected) = &volume.projected {
        let mut all = Vec::new();
        for (i, source) in projected.sources.iter().flatten().enumerate() {
            let at = format!("{field}.projected.sources[{i}]");
            if let Some(cm) = &source.config_map {
                all.extend(object_files(
                    "ConfigMap",
                    &cm.name,
                    sources.config_maps.get(&cm.name),
                    cm.optional,
                    cm.items.as_ref(),
                    &format!("{at}.configMap"),
                )?);
            } else if let Some(secret) = &source.secret {
                all.extend(object_files(
                    "Secret",
                    &secret.name,
                    sources.secrets.get(&secret.name),
                    secret.optional,
                    secret.items.as_ref(),
                    &format!("{at}.secret"),
                )?);
            } else if let Some(downward) = &source.downward_api {
                let items = downward.items.as_deref().unwrap_or_default();
                all.extend(downward_files(
                    pod,
                    placement,
                    items,
                    &format!("{at}.downwardAPI"),
                )?);
            } else if let Some(token) = &source.service_account_token {
                let value = sources.tokens.get(&TokenRequest::of(token)).ok_or_else(|| {
                    error(
                        format!("{at}.serviceAccountToken"),
                        "no token was issued for the pod's service account",
                    )
                })?;
                all.push(proto::File {
                    path: token.path.clone(),
                    content: value.clone().into_bytes(),
                    mode: 0,
                });
            } else {
                return Err(error(
                    at,
                    "only configMap, secret, downwardAPI and serviceAccountToken projections are supported",
                ));
            }
        }
        Ok(files_volume(all, projected.default_mode))
    } else {
        Err(error(
            field.to_string(),
            "only configMap, secret, downwardAPI, projected and emptyDir volumes are supported",
        ))
    }
}

/// The agent's spec for `pod`.
pub fn agent_spec(pod: &Pod, sources: &Sources, placement: &Placement) -> Result<proto::PodSpec, SpecError> {
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(error(
            "spec.initContainers".into(),
            "init containers are not supported yet",
        ));
    }
    let mut containers = Vec::new();
    for (i, container) in spec.containers.iter().enumerate() {
        let field = format!("spec.containers[{i}]");
        containers.push(proto::ContainerSpec {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            command: container.command.clone().unwrap_or_default(),
            args: container.args.clone().unwrap_or_default(),
            env: container_env(pod, container, &field, sources, placement)?,
            working_dir: container.working_dir.clone().unwrap_or_default(),
            volume_mounts: container
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| proto::VolumeMount {
                    name: m.name.clone(),
                    mount_path: m.mount_path.clone(),
                    sub_path: m.sub_path.clone().unwrap_or_default(),
                    read_only: m.read_only.unwrap_or(false),
                })
                .collect(),
            readiness_probe: probe(
                container,
                container.readiness_probe.as_ref(),
                &format!("{field}.readinessProbe"),
            )?,
            liveness_probe: probe(
                container,
                container.liveness_probe.as_ref(),
                &format!("{field}.livenessProbe"),
            )?,
            startup_probe: probe(
                container,
                container.startup_probe.as_ref(),
                &format!("{field}.startupProbe"),
            )?,
            stdin: container.stdin.unwrap_or(false),
            stdin_once: container.stdin_once.unwrap_or(false),
            tty: container.tty.unwrap_or(false),
        });
    }
    let mut volumes = Vec::new();
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        volumes.push(proto::Volume {
            name: volume.name.clone(),
            source: Some(volume_source(
                pod,
                volume,
                &format!("spec.volumes[{i}]"),
                sources,
                placement,
            )?),
        });
    }
    let restart_policy = match spec.restart_policy.as_deref() {
        Some("Never") => proto::RestartPolicy::Never,
        Some("OnFailure") => proto::RestartPolicy::OnFailure,
        _ => proto::RestartPolicy::Always,
    };
    Ok(proto::PodSpec {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        containers,
        volumes,
        restart_policy: restart_policy as i32,
        termination_grace_period_seconds: spec.termination_grace_period_seconds.unwrap_or(30),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "ip-10-0-1-23.pool",
                "restartPolicy": "OnFailure",
                "containers": [{
                    "name": "app", "image": "local/shell", "command": ["/bin/sh"], "args": ["-c", "env"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                    "env": [
                        {"name": "PLAIN", "value": "1"},
                        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                        {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": true}}},
                    ],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/healthz"}, "periodSeconds": 2},
                }],
                "volumes": [
                    {"name": "config", "configMap": {"name": "settings", "items": [{"key": "mode", "path": "mode.txt"}]}},
                    {"name": "scratch", "emptyDir": {}},
                ],
            },
        }))
        .unwrap()
    }

    fn sources() -> Sources {
        Sources {
            config_maps: BTreeMap::from([(
                "settings".to_string(),
                BTreeMap::from([
                    ("mode".to_string(), b"fast".to_vec()),
                    ("level".to_string(), b"3".to_vec()),
                ]),
            )]),
            secrets: BTreeMap::from([(
                "creds".to_string(),
                BTreeMap::from([("password".to_string(), b"s3cret".to_vec())]),
            )]),
            tokens: BTreeMap::new(),
        }
    }

    /// The volume the ServiceAccount admission plugin adds to every pod of a real cluster.
    #[test]
    fn the_kube_api_access_projection_is_written_as_the_kubelet_writes_it() {
        let mut pod = pod();
        pod.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_value(json!({"name": "kube-api-access-x7k2p", "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ],
            }}))
            .unwrap(),
        ]);
        let wanted = TokenRequest {
            audience: String::new(),
            expiration_seconds: 3607,
        };
        assert_eq!(token_requests(&pod), BTreeSet::from([wanted.clone()]));
        let (config_maps, _) = references(&pod);
        assert!(config_maps.contains("kube-root-ca.crt"));

        let mut sources = sources();
        let missing = agent_spec(&pod, &sources, &Placement::default()).unwrap_err();
        assert_eq!(
            missing.field,
            "spec.volumes[0].projected.sources[0].serviceAccountToken"
        );
        sources.tokens.insert(wanted, "header.payload.signature".into());
        let ca = BTreeMap::from([("ca.crt".to_string(), b"-----BEGIN CERTIFICATE-----".to_vec())]);
        sources.config_maps.insert("kube-root-ca.crt".into(), ca);
        let spec = agent_spec(&pod, &sources, &Placement::default()).unwrap();
        let Some(proto::volume::Source::Files(files)) = &spec.volumes[0].source else {
            panic!("expected files, got {:?}", spec.volumes[0].source);
        };
        let by_path: BTreeMap<&str, &[u8]> = files
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.content.as_slice()))
            .collect();
        assert_eq!(by_path["token"], b"header.payload.signature");
        assert_eq!(by_path["ca.crt"], b"-----BEGIN CERTIFICATE-----");
        assert_eq!(by_path["namespace"], b"apps");
        assert_eq!(files.default_mode, 0o644);
    }

    #[test]
    fn downward_api_volumes_write_labels_as_the_kubelet_does() {
        let mut pod = pod();
        pod.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_value(json!({"name": "info", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                {"path": "cpu", "resourceFieldRef": {"resource": "limits.cpu"}},
            ]}}))
            .unwrap(),
        ]);
        let error = agent_spec(&pod, &sources(), &Placement::default()).unwrap_err();
        assert_eq!(error.field, "spec.volumes[0].downwardAPI.items[2]");
        let volumes = pod.spec.as_mut().unwrap().volumes.as_mut().unwrap();
        volumes[0]
            .downward_api
            .as_mut()
            .unwrap()
            .items
            .as_mut()
            .unwrap()
            .pop();
        let spec = agent_spec(&pod, &sources(), &Placement::default()).unwrap();
        let Some(proto::volume::Source::Files(files)) = &spec.volumes[0].source else {
            panic!("expected files");
        };
        assert_eq!(files.files[0].content, b"app=\"web\"\n");
        assert_eq!(files.files[1].content, b"web");
    }

    #[test]
    fn references_list_what_to_fetch() {
        let (config_maps, secrets) = references(&pod());
        assert_eq!(config_maps, BTreeSet::from(["settings".to_string()]));
        assert_eq!(secrets, BTreeSet::from(["creds".to_string()]));
    }

    #[test]
    fn env_volumes_and_probes_are_resolved() {
        let placement = Placement {
            pod_ip: "10.0.2.7".into(),
            host_ip: "10.0.1.23".into(),
        };
        let spec = agent_spec(&pod(), &sources(), &placement).unwrap();
        assert_eq!(spec.restart_policy, proto::RestartPolicy::OnFailure as i32);
        let env: BTreeMap<String, String> = spec.containers[0]
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        assert_eq!(env["CFG_mode"], "fast");
        assert_eq!(env["CFG_level"], "3");
        assert_eq!(env["FROM_CM"], "fast");
        assert_eq!(env["PASSWORD"], "s3cret");
        assert_eq!(env["POD_NAME"], "web");
        assert_eq!(env["POD_IP"], "10.0.2.7");
        assert_eq!(env["APP"], "web");
        assert!(!env.contains_key("MAYBE"), "an optional missing key is left out");
        match &spec.volumes[0].source {
            Some(proto::volume::Source::Files(files)) => {
                assert_eq!(files.files[0].path, "mode.txt");
                assert_eq!(files.files[0].content, b"fast");
            }
            other => panic!("expected files, got {other:?}"),
        }
        let readiness = spec.containers[0].readiness_probe.clone().unwrap();
        match readiness.handler {
            Some(proto::probe::Handler::HttpGet(http)) => {
                assert_eq!((http.port, http.path.as_str()), (8080, "/healthz"))
            }
            other => panic!("expected httpGet, got {other:?}"),
        }
    }

    #[test]
    fn missing_references_name_the_field() {
        let mut sources = sources();
        sources.secrets.clear();
        let error = agent_spec(&pod(), &sources, &Placement::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "spec.containers[0].env[2]: key \"password\" of Secret \"creds\" not found"
        );
        let mut hostpath = pod();
        hostpath.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_value(json!({"name": "h", "hostPath": {"path": "/"}})).unwrap(),
        ]);
        let error = agent_spec(&hostpath, &self::sources(), &Placement::default()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.volumes[0]: only configMap, secret, downwardAPI, projected and emptyDir")
        );
    }
}
