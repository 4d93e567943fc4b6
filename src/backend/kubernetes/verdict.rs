//! `Verdict`: what a claim controller has said about a claim that is not bound — still
//! working, refused, or finished without a sandbox — read from the claim's status.

use kube::api::DynamicObject;
use serde_json::Value;

use super::crd::{agent_sandbox as asb, condition, openkruise as okr};
use super::flavour::Flavour;
use crate::backend::BackendError;

/// agent-sandbox Ready=False reasons after which the claim controller does not bind the
/// claim as it is (kubernetes-sigs/agent-sandbox 2fd412d55eca
/// extensions/controllers/sandboxclaim_controller.go `computeReadyCondition`): the
/// user-configuration errors it suppresses instead of retrying (`suppressErrors`:
/// `InvalidMetadata` from `validateAdditionalPodMetadata`, `EnvVarsInjectionRejected` and
/// `VolumeClaimTemplatesError` from `createSandbox` under the SandboxTemplate's
/// `envVarsInjectionPolicy` / `volumeClaimTemplatesPolicy`), a pool or template that does
/// not exist (`WarmPoolNotFound`, `TemplateNotFound`: requeued only every minute), and
/// `ClaimExpired` (past `spec.lifecycle.shutdownTime`: never bound again).
const AGENT_SANDBOX_REFUSALS: [&str; 6] = [
    "InvalidMetadata",
    "EnvVarsInjectionRejected",
    "VolumeClaimTemplatesError",
    "WarmPoolNotFound",
    "TemplateNotFound",
    "ClaimExpired",
];

/// What the controller said about an unbound claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still working on it (or nothing written yet).
    Pending,
    /// It will not bind as it is: refused, or ended without a sandbox. `capacity`: it
    /// ended because no sandbox could be had in time (OpenKruise `claimTimeout`), not
    /// because anything was wrong with it.
    Refused {
        reason: String,
        message: String,
        capacity: bool,
    },
}

impl Verdict {
    /// The error a session waiting on this claim gets.
    pub fn error(&self, claim: &str) -> Option<BackendError> {
        match self {
            Verdict::Pending => None,
            Verdict::Refused {
                reason,
                message,
                capacity: true,
            } => Some(BackendError::NoCapacity(format!(
                "SandboxClaim {claim}: {reason}: {message}"
            ))),
            Verdict::Refused {
                reason, message, ..
            } => Some(BackendError::Rejected(format!("{reason}: {message}"))),
        }
    }
}

impl Flavour {
    /// The controller's verdict on `claim`, which no Sandbox is bound to.
    ///
    /// agent-sandbox: the claim's Ready condition for its current generation with a
    /// reason in [`AGENT_SANDBOX_REFUSALS`]. OpenKruise (openkruise/agents 0b72c83ae0bc
    /// pkg/controller/sandboxclaim/core/util.go `CalculateClaimStatus`): phase `Completed`
    /// is terminal; with no sandbox counted (`claimedReplicas` 0) it ended without one:
    /// `SandboxSetNotFound` (refused), `TimeoutReached` after `claimTimeout` (capacity),
    /// `FeatureGateDisabled` (refused).
    pub fn claim_verdict(self, claim: &DynamicObject) -> Verdict {
        let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
        match self {
            Flavour::AgentSandbox => {
                let st: asb::SandboxClaimStatus =
                    serde_json::from_value(status).unwrap_or_default();
                let generation = claim.metadata.generation;
                match condition(&st.conditions, "Ready") {
                    Some(c)
                        if c.status == "False"
                            && (generation.is_none()
                                || c.observed_generation.is_none()
                                || c.observed_generation == generation)
                            && c.reason
                                .as_deref()
                                .is_some_and(|r| AGENT_SANDBOX_REFUSALS.contains(&r)) =>
                    {
                        Verdict::Refused {
                            reason: c.reason.clone().unwrap_or_default(),
                            message: c.message.clone().unwrap_or_default(),
                            capacity: false,
                        }
                    }
                    _ => Verdict::Pending,
                }
            }
            Flavour::OpenKruise => {
                let st: okr::SandboxClaimStatus =
                    serde_json::from_value(status).unwrap_or_default();
                if st.phase.as_deref() != Some("Completed") || st.claimed_replicas.unwrap_or(0) > 0
                {
                    return Verdict::Pending;
                }
                let done = condition(&st.conditions, "Completed");
                let reason = done
                    .and_then(|c| c.reason.clone())
                    .unwrap_or_else(|| "Completed".into());
                Verdict::Refused {
                    capacity: reason == "TimeoutReached",
                    message: done.and_then(|c| c.message.clone()).unwrap_or_default(),
                    reason,
                }
            }
        }
    }

    /// Whether the claim controller has counted a sandbox for `claim`: OpenKruise only
    /// after `TryClaimSandbox` returned, post-processing (runtime init, CSI mounts)
    /// included (`core/common_control.go` EnsureClaimClaiming step 9 writes
    /// `claimedReplicas`; the Sandbox was locked earlier, before post-processing).
    /// agent-sandbox binds in `status.sandbox.name`, which it writes only when done.
    pub fn claim_counted(self, claim: &DynamicObject) -> bool {
        match self {
            Flavour::AgentSandbox => true,
            Flavour::OpenKruise => {
                let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
                let st: okr::SandboxClaimStatus =
                    serde_json::from_value(status).unwrap_or_default();
                st.claimed_replicas.unwrap_or(0) > 0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn agent_sandbox_refusals_are_read_at_the_claims_generation() {
        let claim = |reason: &str, observed: i64| {
            obj(json!({"apiVersion": "v", "kind": "k",
                "metadata": {"name": "c", "generation": 2},
                "status": {"conditions": [{"type": "Ready", "status": "False",
                    "reason": reason, "message": "m", "observedGeneration": observed}]}}))
        };
        let f = Flavour::AgentSandbox;
        assert!(matches!(
            f.claim_verdict(&claim("EnvVarsInjectionRejected", 2)),
            Verdict::Refused {
                capacity: false,
                ..
            }
        ));
        // Written for an older spec: not a verdict on this one.
        assert_eq!(
            f.claim_verdict(&claim("EnvVarsInjectionRejected", 1)),
            Verdict::Pending
        );
        assert_eq!(
            f.claim_verdict(&claim("SandboxNotReady", 2)),
            Verdict::Pending
        );
    }

    #[test]
    fn openkruise_completed_without_a_count_is_final() {
        let claim = |phase: &str, n: i64, reason: &str| {
            obj(
                json!({"apiVersion": "v", "kind": "k", "metadata": {"name": "c"},
                "status": {"phase": phase, "claimedReplicas": n, "conditions": [
                    {"type": "Completed", "status": "True", "reason": reason}]}}),
            )
        };
        let f = Flavour::OpenKruise;
        assert!(matches!(
            f.claim_verdict(&claim("Completed", 0, "TimeoutReached")),
            Verdict::Refused { capacity: true, .. }
        ));
        assert!(matches!(
            f.claim_verdict(&claim("Completed", 0, "SandboxSetNotFound")),
            Verdict::Refused {
                capacity: false,
                ..
            }
        ));
        assert_eq!(
            f.claim_verdict(&claim("Completed", 1, "AllReplicasClaimed")),
            Verdict::Pending
        );
        assert_eq!(
            f.claim_verdict(&claim("Claiming", 0, "x")),
            Verdict::Pending
        );
        assert!(!f.claim_counted(&claim("Claiming", 0, "x")));
        assert!(f.claim_counted(&claim("Claiming", 1, "x")));
    }
}
