//! `Activator`: single-flight claim/resume per session, the bounded wait queue, idle policy.
//!
//! CONTRACT (the proxy and admin API rely on these signatures; the bodies are being built
//! in the activation work stream):
//! - [`Activator::acquire`] is the only call on the request path. Fast path: the session is
//!   bound and ready -> a [`Lease`] without awaiting. Slow path: the request joins the
//!   session's FIFO wait queue while exactly one claim or resume runs.
//! - A [`Lease`] counts the request as in flight for its session until dropped; the proxy
//!   keeps it alive until the response body (or upgraded stream) ends, so idle pausing
//!   never hits live traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::backend::{ActivationKind, BackendError, DynBackend, SandboxId};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::SessionKey;

/// Why a request could not get a sandbox; mapped to a response in `proxy::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActivationError {
    /// The session's or the global wait queue is full (503 `queue_full`).
    #[error("activation queue is full ({0})")]
    QueueFull(&'static str),
    /// The backend failed or had no capacity.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The wait exceeded `activation.timeout` (504 `activation_timeout`).
    #[error("sandbox not ready after {0:?}")]
    Timeout(Duration),
    /// The session's sandbox died and `on_sandbox_loss` is `fail` (502 `sandbox_lost`).
    #[error("the sandbox pinned to this session is gone")]
    SandboxLost,
    /// The activator is draining and accepts no new activations (503 `shutting_down`).
    #[error("the activator is shutting down")]
    ShuttingDown,
}

/// Permission to forward one request to a session's sandbox. Dropping it ends the
/// request's in-flight count and stamps the session's last activity.
pub struct Lease {
    pub endpoint: SocketAddr,
    pub sandbox: SandboxId,
    /// What this request waited for.
    pub activation: ActivationKind,
    /// How long it waited (zero on the fast path).
    pub waited: Duration,
    /// The previous sandbox died and this one is fresh (`on_sandbox_loss: reclaim`).
    pub state_lost: bool,
    _guard: InFlightGuard,
}

struct InFlightGuard;

/// One row of `GET /api/sessions`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Short SHA-256 of the session ID (the raw ID only when `log.session_ids: full`).
    pub session: String,
    pub sandbox: Option<SandboxId>,
    /// activating | active | pausing | paused | resuming | releasing | lost
    pub state: &'static str,
    pub in_flight: u64,
    /// Seconds since the last request ended (0 while one is in flight).
    pub idle_seconds: f64,
    pub endpoint: Option<SocketAddr>,
}

/// Owns the session table and drives every session's lifecycle against the backend.
pub struct Activator {
    #[allow(dead_code)]
    backend: DynBackend,
    #[allow(dead_code)]
    metrics: Arc<Metrics>,
}

impl Activator {
    /// Builds the activator; call [`Activator::spawn_background`] to start idle sweeping and
    /// backend event handling.
    pub fn new(_config: &Config, backend: DynBackend, metrics: Arc<Metrics>) -> Arc<Activator> {
        Arc::new(Activator { backend, metrics })
    }

    /// Starts the idle sweeper and the backend-event listener.
    pub fn spawn_background(self: &Arc<Self>) {}

    /// Gets a ready sandbox for `key`, claiming or resuming one if needed.
    pub async fn acquire(&self, _key: &SessionKey) -> Result<Lease, ActivationError> {
        Err(ActivationError::ShuttingDown)
    }

    /// All sessions, for the admin API.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        Vec::new()
    }

    /// One session, for the admin API.
    pub fn session(&self, _key: &SessionKey) -> Option<SessionInfo> {
        None
    }

    /// Releases a session now (admin `DELETE`). Returns false if unknown.
    pub async fn release(&self, _key: &SessionKey) -> Result<bool, ActivationError> {
        Ok(false)
    }

    /// Pauses a session now (admin `POST .../pause`).
    pub async fn pause(&self, _key: &SessionKey) -> Result<bool, ActivationError> {
        Ok(false)
    }

    /// Resumes a session now (admin `POST .../resume`).
    pub async fn resume(&self, _key: &SessionKey) -> Result<bool, ActivationError> {
        Ok(false)
    }

    /// Refuses new activations and releases nothing: called when draining starts.
    pub fn begin_shutdown(&self) {}

    /// Session counts by state, for `activator_sessions{state}` at scrape time.
    pub fn session_counts(&self) -> Vec<(&'static str, i64)> {
        Vec::new()
    }

    /// New sessions currently waiting for capacity (autoscaler demand).
    pub fn waiting_sessions(&self) -> usize {
        0
    }

    /// Bound sessions with a request in flight or inside their idle window.
    pub fn active_sessions(&self) -> usize {
        0
    }
}
