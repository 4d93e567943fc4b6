//! `PauseStrategy`: how a sandbox is paused and resumed, and when each is complete. The
//! default suspends through the Sandbox spec (the pod is deleted); [`super::freeze`]
//! freezes the pod in place through the node agent. Either plugs in without touching the
//! activation layer or the proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;

use super::api::{ApiSet, Decision};
use super::cache::Cache;
use super::flavour::Flavour;
use crate::backend::{BackendError, SandboxId};

/// What a strategy works with: the API handles and the watch-fed cache of this backend.
#[derive(Clone)]
pub struct PauseContext {
    pub(super) api: ApiSet,
    pub(super) cache: Arc<Cache>,
    /// `backend.kubernetes.unschedulable_wait`: how long a resumed pod may stay
    /// Unschedulable before the resume is 503 `no_capacity`.
    pub(super) unschedulable_wait: std::time::Duration,
}

/// Pauses and resumes one sandbox through the cluster.
#[async_trait]
pub trait PauseStrategy: Send + Sync + 'static {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// What survives a pause, in words.
    fn keeps(&self) -> &'static str;

    /// Pauses `sandbox`; returns once the pause is complete (the caller has already
    /// fenced the decision against other replicas).
    async fn pause(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError>;

    /// Resumes `sandbox`; returns its endpoint once it can take traffic.
    async fn resume(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError>;

    /// The deep idle tier for a paused `sandbox`: release its memory. The default does
    /// nothing (a suspended sandbox holds none).
    async fn deep_pause(
        &self,
        _cx: &PauseContext,
        _sandbox: &str,
        _deadline: Instant,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Called before the session's Sandbox is deleted: whatever makes a deletion slow
    /// (a frozen pod) is undone. The default does nothing.
    async fn before_release(
        &self,
        _cx: &PauseContext,
        _sandbox: &str,
        _deadline: Instant,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether a freshly claimed `sandbox` can be paused this way; an error refuses the
    /// claim (it is released).
    async fn check_claim(
        &self,
        _cx: &PauseContext,
        _sandbox: &str,
        _deadline: Instant,
    ) -> Result<(), BackendError> {
        Ok(())
    }
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

#[async_trait]
impl PauseStrategy for SpecSuspend {
    fn name(&self) -> &'static str {
        "spec-suspend"
    }

    fn keeps(&self) -> &'static str {
        self.flavour.pause_keeps()
    }

    /// Done when the pod is gone (agent-sandbox Suspended=True/PodTerminated, or no pod IP
    /// left; Ready=False alone comes at once while the pod still terminates), so a resume
    /// right after cannot mistake the old pod for the new one.
    async fn pause(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        self.set_paused(&cx.api, sandbox, true, deadline).await?;
        let flavour = self.flavour;
        cx.cache
            .wait_for(deadline, |st| match st.sandbox(sandbox) {
                None => Some(()),
                Some(s) => flavour.sandbox_view(s).pause_done.then_some(()),
            })
            .await
            .ok_or_else(|| BackendError::Timeout(started.elapsed()))
    }

    /// Done on Ready=True for the current generation with a pod IP; a finished pod or a
    /// vanished Sandbox is lost; a pod no node can take (agent-sandbox
    /// `PodScheduled=False/Unschedulable`, mirrored from the pod since v0.5.6) is 503
    /// `no_capacity` once it stayed so for `unschedulable_wait`.
    async fn resume(
        &self,
        cx: &PauseContext,
        sandbox: &str,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let started = Instant::now();
        let flavour = self.flavour;
        let lost = || BackendError::Lost(SandboxId::new(sandbox));
        let view = cx
            .cache
            .read(|st| st.sandbox(sandbox).map(|s| flavour.sandbox_view(s)))
            .ok_or_else(lost)?;
        if let Some(ep) = cx.cache.endpoint(&view) {
            return Ok(ep);
        }
        self.set_paused(&cx.api, sandbox, false, deadline).await?;
        let cache = &cx.cache;
        let unschedulable = || {
            BackendError::NoCapacity(format!(
                "the resumed pod of Sandbox {sandbox} is Unschedulable (no node has room)"
            ))
        };
        let look = |give_up: bool| {
            move |st: &super::cache::State| match st.sandbox(sandbox) {
                None => Some(Err(lost())),
                Some(s) => {
                    let v = flavour.sandbox_view(s);
                    if v.finished || v.deleting {
                        Some(Err(lost()))
                    } else if give_up && v.unschedulable && !v.spec_paused {
                        Some(Err(unschedulable()))
                    } else {
                        cache.endpoint(&v).map(Ok)
                    }
                }
            }
        };
        let first = cache
            .wait_for(deadline, look(true))
            .await
            .unwrap_or_else(|| Err(BackendError::Timeout(started.elapsed())));
        match first {
            Err(BackendError::NoCapacity(_)) if !cx.unschedulable_wait.is_zero() => {
                let until = deadline.min(Instant::now() + cx.unschedulable_wait);
                cache
                    .wait_for(until, look(false))
                    .await
                    .unwrap_or_else(|| Err(unschedulable()))
            }
            other => other,
        }
    }
}
