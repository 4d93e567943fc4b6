//! Claiming a sandbox for a session: create-if-absent (adopting only our own claims),
//! wait for the controller to bind it, wait for it to serve.

use std::net::SocketAddr;

use kube::api::{DynamicObject, PostParams};
use serde_json::json;
use tokio::time::Instant;

use super::crd::openkruise as okr;
use super::retry::{self, Failure};
use super::verdict::Verdict;
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
    /// The claim itself, once the API is known to answer: the claim cap, create or
    /// adopt, wait for binding and serving. Sets `created` as soon as this call created
    /// the claim (the caller abandons it on failure).
    pub(super) async fn claim_and_wait(
        &self,
        session: &SessionKey,
        spec: &ClaimSpec,
        budget: ClaimBudget,
        started: Instant,
        name: &str,
        created: &mut bool,
    ) -> Result<Binding, BackendError> {
        self.wait_synced(budget.deadline).await?;
        // The claim cap: every new session is a claim (and a sandbox) in the cluster.
        if self.max_claims > 0
            && self.cache.read(|st| {
                st.claim(name).is_none()
                    && st.claims_with_prefix(&self.claim_prefix) >= self.max_claims
            })
        {
            return Err(BackendError::NoCapacity(format!(
                "backend.kubernetes.max_claims ({}) claims exist",
                self.max_claims
            )));
        }
        *created = self
            .ensure_claim(session, spec, name, budget.deadline)
            .await?;
        let result = self.await_claim(name, *created, budget, started).await?;
        // A claim another replica made was checked there.
        if *created {
            self.strategy
                .check_claim(&self.pause_cx, result.sandbox.as_str(), budget.deadline)
                .await?;
        }
        Ok(result)
    }

    /// `control_plane` for a new session during an outage.
    pub(super) fn outage_error(&self, failing: std::time::Duration) -> BackendError {
        BackendError::ControlPlane(format!(
            "the Kubernetes API has been failing for {failing:?} \
             (backend.kubernetes.api_outage_after: {:?})",
            self.health.bound()
        ))
    }

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
        let mut replaced: Option<String> = None;
        loop {
            // A claim being deleted (a release elsewhere, or the stale one we replace)
            // must be gone before we create anew.
            let existing = self
                .cache
                .wait_for(deadline, |st| {
                    let c = st.claim(name);
                    if c.is_some_and(|c| {
                        c.metadata.deletion_timestamp.is_some()
                            || (replaced.is_some() && c.metadata.uid == replaced)
                    }) {
                        return None;
                    }
                    Some(c.map(|c| {
                        let verdict = st
                            .sandbox_of_claim(name)
                            .is_none()
                            .then(|| self.api.flavour.claim_verdict(c));
                        (is_ours(c, &sha), c.metadata.uid.clone(), verdict)
                    }))
                })
                .await
                .ok_or(BackendError::Timeout(self.op_timeout))?;
            match existing {
                Some((false, ..)) => return Err(self.conflict(name)),
                // Terminal or refused upstream: it will never bind as it is. Adopting it
                // would answer this session ID the same way until the claim goes.
                Some((true, uid, Some(Verdict::Refused { reason, .. }))) => {
                    tracing::warn!(
                        claim = name,
                        reason,
                        "the session's SandboxClaim ended without a sandbox: replacing it"
                    );
                    self.api
                        .release(name, uid.as_deref(), None, deadline)
                        .await?;
                    replaced = uid;
                }
                Some((true, uid, _))
                    if self
                        .counted_but_gone(name, uid.as_deref(), deadline)
                        .await? =>
                {
                    tracing::warn!(
                        claim = name,
                        "the session's SandboxClaim was completed but its Sandbox is gone: \
                         replacing it"
                    );
                    self.api
                        .release(name, uid.as_deref(), None, deadline)
                        .await?;
                    replaced = uid;
                }
                Some((true, ..)) => return Ok(false),
                None => break,
            }
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
                self.claim_timeouts,
            ),
        }))
        .expect("claim object deserializes");
        let started = Instant::now();
        let pp = PostParams {
            field_manager: Some(api::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match retry::call_reporting(&self.health, deadline, || {
            self.api.claims.create(&pp, &body)
        })
        .await
        {
            Ok(_) => Ok(true),
            Err(Some(e)) if retry::classify(&e) == Failure::AlreadyExists => {
                // Someone created it meanwhile: another replica (ours), or not.
                let got =
                    retry::call_reporting(&self.health, deadline, || self.api.claims.get(name))
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

    /// OpenKruise: a Completed claim that counted a Sandbox which no longer exists (it
    /// was deleted: shutdownTime, an operator). The controller never claims again for a
    /// Completed claim. Confirmed through the API, not the cache: the claims and Sandboxes
    /// watches are separate streams.
    async fn counted_but_gone(
        &self,
        name: &str,
        uid: Option<&str>,
        deadline: Instant,
    ) -> Result<bool, BackendError> {
        let flavour = self.api.flavour;
        let suspect = self.cache.read(|st| {
            flavour == super::flavour::Flavour::OpenKruise
                && st.sandbox_of_claim(name).is_none()
                && st.claim(name).is_some_and(|c| {
                    flavour.claim_counted(c)
                        && c.data["status"]["phase"].as_str() == Some("Completed")
                })
        });
        if !suspect {
            return Ok(false);
        }
        let started = Instant::now();
        let lp =
            kube::api::ListParams::default().labels(&format!("{}={name}", okr::CLAIM_NAME_LABEL));
        let found = retry::call(deadline, || self.api.sandboxes.list(&lp))
            .await
            .map_err(|e| retry::fail("list Sandboxes by claim-name", started, e))?;
        Ok(!found.items.iter().any(|s| {
            s.metadata.deletion_timestamp.is_none()
                && (uid.is_none()
                    || s.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(okr::OWNER_ANNOTATION))
                        .map(String::as_str)
                        == uid)
        }))
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
    /// deadline: 504), resuming it if it was suspended. The controller's verdict is read
    /// as soon as it is written: a refused claim is 502 `claim_rejected`, one that ran out
    /// of stock 503 `no_capacity` ([`Verdict`]); a pod nobody can schedule is 503
    /// `no_capacity` once it has been Unschedulable for `unschedulable_wait`; a finished
    /// pod is a lost sandbox.
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
            .wait_for(admission, |st| {
                if st.sandbox_of_claim(name).is_some() {
                    return Some(Ok(()));
                }
                st.claim(name)
                    .and_then(|c| flavour.claim_verdict(c).error(name))
                    .map(Err)
            })
            .await
            .ok_or_else(|| {
                BackendError::NoCapacity(format!(
                    "no Sandbox was bound to SandboxClaim {name} within {:?}",
                    started.elapsed()
                ))
            })??;
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
        let mut seen = cache
            .wait_for(budget.deadline, look(true))
            .await
            .ok_or_else(|| BackendError::Timeout(started.elapsed()))?;
        if matches!(seen, Seen::Unschedulable) && !self.unschedulable_wait.is_zero() {
            // A bounded chance for a node to free up or be added (cluster autoscaler).
            let until = budget
                .deadline
                .min(Instant::now() + self.unschedulable_wait);
            if let Some(s) = cache.wait_for(until, look(false)).await {
                seen = s;
            }
        }
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

    /// Deletes a claim this call created and could not complete (and, OpenKruise, every
    /// Sandbox locked for it, whatever the cache has seen: see [`api::ApiSet::release`]),
    /// in the background.
    pub(super) fn abandon_claim(&self, name: String) {
        let (sandbox, uid) = self.cache.read(|st| {
            (
                st.sandbox_of_claim(&name).map(str::to_owned),
                st.claim(&name).and_then(|c| c.metadata.uid.clone()),
            )
        });
        if let Some(s) = &sandbox {
            self.cache.mark_released(s);
        }
        let api = self.api.clone();
        let deadline = Instant::now() + self.op_timeout;
        tokio::spawn(async move {
            if let Err(e) = api
                .release(&name, uid.as_deref(), sandbox.as_deref(), deadline)
                .await
            {
                tracing::warn!(claim = name, "abandoned claim not deleted: {e}");
            }
        });
    }
}
