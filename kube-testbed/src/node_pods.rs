//! Core `v1` Pods as the kubelet sees them: bound to a node (`spec.nodeName`), with a UID
//! and the sandbox controllers' labels, for the node agent's checks.

use serde_json::{Value, json};

use crate::store::{ApiError, ResourceType, Store};

/// Registers `pods` in the core group (`/api/v1/namespaces/{ns}/pods`).
pub fn register(store: &Store) -> usize {
    if let Some(i) = store.find_kind("", "Pod") {
        return i;
    }
    store.register(ResourceType::namespaced("", "v1", "Pod", "pods"))
}

/// What a simulated pod looks like.
#[derive(Debug, Clone, Default)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// `{"name","livenessProbe",...}` objects; one plain container when empty.
    pub containers: Vec<Value>,
    /// `status.podIP` (default `127.0.0.1`).
    pub pod_ip: Option<String>,
    /// `metadata.ownerReferences`.
    pub owners: Vec<Value>,
}

/// Creates a running pod bound to `spec.node`; returns it (its `metadata.uid` is the
/// store's).
pub fn create(store: &Store, spec: &PodSpec<'_>) -> Result<Value, ApiError> {
    let res = register(store);
    let labels: serde_json::Map<String, Value> = spec
        .labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let containers = if spec.containers.is_empty() {
        vec![json!({"name": "sandbox", "image": "agent-activator:dev"})]
    } else {
        spec.containers.clone()
    };
    store.create(
        res,
        spec.namespace,
        json!({
            "metadata": {"name": spec.name, "labels": labels, "ownerReferences": spec.owners},
            "spec": {"nodeName": spec.node, "containers": containers},
        }),
    )?;
    store.update_with(res, spec.namespace, spec.name, Some("status"), |old| {
        let mut new = old.clone();
        let ip = spec.pod_ip.as_deref().unwrap_or("127.0.0.1");
        new["status"] = json!({"phase": "Running", "podIP": ip,
                               "conditions": [{"type": "Ready", "status": "True"}]});
        Ok(new)
    })
}

/// The UID of a pod object.
pub fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Deletes pod `name` only while it is still the pod with `uid` (a newer pod of the same
/// name is left alone).
pub fn delete_if(store: &Store, namespace: &str, name: &str, uid: &str) {
    let res = register(store);
    if store
        .get(res, namespace, name)
        .is_ok_and(|p| p["metadata"]["uid"] == uid)
    {
        let _ = store.delete(res, namespace, name);
    }
}
