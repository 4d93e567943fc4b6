//! `ApiSet`: the typed-by-flavour API handles and the one fenced write every update uses
//! (read, patch with the read resourceVersion, re-read and retry on 409 Conflict).

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::time::Instant;

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
    /// claim frees nothing: delete the Sandbox, then the claim. Absent is fine.
    pub async fn release(
        &self,
        claim: &str,
        sandbox: Option<&str>,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        if self.flavour == Flavour::OpenKruise
            && let Some(s) = sandbox
        {
            delete(&self.sandboxes, s, "delete Sandbox", deadline).await?;
        }
        delete(&self.claims, claim, "delete SandboxClaim", deadline).await
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
