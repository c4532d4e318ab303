//! The `aws` backend: real EC2 through aws-sdk-ec2 (adaptive retry mode, bounded attempts; endpoint overridable,
//! so tests run it against a local EC2 emulator). Idempotency never relies on EC2 alone: every
//! launch first looks the pod's instance up by its `pod-uid` tag, then sends `ClientToken`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceMarketOptionsRequest, InstanceType, MarketType, ResourceType, Tag, TagSpecification,
};

use super::{
    Compute, Eni, EniRequest, Error, ImageInfo, ImageQuery, Instance, InstanceFilter, InstanceState,
    InstanceTypeInfo, LaunchRequest, Result, eni_tags, instance_tags,
};
use crate::crd::{TagMap, tags};

/// Where an instance's agent answers, as `host:port`, for tests whose emulated private IPs
/// must never be dialled (they map instances to loopback agents). `None`: `private_ip:port`.
pub type EndpointResolver = Arc<dyn Fn(&Instance, u16) -> Option<String> + Send + Sync>;

/// Counts of EC2 requests sent, by action (each page of a paginated call counts).
#[derive(Debug, Default, Clone)]
pub struct CallCounter(Arc<Mutex<HashMap<&'static str, u64>>>);

impl CallCounter {
    fn record(&self, action: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(action)
            .or_default() += 1;
    }

    /// Every action sent so far.
    pub fn actions(&self) -> Vec<&'static str> {
        let mut actions: Vec<&'static str> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        actions.sort();
        actions
    }

    /// Requests sent for `action` so far.
    pub fn get(&self, action: &str) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(action)
            .copied()
            .unwrap_or(0)
    }
}

pub struct AwsCompute {
    client: Client,
    cluster: String,
    instance_types: Mutex<HashMap<String, InstanceTypeInfo>>,
    resolver: Option<EndpointResolver>,
    pub calls: CallCounter,
}

/// RunInstances' placement for a template's `placement`.
fn ec2_placement(placement: &crate::crd::Placement) -> aws_sdk_ec2::types::Placement {
    aws_sdk_ec2::types::Placement::builder()
        .tenancy(aws_sdk_ec2::types::Tenancy::from(placement.tenancy.as_str()))
        .set_host_id(placement.host_id.clone())
        .set_host_resource_group_arn(placement.host_resource_group_arn.clone())
        .build()
}

/// The idempotency token of a pod's launch on one instance type (EC2 allows 64 ASCII characters).
fn client_token(pod_uid: &str, instance_type: &str) -> String {
    let mut token = format!("{pod_uid}-{instance_type}");
    token.truncate(64);
    token
}

/// Maps an SDK error to the classified `cloud::Error`.
fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(action: &'static str, error: SdkError<E>) -> Error {
    let (code, message) = match &error {
        SdkError::ServiceError(service) => (
            service.err().code().unwrap_or("").to_string(),
            service.err().message().unwrap_or("").to_string(),
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return Error::Unavailable {
                action: action.into(),
                message: format!("{error:?}"),
            };
        }
        other => (String::new(), format!("{other:?}")),
    };
    let server_error = matches!(&error, SdkError::ServiceError(s) if s.raw().status().is_server_error());
    match code.as_str() {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => Error::Throttled {
            action: action.into(),
        },
        "InsufficientInstanceCapacity" | "InsufficientCapacity" => Error::InsufficientCapacity {
            instance_type: message,
        },
        "InvalidAMIID.NotFound" | "InvalidAMIID.Malformed" | "InvalidAMIID.Unavailable" => {
            Error::ImageNotFound { image_id: message }
        }
        "InvalidSubnetID.NotFound" | "InvalidSubnetID.Malformed" => {
            Error::SubnetNotFound { subnet_id: message }
        }
        "InvalidGroup.NotFound" | "InvalidGroupId.Malformed" => {
            Error::SecurityGroupNotFound { group_id: message }
        }
        "InvalidInstanceType" | "Unsupported" => Error::InstanceTypeNotFound {
            instance_type: message,
        },
        code if code.ends_with(".NotFound") => Error::NotFound { resource: message },
        _ if server_error || code == "InternalError" || code == "ServiceUnavailable" => Error::Unavailable {
            action: action.into(),
            message,
        },
        _ => Error::InvalidParameter {
            action: action.into(),
            message: if code.is_empty() {
                message
            } else {
                format!("{code}: {message}")
            },
        },
    }
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder().name(format!("tag:{key}")).values(value).build()
}

fn tag_specification(resource: ResourceType, tags: &TagMap) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(resource);
    for (key, value) in tags {
        spec = spec.tags(Tag::builder().key(key).value(value).build());
    }
    spec.build()
}

fn tags_of(tags: &[Tag]) -> TagMap {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

fn eni_of(eni: &aws_sdk_ec2::types::NetworkInterface) -> Option<Eni> {
    let tags = tags_of(eni.tag_set());
    Some(Eni {
        eni_id: eni.network_interface_id()?.to_string(),
        private_ip: eni.private_ip_address().unwrap_or("").to_string(),
        subnet_id: eni.subnet_id().unwrap_or("").to_string(),
        pool: tags.get(tags::POOL).cloned().unwrap_or_default(),
        index: tags
            .get(tags::NODE_INDEX)
            .and_then(|i| i.parse().ok())
            .unwrap_or(0),
        tags,
    })
}

fn instance_of(instance: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    use aws_sdk_ec2::types::InstanceStateName as Name;
    let state = match instance.state().and_then(|s| s.name()) {
        Some(Name::Pending) => InstanceState::Pending,
        Some(Name::Running) => InstanceState::Running,
        Some(Name::ShuttingDown) => InstanceState::ShuttingDown,
        Some(Name::Stopping) => InstanceState::Stopping,
        Some(Name::Stopped) => InstanceState::Stopped,
        _ => InstanceState::Terminated,
    };
    Some(Instance {
        instance_id: instance.instance_id()?.to_string(),
        state,
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        private_ip: instance.private_ip_address().map(str::to_string),
        launch_time: instance
            .launch_time()
            .map(|t| t.to_millis().unwrap_or(0))
            .unwrap_or(0),
        tags: tags_of(instance.tags()),
    })
}

/// The operator's retries and timeouts (`ec2Client`) on an EC2 client configuration.
pub fn tune(
    config: aws_sdk_ec2::config::Builder,
    settings: &crate::config::Ec2ClientConfig,
) -> aws_sdk_ec2::config::Builder {
    use aws_sdk_ec2::config::retry::RetryConfig;
    use aws_sdk_ec2::config::timeout::TimeoutConfig;
    let seconds = |s: u32| std::time::Duration::from_secs(u64::from(s.max(1)));
    config
        .retry_config(RetryConfig::adaptive().with_max_attempts(settings.max_attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(seconds(settings.attempt_timeout_seconds))
                .operation_timeout(seconds(settings.operation_timeout_seconds))
                .build(),
        )
}

impl AwsCompute {
    /// A backend for `region`, with credentials from the default chain, and the retries and
    /// timeouts of `settings`.
    pub async fn new(
        cluster: &str,
        region: &str,
        endpoint: Option<&str>,
        settings: &crate::config::Ec2ClientConfig,
    ) -> Self {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        let mut config = tune(aws_sdk_ec2::config::Builder::from(&shared), settings);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        Self::from_client(Client::from_conf(config.build()), cluster, None)
    }

    /// A backend on an existing client (tests point it at the EC2 emulator).
    pub fn from_client(client: Client, cluster: &str, resolver: Option<EndpointResolver>) -> Self {
        AwsCompute {
            client,
            cluster: cluster.to_string(),
            instance_types: Mutex::new(HashMap::new()),
            resolver,
            calls: CallCounter::default(),
        }
    }

    async fn enis_by(&self, filters: Vec<Filter>) -> Result<Vec<Eni>> {
        let mut pages = self
            .client
            .describe_network_interfaces()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let mut enis = Vec::new();
        while let Some(page) = pages.next().await {
            self.calls.record("DescribeNetworkInterfaces");
            let page = page.map_err(|e| classify("DescribeNetworkInterfaces", e))?;
            enis.extend(page.network_interfaces().iter().filter_map(eni_of));
        }
        enis.sort_by_key(|e| e.index);
        Ok(enis)
    }

    async fn instances_by(&self, ids: Option<Vec<String>>, filters: Vec<Filter>) -> Result<Vec<Instance>> {
        let mut pages = self
            .client
            .describe_instances()
            .set_instance_ids(ids)
            .set_filters(if filters.is_empty() { None } else { Some(filters) })
            .into_paginator()
            .send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            self.calls.record("DescribeInstances");
            let page = match page {
                Ok(page) => page,
                Err(e) => match classify("DescribeInstances", e) {
                    Error::NotFound { .. } => return Ok(instances),
                    other => return Err(other),
                },
            };
            instances.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(instance_of),
            );
        }
        Ok(instances)
    }
}

#[async_trait::async_trait]
impl Compute for AwsCompute {
    fn backend(&self) -> &'static str {
        "aws"
    }

    async fn ensure_eni(&self, request: &EniRequest) -> Result<Eni> {
        let index = request.index.to_string();
        let existing = self
            .enis_by(vec![
                tag_filter(tags::CLUSTER, &self.cluster),
                tag_filter(tags::POOL, &request.pool),
                tag_filter(tags::NODE_INDEX, &index),
            ])
            .await?;
        if let Some(eni) = existing.into_iter().next() {
            return Ok(eni);
        }
        let eni_tags = eni_tags(&self.cluster, request);
        self.calls.record("CreateNetworkInterface");
        let created = self
            .client
            .create_network_interface()
            .subnet_id(&request.subnet_id)
            .set_groups(Some(request.security_group_ids.clone()).filter(|g| !g.is_empty()))
            .description(format!(
                "ec2-kubelet virtual node {} of pool {}",
                request.index, request.pool
            ))
            .tag_specifications(tag_specification(ResourceType::NetworkInterface, &eni_tags))
            .send()
            .await
            .map_err(|e| classify("CreateNetworkInterface", e))?;
        created
            .network_interface()
            .and_then(eni_of)
            .ok_or_else(|| Error::Internal("CreateNetworkInterface returned no interface".into()))
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<()> {
        self.calls.record("DeleteNetworkInterface");
        match self
            .client
            .delete_network_interface()
            .network_interface_id(eni_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify("DeleteNetworkInterface", e) {
                Error::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn describe_enis(&self, pool: &str) -> Result<Vec<Eni>> {
        self.enis_by(vec![
            tag_filter(tags::CLUSTER, &self.cluster),
            tag_filter(tags::POOL, pool),
        ])
        .await
    }

    async fn instance_types(&self, names: &[String]) -> Result<Vec<InstanceTypeInfo>> {
        let missing: Vec<String> = {
            let cache = self.instance_types.lock().unwrap_or_else(|p| p.into_inner());
            names
                .iter()
                .filter(|n| !cache.contains_key(*n))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            // A filter (not InstanceTypes) so that unknown names are left out instead of failing the call.
            let mut pages = self
                .client
                .describe_instance_types()
                .filters(
                    Filter::builder()
                        .name("instance-type")
                        .set_values(Some(missing))
                        .build(),
                )
                .into_paginator()
                .send();
            let mut found = Vec::new();
            while let Some(page) = pages.next().await {
                self.calls.record("DescribeInstanceTypes");
                let page = page.map_err(|e| classify("DescribeInstanceTypes", e))?;
                for info in page.instance_types() {
                    let Some(name) = info
                        .instance_type()
                        .map(|t: &InstanceType| t.as_str().to_string())
                    else {
                        continue;
                    };
                    found.push(InstanceTypeInfo {
                        name,
                        vcpus: info.v_cpu_info().and_then(|v| v.default_v_cpus()).unwrap_or(0) as u32,
                        memory_mib: info.memory_info().and_then(|m| m.size_in_mib()).unwrap_or(0) as u64,
                        gpus: info
                            .gpu_info()
                            .map(|g| g.gpus().iter().map(|d| d.count().unwrap_or(0) as u32).sum())
                            .unwrap_or(0),
                        architectures: info
                            .processor_info()
                            .map(|p| {
                                p.supported_architectures()
                                    .iter()
                                    .map(|a| a.as_str().to_string())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
            }
            let mut cache = self.instance_types.lock().unwrap_or_else(|p| p.into_inner());
            for info in found {
                cache.insert(info.name.clone(), info);
            }
        }
        let cache = self.instance_types.lock().unwrap_or_else(|p| p.into_inner());
        Ok(names.iter().filter_map(|n| cache.get(n).cloned()).collect())
    }

    async fn launch_instance(&self, request: &LaunchRequest) -> Result<Instance> {
        // Look up by tag first (unless the caller just did): EC2's ClientToken expires, and
        // emulators ignore it.
        let existing = if request.known_absent {
            Vec::new()
        } else {
            self.instances_by(
                None,
                vec![
                    tag_filter(tags::CLUSTER, &self.cluster),
                    tag_filter(tags::POD_UID, &request.pod_uid),
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .build(),
                ],
            )
            .await?
        };
        if let Some(instance) = existing.into_iter().next() {
            return Ok(instance);
        }
        let instance_tags = instance_tags(&self.cluster, request);
        let mut run = self
            .client
            .run_instances()
            // One token per pod and type: a retry on another type after InsufficientInstanceCapacity
            // must not be taken for a changed repeat of the first request.
            .client_token(client_token(&request.pod_uid, &request.instance_type))
            .image_id(&request.image_id)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .subnet_id(&request.subnet_id)
            .set_security_group_ids(Some(request.security_group_ids.clone()).filter(|g| !g.is_empty()))
            .set_key_name(request.key_name.clone())
            .min_count(1)
            .max_count(1)
            .tag_specifications(tag_specification(ResourceType::Instance, &instance_tags))
            .tag_specifications(tag_specification(ResourceType::Volume, &instance_tags));
        if let Some(profile) = &request.iam_instance_profile {
            let spec = aws_sdk_ec2::types::IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            run = run.iam_instance_profile(spec.build());
        }
        {
            use base64::Engine;
            let bootstrap = super::bootstrap::AgentBootstrap {
                port: request.agent_port,
                enrollment: request.enrollment.clone(),
                ..Default::default()
            };
            let user_data = super::bootstrap::user_data(request.user_data.as_deref(), &bootstrap);
            run = run.user_data(base64::engine::general_purpose::STANDARD.encode(user_data));
        }
        if request.spot {
            run = run.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .build(),
            );
        }
        if let Some(placement) = &request.placement {
            run = run.placement(ec2_placement(placement));
        }
        self.calls.record("RunInstances");
        let output = run.send().await.map_err(|e| match classify("RunInstances", e) {
            Error::InsufficientCapacity { .. } => Error::InsufficientCapacity {
                instance_type: request.instance_type.clone(),
            },
            Error::ImageNotFound { .. } => Error::ImageNotFound {
                image_id: request.image_id.clone(),
            },
            Error::InstanceTypeNotFound { .. } => Error::InstanceTypeNotFound {
                instance_type: request.instance_type.clone(),
            },
            other => other,
        })?;
        output
            .instances()
            .first()
            .and_then(instance_of)
            .ok_or_else(|| Error::Internal("RunInstances returned no instance".into()))
    }

    async fn describe_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        match filter {
            InstanceFilter::Ids(ids) if ids.is_empty() => Ok(Vec::new()),
            InstanceFilter::Ids(ids) => {
                let mut instances = Vec::new();
                for chunk in ids.chunks(1000) {
                    instances.extend(self.instances_by(Some(chunk.to_vec()), Vec::new()).await?);
                }
                Ok(instances)
            }
            InstanceFilter::Pool(pool) => {
                self.instances_by(
                    None,
                    vec![
                        tag_filter(tags::CLUSTER, &self.cluster),
                        tag_filter(tags::POOL, pool),
                    ],
                )
                .await
            }
            InstanceFilter::Cluster => {
                self.instances_by(None, vec![tag_filter(tags::CLUSTER, &self.cluster)])
                    .await
            }
        }
    }

    async fn tag_instance(&self, instance_id: &str, new_tags: &TagMap) -> Result<()> {
        self.calls.record("CreateTags");
        let tags: Vec<Tag> = new_tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        self.client
            .create_tags()
            .resources(instance_id)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| classify("CreateTags", e))?;
        Ok(())
    }

    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<()> {
        for chunk in instance_ids.chunks(1000) {
            self.calls.record("TerminateInstances");
            match self
                .client
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) => match classify("TerminateInstances", e) {
                    Error::NotFound { .. } => {}
                    other => return Err(other),
                },
            }
        }
        Ok(())
    }

    async fn describe_images(&self, query: &ImageQuery) -> Result<Vec<ImageInfo>> {
        let mut request = self.client.describe_images();
        match query {
            // A filter (not ImageIds) so that an unknown id is left out instead of failing the call.
            ImageQuery::Ids(ids) => {
                request = request.filters(
                    Filter::builder()
                        .name("image-id")
                        .set_values(Some(ids.clone()))
                        .build(),
                );
            }
            ImageQuery::Selector {
                owners,
                name,
                tags,
                architecture,
            } => {
                request = request.set_owners(Some(owners.clone()).filter(|o| !o.is_empty()));
                if let Some(name) = name {
                    request = request.filters(Filter::builder().name("name").values(name).build());
                }
                for (key, value) in tags {
                    request = request.filters(tag_filter(key, value));
                }
                if let Some(architecture) = architecture {
                    request = request.filters(
                        Filter::builder()
                            .name("architecture")
                            .values(architecture)
                            .build(),
                    );
                }
                request = request.filters(Filter::builder().name("state").values("available").build());
            }
        }
        self.calls.record("DescribeImages");
        let answer = request.send().await.map_err(|e| classify("DescribeImages", e))?;
        let mut images: Vec<ImageInfo> = answer
            .images()
            .iter()
            .filter_map(|image| {
                Some(ImageInfo {
                    image_id: image.image_id()?.to_string(),
                    name: image.name().unwrap_or_default().to_string(),
                    architecture: image
                        .architecture()
                        .map(|a| a.as_str().to_string())
                        .unwrap_or_default(),
                    creation_date: image.creation_date().unwrap_or_default().to_string(),
                })
            })
            .collect();
        images.sort_by(|a, b| {
            b.creation_date
                .cmp(&a.creation_date)
                .then(a.image_id.cmp(&b.image_id))
        });
        Ok(images)
    }

    async fn existing_subnets(&self, subnet_ids: &[String]) -> Result<Vec<String>> {
        if subnet_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.calls.record("DescribeSubnets");
        let answer = self
            .client
            .describe_subnets()
            .filters(
                Filter::builder()
                    .name("subnet-id")
                    .set_values(Some(subnet_ids.to_vec()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("DescribeSubnets", e))?;
        Ok(answer
            .subnets()
            .iter()
            .filter_map(|s| s.subnet_id().map(String::from))
            .collect())
    }

    async fn existing_security_groups(&self, group_ids: &[String]) -> Result<Vec<String>> {
        if group_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.calls.record("DescribeSecurityGroups");
        let answer = self
            .client
            .describe_security_groups()
            .filters(
                Filter::builder()
                    .name("group-id")
                    .set_values(Some(group_ids.to_vec()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("DescribeSecurityGroups", e))?;
        Ok(answer
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(String::from))
            .collect())
    }

    fn agent_endpoint(&self, instance: &Instance, port: u16) -> Result<String> {
        let ip = instance.private_ip.as_deref().ok_or_else(|| Error::NotFound {
            resource: format!("private IP of {}", instance.instance_id),
        })?;
        Ok(
            match self.resolver.as_ref().and_then(|resolve| resolve(instance, port)) {
                Some(address) => format!("http://{address}"),
                None => format!("http://{ip}:{port}"),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_hosts_map_to_a_host_tenancy_placement() {
        let placement = ec2_placement(&crate::crd::Placement {
            tenancy: crate::crd::Tenancy::Host,
            host_id: Some("h-0123456789abcdef0".into()),
            host_resource_group_arn: None,
        });
        assert_eq!(placement.tenancy(), Some(&aws_sdk_ec2::types::Tenancy::Host));
        assert_eq!(placement.host_id(), Some("h-0123456789abcdef0"));
        assert_eq!(placement.host_resource_group_arn(), None);
    }
    use aws_sdk_ec2::error::ErrorMetadata;
    use aws_sdk_ec2::operation::run_instances::RunInstancesError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;

    fn service_error(status: u16, code: &str) -> SdkError<RunInstancesError, Response> {
        let error = RunInstancesError::generic(ErrorMetadata::builder().code(code).message("detail").build());
        let raw = Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(error, raw)
    }

    #[test]
    fn ec2_error_codes_are_classified() {
        let cases = [
            (503, "RequestLimitExceeded", "Throttled", true),
            (
                500,
                "InsufficientInstanceCapacity",
                "InsufficientInstanceCapacity",
                true,
            ),
            (500, "InternalError", "Unavailable", true),
            (400, "InvalidAMIID.NotFound", "ImageNotFound", false),
            (400, "InvalidSubnetID.NotFound", "SubnetNotFound", false),
            (400, "InvalidGroup.NotFound", "SecurityGroupNotFound", false),
            (400, "InvalidInstanceID.NotFound", "NotFound", false),
            (400, "InvalidParameterCombination", "InvalidParameter", false),
        ];
        for (status, code, reason, retryable) in cases {
            let error = classify("RunInstances", service_error(status, code));
            assert_eq!(error.reason(), reason, "{code}");
            assert_eq!(error.is_retryable(), retryable, "{code}");
        }
    }
}
