//! A virtual node as the node task and its pod workers share it, and how nodes are named.

use crate::crd::Ec2NodePoolSpec;

/// The namespace of kubelet heartbeat leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// One virtual node as the pool's status describes it: what its task needs to run it.
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualNode {
    pub name: String,
    pub pool: String,
    pub pool_uid: String,
    pub index: i32,
    pub eni_id: String,
    pub private_ip: String,
    pub spec: Ec2NodePoolSpec,
}

/// `ip-10-0-1-23.<pool>`: the node name for an ENI address (a DNS-1123 subdomain).
pub fn node_name(private_ip: &str, pool: &str) -> String {
    format!("ip-{}.{pool}", private_ip.replace(['.', ':'], "-"))
}
