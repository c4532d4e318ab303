//! The operator <-> agent trust model: mutual TLS with certificates from the operator's CA,
//! one-time bootstrap tokens bound to their instance, renewal, and who gets refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ec2_kubelet::cloud::local::LocalCompute;
use ec2_kubelet::cloud::{Compute, Enrollment, Instance, LaunchRequest};
use ec2_kubelet::crd::tags;
use ec2_kubelet::enrollment::EnrollmentServer;
use ec2_kubelet::runtime::Context;
use ec2_kubelet_protocol::pki::{self, Authority, Credentials};
use ec2_kubelet_protocol::v1::agent_client::AgentClient;
use ec2_kubelet_protocol::v1::enrollment_client::EnrollmentClient;
use ec2_kubelet_protocol::v1::{EnrollRequest, PingRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Env {
    _cluster: common::TestCluster,
    client: kube::Client,
    ctx: Arc<Context>,
    compute: Arc<LocalCompute>,
    enrollment: EnrollmentServer,
    _instances: common::LocalInstances,
    _dir: tempfile::TempDir,
}

/// A dev cluster, the local backend, and an operator context with agent TLS set up (the CA
/// Secret created, enrollment served).
async fn start(certificate_ttl_seconds: u32) -> Env {
    let cluster = common::operator_cluster(false).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let (compute, instances) = common::local_compute(dir.path());
    let mut config = common::fast_config();
    config.agent_tls.certificate_ttl_seconds = certificate_ttl_seconds;
    let (ctx, enrollment) =
        ec2_kubelet::operator::context(client.clone(), compute.clone(), config, "security")
            .await
            .unwrap();
    let enrollment = enrollment.expect("agent TLS is on by default");
    Env {
        _cluster: cluster,
        client,
        ctx,
        compute,
        enrollment,
        _instances: instances,
        _dir: dir,
    }
}

impl Env {
    /// Launches an instance as a pod worker would: its agent enrolls with the token of its
    /// user data.
    async fn launch(&self, name: &str) -> (Instance, String) {
        self.launch_with(name, self.ctx.agents.tls().map(|tls| tls.enrollment()))
            .await
    }

    /// Launches an instance whose own agent never enrolls: its user data names an enrollment
    /// URL nobody answers, so the agent keeps retrying (and the instance stays live) without
    /// spending its token. The test enrolls in its place, with a token for the instance's nonce.
    async fn launch_unenrolled(&self, name: &str) -> (Instance, String) {
        let enrollment = self.ctx.agents.tls().map(|tls| Enrollment {
            url: format!("https://127.0.0.1:{}", common::free_port()),
            ..tls.enrollment()
        });
        self.launch_with(name, enrollment).await
    }

    async fn launch_with(&self, name: &str, enrollment: Option<Enrollment>) -> (Instance, String) {
        let request = LaunchRequest {
            pod_uid: format!("uid-{name}"),
            pool: "p".into(),
            node: "n".into(),
            namespace: "default".into(),
            name: name.into(),
            instance_type: "t3.micro".into(),
            image_id: "ami-0123456789abcdef0".into(),
            subnet_id: "subnet-0a".into(),
            agent_port: common::free_port(),
            enrollment,
            ..Default::default()
        };
        let instance = self.compute.launch_instance(&request).await.unwrap();
        let endpoint = self
            .compute
            .agent_endpoint(&instance, request.agent_port)
            .unwrap();
        (instance, endpoint)
    }

    /// The operator's own ping of the agent of `instance_id` at `endpoint`.
    async fn operator_ping(&self, endpoint: &str, instance_id: &str) -> Result<(), String> {
        self.ctx.agents.forget(endpoint, instance_id);
        let channel = self
            .ctx
            .agents
            .connect(endpoint, instance_id, Duration::from_secs(2))
            .await
            .map_err(|e| format!("{e:?}"))?;
        ec2_kubelet::agent_client::for_instance(channel, instance_id)
            .ping(PingRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    fn enroll_url(&self) -> String {
        format!("https://{}", self.enrollment.address)
    }
}

/// A ping of the agent at `endpoint` over TLS trusting `ca_pem`, expecting `instance_id`'s
/// certificate, presenting `identity` (if any).
async fn ping_as(
    endpoint: &str,
    instance_id: &str,
    ca_pem: &str,
    identity: Option<&Credentials>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(pki::agent_name(instance_id).unwrap());
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    }
    let dial = Endpoint::from_shared(endpoint.replacen("http://", "https://", 1))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?;
    ping(dial).await
}

/// A plain-text ping.
async fn ping_plain(endpoint: &str) -> Result<(), String> {
    ping(Endpoint::from_shared(endpoint.to_string()).unwrap()).await
}

/// A ping of the agent `dial` reaches.
async fn ping(dial: Endpoint) -> Result<(), String> {
    let channel = dial
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    AgentClient::new(channel)
        .ping(PingRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Credentials for `instance_id` (or, with `None`, the operator) issued by `authority`.
fn credentials_of(authority: &Authority, instance_id: Option<&str>) -> Credentials {
    match instance_id {
        None => authority.issue_operator(Duration::from_secs(600)).unwrap(),
        Some(id) => {
            let key = pki::new_key().unwrap();
            let issued = authority
                .issue_agent(id, key.public_key_raw(), Duration::from_secs(600))
                .unwrap();
            Credentials::new(&key, issued)
        }
    }
}

async fn enrollment_client(
    url: &str,
    ca_pem: &str,
    identity: Option<&Credentials>,
) -> EnrollmentClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(pki::OPERATOR_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    }
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    EnrollmentClient::new(channel)
}

fn enroll_request(instance_id: &str, token: &str) -> EnrollRequest {
    EnrollRequest {
        instance_id: instance_id.into(),
        bootstrap_token: token.into(),
        public_key: pki::new_key().unwrap().public_key_raw().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_accept_only_the_operator_and_the_operator_only_the_agent_it_dials() {
    let env = start(3600).await;
    let (a, endpoint_a) = env.launch("a").await;
    let (b, endpoint_b) = env.launch("b").await;
    for (instance, endpoint) in [(&a, &endpoint_a), (&b, &endpoint_b)] {
        common::eventually(30, "the agent to enroll and answer the operator", || async {
            env.operator_ping(endpoint, &instance.instance_id).await.ok()
        })
        .await;
    }
    let authority = common::agent_authority(&env.client).await;
    let ca = authority.ca_pem();

    // The operator's certificate is the only way in.
    let operator = credentials_of(&authority, None);
    ping_as(&endpoint_a, &a.instance_id, ca, Some(&operator))
        .await
        .expect("the operator's certificate is accepted");
    let refusals = [
        (
            "no client certificate",
            ping_as(&endpoint_a, &a.instance_id, ca, None).await,
        ),
        (
            "a certificate from another CA",
            ping_as(
                &endpoint_a,
                &a.instance_id,
                ca,
                Some(&credentials_of(&Authority::generate().unwrap(), None)),
            )
            .await,
        ),
        (
            "another instance's certificate",
            ping_as(
                &endpoint_a,
                &a.instance_id,
                ca,
                Some(&credentials_of(&authority, Some(&b.instance_id))),
            )
            .await,
        ),
        (
            "the agent's own certificate",
            ping_as(
                &endpoint_a,
                &a.instance_id,
                ca,
                Some(&credentials_of(&authority, Some(&a.instance_id))),
            )
            .await,
        ),
        ("plain text", ping_plain(&endpoint_a).await),
    ];
    for (who, outcome) in refusals {
        assert!(outcome.is_err(), "{who} must be refused");
    }

    // The operator refuses an agent whose certificate names another instance (B's agent
    // answering where A's is expected), and an agent served by another CA.
    let confused = env.operator_ping(&endpoint_b, &a.instance_id).await;
    assert!(confused.is_err(), "B's agent must not pass for A's");
    let foreign = Authority::generate().unwrap();
    let err = ping_as(&endpoint_a, &a.instance_id, foreign.ca_pem(), Some(&operator)).await;
    assert!(
        err.is_err(),
        "an agent certificate from another CA must not be trusted"
    );
    env.operator_ping(&endpoint_a, &a.instance_id)
        .await
        .expect("the operator still reaches A");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_are_one_time_and_bound_to_their_instance() {
    let env = start(3600).await;
    let (a, endpoint_a) = env.launch("a").await;
    let (b, _) = env.launch("b").await;
    common::eventually(30, "A's agent to enroll", || async {
        env.operator_ping(&endpoint_a, &a.instance_id).await.ok()
    })
    .await;
    let authority = common::agent_authority(&env.client).await;
    let ca = authority.ca_pem().to_string();
    let url = env.enroll_url();
    let token_for = |instance: &Instance| {
        authority.mint_token(instance.tag(tags::ENROLLMENT).unwrap(), Duration::from_secs(600))
    };
    let mut anonymous = enrollment_client(&url, &ca, None).await;
    let refused = |result: Result<tonic::Response<_>, tonic::Status>, code: tonic::Code, says: &str| {
        let status = result.expect_err(says);
        assert_eq!(status.code(), code, "expected {says:?}: {status:?}");
        assert!(status.message().contains(says), "{status:?}");
    };

    use tonic::Code::{InvalidArgument, PermissionDenied, Unauthenticated};
    let foreign = Authority::generate()
        .unwrap()
        .mint_token(b.tag(tags::ENROLLMENT).unwrap(), Duration::from_secs(600));
    let expired = authority.mint_token(b.tag(tags::ENROLLMENT).unwrap(), Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let anonymous_cases = [
        // A's token (already exchanged by A's agent) is spent.
        (
            a.instance_id.as_str(),
            token_for(&a),
            PermissionDenied,
            "already used",
        ),
        // A's token does not get a certificate for B.
        (&b.instance_id, token_for(&a), PermissionDenied, "not issued for"),
        // Tokens not signed with this cluster's key, malformed or expired ones.
        (&b.instance_id, foreign, Unauthenticated, "not signed"),
        (&b.instance_id, "ekb1.x.y.z".into(), Unauthenticated, "malformed"),
        (&b.instance_id, expired, Unauthenticated, "expired"),
        // Instances that are not ours, ids that are not DNS labels.
        (
            "i-0000000000000000",
            token_for(&b),
            PermissionDenied,
            "not a live instance",
        ),
        ("i-1.evil.example", token_for(&b), InvalidArgument, "DNS label"),
        // Renewal needs a client certificate naming the instance.
        (
            &a.instance_id,
            String::new(),
            Unauthenticated,
            "no client certificate",
        ),
    ];
    for (instance_id, token, code, says) in anonymous_cases {
        refused(
            anonymous.enroll(enroll_request(instance_id, &token)).await,
            code,
            says,
        );
    }
    let a_credentials = credentials_of(&authority, Some(&a.instance_id));
    let mut as_a = enrollment_client(&url, &ca, Some(&a_credentials)).await;
    refused(
        as_a.enroll(enroll_request(&b.instance_id, "")).await,
        tonic::Code::PermissionDenied,
        "does not name",
    );
    let renewed = as_a
        .enroll(enroll_request(&a.instance_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.certificate_pem.contains("BEGIN CERTIFICATE"));

    // A malformed request does not spend the token it carries.
    let (c, _) = env.launch_unenrolled("c").await;
    let mut bad_key = enroll_request(&c.instance_id, &token_for(&c));
    bad_key.public_key = vec![4; 12];
    refused(
        anonymous.enroll(bad_key).await,
        tonic::Code::InvalidArgument,
        "P-256",
    );
    let issued = anonymous
        .enroll(enroll_request(&c.instance_id, &token_for(&c)))
        .await
        .expect("C's token, once")
        .into_inner();
    assert!(issued.certificate_pem.contains("BEGIN CERTIFICATE"));
    refused(
        anonymous
            .enroll(enroll_request(&c.instance_id, &token_for(&c)))
            .await,
        tonic::Code::PermissionDenied,
        "already used",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_their_short_lived_certificates_and_reuse_them_across_restarts() {
    let env = start(10).await;
    let authority = common::agent_authority(&env.client).await;
    let (instance, endpoint) = env.launch("renewing").await;
    let id = instance.instance_id.clone();
    // The local backend keeps each instance under <dir>/instances/<id>, its agent's state in
    // state/ (the certificate in state/tls).
    let home = env._dir.path().join("instances").join(&id);
    let stored = |home: &std::path::Path| -> Option<Credentials> {
        let text = std::fs::read_to_string(home.join("state/tls/credentials.json")).ok()?;
        let stored: serde_json::Value = serde_json::from_str(&text).ok()?;
        serde_json::from_value(stored["credentials"].clone()).ok()
    };
    common::eventually(30, "the agent to enroll", || async {
        env.operator_ping(&endpoint, &id).await.ok()?;
        stored(&home)
    })
    .await;
    let first = stored(&home).unwrap();
    assert_eq!(first.not_after_unix_ms - first.issued_unix_ms, 10_000);

    // At two thirds of its lifetime the agent renews (with its certificate: the token is
    // spent), and serves the new certificate to new connections.
    let renewed = common::eventually(20, "a renewal", || async {
        stored(&home).filter(|now| now.cert_pem != first.cert_pem)
    })
    .await;
    assert!(
        renewed.issued_unix_ms >= first.issued_unix_ms + 6_000,
        "renewed at 2/3 of 10 s"
    );
    env.operator_ping(&endpoint, &id)
        .await
        .expect("the operator reaches the renewed agent");

    // Killed and restarted on its state dir, the agent serves its stored certificate. Its token
    // is spent: had it enrolled again, it would have been refused and exited.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.with_extension("json")).unwrap()).unwrap();
    let pid = record["agent_pid"].as_i64().expect("the agent's pid") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let nonce = instance.tag(tags::ENROLLMENT).unwrap();
    let restarted = common::AgentProcess::start_enrolling(&home, &authority, &env.enroll_url(), &id, nonce);
    let endpoint = format!("http://{}", restarted.address);
    common::eventually(30, "the restarted agent to answer", || async {
        env.operator_ping(&endpoint, &id).await.ok()
    })
    .await;

    // The CA Secret holds the CA every replica uses.
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(env.client.clone(), common::OPERATOR_NAMESPACE);
    let data = secrets.get(pki::CA_SECRET).await.unwrap().data.unwrap();
    assert_eq!(data[pki::SECRET_CERT].0, authority.ca_pem().as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_config_maps_never_reach_logs_events_or_tags() {
    use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
    use kube::api::{Api, DeleteParams, PostParams};
    use serde_json::json;

    let secret_value = format!("s3cret-{:016x}", rand::random::<u64>());
    let config_value = format!("c0nfig-{:016x}", rand::random::<u64>());
    let cluster = common::operator_cluster(true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let files = common::RunFiles::new(&cluster, dir.path(), "secrets", "");
    let local = files.local.clone();
    // The real binary at its most verbose, its output kept for the grep.
    let output_file = dir.path().join("operator.log");
    let mut operator = files.spawn("trace", Some(&output_file));

    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "db"}, "stringData": {"password": secret_value}}))
            .unwrap();
    Api::<Secret>::default_namespaced(client.clone())
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let config_map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"mode": config_value}}))
            .unwrap();
    Api::<ConfigMap>::default_namespaced(client.clone())
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    common::local_template_and_pool(&client, "secrets", 1).await;
    // The container checks it got both values (env and the Secret volume) without printing
    // them.
    let check = format!(
        "test \"$PASSWORD\" = '{secret_value}' && test \"$(cat password)\" = '{secret_value}' && test \"$MODE\" = '{config_value}' && sleep 3600"
    );
    let pod = common::virtual_pod(
        "uses-secrets",
        Some("secrets"),
        &["/bin/sh", "-c", &check],
        json!({"spec": {
            "containers": [{"name": "main", "image": "local/shell", "command": ["/bin/sh", "-c", check],
                "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}],
                "volumeMounts": [{"name": "db", "mountPath": "/etc/db"}],
                // Paths a pod names are under the instance's root: the volume is its working dir.
                "workingDir": "/etc/db"}],
            "volumes": [{"name": "db", "secret": {"secretName": "db"}}]}}),
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = common::phase_of(&pods, "uses-secrets", "Running").await;
    // Still running a moment later: the checks passed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = pods.get("uses-secrets").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"), "{status:?}");
    assert_eq!(
        status.container_statuses.unwrap()[0].restart_count,
        0,
        "the container found both values"
    );
    pods.delete("uses-secrets", &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(60, "the pod released", || async {
        pods.get_opt("uses-secrets").await.ok()?.is_none().then_some(())
    })
    .await;
    operator.kill().await.unwrap();
    drop(running);

    // Everything the operator printed, every event, and what the instance was tagged with and
    // its agent logged.
    let mut haystacks = vec![(
        "operator output".to_string(),
        std::fs::read_to_string(&output_file).unwrap(),
    )];
    assert!(haystacks[0].1.len() > 10_000, "trace output was captured");
    let events: Api<Event> = Api::all(client.clone());
    for event in events.list(&Default::default()).await.unwrap().items {
        haystacks.push((
            format!("event {:?}", event.reason),
            format!(
                "{} {}",
                event.message.unwrap_or_default(),
                event.action.unwrap_or_default()
            ),
        ));
    }
    for entry in std::fs::read_dir(local.join("instances")).unwrap() {
        let path = entry.unwrap().path();
        let file = if path.is_dir() {
            path.join("agent.log")
        } else {
            path.clone()
        };
        haystacks.push((
            file.display().to_string(),
            std::fs::read_to_string(&file).unwrap_or_default(),
        ));
    }
    assert!(
        haystacks.len() > 3,
        "{:?}",
        haystacks.iter().map(|h| &h.0).collect::<Vec<_>>()
    );
    for (what, text) in &haystacks {
        for value in [&secret_value, &config_value] {
            assert!(!text.contains(value.as_str()), "{what} contains {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_works_once_across_replicas_and_restarts() {
    let env = start(600).await;
    let (c, _) = env.launch_unenrolled("c").await;
    let authority = common::agent_authority(&env.client).await;
    let ca = authority.ca_pem().to_string();
    let token = authority.mint_token(c.tag(tags::ENROLLMENT).unwrap(), Duration::from_secs(600));
    // A second replica, with its own enrollment endpoint (as behind one Service).
    let second = || async {
        let mut config = common::fast_config();
        config.server.enroll_address = format!("127.0.0.1:{}", common::free_port());
        let compute: Arc<dyn Compute> = env.compute.clone();
        let (ctx, enrollment) =
            ec2_kubelet::operator::context(env.client.clone(), compute, config, "security-b")
                .await
                .unwrap();
        (ctx, enrollment.unwrap())
    };
    let (_b, b_enrollment) = second().await;
    let b_url = format!("https://{}", b_enrollment.address);

    let mut via_a = enrollment_client(&env.enroll_url(), &ca, None).await;
    let issued = via_a
        .enroll(enroll_request(&c.instance_id, &token))
        .await
        .expect("the token, once")
        .into_inner();
    assert!(issued.certificate_pem.contains("BEGIN CERTIFICATE"));
    let refused = |result: Result<tonic::Response<_>, tonic::Status>, who: &str| {
        let status = result.expect_err(who);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{who}: {status:?}");
        assert!(status.message().contains("already used"), "{who}: {status:?}");
    };
    // Replayed at the other replica.
    let mut via_b = enrollment_client(&b_url, &ca, None).await;
    refused(
        via_b.enroll(enroll_request(&c.instance_id, &token)).await,
        "replica B",
    );
    // Replayed after a restart of that replica (nothing of the first one's memory left).
    drop(b_enrollment);
    let (_b2, b2_enrollment) = second().await;
    let mut via_b2 = enrollment_client(&format!("https://{}", b2_enrollment.address), &ca, None).await;
    refused(
        via_b2.enroll(enroll_request(&c.instance_id, &token)).await,
        "restarted replica B",
    );
    // The requester itself may ask again with the same key (the replica that spent its token
    // may have died before answering): it gets a certificate for that key, at any replica.
    let (d, _) = env.launch_unenrolled("d").await;
    let d_token = authority.mint_token(d.tag(tags::ENROLLMENT).unwrap(), Duration::from_secs(600));
    let d_key = pki::new_key().unwrap().public_key_raw().to_vec();
    let with_key = |key: &[u8]| EnrollRequest {
        public_key: key.to_vec(),
        ..enroll_request(&d.instance_id, &d_token)
    };
    via_a.enroll(with_key(&d_key)).await.expect("D's first try");
    via_b2
        .enroll(with_key(&d_key))
        .await
        .expect("D's retry with the same key, at another replica");
    refused(
        via_b2.enroll(enroll_request(&d.instance_id, &d_token)).await,
        "D's token with another key",
    );
    // The record names the instance that spent the token and lasts until the token expires.
    let records: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), common::OPERATOR_NAMESPACE);
    let listed = records
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("{}=true", ec2_kubelet::enrollment::SPENT_TOKEN_LABEL)),
        )
        .await
        .unwrap();
    let spec = listed
        .items
        .iter()
        .filter_map(|l| l.spec.clone())
        .find(|s| s.holder_identity.as_deref() == Some(c.instance_id.as_str()))
        .expect("a record of the spent token");
    assert!(
        (590..=601).contains(&spec.lease_duration_seconds.unwrap()),
        "{spec:?}"
    );
}
