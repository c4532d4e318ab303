//! Right-sizing: what a pod needs (its containers' summed requests, falling back to limits,
//! as the scheduler counts them) and the smallest allowed instance type that fits.

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::cloud::InstanceTypeInfo;
use crate::crd::Architecture;

/// Parses a Kubernetes quantity (`500m`, `2`, `1.5Gi`, `4k`, `1e3`) into its value.
pub fn parse_quantity(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (number, suffix) = match suffix.strip_prefix(['e', 'E']) {
        Some(exponent)
            if !exponent.is_empty() && exponent.chars().all(|c| c.is_ascii_digit() || c == '-') =>
        {
            (text, "")
        }
        _ => (number, suffix),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a quantity (e.g. 500m, 2, 1.5Gi)"))?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        other => return Err(format!("{text:?} has an unknown suffix {other:?}")),
    };
    let value = value * multiplier;
    if !value.is_finite() {
        return Err(format!("{text:?} is too large a quantity"));
    }
    Ok(value)
}

/// What a pod asks of its instance.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodNeeds {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
}

impl PodNeeds {
    fn max(self, other: PodNeeds) -> PodNeeds {
        PodNeeds {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
            gpus: self.gpus.max(other.gpus),
        }
    }

    fn add(self, other: PodNeeds) -> PodNeeds {
        PodNeeds {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_bytes: self.memory_bytes + other.memory_bytes,
            gpus: self.gpus + other.gpus,
        }
    }

    /// `1500m CPU, 3Gi memory, 1 GPU` (zeros left out).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.cpu_millis > 0 {
            parts.push(format!("{}m CPU", self.cpu_millis));
        }
        if self.memory_bytes > 0 {
            parts.push(format!("{}Mi memory", self.memory_bytes.div_ceil(1024 * 1024)));
        }
        if self.gpus > 0 {
            parts.push(format!("{} GPU", self.gpus));
        }
        if parts.is_empty() {
            "no resource requests".into()
        } else {
            parts.join(", ")
        }
    }
}

/// One container's needs: its requests, each defaulting to the limit when unset.
fn container_needs(container: &Container, index: &str) -> Result<PodNeeds, String> {
    let resources = container.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let amount = |name: &str| -> Result<f64, String> {
        match requests.get(name).or_else(|| limits.get(name)) {
            Some(q) => parse_quantity(&q.0).map_err(|e| format!("{index}.resources {name}: {e}")),
            None => Ok(0.0),
        }
    };
    Ok(PodNeeds {
        cpu_millis: (amount("cpu")? * 1000.0).ceil() as u64,
        memory_bytes: amount("memory")?.ceil() as u64,
        gpus: amount("nvidia.com/gpu")?.ceil() as u64,
    })
}

/// The pod's effective needs, as the scheduler computes them: the sum over its containers,
/// or the largest init container if that is more.
pub fn pod_needs(pod: &Pod) -> Result<PodNeeds, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut sum = PodNeeds::default();
    for (i, container) in spec.containers.iter().enumerate() {
        sum = sum.add(container_needs(container, &format!("spec.containers[{i}]"))?);
    }
    let mut init = PodNeeds::default();
    for (i, container) in spec.init_containers.unwrap_or_default().iter().enumerate() {
        init = init.max(container_needs(container, &format!("spec.initContainers[{i}]"))?);
    }
    Ok(sum.max(init))
}

fn fits(info: &InstanceTypeInfo, needs: &PodNeeds, arch: Architecture) -> bool {
    u64::from(info.vcpus) * 1000 >= needs.cpu_millis
        && info.memory_mib * 1024 * 1024 >= needs.memory_bytes
        && u64::from(info.gpus) >= needs.gpus
        && info.architectures.iter().any(|a| a == arch.ec2_name())
}

/// The smallest type among `allowed` that fits `needs` on `arch` (fewest GPUs, then vCPUs,
/// then memory, then name), with the reason for the event.
/// Every allowed type that fits, smallest first: the order in which launches fall back when EC2
/// has no capacity for a type.
pub fn candidates<'a>(
    allowed: &'a [InstanceTypeInfo],
    needs: &PodNeeds,
    arch: Architecture,
) -> Vec<&'a InstanceTypeInfo> {
    let mut fitting: Vec<&InstanceTypeInfo> = allowed.iter().filter(|info| fits(info, needs, arch)).collect();
    fitting.sort_by(|a, b| {
        (a.gpus, a.vcpus, a.memory_mib, &a.name).cmp(&(b.gpus, b.vcpus, b.memory_mib, &b.name))
    });
    fitting
}

pub fn smallest_fit<'a>(
    allowed: &'a [InstanceTypeInfo],
    needs: &PodNeeds,
    arch: Architecture,
) -> Result<(&'a InstanceTypeInfo, String), String> {
    match candidates(allowed, needs, arch).first().copied() {
        Some(info) => {
            let why = format!(
                "{}: the smallest allowed type with {} ({} vCPU, {} MiB, {} GPU)",
                info.name,
                needs.describe(),
                info.vcpus,
                info.memory_mib,
                info.gpus
            );
            Ok((info, why))
        }
        None => {
            let names: Vec<&str> = allowed.iter().map(|i| i.name.as_str()).collect();
            Err(format!(
                "no allowed instance type ({}) fits {} on {}",
                names.join(", "),
                needs.describe(),
                arch.ec2_name()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(name: &str, vcpus: u32, memory_mib: u64, gpus: u32) -> InstanceTypeInfo {
        InstanceTypeInfo {
            name: name.into(),
            vcpus,
            memory_mib,
            gpus,
            architectures: vec!["x86_64".into()],
        }
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_quantity("500m").unwrap(), 0.5);
        assert_eq!(parse_quantity("2").unwrap(), 2.0);
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 1.5 * 1024.0 * 1024.0 * 1024.0);
        assert_eq!(parse_quantity("4k").unwrap(), 4000.0);
        assert_eq!(parse_quantity("1e3").unwrap(), 1000.0);
        assert!(parse_quantity("lots").is_err());
        assert!(parse_quantity("3Zi").is_err());
    }

    #[test]
    fn pod_needs_sum_containers_and_respect_init_containers() {
        let pod: Pod = serde_json::from_value(json!({"spec": {
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}}},
            ],
            "initContainers": [{"name": "init", "resources": {"requests": {"cpu": "4"}}}],
        }}))
        .unwrap();
        let needs = pod_needs(&pod).unwrap();
        assert_eq!(
            needs.cpu_millis, 4000,
            "the init container needs more CPU than the sum"
        );
        assert_eq!(needs.memory_bytes, 3 * 1024 * 1024 * 1024);
        assert_eq!(needs.gpus, 1);
        let bad: Pod = serde_json::from_value(json!({"spec": {"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "fast"}}}]}}))
        .unwrap();
        assert!(
            pod_needs(&bad)
                .unwrap_err()
                .starts_with("spec.containers[0].resources cpu:")
        );
    }

    #[test]
    fn the_smallest_fitting_type_wins() {
        let allowed = vec![
            info("m5.xlarge", 4, 16384, 0),
            info("t3.micro", 2, 1024, 0),
            info("t3.medium", 2, 4096, 0),
            info("g5.xlarge", 4, 16384, 1),
        ];
        let needs = PodNeeds {
            cpu_millis: 1500,
            memory_bytes: 3 * 1024 * 1024 * 1024,
            gpus: 0,
        };
        let (chosen, why) = smallest_fit(&allowed, &needs, Architecture::Amd64).unwrap();
        assert_eq!(chosen.name, "t3.medium");
        assert!(why.contains("1500m CPU, 3072Mi memory"), "{why}");
        // The fallback order when EC2 has no capacity: every fitting type, smallest first.
        let order: Vec<&str> = candidates(&allowed, &needs, Architecture::Amd64)
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(order, ["t3.medium", "m5.xlarge", "g5.xlarge"]);
        let gpu = PodNeeds { gpus: 1, ..needs };
        assert_eq!(
            smallest_fit(&allowed, &gpu, Architecture::Amd64).unwrap().0.name,
            "g5.xlarge"
        );
        let huge = PodNeeds {
            cpu_millis: 64_000,
            ..needs
        };
        assert!(
            smallest_fit(&allowed, &huge, Architecture::Amd64)
                .unwrap_err()
                .starts_with("no allowed instance type")
        );
        assert!(
            smallest_fit(&allowed, &needs, Architecture::Arm64).is_err(),
            "architecture must match"
        );
    }
}
