//! A pod as its worker keeps it between events.
//!
//! Every pod on a virtual node has a worker for its whole life, and the worker's watch channel
//! holds the latest copy of its pod. Decoded, a small running pod takes about 10 KiB of heap
//! (k8s-openapi's structs are wide: a `Container` alone is 2 KiB before any of its strings);
//! its JSON is about 2 KiB. So the channel holds the JSON, plus the few fields the worker looks
//! at on every event, and a step that needs the whole pod decodes it for as long as it runs.
//! Managed fields are dropped: the worker never reads them, and on a real API server they are
//! often the larger half of the object.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The latest copy of a pod, compact: see the module docs.
#[derive(Clone, Debug)]
pub struct KeptPod {
    namespace: String,
    name: String,
    uid: String,
    deleting: bool,
    json: Arc<[u8]>,
}

impl KeptPod {
    pub fn new(mut pod: Pod) -> KeptPod {
        pod.metadata.managed_fields = None;
        KeptPod {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            // A Pod always encodes (its maps have string keys); an empty copy would fail to
            // decode, loudly, in `pod`.
            json: serde_json::to_vec(&pod).unwrap_or_default().into(),
        }
    }

    /// The whole pod, decoded for the step that needs it.
    pub fn pod(&self) -> Result<Pod, kube::Error> {
        serde_json::from_slice(&self.json).map_err(kube::Error::SerdeError)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Whether the pod is being deleted (it has a `deletionTimestamp`).
    pub fn deleting(&self) -> bool {
        self.deleting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn running_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "annotations": {"ec2-kubelet.io/instance-type": "t3.micro"},
                "labels": {"app": "web"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}]},
            "spec": {"nodeName": "ip-10-0-0-1.web", "restartPolicy": "Always",
                "containers": [{"name": "main", "image": "nginx", "command": ["nginx"],
                    "env": [{"name": "MODE", "value": "prod"}],
                    "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}]},
            "status": {"phase": "Running", "podIP": "10.0.1.23",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "main", "ready": true, "restartCount": 2, "image": "nginx",
                    "imageID": "", "state": {"running": {"startedAt": "2026-12-01T05:00:01Z"}}}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_kept_pod_decodes_to_the_pod_without_its_managed_fields() {
        let pod = running_pod();
        let kept = KeptPod::new(pod.clone());
        assert_eq!(
            (kept.namespace(), kept.name(), kept.uid(), kept.deleting()),
            ("shop", "web-0", "u-1", false)
        );
        let mut expected = pod;
        expected.metadata.managed_fields = None;
        assert_eq!(kept.pod().unwrap(), expected);
    }

    #[test]
    fn a_deleted_pod_is_kept_as_deleting() {
        let mut pod = running_pod();
        pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(KeptPod::new(pod).deleting());
    }
}
