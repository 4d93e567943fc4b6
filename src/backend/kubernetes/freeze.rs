//! `NodeFreeze` (`backend.kubernetes.pause: freeze`): pause freezes the sandbox pod's
//! cgroup in place through the node agent on its node; resume thaws it. Memory, IP and
//! files are kept; the pod takes no CPU while frozen, but its memory is not released.
//!
//! The pod is the Sandbox's namesake with a controller ownerReference to it: agent-sandbox
//! `2fd412d55eca` controllers/sandbox_controller.go:1466-1477 (`Name: sandbox.Name`,
//! `SetControllerReference(sandbox, pod)`), openkruise/agents `0b72c83ae0bc`
//! pkg/controller/sandbox/core/pod_control.go:318-321 (`Name: box.Name`,
//! `NewControllerRef(box, ...)`). Its UID and node come from the pod itself (one `get`).
//!
//! The frozen state lives on the Sandbox as [`FROZEN_ANNOTATION`] (the frozen pod's UID),
//! written only once the agent reports the kernel froze the pod and removed only after it
//! reports the pod thawed, so every replica (and a restarted one) sees frozen sandboxes as
//! paused. A crash between a thaw and the removal leaves a running pod marked frozen: the
//! next resume thaws again (a no-op) and removes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;
use tokio::time::Instant;

use super::api::Decision;
use super::flavour::Flavour;
use super::pause::{PauseContext, PauseStrategy, SpecSuspend};
use super::retry::{self, Failure};
use crate::backend::{BackendError, SandboxId};
use crate::cluster::KubeContext;
use crate::config::KubernetesConfig;
use crate::lock::MutexExt;
use crate::node_agent::client::{AgentLocator, ClientError, NodeAgentClient, PodRef};

/// Annotation on a Sandbox whose pod the node agent froze: the frozen pod's UID.
pub const FROZEN_ANNOTATION: &str = "agent-activator.dev/frozen";

/// Most pods remembered between a pause and its resume (a bound on memory, not on
/// sessions: a forgotten pod is looked up again).
const MAX_REMEMBERED: usize = 65_536;

/// Freezes and thaws sandbox pods through the node agent.
pub struct NodeFreeze {
    flavour: Flavour,
    agents: NodeAgentClient,
    pods: Api<Pod>,
    namespace: String,
    freeze_with_probes: bool,
    /// For a Sandbox whose pod is not frozen (never was, or was suspended instead).
    suspend: SpecSuspend,
    /// Sandbox -> its pod, from the pause, so a thaw costs no lookup. Std mutex: never
    /// held across an await.
    remembered: Mutex<HashMap<String, PodRef>>,
}

impl NodeFreeze {
    pub fn new(kube: &KubeContext, k: &KubernetesConfig, flavour: Flavour) -> NodeFreeze {
        NodeFreeze {
            flavour,
            agents: NodeAgentClient::new(
                kube.client.clone(),
                AgentLocator::from_config(&k.node_agent),
            ),
            pods: Api::namespaced(kube.client.clone(), &kube.namespace),
            namespace: kube.namespace.clone(),
            freeze_with_probes: k.freeze_with_probes,
            suspend: SpecSuspend::new(flavour),
            remembered: Mutex::new(HashMap::new()),
        }
    }

    /// The Sandbox's pod, read from the API server and checked to be controlled by it.
    async fn pod(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<Pod, BackendError> {
        let started = Instant::now();
        let lost = || BackendError::Lost(SandboxId::new(sandbox));
        let sandbox_uid = cx
            .cache
            .read(|st| st.sandbox(sandbox).and_then(|s| s.metadata.uid.clone()))
            .ok_or_else(lost)?;
        let pod = match retry::call(deadline, || self.pods.get(sandbox)).await {
            Ok(p) => p,
            Err(Some(e)) if retry::classify(&e) == Failure::NotFound => return Err(lost()),
            Err(e) => return Err(retry::fail("get the sandbox's pod", started, e)),
        };
        let owned = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.kind == "Sandbox" && o.uid == sandbox_uid);
        if !owned || pod.metadata.deletion_timestamp.is_some() {
            return Err(lost());
        }
        Ok(pod)
    }

    fn pod_ref(&self, sandbox: &str, pod: &Pod) -> Result<PodRef, BackendError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if uid.is_empty() || node.is_empty() {
            return Err(BackendError::ControlPlane(format!(
                "pod {sandbox} has no UID or is not scheduled to a node"
            )));
        }
        Ok(PodRef {
            namespace: self.namespace.clone(),
            name: sandbox.to_owned(),
            uid,
            node,
        })
    }

    fn remember(&self, sandbox: &str, pod: &PodRef) {
        let mut m = self.remembered.lock_recovered();
        if m.len() >= MAX_REMEMBERED {
            m.clear();
        }
        m.insert(sandbox.to_owned(), pod.clone());
    }

    fn forget(&self, sandbox: &str) -> Option<PodRef> {
        self.remembered.lock_recovered().remove(sandbox)
    }

    /// Whether the cache shows `sandbox`'s frozen annotation.
    fn cached_frozen(&self, cx: &PauseContext, sandbox: &str) -> bool {
        cx.cache.read(|st| {
            st.sandbox(sandbox)
                .map(|s| self.flavour.sandbox_view(s).frozen.is_some())
        }) == Some(true)
    }

    /// Writes (`Some(uid)`) or removes (`None`, only while it still names `expect`) the
    /// frozen annotation, fenced by resourceVersion.
    async fn mark(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        value: Option<&str>,
        expect: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        cx.api
            .patch_fenced(&cx.api.sandboxes, sandbox, deadline, |obj| {
                let now = obj
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(FROZEN_ANNOTATION));
                match value {
                    Some(v) if now.map(String::as_str) == Some(v) => Ok(Decision::Skip),
                    Some(v) => Ok(Decision::Patch(
                        json!({"metadata": {"annotations": {FROZEN_ANNOTATION: v}}}),
                    )),
                    None if now.map(String::as_str) != Some(expect) => Ok(Decision::Skip),
                    None => Ok(Decision::Patch(
                        json!({"metadata": {"annotations": {FROZEN_ANNOTATION: null}}}),
                    )),
                }
            })
            .await
            .map(|_| ())
    }
}

/// What an agent failure means for the session.
fn agent_error(sandbox: &str, op: &str, e: ClientError) -> BackendError {
    match e {
        // The pod is gone, going or is another pod now: its memory goes with it.
        ClientError::Refused { ref code, .. }
            if matches!(
                code.as_str(),
                "pod_not_found" | "uid_mismatch" | "pod_terminating" | "cgroup_not_found"
            ) =>
        {
            BackendError::Lost(SandboxId::new(sandbox))
        }
        e => BackendError::ControlPlane(format!("node agent {op} of pod {sandbox}: {e}")),
    }
}

/// Containers whose liveness or startup probe would fail while frozen.
fn probed_containers(pod: &Pod) -> Vec<String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .filter(|c| c.liveness_probe.is_some() || c.startup_probe.is_some())
        .map(|c| c.name.clone())
        .collect()
}

#[async_trait]
impl PauseStrategy for NodeFreeze {
    fn name(&self) -> &'static str {
        "node-freeze"
    }

    fn keeps(&self) -> &'static str {
        "memory, files and the pod IP (the pod is frozen in place; its memory stays allocated)"
    }

    async fn pause(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let pod = self.pod(cx, sandbox, deadline).await?;
        let target = self.pod_ref(sandbox, &pod)?;
        let status = self
            .agents
            .freeze(&target)
            .await
            .map_err(|e| agent_error(sandbox, "freeze", e))?;
        if status.state != "frozen" {
            return Err(BackendError::ControlPlane(format!(
                "node agent reported pod {sandbox} {} after a freeze",
                status.state
            )));
        }
        if let Err(e) = self
            .mark(cx, sandbox, Some(&target.uid), "", deadline)
            .await
        {
            // Unrecorded, the freeze would strand the pod: nobody else would thaw it.
            if let Err(t) = self.agents.thaw(&target).await {
                tracing::warn!(sandbox, "thawing after a failed record: {t}");
            }
            return Err(e);
        }
        self.remember(sandbox, &target);
        Ok(())
    }

    async fn resume(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let flavour = self.flavour;
        let view = cx
            .cache
            .read(|st| st.sandbox(sandbox).map(|s| flavour.sandbox_view(s)))
            .ok_or_else(|| BackendError::Lost(SandboxId::new(sandbox)))?;
        // Our own freeze may not have reached the watch cache yet: the annotation was
        // written a moment ago and a request can ask for the thaw before the watch event
        // arrives (seen in release builds: benches/freeze_path.rs). What this replica froze
        // it thaws; if another replica already thawed it, the agent's thaw is a no-op.
        let remembered = self
            .remembered
            .lock_recovered()
            .get(sandbox)
            .map(|p| p.uid.clone());
        let Some(frozen_uid) = view.frozen.clone().or(remembered) else {
            // Not frozen: running (maybe resumed by another replica) or suspended.
            self.forget(sandbox);
            return self.suspend.resume(cx, sandbox, deadline).await;
        };
        if view.finished || view.deleting {
            return Err(BackendError::Lost(SandboxId::new(sandbox)));
        }
        let target = match self.forget(sandbox).filter(|p| p.uid == frozen_uid) {
            Some(p) => p,
            None => {
                let pod = self.pod(cx, sandbox, deadline).await?;
                self.pod_ref(sandbox, &pod)?
            }
        };
        // A new pod under the same Sandbox: the frozen one (and its memory) is gone.
        if target.uid != frozen_uid {
            return Err(BackendError::Lost(SandboxId::new(sandbox)));
        }
        let status = self
            .agents
            .thaw(&target)
            .await
            .map_err(|e| agent_error(sandbox, "thaw", e))?;
        if status.state != "running" {
            return Err(BackendError::ControlPlane(format!(
                "node agent reported pod {sandbox} {} after a thaw",
                status.state
            )));
        }
        self.mark(cx, sandbox, None, &frozen_uid, deadline).await?;
        cx.cache.address(&view).ok_or_else(|| {
            BackendError::ControlPlane(format!("the Sandbox {sandbox} reports no pod IP"))
        })
    }

    /// Thaws the frozen pod (and drops its mark), then suspends the Sandbox through its
    /// spec: the pod shuts down gracefully and its memory is released.
    async fn deep_pause(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        if self.cached_frozen(cx, sandbox) {
            self.resume(cx, sandbox, deadline).await?;
        }
        self.suspend.pause(cx, sandbox, deadline).await
    }

    /// Thaws a frozen pod before its Sandbox is deleted: frozen, it cannot handle SIGTERM
    /// (cgroup v2 waits out the grace period; under v1 the kill may hang until thawed).
    async fn before_release(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let frozen = self.cached_frozen(cx, sandbox)
            || self.remembered.lock_recovered().contains_key(sandbox);
        if frozen {
            self.resume(cx, sandbox, deadline).await?;
        }
        Ok(())
    }

    /// Refuses pods with liveness or startup probes unless `freeze_with_probes`: a frozen
    /// container fails them and the kubelet restarts it, losing the state a freeze keeps.
    async fn check_claim(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        if self.freeze_with_probes {
            return Ok(());
        }
        let pod = self.pod(cx, sandbox, deadline).await?;
        let probed = probed_containers(&pod);
        if probed.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            sandbox,
            containers = ?probed,
            "refusing the claim: backend.kubernetes.pause is freeze, and a frozen container \
             fails its liveness/startup probes and is restarted (state lost); remove the \
             probes from the template or set backend.kubernetes.freeze_with_probes: true"
        );
        Err(BackendError::StartFailed(format!(
            "pod {sandbox}: containers {probed:?} have liveness or startup probes, which a \
             frozen container fails (backend.kubernetes.pause: freeze; set \
             backend.kubernetes.freeze_with_probes: true to allow)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": containers}}),
        )
        .unwrap()
    }

    #[test]
    fn only_liveness_and_startup_probes_refuse_a_freeze() {
        let p = pod(json!([
            {"name": "a", "readinessProbe": {"httpGet": {"path": "/", "port": 80}}},
            {"name": "b", "livenessProbe": {"httpGet": {"path": "/", "port": 80}}},
            {"name": "c", "startupProbe": {"tcpSocket": {"port": 80}}},
            {"name": "d"},
        ]));
        assert_eq!(probed_containers(&p), vec!["b".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn a_pod_that_is_gone_or_replaced_is_a_loss_other_failures_are_not() {
        let refused = |status, code: &str| ClientError::Refused {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(matches!(
            agent_error("s", "thaw", refused(404, "pod_not_found")),
            BackendError::Lost(_)
        ));
        assert!(matches!(
            agent_error("s", "thaw", refused(409, "uid_mismatch")),
            BackendError::Lost(_)
        ));
        assert!(matches!(
            agent_error("s", "freeze", refused(504, "freeze_timeout")),
            BackendError::ControlPlane(_)
        ));
        assert!(matches!(
            agent_error("s", "freeze", refused(409, "wrong_node")),
            BackendError::ControlPlane(_)
        ));
        assert!(matches!(
            agent_error("s", "freeze", ClientError::NoAgent("n".into())),
            BackendError::ControlPlane(_)
        ));
    }
}
