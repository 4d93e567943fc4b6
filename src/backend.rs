//! `SandboxBackend`: where sandboxes come from (static endpoints, local processes, Kubernetes).
//!
//! The proxy and the activation layer only talk to this trait. A backend owns the sandbox
//! fleet (warm pool, capacity, pause/resume mechanics); the session table owns which
//! session is pinned to which sandbox. Results are async; spontaneous changes (a sandbox
//! died, another replica paused it) arrive as [`BackendEvent`]s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use crate::customize::ClaimSpec;
pub use crate::sandbox::SandboxId;
use crate::session::SessionKey;

pub mod kubernetes;
pub mod process;
pub mod static_set;

/// What a request had to wait for before it could be forwarded.
/// Sent to clients as `X-Activator-Activation` and used as the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationKind {
    /// Took a ready sandbox from the warm pool (or a free static endpoint).
    Claim,
    /// No warm sandbox: one was created on demand.
    Create,
    /// The session's sandbox was paused and had to be resumed.
    Resume,
    /// Nothing: the session was already bound and ready.
    None,
}

impl ActivationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActivationKind::Claim => "claim",
            ActivationKind::Create => "create",
            ActivationKind::Resume => "resume",
            ActivationKind::None => "none",
        }
    }
}

/// A sandbox bound to a session by [`SandboxBackend::claim`].
#[derive(Debug, Clone)]
pub struct Binding {
    pub sandbox: SandboxId,
    /// Where requests for the session go.
    pub endpoint: SocketAddr,
    /// `Claim`, `Create`, or `Resume` when the backend adopted an existing paused sandbox
    /// (another replica's claim) and resumed it.
    pub kind: ActivationKind,
    /// The claim waited for capacity (`backend.max_sandboxes` reached, every static
    /// endpoint full) before it could bind: `queued_no_capacity` in
    /// `activator_request_held_seconds`.
    pub queued_for_capacity: bool,
}

/// How long a claim may take: waiting for capacity, then starting/claiming the sandbox.
#[derive(Debug, Clone, Copy)]
pub struct ClaimBudget {
    /// Give up with [`BackendError::NoCapacity`] if no capacity frees up by then.
    pub admission_deadline: Instant,
    /// Give up with [`BackendError::Timeout`] if the sandbox is not ready by then.
    pub deadline: Instant,
}

/// What a backend can do; the activation layer adapts its policies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `pause`/`resume` keep the sandbox's state.
    pub pause: bool,
    /// What a pause keeps, for docs and the admin API: e.g. "memory, files, address".
    pub pause_keeps: &'static str,
}

/// Lifecycle state of one sandbox as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Being created, not ready yet.
    Starting,
    /// Ready and unassigned (in the warm pool).
    Warm,
    /// Bound to at least one session and running.
    Bound,
    /// Frozen / suspended.
    Paused,
    /// Being stopped or deleted.
    Stopping,
}

impl SandboxState {
    pub const ALL: [SandboxState; 5] = [
        SandboxState::Starting,
        SandboxState::Warm,
        SandboxState::Bound,
        SandboxState::Paused,
        SandboxState::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Warm => "warm",
            SandboxState::Bound => "bound",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
        }
    }
}

/// How many sandboxes a backend holds in each [`SandboxState`]: what gauges and the
/// autoscaler need, without the per-sandbox session lists of [`SandboxInfo`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts([usize; SandboxState::ALL.len()]);

impl StateCounts {
    /// Counts the states of `states`.
    pub fn of(states: impl IntoIterator<Item = SandboxState>) -> StateCounts {
        let mut c = StateCounts::default();
        for s in states {
            c.0[s as usize] += 1;
        }
        c
    }

    /// Sandboxes in `state`.
    pub fn get(&self, state: SandboxState) -> usize {
        self.0[state as usize]
    }
}

/// One row of `GET /api/sandboxes`.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub id: SandboxId,
    pub state: SandboxState,
    /// Short hashes of the sessions bound to it.
    pub sessions: Vec<String>,
    /// `ip:port` when running.
    pub endpoint: Option<SocketAddr>,
    /// Process backend: the sandbox's PID.
    pub pid: Option<u32>,
    pub age_seconds: f64,
}

/// What the deep idle tier ([`SandboxBackend::deep_pause`]) did to a paused sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepPause {
    /// Suspended (its memory released); still bound, a resume starts it cold.
    Suspended,
    /// Stopped and gone: the session has no sandbox any more.
    Stopped,
}

/// A session found bound in the backend's own store (Kubernetes claims) on startup.
#[derive(Debug, Clone)]
pub struct RecoveredBinding {
    /// Present when the store keeps the raw ID (`write_session_id`); otherwise the session
    /// is re-attached lazily by hash on its next request.
    pub session: Option<SessionKey>,
    pub session_hash: String,
    pub sandbox: SandboxId,
    pub endpoint: Option<SocketAddr>,
    pub paused: bool,
}

/// How a [`BackendEvent::Lost`] reason starts when the kernel OOM-killed the sandbox at
/// its memory limit (`backend.memory_max`).
pub const LOST_OOM: &str = "out of memory";

/// Something that happened to a sandbox outside of a call made by this activator.
#[derive(Debug, Clone)]
pub enum BackendEvent {
    /// The sandbox died or was deleted; its sessions are lost. A `reason` starting with
    /// [`LOST_OOM`] is an out-of-memory kill (the event stream's `lost` says `oom`).
    Lost { sandbox: SandboxId, reason: String },
    /// Paused by someone else (another replica, an operator).
    Paused { sandbox: SandboxId },
    /// Running again, possibly at a new address.
    Resumed {
        sandbox: SandboxId,
        endpoint: SocketAddr,
    },
}

/// Why a backend call failed; mapped to a client status in `proxy::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// No sandbox could be had before the admission deadline (503 + Retry-After).
    #[error("no sandbox capacity: {0}")]
    NoCapacity(String),
    /// The sandbox did not become ready in time (504).
    #[error("sandbox not ready within {0:?}")]
    Timeout(Duration),
    /// The sandbox is gone (502 `sandbox_lost`).
    #[error("sandbox {0} is gone")]
    Lost(SandboxId),
    /// Another replica saw traffic recently; the pause was not done.
    #[error("sandbox {0} is busy elsewhere")]
    Busy(SandboxId),
    /// The operation is not supported by this backend (e.g. pause on `static`).
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    /// Starting a sandbox failed (process exited, pod failed).
    #[error("sandbox failed to start: {0}")]
    StartFailed(String),
    /// The control plane (Kubernetes API) failed or is unreachable (503).
    #[error("control plane error: {0}")]
    ControlPlane(String),
    /// The session's claim exists but is not this activator's (503 `claim_conflict`): it
    /// is never adopted. Holds the claim's name, for logs only.
    #[error("the session's sandbox claim belongs to someone else")]
    Conflict(String),
    /// The control plane refused the session's claim (502 `claim_rejected`): a
    /// customisation its controller does not allow, a missing pool or template. Holds the
    /// controller's reason and message, for the log and the admin API's events only: it
    /// is never sent to the client.
    #[error("the sandbox claim was rejected: {0}")]
    Rejected(String),
}

/// The source of sandboxes. Implementations must be cheap to call concurrently: the
/// activation layer guarantees at most one in-flight transition per session, not per
/// backend.
#[async_trait]
pub trait SandboxBackend: Send + Sync + 'static {
    /// `static`, `process` or `kubernetes`.
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Binds a sandbox to `session`: a warm one, a shared one with a free slot, or a new one.
    /// Waits for capacity until `budget.admission_deadline`. Nothing customised.
    async fn claim(
        &self,
        session: &SessionKey,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError>;

    /// [`SandboxBackend::claim`] carrying the session's claim-time customisation (the one
    /// call the activation layer makes). A backend that applies customisation overrides it
    /// and reports a claim the customisation forced to start a new sandbox as
    /// [`ActivationKind::Create`]; the default serves an empty spec and refuses any other.
    async fn claim_with(
        &self,
        session: &SessionKey,
        spec: &ClaimSpec,
        budget: ClaimBudget,
    ) -> Result<Binding, BackendError> {
        if !spec.is_empty() {
            return Err(BackendError::Unsupported("claim-time customisation"));
        }
        self.claim(session, budget).await
    }

    /// Thaws a paused sandbox; returns its (possibly new) endpoint.
    async fn resume(
        &self,
        sandbox: &SandboxId,
        deadline: Instant,
    ) -> Result<SocketAddr, BackendError>;

    /// Freezes a sandbox with its state intact.
    async fn pause(&self, sandbox: &SandboxId) -> Result<(), BackendError>;

    /// The deep idle tier (`idle.deep_after`) for a paused sandbox: release its memory.
    async fn deep_pause(
        &self,
        _session: &SessionKey,
        _sandbox: &SandboxId,
    ) -> Result<DeepPause, BackendError> {
        Err(BackendError::Unsupported("the deep idle tier"))
    }

    /// Unbinds `session` from `sandbox`; the sandbox is destroyed or returned to the pool
    /// when no session is left on it.
    async fn release(&self, session: &SessionKey, sandbox: &SandboxId) -> Result<(), BackendError>;

    /// Spontaneous changes. Each subscriber sees every event sent after it subscribed.
    fn subscribe(&self) -> broadcast::Receiver<BackendEvent>;

    /// A snapshot of all sandboxes, for the admin API.
    fn sandboxes(&self) -> Vec<SandboxInfo>;

    /// Sandboxes per state, for gauges and the autoscaler (called every tick and scrape):
    /// backends whose rows are costly to build (the static backend lists every session
    /// on a sandbox) count without building them.
    fn sandbox_counts(&self) -> StateCounts {
        StateCounts::of(self.sandboxes().iter().map(|s| s.state))
    }

    /// Autoscaler output: how many ready, unassigned sandboxes to keep.
    async fn set_warm_pool_target(&self, _target: u32) -> Result<(), BackendError> {
        Err(BackendError::Unsupported("warm pool scaling"))
    }

    /// Bindings that survive an activator restart (Kubernetes claims).
    async fn recover(&self) -> Result<Vec<RecoveredBinding>, BackendError> {
        Ok(Vec::new())
    }

    /// Where the sandbox's own port `port` is reachable from the activator (preview URLs,
    /// `preview.ports`): Kubernetes the pod IP and that port, the process backend a
    /// per-sandbox host-loopback forward into the sandbox's network namespace
    /// (`backend.expose_ports`), static endpoints their host and that port. `None`: this
    /// backend cannot reach it (the preview request gets 502 `preview_port_unreachable`).
    fn port_endpoint(&self, _sandbox: &SandboxId, _port: u16) -> Option<SocketAddr> {
        None
    }

    /// Called (at most once per request) when a session sees traffic, so shared stores
    /// can record cluster-wide activity. Must not block.
    fn record_activity(&self, _session: &SessionKey, _sandbox: &SandboxId) {}

    /// Stops everything this backend started (process: kill the children).
    async fn shutdown(&self) {}
}

/// A shared, type-erased backend.
pub type DynBackend = Arc<dyn SandboxBackend>;

/// Builds the backend named by `backend.kind`. Problems name the offending key. The
/// Kubernetes backend uses the cluster's one kube client and replica identity.
pub async fn build(
    config: &crate::config::Config,
    metrics: &Arc<crate::metrics::Metrics>,
    cluster: &crate::cluster::Cluster,
) -> Result<DynBackend, crate::config::ConfigError> {
    use crate::config::BackendKind;
    match config.backend.kind {
        BackendKind::Static => Ok(Arc::new(static_set::StaticBackend::new(
            &config.backend.endpoints,
            config.session.max_sessions_per_sandbox,
        )?)),
        BackendKind::Process => Ok(process::build(config, metrics).await?),
        BackendKind::Kubernetes => {
            let kube = cluster.kube().ok_or_else(|| {
                crate::config::ConfigError::invalid(
                    "backend.kind",
                    "kubernetes, but the cluster has no kube client",
                )
            })?;
            Ok(Arc::new(kubernetes::KubernetesBackend::new(kube, config)))
        }
    }
}
