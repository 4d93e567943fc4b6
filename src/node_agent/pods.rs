//! Whether a pod may be frozen by this agent: it exists with the UID the client named, runs
//! on this node, in an allowed namespace, and is a sandbox pod.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::lock::MutexExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use tokio::time::Instant;

/// agent-sandbox labels every pod of a Sandbox with this (value: a hash of the Sandbox name).
/// kubernetes-sigs/agent-sandbox `2fd412d55eca`, controllers/sandbox_controller.go:53
/// (`sandboxLabel`), set on the pod at :998.
pub const AGENT_SANDBOX_POD_LABEL: &str = "agents.x-k8s.io/sandbox-name-hash";
/// OpenKruise agents labels the pods its Sandbox controller creates `created-by=sandbox`.
/// openkruise/agents `0b72c83ae0bc`, pkg/utils/constant.go:45 (`PodLabelCreatedBy`) and :55
/// (`CreatedBySandbox`), set in pkg/controller/sandbox/core/pod_control.go:334.
pub const OPENKRUISE_POD_LABEL: &str = "agents.kruise.io/created-by";
pub const OPENKRUISE_POD_LABEL_VALUE: &str = "sandbox";

/// Most verified pods remembered at once.
const MAX_CACHED: usize = 4096;

/// Why a pod is refused.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("namespace {0:?} is not served by this agent")]
    NamespaceNotAllowed(String),
    #[error("pod {0} not found")]
    NotFound(String),
    #[error("pod {0} has a different UID")]
    UidMismatch(String),
    #[error("pod {0} is not on this node")]
    WrongNode(String),
    #[error("pod {0} is not a sandbox pod")]
    NotSandbox(String),
    #[error("pod {0} is terminating")]
    Terminating(String),
    #[error("the API server could not be asked about the pod: {0}")]
    Unavailable(String),
}

/// Checks pods against the API server, remembering verified ones for `ttl`.
pub struct PodVerifier {
    client: kube::Client,
    node: String,
    namespaces: HashSet<String>,
    ttl: Duration,
    timeout: Duration,
    /// (namespace, name, uid) -> verified until. A std Mutex: no await while held.
    cache: Mutex<HashMap<(String, String, String), Instant>>,
}

impl PodVerifier {
    pub fn new(
        client: kube::Client,
        node: String,
        namespaces: &[String],
        ttl: Duration,
        timeout: Duration,
    ) -> PodVerifier {
        PodVerifier {
            client,
            node,
            namespaces: namespaces.iter().cloned().collect(),
            ttl,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` when `namespace/name` has `uid`, is on this node and is a live sandbox pod.
    /// The namespace is checked before anything is asked.
    pub async fn verify(&self, namespace: &str, name: &str, uid: &str) -> Result<(), PodError> {
        if !self.namespaces.contains(namespace) {
            return Err(PodError::NamespaceNotAllowed(namespace.to_owned()));
        }
        let key = (namespace.to_owned(), name.to_owned(), uid.to_owned());
        let now = Instant::now();
        if self.lock().get(&key).is_some_and(|until| *until > now) {
            return Ok(());
        }
        let what = format!("{namespace}/{name}");
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = tokio::time::timeout(self.timeout, api.get_opt(name))
            .await
            .map_err(|_| PodError::Unavailable("pod lookup timed out".into()))?
            .map_err(|e| PodError::Unavailable(e.to_string()))?
            .ok_or_else(|| PodError::NotFound(what.clone()))?;
        check(&pod, uid, &self.node).map_err(|f| f(what))?;
        if !self.ttl.is_zero() {
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, now + self.ttl);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), Instant>> {
        // Single inserts/clears: the map is consistent even after a panic elsewhere.
        self.cache.lock_recovered()
    }
}

/// The checks on a fetched pod, in the order a client can act on: identity, place, kind.
fn check(pod: &Pod, uid: &str, node: &str) -> Result<(), fn(String) -> PodError> {
    if pod.metadata.uid.as_deref() != Some(uid) {
        return Err(PodError::UidMismatch);
    }
    let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if on_node != Some(node) {
        return Err(PodError::WrongNode);
    }
    if !is_sandbox_pod(pod) {
        return Err(PodError::NotSandbox);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(PodError::Terminating);
    }
    Ok(())
}

/// Whether the pod carries the agent-sandbox or OpenKruise sandbox label.
pub fn is_sandbox_pod(pod: &Pod) -> bool {
    let Some(labels) = pod.metadata.labels.as_ref() else {
        return false;
    };
    labels
        .get(AGENT_SANDBOX_POD_LABEL)
        .is_some_and(|v| !v.is_empty())
        || labels
            .get(OPENKRUISE_POD_LABEL)
            .is_some_and(|v| v == OPENKRUISE_POD_LABEL_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": uid, "labels": labels.iter().cloned()
                .collect::<std::collections::BTreeMap<_, _>>()},
            "spec": {"nodeName": node, "containers": []},
        }))
        .unwrap()
    }

    #[test]
    fn checks_identity_then_place_then_kind() {
        let sb = [(AGENT_SANDBOX_POD_LABEL, "abc")];
        assert!(check(&pod("u1", "n1", &sb), "u1", "n1").is_ok());
        let e = check(&pod("u1", "n1", &sb), "u2", "n1").unwrap_err()("x".into());
        assert!(matches!(e, PodError::UidMismatch(_)));
        let e = check(&pod("u1", "n2", &sb), "u1", "n1").unwrap_err()("x".into());
        assert!(matches!(e, PodError::WrongNode(_)));
        let e = check(&pod("u1", "n1", &[]), "u1", "n1").unwrap_err()("x".into());
        assert!(matches!(e, PodError::NotSandbox(_)));
        let kruise = [(OPENKRUISE_POD_LABEL, "sandbox")];
        assert!(check(&pod("u1", "n1", &kruise), "u1", "n1").is_ok());
        let external = [(OPENKRUISE_POD_LABEL, "external")];
        assert!(!is_sandbox_pod(&pod("u1", "n1", &external)));
    }
}
