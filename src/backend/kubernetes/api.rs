//! `ApiSet`: the typed-by-flavour API handles and the one fenced write every update uses
//! (read, patch with the read resourceVersion, re-read and retry on 409 Conflict).

use std::collections::BTreeSet;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::crd::openkruise as okr;
use super::flavour::Flavour;
use super::retry::{self, Failure};
use crate::backend::{BackendError, SandboxId};

/// Field manager recorded on every write.
pub const FIELD_MANAGER: &str = "agent-activator";

/// Namespaced API handles for claims, sandboxes and the warm pool.
#[derive(Clone)]
pub struct ApiSet {
    pub flavour: Flavour,
    pub claims: Api<DynamicObject>,
    pub sandboxes: Api<DynamicObject>,
    pub pools: Api<DynamicObject>,
}

/// What a fenced update decided after reading the object.
pub enum Decision {
    /// Write this merge patch (the resourceVersion is added).
    Patch(Value),
    /// Nothing to write.
    Skip,
}

impl ApiSet {
    pub fn new(client: kube::Client, namespace: &str, flavour: Flavour) -> ApiSet {
        ApiSet {
            flavour,
            claims: Api::namespaced_with(client.clone(), namespace, &flavour.claim_resource()),
            sandboxes: Api::namespaced_with(client.clone(), namespace, &flavour.sandbox_resource()),
            pools: Api::namespaced_with(client, namespace, &flavour.pool_resource()),
        }
    }

    /// Reads `name` fresh from the API server, decides, and writes the decision as a merge
    /// patch carrying the read resourceVersion (a precondition on the server). A 409
    /// Conflict means someone wrote in between: read again and decide again. Transient
    /// failures are retried until `deadline`. 404 -> [`BackendError::Lost`].
    pub async fn patch_fenced(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        deadline: Instant,
        mut decide: impl FnMut(&DynamicObject) -> Result<Decision, BackendError>,
    ) -> Result<DynamicObject, BackendError> {
        let started = Instant::now();
        let what = format!("update {}/{name}", api.resource_url());
        loop {
            let current = match retry::call(deadline, || api.get(name)).await {
                Ok(o) => o,
                Err(Some(e)) if retry::classify(&e) == Failure::NotFound => {
                    return Err(BackendError::Lost(SandboxId::new(name)));
                }
                Err(e) => return Err(retry::fail(&what, started, e)),
            };
            let mut patch = match decide(&current)? {
                Decision::Skip => return Ok(current),
                Decision::Patch(p) => p,
            };
            patch["metadata"]["resourceVersion"] = json!(current.metadata.resource_version);
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let patch = Patch::Merge(patch);
            match retry::call(deadline, || api.patch(name, &pp, &patch)).await {
                Ok(o) => return Ok(o),
                Err(Some(e)) if retry::classify(&e) == Failure::Conflict => {
                    tracing::debug!("{what}: conflict, re-reading");
                    continue;
                }
                Err(Some(e)) if retry::classify(&e) == Failure::NotFound => {
                    return Err(BackendError::Lost(SandboxId::new(name)));
                }
                Err(e) => return Err(retry::fail(&what, started, e)),
            }
        }
    }

    /// Sets the warm pool's `spec.replicas` through its `/scale` subresource, fenced by
    /// the Scale's resourceVersion like every other write (409 -> read again).
    pub async fn scale_pool(
        &self,
        pool: &str,
        replicas: u32,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let what = "scale the warm pool";
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        loop {
            let scale = retry::call(deadline, || self.pools.get_scale(pool))
                .await
                .map_err(|e| retry::fail(what, started, e))?;
            if scale.spec.as_ref().and_then(|s| s.replicas) == Some(replicas as i32) {
                return Ok(());
            }
            let patch = Patch::Merge(json!({
                "metadata": {"resourceVersion": scale.metadata.resource_version},
                "spec": {"replicas": replicas},
            }));
            match retry::call(deadline, || self.pools.patch_scale(pool, &pp, &patch)).await {
                Ok(_) => return Ok(()),
                Err(Some(e)) if retry::classify(&e) == Failure::Conflict => continue,
                Err(e) => return Err(retry::fail(what, started, e)),
            }
        }
    }

    /// Ends a session's claim. agent-sandbox: delete the claim (its Sandbox, controlled
    /// by it, goes by garbage collection). OpenKruise: a claimed Sandbox has no owner
    /// (`sandboxcr/claim.go` modifyPickedSandbox clears ownerReferences), so deleting the
    /// claim frees nothing. The claim goes first (its controller then claims nothing
    /// more), then every Sandbox locked for it — found by the API, not the cache, by its
    /// `agents.kruise.io/claim-name` label and, when the claim's UID (`claim_uid`) is
    /// known, its `agents.kruise.io/owner` annotation (`utils.LockSandbox` writes both
    /// before post-processing, long before the claim counts it) — plus `sandbox`, the one
    /// the session was bound to. Absent is fine.
    pub async fn release(
        &self,
        claim: &str,
        claim_uid: Option<&str>,
        sandbox: Option<&str>,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        delete(&self.claims, claim, "delete SandboxClaim", deadline).await?;
        if self.flavour != Flavour::OpenKruise {
            return Ok(());
        }
        let started = Instant::now();
        let lp = ListParams::default().labels(&format!("{}={claim}", okr::CLAIM_NAME_LABEL));
        let locked = retry::call(deadline, || self.sandboxes.list(&lp))
            .await
            .map_err(|e| retry::fail("list Sandboxes by claim-name", started, e))?;
        let mut victims: BTreeSet<String> = sandbox.map(str::to_owned).into_iter().collect();
        for s in locked.items {
            let owner = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(okr::OWNER_ANNOTATION));
            if claim_uid.is_none() || owner.map(String::as_str) == claim_uid {
                victims.extend(s.metadata.name);
            }
        }
        for s in &victims {
            delete(&self.sandboxes, s, "delete Sandbox", deadline).await?;
        }
        Ok(())
    }
}

async fn delete(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    deadline: Instant,
) -> Result<(), BackendError> {
    let started = Instant::now();
    let dp = DeleteParams::background();
    match retry::call(deadline, || api.delete(name, &dp)).await {
        Ok(_) => Ok(()),
        Err(Some(e)) if retry::classify(&e) == Failure::NotFound => Ok(()),
        Err(e) => Err(retry::fail(what, started, e)),
    }
}
