//! `PauseStrategy`: how a sandbox is frozen and thawed. The default suspends through the
//! Sandbox spec (the pod is deleted); a memory-keeping freeze (CRIU checkpoint, a runtime
//! that pauses VMs) plugs in here without touching the activation layer or the proxy.

use async_trait::async_trait;
use tokio::time::Instant;

use super::api::{ApiSet, Decision};
use super::flavour::Flavour;
use crate::backend::BackendError;

/// Freezes and thaws one sandbox through the cluster.
#[async_trait]
pub trait PauseStrategy: Send + Sync + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// What survives a pause, in words.
    fn keeps(&self) -> &'static str;

    /// Asks the cluster to pause (`true`) or resume (`false`) `sandbox`. Returns when the
    /// request is accepted; the caller waits for the watched state to follow.
    async fn set_paused(
        &self,
        api: &ApiSet,
        sandbox: &str,
        paused: bool,
        deadline: Instant,
    ) -> Result<(), BackendError>;
}

/// Patches `spec.operatingMode` (agent-sandbox) or `spec.paused` (OpenKruise), fenced by
/// resourceVersion. The controller deletes the pod on suspend and creates a new one (new
/// IP, empty memory) on resume; volumes survive.
pub struct SpecSuspend {
    flavour: Flavour,
}

impl SpecSuspend {
    pub fn new(flavour: Flavour) -> SpecSuspend {
        SpecSuspend { flavour }
    }
}

#[async_trait]
impl PauseStrategy for SpecSuspend {
    fn name(&self) -> &'static str {
        "spec-suspend"
    }

    fn keeps(&self) -> &'static str {
        self.flavour.pause_keeps()
    }

    async fn set_paused(
        &self,
        api: &ApiSet,
        sandbox: &str,
        paused: bool,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let flavour = api.flavour;
        api.patch_fenced(&api.sandboxes, sandbox, deadline, |obj| {
            if flavour.sandbox_view(obj).spec_paused == paused {
                Ok(Decision::Skip)
            } else {
                Ok(Decision::Patch(
                    serde_json::json!({"spec": flavour.pause_spec(paused)}),
                ))
            }
        })
        .await
        .map(|_| ())
    }
}
