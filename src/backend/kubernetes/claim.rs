//! Claiming a sandbox for a session: create-if-absent (adopting only our own claims),
//! wait for the controller to bind it, wait for it to serve.

use std::net::SocketAddr;

use kube::api::{DynamicObject, PostParams};
use serde_json::json;
use tokio::time::Instant;

use super::retry::{self, Failure};
use super::{
    HASH_CHARS, KubernetesBackend, MANAGED_BY, MANAGED_BY_LABEL, SESSION_ID_ANNOTATION,
    SESSION_LABEL, SESSION_SHA_ANNOTATION, api,
};
use crate::backend::{ActivationKind, BackendError, Binding, ClaimBudget, ClaimSpec, SandboxId};
use crate::session::SessionKey;

/// How a claim's sandbox looked when a wait ended.
enum Seen {
    Serving(String, SocketAddr),
    Suspended(String),
    Finished(String),
    Unschedulable,
}

/// True when `claim` was made by this activator for the session with SHA-256 `sha`.
pub(super) fn is_ours(claim: &DynamicObject, sha: &str) -> bool {
    let labels = claim.metadata.labels.as_ref();
    let annotations = claim.metadata.annotations.as_ref();
    labels
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGED_BY)
        && labels
            .and_then(|l| l.get(SESSION_LABEL))
            .map(String::as_str)
            == Some(&sha[..HASH_CHARS])
        && annotations
            .and_then(|a| a.get(SESSION_SHA_ANNOTATION))
            .map(String::as_str)
            == Some(sha)
}

impl KubernetesBackend {
    /// Creates the session's claim unless it exists. Returns true if this call created it.
    /// An existing claim is adopted only if it is ours for this session
    /// ([`is_ours`]); anything else is [`BackendError::Conflict`], never routed.
    pub(super) async fn ensure_claim(
        &self,
        session: &SessionKey,
        custom: &ClaimSpec,
        name: &str,
        deadline: Instant,
    ) -> Result<bool, BackendError> {
        let sha = session.sha256_hex();
        // A claim being deleted (a release elsewhere) must be gone before we create anew.
        let existing = self
            .cache
            .wait_for(deadline, |st| {
                let c = st.claim(name);
                c.is_none_or(|c| c.metadata.deletion_timestamp.is_none())
                    .then(|| c.map(|c| is_ours(c, &sha)))
            })
            .await
            .ok_or(BackendError::Timeout(self.op_timeout))?;
        match existing {
            Some(true) => return Ok(false),
            Some(false) => return Err(self.conflict(name)),
            None => {}
        }
        let mut annotations = json!({ SESSION_SHA_ANNOTATION: sha });
        if self.write_session_id {
            annotations[SESSION_ID_ANNOTATION] = json!(session.as_str());
        }
        let ar = self.api.flavour.claim_resource();
        let body: DynamicObject = serde_json::from_value(json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": {
                "name": name,
                "labels": {
                    SESSION_LABEL: &sha[..HASH_CHARS],
                    MANAGED_BY_LABEL: MANAGED_BY,
                },
                "annotations": annotations,
            },
            "spec": self.api.flavour.claim_spec(
                &self.pool,
                &self.backstop.expiry(),
                custom,
                session,
            ),
        }))
        .expect("claim object deserializes");
        let started = Instant::now();
        let pp = PostParams {
            field_manager: Some(api::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match retry::call(deadline, || self.api.claims.create(&pp, &body)).await {
            Ok(_) => Ok(true),
            Err(Some(e)) if retry::classify(&e) == Failure::AlreadyExists => {
                // Someone created it meanwhile: another replica (ours), or not.
                let got = retry::call(deadline, || self.api.claims.get(name))
                    .await
                    .map_err(|e| retry::fail("read SandboxClaim", started, e))?;
                if is_ours(&got, &sha) {
                    Ok(false)
                } else {
                    Err(self.conflict(name))
                }
            }
            Err(e) => Err(retry::fail("create SandboxClaim", started, e)),
        }
    }

    fn conflict(&self, name: &str) -> BackendError {
        tracing::warn!(
            claim = name,
            "a SandboxClaim with this session's name exists without the activator's \
             managed-by label and session hash: refusing to adopt it"
        );
        BackendError::Conflict(name.to_owned())
    }

    /// Waits for the controller to bind a Sandbox to the claim (until the admission
    /// deadline: none bound means no capacity, 503) and for it to serve (until the
    /// deadline: 504), resuming it if it was suspended. A pod nobody can schedule is no
    /// capacity once the admission deadline passed; a finished pod is a lost sandbox.
    pub(super) async fn await_claim(
        &self,
        name: &str,
        created: bool,
        budget: ClaimBudget,
        started: Instant,
    ) -> Result<Binding, BackendError> {
        let (flavour, cache) = (self.api.flavour, &self.cache);
        let admission = budget.admission_deadline.min(budget.deadline);
        cache
            .wait_for(admission, |st| st.sandbox_of_claim(name).map(|_| ()))
            .await
            .ok_or_else(|| {
                BackendError::NoCapacity(format!(
                    "no Sandbox was bound to SandboxClaim {name} within {:?}",
                    started.elapsed()
                ))
            })?;
        let look = |unschedulable_is_final: bool| {
            move |st: &super::cache::State| {
                let sandbox = st.sandbox_of_claim(name)?.to_owned();
                let view = flavour.sandbox_view(st.sandbox(&sandbox)?);
                if view.finished {
                    return Some(Seen::Finished(sandbox));
                }
                match cache.endpoint(&view) {
                    Some(ep) => Some(Seen::Serving(sandbox, ep)),
                    None if view.spec_paused => Some(Seen::Suspended(sandbox)),
                    None if view.unschedulable && unschedulable_is_final => {
                        Some(Seen::Unschedulable)
                    }
                    None => None,
                }
            }
        };
        // Until admission, an Unschedulable pod may still find room.
        let seen = match cache.wait_for(admission, look(false)).await {
            Some(s) => s,
            None => cache
                .wait_for(budget.deadline, look(true))
                .await
                .ok_or_else(|| BackendError::Timeout(started.elapsed()))?,
        };
        match seen {
            Seen::Serving(sandbox, endpoint) => Ok(Binding {
                kind: if created && sandbox == name {
                    ActivationKind::Create
                } else {
                    ActivationKind::Claim
                },
                sandbox: SandboxId::new(sandbox),
                endpoint,
                // The cluster's controllers place pods; a wait here is not the activator's
                // capacity queue (an Unschedulable pod ends as `no_capacity`).
                queued_for_capacity: false,
            }),
            Seen::Suspended(sandbox) => {
                // Adopted a claim whose sandbox was suspended (another replica, or before
                // our restart): thaw it.
                let id = SandboxId::new(sandbox);
                let endpoint = self.resume_sandbox(&id, budget.deadline).await?;
                Ok(Binding {
                    sandbox: id,
                    endpoint,
                    kind: ActivationKind::Resume,
                    queued_for_capacity: false,
                })
            }
            Seen::Finished(sandbox) => Err(BackendError::Lost(SandboxId::new(sandbox))),
            Seen::Unschedulable => Err(BackendError::NoCapacity(format!(
                "the pod of SandboxClaim {name} is Unschedulable (no node has room)"
            ))),
        }
    }

    /// Deletes a claim this call created and could not complete (and, OpenKruise, its
    /// Sandbox), in the background.
    pub(super) fn abandon_claim(&self, name: String) {
        let sandbox = self
            .cache
            .read(|st| st.sandbox_of_claim(&name).map(str::to_owned));
        if let Some(s) = &sandbox {
            self.cache.mark_released(s);
        }
        let api = self.api.clone();
        let deadline = Instant::now() + self.op_timeout;
        tokio::spawn(async move {
            if let Err(e) = api.release(&name, sandbox.as_deref(), deadline).await {
                tracing::warn!(claim = name, "abandoned claim not deleted: {e}");
            }
        });
    }
}
