//! The EC2 emulator harness: the real aws-sdk-ec2 against moto's server on loopback.

mod common;

use aws_sdk_ec2::types::{Filter, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification};

fn tags(resource: ResourceType, pairs: &[(&str, &str)]) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(resource);
    for (key, value) in pairs {
        spec = spec.tags(Tag::builder().key(*key).value(*value).build());
    }
    spec.build()
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder().name(format!("tag:{key}")).values(value).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_round_trip_through_the_sdk_against_moto() {
    let moto = common::Moto::start();
    let ec2 = moto.ec2_client();

    // DescribeInstanceTypes: the catalogue the operator sizes instances from.
    let types = ec2
        .describe_instance_types()
        .instance_types(InstanceType::T3Micro)
        .send()
        .await
        .unwrap_or_else(|e| panic!("DescribeInstanceTypes: {e:?}\n{}", moto.log()));
    let t3_micro = &types.instance_types()[0];
    assert_eq!(t3_micro.v_cpu_info().and_then(|v| v.default_v_cpus()), Some(2));
    assert_eq!(t3_micro.memory_info().and_then(|m| m.size_in_mib()), Some(1024));

    // A subnet of our own, so addresses are predictable.
    let vpc = ec2.create_vpc().cidr_block("10.42.0.0/16").send().await.unwrap();
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.42.1.0/24")
        .send()
        .await
        .unwrap();
    let subnet_id = subnet.subnet().and_then(|s| s.subnet_id()).unwrap().to_string();

    // CreateNetworkInterface with tags, found again by tag filter.
    let eni = ec2
        .create_network_interface()
        .subnet_id(&subnet_id)
        .description("ec2-kubelet test node")
        .tag_specifications(tags(
            ResourceType::NetworkInterface,
            &[
                ("ec2-kubelet.io/cluster", "test"),
                ("ec2-kubelet.io/pool", "p1"),
                ("ec2-kubelet.io/node-index", "0"),
            ],
        ))
        .send()
        .await
        .unwrap();
    let eni_id = eni
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .unwrap()
        .to_string();
    let found = ec2
        .describe_network_interfaces()
        .filters(tag_filter("ec2-kubelet.io/pool", "p1"))
        .send()
        .await
        .unwrap();
    let found: Vec<_> = found
        .network_interfaces()
        .iter()
        .filter_map(|n| n.network_interface_id())
        .collect();
    assert_eq!(found, [eni_id.as_str()]);
    let none = ec2
        .describe_network_interfaces()
        .filters(tag_filter("ec2-kubelet.io/pool", "other"))
        .send()
        .await
        .unwrap();
    assert!(
        none.network_interfaces().is_empty(),
        "tag filter must exclude other pools"
    );

    // RunInstances with tags, from an image moto knows.
    let images = ec2.describe_images().owners("amazon").send().await.unwrap();
    let image_id = images
        .images()
        .iter()
        .find_map(|i| i.image_id())
        .expect("moto ships images")
        .to_string();
    let run = ec2
        .run_instances()
        .image_id(&image_id)
        .instance_type(InstanceType::T3Micro)
        .subnet_id(&subnet_id)
        .min_count(1)
        .max_count(1)
        .client_token("pod-uid-1234")
        .tag_specifications(tags(
            ResourceType::Instance,
            &[
                ("ec2-kubelet.io/cluster", "test"),
                ("ec2-kubelet.io/pod-uid", "1234"),
            ],
        ))
        .send()
        .await
        .unwrap();
    let instance_id = run.instances()[0].instance_id().unwrap().to_string();

    // DescribeInstances by tag filter finds exactly that instance, with our tags.
    let described = ec2
        .describe_instances()
        .filters(tag_filter("ec2-kubelet.io/pod-uid", "1234"))
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_id(), Some(instance_id.as_str()));
    assert!(
        instances[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some("ec2-kubelet.io/cluster") && t.value() == Some("test"))
    );
    let private_ip = instances[0].private_ip_address().unwrap_or_default();
    assert!(
        private_ip.starts_with("10.42.1."),
        "instance IP {private_ip} is in the subnet"
    );

    // TerminateInstances: the instance ends terminated.
    ec2.terminate_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .unwrap();
    let after = ec2
        .describe_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .unwrap();
    let state = after.reservations()[0].instances()[0]
        .state()
        .and_then(|s| s.name())
        .cloned();
    assert_eq!(state, Some(InstanceStateName::Terminated));
}
