//! `KubernetesBackend`: sessions as SandboxClaims (agent-sandbox or OpenKruise), suspend and
//! resume through the Sandbox spec, state shared by every activator replica via the cluster.
//!
//! - One claim per session, named `claim_prefix + sha256(session)[..32]`, so every replica
//!   (and a restarted one) finds the same claim; create-if-absent, AlreadyExists -> adopt.
//! - Reads come from a watch-fed [`cache::Cache`]; waits are woken by watch events and
//!   bounded by the caller's deadline. Writes are merge patches fenced by resourceVersion.
//! - Binding follows what the controllers really write (see [`cache::Cache`]); a claim
//!   of the session's name that is not ours is refused (503 `claim_conflict`).
//! - Idle pausing is cluster-wide at a write cost independent of active sessions: see
//!   [`activity`]. Leaked claims expire on their own: see [`backstop`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    BackendError, BackendEvent, Binding, Capabilities, ClaimBudget, ClaimSpec, DeepPause,
    RecoveredBinding, SandboxBackend, SandboxId, SandboxInfo, SandboxState,
};
use crate::cluster::KubeContext;
use crate::config::{Config, PauseMode};
use crate::session::SessionKey;

pub mod activity;
pub mod api;
mod backstop;
mod cache;
mod claim;
pub mod crd;
pub mod flavour;
pub mod freeze;
mod health;
pub mod pause;
mod retry;
mod verdict;

use activity::{ActivityLog, PAUSING};
use api::{ApiSet, Decision};
use backstop::Backstop;
use cache::{Cache, Kind};
use flavour::{ClaimTimeouts, Flavour};
use freeze::NodeFreeze;
use health::ApiHealth;
use pause::{PauseContext, PauseStrategy, SpecSuspend};

/// Label on every claim this activator creates: the first 32 hex characters of the
/// session's SHA-256 (also the claim name's suffix).
pub const SESSION_LABEL: &str = "agent-activator.dev/session-hash";
/// Annotation with the full SHA-256 of the session ID.
pub const SESSION_SHA_ANNOTATION: &str = "agent-activator.dev/session-sha256";
/// Annotation with the raw session ID (only with `write_session_id: true`).
pub const SESSION_ID_ANNOTATION: &str = "agent-activator.dev/session-id";
/// Label on every claim this activator creates; with the session hash it is what makes
/// an existing claim adoptable.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "agent-activator";

/// Hex characters of the session hash used in claim names and labels (128 bits).
const HASH_CHARS: usize = 32;

/// The Kubernetes backend. Cheap to call concurrently; owns its watch tasks.
pub struct KubernetesBackend {
    api: ApiSet,
    cache: Arc<Cache>,
    activity: Arc<ActivityLog>,
    digests: Api<ConfigMap>,
    digest_name: String,
    backstop: Arc<Backstop>,
    strategy: Arc<dyn PauseStrategy>,
    pause_cx: PauseContext,
    pool: String,
    claim_prefix: String,
    /// `backend.kubernetes.max_claims` (0 = unlimited).
    max_claims: usize,
    write_session_id: bool,
    max_id_length: usize,
    /// Bound on pause, release and other calls that have no caller deadline.
    op_timeout: Duration,
    /// How long the API has been failing (`backend.kubernetes.api_outage_after`).
    health: Arc<ApiHealth>,
    /// `backend.kubernetes.unschedulable_wait`.
    unschedulable_wait: Duration,
    /// OpenKruise `waitReadyTimeout` / `claimTimeout` from the session budgets.
    claim_timeouts: ClaimTimeouts,
    /// An unbound claim older than this is nobody's any more (`recover`): the whole
    /// budget of a new session (`session.admission_timeout` + `activation.timeout`).
    claim_budget: Duration,
    watchers: Vec<JoinHandle<()>>,
}

impl KubernetesBackend {
    /// Starts watching claims, sandboxes and activity digests in the context's namespace,
    /// with the cluster's one client, and publishing this replica's digest (named after
    /// the context's replica identity).
    pub fn new(kube: &KubeContext, config: &Config) -> KubernetesBackend {
        let k = &config.backend.kubernetes;
        let flavour = Flavour::from_config(k.api);
        let api = ApiSet::new(kube.client.clone(), &kube.namespace, flavour);
        let cache = Cache::new(flavour, k.port, k.port_from_annotation);
        let activity = Arc::new(ActivityLog::new(
            kube.replica.to_string(),
            k.activity_write_interval.as_duration(),
            config.idle.timeout.as_duration(),
        ));
        let digests: Api<ConfigMap> = Api::namespaced(kube.client.clone(), &kube.namespace);
        let digest_name = activity.object_name(&k.claim_prefix);
        let backstop = Arc::new(Backstop::new(k.shutdown_after.as_duration()));
        let health = Arc::new(ApiHealth::new(k.api_outage_after.as_duration()));
        let watchers = vec![
            tokio::spawn(cache.clone().run_watch(
                Kind::Claims,
                api.claims.clone(),
                watcher::Config::default().labels(SESSION_LABEL),
                health.clone(),
            )),
            tokio::spawn(cache.clone().run_watch(
                Kind::Sandboxes,
                api.sandboxes.clone(),
                watcher::Config::default(),
                health.clone(),
            )),
            tokio::spawn(activity.clone().run_watch(digests.clone())),
            tokio::spawn(
                activity
                    .clone()
                    .run_publisher(digests.clone(), digest_name.clone()),
            ),
            tokio::spawn(backstop.clone().run(api.clone(), cache.clone())),
        ];
        let strategy: Arc<dyn PauseStrategy> = match k.pause {
            PauseMode::Suspend => Arc::new(SpecSuspend::new(flavour)),
            PauseMode::Freeze => Arc::new(NodeFreeze::new(kube, k, flavour)),
        };
        KubernetesBackend {
            pause_cx: PauseContext {
                api: api.clone(),
                cache: cache.clone(),
                unschedulable_wait: k.unschedulable_wait.as_duration(),
            },
            api,
            cache,
            activity,
            digests,
            digest_name,
            backstop,
            strategy,
            pool: k.pool.clone(),
            claim_prefix: k.claim_prefix.clone(),
            max_claims: k.max_claims as usize,
            write_session_id: k.write_session_id,
            max_id_length: config.session.max_id_length,
            op_timeout: config.activation.timeout.as_duration(),
            health,
            unschedulable_wait: k.unschedulable_wait.as_duration(),
            claim_timeouts: ClaimTimeouts {
                wait_ready: config.activation.timeout.as_duration(),
                claim: config.session.admission_timeout.as_duration()
                    + config.activation.timeout.as_duration(),
            },
            claim_budget: config.session.admission_timeout.as_duration()
                + config.activation.timeout.as_duration(),
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

    /// Another replica's fresh activity digest lists `session` (a pause would be Busy).
    pub fn served_elsewhere(&self, session: &SessionKey) -> bool {
        self.activity.busy_elsewhere(&session.sha256_hex())
    }

    /// Pushes the leak backstops of live sessions forward now (tests; normally periodic).
    pub async fn refresh_backstops(&self) {
        self.backstop.round(&self.api, &self.cache).await;
    }

    /// `recover()` for a claim of ours bound to nothing: one its controller refused or
    /// ended ([`verdict::Verdict::Refused`]), or one older than a new session's whole
    /// budget (nobody waits on it: its replica gave up or died before deleting it), is
    /// deleted with whatever was locked for it. A younger one may be another replica's
    /// claim in flight: left alone (its own backstop, `shutdown_after`, bounds it).
    async fn clean_unbound(&self, claim: &kube::api::DynamicObject, deadline: Instant) {
        let name = claim.metadata.name.clone().unwrap_or_default();
        // The claim as just listed from the API (the cache may lag behind it).
        let refused = self.api.flavour.claim_verdict(claim);
        let age = claim
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| {
                let ms = chrono::Utc::now().timestamp_millis() - t.0.as_millisecond();
                Duration::from_millis(ms.max(0) as u64)
            })
            .unwrap_or_default();
        let stale = matches!(refused, verdict::Verdict::Refused { .. }) || age > self.claim_budget;
        if !stale {
            return;
        }
        tracing::info!(
            claim = name,
            ?refused,
            ?age,
            "recover: deleting a claim that never bound"
        );
        if let Err(e) = self
            .api
            .release(&name, claim.metadata.uid.as_deref(), None, deadline)
            .await
        {
            tracing::warn!(claim = name, "recover: unbound claim not deleted: {e}");
        }
    }

    /// Resumes a paused sandbox through the pause strategy.
    async fn resume_sandbox(
        &self,
        sandbox: &SandboxId,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError> {
        let _own = self.cache.begin_own(sandbox.as_str());
        self.strategy
            .resume(&self.pause_cx, sandbox.as_str(), deadline)
            .await
    }
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
        self.claim_with(session, &ClaimSpec::default(), budget)
            .await
    }

    /// The claim carries the session's customisation in the flavour's own fields
    /// ([`Flavour::claim_spec`]). A claim that already exists (another replica's, or ours
    /// before a restart) is adopted as it is.
    async fn claim_with(
        &self,
        session: &SessionKey,
        spec: &ClaimSpec,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        let started = Instant::now();
        let name = self.claim_name(session);
        let mut created = false;
        // During an outage this session's own first failed call ends it (`control_plane`)
        // at once; otherwise at `api_outage_after` into the outage, not at its deadline.
        let result = tokio::select! {
            r = self.claim_and_wait(session, spec, budget, started, &name, &mut created) => r,
            d = self.health.outage_reached(started) => Err(self.outage_error(d)),
        };
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
        self.resume_sandbox(sandbox, deadline).await
    }

    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError> {
        let started = Instant::now();
        let deadline = started + self.op_timeout;
        let name = sandbox.as_str();
        let _own = self.cache.begin_own(name);
        let (claim, sha) = self
            .cache
            .read(|st| {
                let claim = st.claim_of_sandbox(name)?;
                let sha = st
                    .claim(claim)?
                    .metadata
                    .annotations
                    .as_ref()?
                    .get(SESSION_SHA_ANNOTATION)?
                    .clone();
                Some((claim.to_owned(), sha))
            })
            .ok_or_else(|| BackendError::Lost(sandbox.clone()))?;
        // Another replica served the session within idle.timeout: not idle cluster-wide.
        if self.activity.busy_elsewhere(&sha) {
            return Err(BackendError::Busy(sandbox.clone()));
        }
        // The fence: two replicas deciding at once serialise on the claim's
        // resourceVersion (the loser re-reads, sees the decision and skips).
        let activity = &self.activity;
        self.api
            .patch_fenced(&self.api.claims, &claim, deadline, |_| {
                if activity.busy_elsewhere(&sha) {
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
        self.strategy.pause(&self.pause_cx, name, deadline).await
    }

    /// Suspends through the Sandbox spec (a frozen pod is thawed first, so it shuts down
    /// gracefully and its frozen mark goes): the pod and its memory are released; the
    /// binding stays, and a resume starts a new pod.
    async fn deep_pause(
        &self,
        _session: &SessionKey,
        sandbox: &SandboxId,
    ) -> Result<DeepPause, BackendError> {
        let deadline = Instant::now() + self.op_timeout;
        let _own = self.cache.begin_own(sandbox.as_str());
        self.strategy
            .deep_pause(&self.pause_cx, sandbox.as_str(), deadline)
            .await?;
        Ok(DeepPause::Suspended)
    }

    /// Deletes the session's claim and (OpenKruise) every Sandbox locked for it, found by
    /// the API whatever this replica's cache has seen. A frozen pod is thawed first
    /// (`pause: freeze`), so it handles its SIGTERM at once instead of waiting out the
    /// grace period frozen (cgroup v2) or hanging in Terminating (v1).
    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError> {
        let started = Instant::now();
        let deadline = started + self.op_timeout;
        let name = self.claim_name(session);
        self.cache.mark_released(sandbox.as_str());
        self.activity.forget(&session.sha256_hex());
        let (bound, uid) = self.cache.read(|st| {
            (
                st.sandbox_of_claim(&name).map(str::to_owned),
                st.claim(&name).and_then(|c| c.metadata.uid.clone()),
            )
        });
        // Only a Sandbox bound to this session's claim is deleted by name.
        let bound = bound.filter(|s| s == sandbox.as_str());
        if let Some(s) = &bound {
            let _own = self.cache.begin_own(s);
            if let Err(e) = self
                .strategy
                .before_release(&self.pause_cx, s, deadline)
                .await
            {
                tracing::warn!(
                    sandbox = s,
                    "thaw before release failed (deleting anyway): {e}"
                );
            }
        }
        self.api
            .release(&name, uid.as_deref(), bound.as_deref(), deadline)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.cache.subscribe()
    }

    /// The pod IP and `port` (a preview port; deploy/'s NetworkPolicy admits exactly
    /// `preview.ports` from the activator), whatever the pod's readiness: the preview
    /// request was leased like any other, so the sandbox is bound and running.
    fn port_endpoint(&self, sandbox: &SandboxId, port: u16) -> Option<SocketAddr> {
        let flavour = self.api.flavour;
        self.cache.read(|st| {
            let s = st.sandbox(sandbox.as_str())?;
            let ip = flavour.sandbox_view(s).pod_ip?;
            Some(SocketAddr::new(ip, port))
        })
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
                    let state = if view.deleting || view.finished {
                        SandboxState::Stopping
                    } else if view.spec_paused || view.frozen.is_some() {
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
            let name = c.metadata.name.clone().unwrap_or_default();
            // Another pool's (or deployment's) claim in the namespace: not ours to recover.
            if !name.starts_with(&self.claim_prefix) {
                continue;
            }
            let Some(sandbox) = self
                .cache
                .read(|st| st.sandbox_of_claim(&name).map(str::to_owned))
            else {
                self.clean_unbound(&c, deadline).await;
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
                paused: view
                    .as_ref()
                    .is_some_and(|v| v.spec_paused || v.frozen.is_some()),
                sandbox: SandboxId::new(sandbox),
            });
        }
        Ok(out)
    }

    fn record_activity(&self, session: &SessionKey, _sandbox: &SandboxId) {
        // No API call: the digest publisher writes when this session is new here.
        let sha = session.sha256_hex();
        self.activity.record(&sha);
        self.backstop
            .touch(&format!("{}{}", self.claim_prefix, &sha[..HASH_CHARS]));
    }

    async fn shutdown(&self) {
        for w in &self.watchers {
            w.abort();
        }
        self.activity
            .withdraw(&self.digests, &self.digest_name)
            .await;
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
