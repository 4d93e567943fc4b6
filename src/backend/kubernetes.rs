//! `KubernetesBackend`: sessions as SandboxClaims (agent-sandbox or OpenKruise), suspend and
//! resume through the Sandbox spec, state shared by every activator replica via the cluster.
//!
//! - One claim per session, named `claim_prefix + sha256(session)[..32]`, so every replica
//!   (and a restarted one) finds the same claim; create-if-absent, AlreadyExists -> adopt.
//! - Reads come from a watch-fed [`cache::Cache`]; waits are woken by watch events and
//!   bounded by the caller's deadline. Writes are merge patches fenced by resourceVersion.
//! - Idle pausing is cluster-wide: see [`activity`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kube::api::{DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    ActivationKind, BackendError, BackendEvent, Binding, Capabilities, ClaimBudget,
    RecoveredBinding, SandboxBackend, SandboxId, SandboxInfo, SandboxState,
};
use crate::cluster::KubeContext;
use crate::config::Config;
use crate::session::SessionKey;

pub mod activity;
pub mod api;
mod cache;
pub mod crd;
pub mod flavour;
pub mod pause;
mod retry;

use activity::{ActivityLog, LAST_ACTIVITY, PAUSING};
use api::{ApiSet, Decision};
use cache::{Cache, Kind};
use flavour::Flavour;
use pause::{PauseStrategy, SpecSuspend};
use retry::Failure;

/// Label on every claim this activator creates: the first 32 hex characters of the
/// session's SHA-256 (also the claim name's suffix).
pub const SESSION_LABEL: &str = "agent-activator.dev/session-hash";
/// Annotation with the full SHA-256 of the session ID.
pub const SESSION_SHA_ANNOTATION: &str = "agent-activator.dev/session-sha256";
/// Annotation with the raw session ID (only with `write_session_id: true`).
pub const SESSION_ID_ANNOTATION: &str = "agent-activator.dev/session-id";

/// Hex characters of the session hash used in claim names and labels (128 bits).
const HASH_CHARS: usize = 32;

/// The Kubernetes backend. Cheap to call concurrently; owns its watch tasks.
pub struct KubernetesBackend {
    api: ApiSet,
    cache: Arc<Cache>,
    activity: Arc<ActivityLog>,
    strategy: Arc<dyn PauseStrategy>,
    pool: String,
    claim_prefix: String,
    /// `backend.kubernetes.max_claims` (0 = unlimited).
    max_claims: usize,
    write_session_id: bool,
    max_id_length: usize,
    /// Bound on pause, release and other calls that have no caller deadline.
    op_timeout: Duration,
    watchers: Vec<JoinHandle<()>>,
}

impl KubernetesBackend {
    /// Starts watching claims and sandboxes in the context's namespace, with the cluster's
    /// one client; activity stamps carry the context's replica identity.
    pub fn new(kube: &KubeContext, config: &Config) -> KubernetesBackend {
        let k = &config.backend.kubernetes;
        let flavour = Flavour::from_config(k.api);
        let api = ApiSet::new(kube.client.clone(), &kube.namespace, flavour);
        let cache = Cache::new(flavour, k.port);
        let watchers = vec![
            tokio::spawn(cache.clone().run_watch(
                Kind::Claims,
                api.claims.clone(),
                watcher::Config::default().labels(SESSION_LABEL),
            )),
            tokio::spawn(cache.clone().run_watch(
                Kind::Sandboxes,
                api.sandboxes.clone(),
                watcher::Config::default(),
            )),
        ];
        KubernetesBackend {
            api,
            cache,
            activity: Arc::new(ActivityLog::new(
                kube.replica.to_string(),
                k.activity_write_interval.as_duration(),
                config.idle.timeout.as_duration(),
            )),
            strategy: Arc::new(SpecSuspend::new(flavour)),
            pool: k.pool.clone(),
            claim_prefix: k.claim_prefix.clone(),
            max_claims: k.max_claims as usize,
            write_session_id: k.write_session_id,
            max_id_length: config.session.max_id_length,
            op_timeout: config.activation.timeout.as_duration(),
            watchers,
        }
    }

    /// Replaces the pause strategy (default: [`SpecSuspend`]).
    pub fn with_pause_strategy(mut self, strategy: Arc<dyn PauseStrategy>) -> KubernetesBackend {
        self.strategy = strategy;
        self
    }

    /// The claim name for `session`: `claim_prefix` + 32 hex characters of its SHA-256.
    pub fn claim_name(&self, session: &SessionKey) -> String {
        format!(
            "{}{}",
            self.claim_prefix,
            &session.sha256_hex()[..HASH_CHARS]
        )
    }

    /// This replica's identity in activity stamps.
    pub fn replica(&self) -> &str {
        self.activity.replica()
    }

    async fn wait_synced(&self, deadline: Instant) -> Result<(), BackendError> {
        self.cache
            .wait_for(deadline, |st| st.synced().then_some(()))
            .await
            .ok_or_else(|| {
                BackendError::ControlPlane(
                    "the watches of SandboxClaims and Sandboxes have not synced".into(),
                )
            })
    }

    /// Creates the session's claim unless it exists. Returns true if this call created it.
    async fn ensure_claim(
        &self,
        session: &SessionKey,
        name: &str,
        deadline: Instant,
    ) -> Result<bool, BackendError> {
        // A claim being deleted (a release elsewhere) must be gone before we create anew.
        let settled = self
            .cache
            .wait_for(deadline, |st| {
                let c = st.claim(name);
                c.is_none_or(|c| c.metadata.deletion_timestamp.is_none())
                    .then(|| c.is_some())
            })
            .await
            .ok_or(BackendError::Timeout(self.op_timeout))?;
        if settled {
            return Ok(false);
        }
        let sha = session.sha256_hex();
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
                    "app.kubernetes.io/managed-by": "agent-activator",
                },
                "annotations": annotations,
            },
            "spec": self.api.flavour.claim_spec(&self.pool),
        }))
        .expect("claim object deserializes");
        let started = Instant::now();
        let pp = PostParams {
            field_manager: Some(api::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match retry::call(deadline, || self.api.claims.create(&pp, &body)).await {
            Ok(_) => Ok(true),
            Err(Some(e)) if retry::classify(&e) == Failure::AlreadyExists => Ok(false),
            Err(e) => Err(retry::fail("create SandboxClaim", started, e)),
        }
    }
}

impl KubernetesBackend {
    /// Waits for the controller to bind a Sandbox to the claim (until the admission
    /// deadline: none bound means no capacity, 503) and for it to serve (until the
    /// deadline: 504), resuming it if it was suspended.
    async fn await_claim(
        &self,
        name: &str,
        created: bool,
        budget: ClaimBudget,
        started: Instant,
    ) -> Result<Binding, BackendError> {
        let (flavour, cache) = (self.api.flavour, &self.cache);
        cache
            .wait_for(budget.admission_deadline.min(budget.deadline), |st| {
                flavour.claim_sandbox(st.claim(name)?)
            })
            .await
            .ok_or_else(|| {
                BackendError::NoCapacity(format!(
                    "no Sandbox was bound to SandboxClaim {name} within {:?}",
                    started.elapsed()
                ))
            })?;
        let bound = cache
            .wait_for(budget.deadline, |st| {
                let sandbox = flavour.claim_sandbox(st.claim(name)?)?;
                let view = flavour.sandbox_view(st.sandbox(&sandbox)?);
                match cache.endpoint(&view) {
                    Some(ep) => Some(Bound::Serving(sandbox, ep)),
                    None if view.spec_paused => Some(Bound::Suspended(sandbox)),
                    None => None,
                }
            })
            .await
            .ok_or_else(|| BackendError::Timeout(started.elapsed()))?;
        match bound {
            Bound::Serving(sandbox, endpoint) => Ok(Binding {
                kind: if created && sandbox == name {
                    ActivationKind::Create
                } else {
                    ActivationKind::Claim
                },
                sandbox: SandboxId::new(sandbox),
                endpoint,
            }),
            Bound::Suspended(sandbox) => {
                // Adopted a claim whose sandbox was suspended (another replica, or before
                // our restart): thaw it.
                let id = SandboxId::new(sandbox);
                let endpoint = self.resume(&id, budget.deadline).await?;
                Ok(Binding {
                    sandbox: id,
                    endpoint,
                    kind: ActivationKind::Resume,
                })
            }
        }
    }

    /// Deletes a claim this call created and could not complete, in the background.
    fn abandon_claim(&self, name: String) {
        let flavour = self.api.flavour;
        if let Some(sandbox) = self
            .cache
            .read(|st| st.claim(&name).and_then(|c| flavour.claim_sandbox(c)))
        {
            self.cache.mark_released(&sandbox);
        }
        let api = self.api.clone();
        let deadline = Instant::now() + self.op_timeout;
        tokio::spawn(async move {
            if let Err(e) = api.delete_claim(&name, deadline).await {
                tracing::warn!(claim = name, "abandoned claim not deleted: {e}");
            }
        });
    }
}

/// How a claim's sandbox looked when the claim wait ended.
enum Bound {
    Serving(String, SocketAddr),
    Suspended(String),
}

#[async_trait]
impl SandboxBackend for KubernetesBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            pause_keeps: self.strategy.keeps(),
        }
    }

    async fn claim(
        &self,
        session: &SessionKey,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        let started = Instant::now();
        self.wait_synced(budget.deadline).await?;
        let name = self.claim_name(session);
        // The claim cap: every new session is a claim (and a sandbox) in the cluster.
        if self.max_claims > 0
            && self.cache.read(|st| {
                st.claim(&name).is_none()
                    && st.claims_with_prefix(&self.claim_prefix) >= self.max_claims
            })
        {
            return Err(BackendError::NoCapacity(format!(
                "backend.kubernetes.max_claims ({}) claims exist",
                self.max_claims
            )));
        }
        let created = self.ensure_claim(session, &name, budget.deadline).await?;
        let result = self.await_claim(&name, created, budget, started).await;
        if result.is_err() && created {
            // Nobody may come back for it: a claim left behind would keep a sandbox.
            self.abandon_claim(name);
        }
        result
    }

    async fn resume(
        &self,
        sandbox: &SandboxId,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let started = Instant::now();
        let name = sandbox.as_str();
        let _own = self.cache.begin_own(name);
        let flavour = self.api.flavour;
        let view = self
            .cache
            .read(|st| st.sandbox(name).map(|s| flavour.sandbox_view(s)))
            .ok_or_else(|| BackendError::Lost(sandbox.clone()))?;
        if let Some(ep) = self.cache.endpoint(&view) {
            return Ok(ep);
        }
        self.strategy
            .set_paused(&self.api, name, false, deadline)
            .await?;
        let cache = &self.cache;
        cache
            .wait_for(deadline, |st| match st.sandbox(name) {
                None => Some(Err(BackendError::Lost(sandbox.clone()))),
                Some(s) => cache.endpoint(&flavour.sandbox_view(s)).map(Ok),
            })
            .await
            .unwrap_or_else(|| Err(BackendError::Timeout(started.elapsed())))
    }

    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let started = Instant::now();
        let deadline = started + self.op_timeout;
        let name = sandbox.as_str();
        let _own = self.cache.begin_own(name);
        let flavour = self.api.flavour;
        let claim = self
            .cache
            .read(|st| st.claim_of_sandbox(name).map(str::to_owned))
            .ok_or_else(|| BackendError::Lost(sandbox.clone()))?;
        // The fence: decide on the fresh claim and stamp the decision with its
        // resourceVersion. An activity stamp written meanwhile by another replica makes
        // this write fail with 409; the re-read then sees it and answers Busy.
        let activity = &self.activity;
        self.api
            .patch_fenced(&self.api.claims, &claim, deadline, |c| {
                if activity.busy_elsewhere(c) {
                    return Err(BackendError::Busy(sandbox.clone()));
                }
                Ok(Decision::Patch(
                    json!({"metadata": {"annotations": {PAUSING: activity.stamp()}}}),
                ))
            })
            .await
            .map_err(|e| match e {
                BackendError::Lost(_) => BackendError::Lost(sandbox.clone()),
                e => e,
            })?;
        self.strategy
            .set_paused(&self.api, name, true, deadline)
            .await?;
        // Done when the pod is gone (status no longer ready), so a resume right after
        // cannot mistake the old pod for the new one.
        let cache = &self.cache;
        cache
            .wait_for(deadline, |st| match st.sandbox(name) {
                None => Some(()),
                Some(s) => (!flavour.sandbox_view(s).ready).then_some(()),
            })
            .await
            .ok_or_else(|| BackendError::Timeout(started.elapsed()))
    }

    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        let started = Instant::now();
        let name = self.claim_name(session);
        self.cache.mark_released(sandbox.as_str());
        self.activity.forget(session.as_str());
        self.api
            .delete_claim(&name, started + self.op_timeout)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.cache.subscribe()
    }

    fn sandboxes(&self) -> Vec<SandboxInfo> {
        let flavour = self.api.flavour;
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.cache.read(|st| {
            let mut out: Vec<SandboxInfo> = st
                .sandboxes()
                .map(|s| {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    let view = flavour.sandbox_view(s);
                    let sessions: Vec<String> = st
                        .claim_of_sandbox(&name)
                        .and_then(|c| st.claim(c))
                        .and_then(|c| c.metadata.labels.as_ref()?.get(SESSION_LABEL).cloned())
                        .map(|h| h.chars().take(12).collect())
                        .into_iter()
                        .collect();
                    let state = if view.deleting {
                        SandboxState::Stopping
                    } else if view.spec_paused {
                        SandboxState::Paused
                    } else if !view.ready {
                        SandboxState::Starting
                    } else if view.warm || sessions.is_empty() {
                        SandboxState::Warm
                    } else {
                        SandboxState::Bound
                    };
                    SandboxInfo {
                        id: SandboxId::new(name),
                        state,
                        sessions,
                        endpoint: self.cache.endpoint(&view),
                        pid: None,
                        age_seconds: s
                            .metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| (now_ms - t.0.as_millisecond()).max(0) as f64 / 1000.0)
                            .unwrap_or(0.0),
                    }
                })
                .collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            out
        })
    }

    async fn set_warm_pool_target(&self, target: u32) -> Result<(), BackendError> {
        let started = Instant::now();
        self.api
            .scale_pool(&self.pool, target, started + self.op_timeout)
            .await
    }

    async fn recover(&self) -> Result<Vec<RecoveredBinding>, BackendError> {
        let started = Instant::now();
        let deadline = started + self.op_timeout;
        let lp = ListParams::default().labels(SESSION_LABEL);
        let claims = retry::call(deadline, || self.api.claims.list(&lp))
            .await
            .map_err(|e| retry::fail("list SandboxClaims", started, e))?;
        // Endpoints come from the sandbox watch; give it the same budget to sync.
        self.wait_synced(deadline).await?;
        let flavour = self.api.flavour;
        let mut out = Vec::new();
        for c in claims.items {
            let Some(sandbox) = flavour.claim_sandbox(&c) else {
                continue;
            };
            let annotations = c.metadata.annotations.clone().unwrap_or_default();
            let session_hash = annotations
                .get(SESSION_SHA_ANNOTATION)
                .cloned()
                .or_else(|| c.metadata.labels.as_ref()?.get(SESSION_LABEL).cloned())
                .unwrap_or_default();
            let session = annotations
                .get(SESSION_ID_ANNOTATION)
                .and_then(|raw| SessionKey::parse(raw, self.max_id_length).ok());
            let view = self
                .cache
                .read(|st| st.sandbox(&sandbox).map(|s| flavour.sandbox_view(s)));
            out.push(RecoveredBinding {
                session,
                session_hash,
                endpoint: view.as_ref().and_then(|v| self.cache.endpoint(v)),
                paused: view.is_some_and(|v| v.spec_paused),
                sandbox: SandboxId::new(sandbox),
            });
        }
        Ok(out)
    }

    fn record_activity(&self, session: &SessionKey, _sandbox: &SandboxId) {
        // Keyed by the raw ID so the common case (stamped recently) hashes nothing.
        if !self.activity.due(session.as_str()) {
            return;
        }
        let name = self.claim_name(session);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let api = self.api.clone();
        let stamp = self.activity.stamp();
        let deadline = Instant::now() + self.op_timeout;
        handle.spawn(async move {
            let r = api
                .patch_fenced(&api.claims, &name, deadline, |_| {
                    Ok(Decision::Patch(
                        json!({"metadata": {"annotations": {LAST_ACTIVITY: stamp}}}),
                    ))
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(claim = name, "activity stamp not written: {e}");
            }
        });
    }

    async fn shutdown(&self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl Drop for KubernetesBackend {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

#[cfg(test)]
mod tests;
