//! `Activator`: single-flight claim/resume per session, the bounded wait queue, idle policy.
//!
//! CONTRACT (the proxy and admin API rely on these signatures):
//! - [`Activator::acquire`] is the only call on the request path. Fast path: the session is
//!   bound and ready -> a [`Permit`] without awaiting (one table lookup, or none through a
//!   connection's [`LeaseCache`]; one short lock).
//!   Slow path: the request joins the session's FIFO wait queue while exactly one claim or
//!   resume runs in a spawned task (a client that goes away does not cancel it).
//! - A [`Permit`] counts the request as in flight for its session until dropped; the proxy
//!   keeps it alive until the response body (or upgraded stream) ends, so idle pausing
//!   never hits live traffic.
//!
//! # Layout
//! - [`lifecycle`]: the pure state machine `(SessionPhase, Event) -> (SessionPhase, Effects)`.
//! - [`transition`]: `Transitions`, the one executor of lifecycle steps, and the backend
//!   calls (claim, resume, pause, release) it spawns; the activator's private context.
//! - [`table`]: `SessionTable`, the session map; [`orphans`]: bindings recovered by hash.
//! - [`entry`]: one table row: phase, binding, wait queue, lock-free in-flight count.
//! - [`acquire`]: the fast and slow acquire paths.
//! - [`queue`]: per-session and global queue bounds, waiter fan-out.
//! - [`idle`]: `IdleScheduler`, which steps sessions whose deadline came and reports activity.
//! - [`deadlines`]: `Deadlines`, settled sessions ordered by when they are due.
//! - [`events`]: `EventRouter`, backend events and restart recovery.
//! - [`admin`]: listings, counts and admin-initiated transitions.
//! - [`settings`]: the configuration the layer reads, resolved once.
//! - [`hooks`]: the pause/resume hooks, HTTP calls into the sandbox.
//! - [`publish`]: transition events for `GET /api/events`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::backend::{ActivationKind, BackendError, ClaimSpec, DynBackend, SandboxId};
use crate::config::Config;
use crate::customize::CustomizeError;
use crate::metrics::Metrics;
use crate::session::SessionKey;

mod acquire;
mod admin;
mod deadlines;
mod entry;
mod events;
mod held;
mod hooks;
mod idle;
mod lifecycle;
mod orphans;
mod publish;
mod queue;
mod settings;
mod table;
mod transition;

#[cfg(test)]
mod tests;

pub use acquire::LeaseCache;
pub use admin::{SessionCursor, SessionPage};
use entry::{Grant, InFlightGuard};
use events::EventRouter;
pub use held::HeldFor;
use idle::IdleScheduler;
use lifecycle::Event;
use transition::Transitions;

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
    /// A pause/resume hook failed with `on_failure: abort` (502 `hook_failed` for held
    /// requests, 409 for an admin pause); names the hook.
    #[error("the {0} hook failed")]
    Hook(&'static str),
}

/// Permission to forward one request to a session's sandbox. Dropping it ends the
/// request's in-flight count and stamps the session's last activity.
pub struct Permit {
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

impl Permit {
    fn from_grant(grant: Grant, waited: Duration) -> Permit {
        Permit {
            endpoint: grant.endpoint,
            sandbox: grant.sandbox,
            activation: grant.kind,
            waited,
            state_lost: grant.state_lost,
            _guard: grant.guard,
        }
    }

    /// The session's short hash, as logs show it; cached, so free on every request.
    pub fn session_hash(&self) -> &str {
        self._guard.session_hash()
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("endpoint", &self.endpoint)
            .field("sandbox", &self.sandbox)
            .field("activation", &self.activation)
            .field("waited", &self.waited)
            .field("state_lost", &self.state_lost)
            .finish()
    }
}

/// One row of `GET /api/sessions`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Short SHA-256 of the session ID (the raw ID only when `log.session_ids: full`).
    pub session: String,
    pub sandbox: Option<SandboxId>,
    /// unbound | activating | active | pausing | paused | suspending | resuming | releasing | lost
    pub state: &'static str,
    pub in_flight: u64,
    /// Seconds since the last request ended (0 while one is in flight).
    pub idle_seconds: f64,
    /// Where requests go; set while the sandbox runs (not while paused).
    pub endpoint: Option<SocketAddr>,
}

/// Owns the session table and drives every session's lifecycle against the backend.
pub struct Activator {
    transitions: Arc<Transitions>,
    idle: IdleScheduler,
    events: EventRouter,
}

impl Activator {
    /// Builds the activator; call [`Activator::spawn_background`] to start idle scheduling
    /// and backend event handling.
    pub fn new(config: &Config, backend: DynBackend, metrics: Arc<Metrics>) -> Arc<Activator> {
        Activator::build(config, backend, metrics, None)
    }

    /// An activator of pool `pool` publishing onto `bus`, which every pool shares (one
    /// `GET /api/events` stream; each event names its pool).
    pub fn for_pool(
        config: &Config,
        backend: DynBackend,
        metrics: Arc<Metrics>,
        bus: Arc<crate::events::EventBus>,
        pool: Arc<str>,
    ) -> Arc<Activator> {
        Activator::build(config, backend, metrics, Some((bus, pool)))
    }

    fn build(
        config: &Config,
        backend: DynBackend,
        metrics: Arc<Metrics>,
        bus: Option<(Arc<crate::events::EventBus>, Arc<str>)>,
    ) -> Arc<Activator> {
        let transitions = Transitions::new(config, backend, metrics, bus);
        Arc::new(Activator {
            idle: IdleScheduler::new(&transitions),
            events: EventRouter::new(&transitions),
            transitions,
        })
    }

    /// Starts the idle scheduler and the backend-event listener. They stop by themselves
    /// once the activator is dropped.
    pub fn spawn_background(self: &Arc<Self>) {
        self.idle.spawn();
        self.events.spawn();
    }

    /// Re-populates the table from the backend's own store (Kubernetes claims) after a
    /// restart. Call once before serving. Returns how many bindings were found; those
    /// known only by hash attach when a request whose ID hashes to them arrives.
    pub async fn recover(&self) -> Result<usize, ActivationError> {
        self.events.recover().await
    }

    /// Gets a ready sandbox for `key`, claiming or resuming one if needed. A session this
    /// call creates customises nothing (see [`Activator::acquire_with`]).
    pub async fn acquire(&self, key: &SessionKey) -> Result<Permit, ActivationError> {
        if let Some(permit) = acquire::try_ready(&self.transitions, key) {
            return Ok(permit);
        }
        let plain = self.transitions.settings.customizer.plain();
        acquire::acquire_slow(&self.transitions, key, &plain).await
    }

    /// [`Activator::acquire`] for a request that may create the session: if it does, the
    /// session keeps `spec` (from [`Activator::claim_spec`]) for all its claims; an
    /// existing session keeps its own and `spec` is ignored.
    pub async fn acquire_with(
        &self,
        key: &SessionKey,
        spec: &Arc<ClaimSpec>,
    ) -> Result<Permit, ActivationError> {
        if let Some(permit) = acquire::try_ready(&self.transitions, key) {
            return Ok(permit);
        }
        acquire::acquire_slow(&self.transitions, key, spec).await
    }

    /// The spec of a session that customised nothing (shared, no allocation).
    pub fn plain_spec(&self) -> Arc<ClaimSpec> {
        self.transitions.settings.customizer.plain()
    }

    /// The customisation a new session's first request asks for (`customize.*`): 400
    /// `invalid_customization` material when a header is not allowed or fails its pattern.
    pub fn claim_spec(&self, headers: &http::HeaderMap) -> Result<Arc<ClaimSpec>, CustomizeError> {
        self.transitions.settings.customizer.spec(headers)
    }

    /// The fast path alone: a permit if `key` is bound and ready, without waiting.
    pub fn try_acquire_ready(&self, key: &SessionKey) -> Option<Permit> {
        acquire::try_ready(&self.transitions, key)
    }

    /// [`Activator::try_acquire_ready`] through a client connection's cache of the
    /// sessions it carried lately: the same answer, usually without a table probe.
    pub fn try_acquire_ready_cached(
        &self,
        key: &SessionKey,
        cache: &mut LeaseCache,
    ) -> Option<Permit> {
        acquire::try_ready_cached(&self.transitions, key, cache)
    }

    /// Whether the table holds `key` (in any phase): a request for an unknown key starts
    /// a new session, which `session.max_sessions`/`create_rate` bound.
    pub fn knows(&self, key: &SessionKey) -> bool {
        self.transitions.table.contains(key)
    }

    /// The identity of `key`'s table entry (unique per process): a session released and
    /// created again under the same ID has another. Previews are scoped to it.
    pub fn entry_id(&self, key: &SessionKey) -> Option<u64> {
        self.transitions.table.with(key, |entry| entry.id)
    }

    /// Sessions in the table, in any phase (`session.max_sessions` counts these).
    pub fn session_total(&self) -> usize {
        self.transitions.table.len()
    }

    /// All sessions, for the admin API.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        admin::sessions(&self.transitions)
    }

    /// One page of the admin listing: at most `limit` sessions after `after`, ordered by
    /// the SHA-256 of their IDs. Walks the whole table (O(n log limit)): call it off the
    /// runtime's workers (`spawn_blocking`).
    pub fn sessions_page(&self, after: Option<&SessionCursor>, limit: usize) -> SessionPage {
        admin::sessions_page(&self.transitions, after, limit)
    }

    /// One session, for the admin API.
    pub fn session(&self, key: &SessionKey) -> Option<SessionInfo> {
        admin::session(&self.transitions, key)
    }

    /// The sessions whose short hash (as listings show it) is `hash`: normally one, none
    /// if unknown, several only on a hash-prefix collision.
    pub fn keys_by_hash(&self, hash: &str) -> Vec<SessionKey> {
        admin::keys_by_hash(&self.transitions, hash)
    }

    /// Releases a session now (admin `DELETE`), even with requests in flight (they finish
    /// against the old sandbox). `Ok(false)`: unknown session. Waits (bounded by
    /// `activation.timeout`) for a running transition to end first.
    pub async fn release(&self, key: &SessionKey) -> Result<bool, ActivationError> {
        admin::admin_op(&self.transitions, key, Event::AdminRelease).await
    }

    /// Pauses a session now (admin `POST .../pause`). `Ok(false)`: unknown session (or one
    /// without a sandbox); `Ok(true)`: paused (or already was). Errors:
    /// `Backend(Unsupported)` when the backend cannot pause, `Backend(Busy)` while a request
    /// is in flight (live traffic is never paused), `SandboxLost`.
    pub async fn pause(&self, key: &SessionKey) -> Result<bool, ActivationError> {
        admin::admin_op(&self.transitions, key, Event::AdminPause).await
    }

    /// Resumes a session now (admin `POST .../resume`). `Ok(false)`: unknown session (or
    /// one without a sandbox); `Ok(true)`: running (or already was).
    pub async fn resume(&self, key: &SessionKey) -> Result<bool, ActivationError> {
        admin::admin_op(&self.transitions, key, Event::AdminResume).await
    }

    /// Refuses new activations (claims and resumes get `ShuttingDown`) and releases
    /// nothing: ready sessions keep serving during the drain; idle pausing stops.
    pub fn begin_shutdown(&self) {
        self.transitions.begin_shutdown();
    }

    /// Session counts by state (every state, zeros included), for
    /// `activator_sessions{state}` at scrape time.
    pub fn session_counts(&self) -> Vec<(&'static str, i64)> {
        admin::session_counts(&self.transitions)
    }

    /// New sessions currently waiting for a claim (capacity): autoscaler demand.
    pub fn waiting_sessions(&self) -> usize {
        self.transitions.claiming()
    }

    /// Bound sessions with a request in flight or inside their idle window, as counted by
    /// the last idle pass (so at most `idle.sweep_interval` old; reading it is free).
    pub fn active_sessions(&self) -> usize {
        self.transitions.active_sessions()
    }

    /// The transition event stream (`GET /api/events`).
    pub fn events(&self) -> &Arc<crate::events::EventBus> {
        self.transitions.events.bus()
    }

    /// Requests waiting across all sessions (`activator_queued_requests`).
    pub fn queued_requests(&self) -> usize {
        self.transitions.queue.total()
    }
}
