//! `SessionEntry`: one row of the session table — lifecycle phase, binding, in-flight count.
//!
//! The phase, binding and wait queue sit behind a `std::sync::Mutex`: no `.await` ever
//! happens while it is held, and every critical section is a handful of field writes. The
//! in-flight count and last-activity stamp are atomics so that dropping a [`InFlightGuard`]
//! (the end of every request) never takes the lock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lifecycle::SessionPhase;
use super::{ActivationError, HeldFor};
use crate::backend::{ActivationKind, ClaimSpec, SandboxId};
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// The sandbox a session is pinned to.
#[derive(Debug, Clone)]
pub(crate) struct Bound {
    pub sandbox: SandboxId,
    /// Unknown only for a paused sandbox recovered after a restart; the resume sets it.
    pub endpoint: Option<SocketAddr>,
}

/// What a waiter receives when its session becomes ready.
pub(crate) struct Grant {
    pub guard: InFlightGuard,
    pub endpoint: SocketAddr,
    pub sandbox: SandboxId,
    pub kind: ActivationKind,
    /// What the request was held for (`None`: nothing was activated for it).
    pub held_for: Option<HeldFor>,
    pub state_lost: bool,
}

/// One queued request.
pub(crate) struct Waiter {
    pub id: u64,
    pub tx: oneshot::Sender<Result<Grant, ActivationError>>,
}

/// The mutable part of an entry, guarded by [`SessionEntry::lock`].
pub(crate) struct EntryState {
    pub phase: SessionPhase,
    pub bound: Option<Bound>,
    /// Requests waiting for the running transition, in arrival order.
    pub waiters: VecDeque<Waiter>,
    /// When the current phase began (paused-since for TTL, lost-since for cleanup).
    pub since: Instant,
    /// The next lease gets `state_lost = true` (the previous sandbox died, `reclaim`).
    pub state_lost_pending: bool,
    /// A `Lost` event arrived while a pause or resume ran: its result is not trusted.
    pub lost_meanwhile: bool,
    /// When the idle scheduler looks at the entry next (its key in `Deadlines`).
    pub due: Option<Instant>,
    /// Paused in the deep tier already (`idle.deep_after`); cleared when it runs again.
    pub deep: bool,
}

/// One session: its key, its locked state and its lock-free counters.
pub(crate) struct SessionEntry {
    pub key: SessionKey,
    /// Unique per entry (process-wide): orders equal deadlines and names the entry in
    /// the indexes without hashing its key.
    pub id: u64,
    /// `key.short_hash()`, computed once: the access log and the admin API show it for
    /// every request and listing, and a SHA-256 per request is work a cached value answers.
    pub short_hash: Box<str>,
    /// The session's claim-time customisation, fixed when the session was created: every
    /// claim for it (the first, and a re-claim after a lost sandbox) carries it.
    pub spec: Arc<ClaimSpec>,
    state: Mutex<EntryState>,
    in_flight: AtomicU64,
    /// The origin of the nanosecond stamps below.
    created: Instant,
    /// Nanoseconds after `created` when the last request ended (or the session got ready).
    last_activity_ns: AtomicU64,
    /// Counted in the active-sessions figure (`Transitions::set_active`).
    pub(crate) counted_active: AtomicBool,
    /// Waiting in the activity reporter's list (`idle::Reporter`).
    pub(crate) report_pending: AtomicBool,
}

/// The next `SessionEntry::id`.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl SessionEntry {
    pub(crate) fn new(
        key: SessionKey,
        phase: SessionPhase,
        bound: Option<Bound>,
        spec: Arc<ClaimSpec>,
    ) -> Arc<SessionEntry> {
        let now = Instant::now();
        Arc::new(SessionEntry {
            short_hash: key.short_hash().into_boxed_str(),
            key,
            spec,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(EntryState {
                phase,
                bound,
                waiters: VecDeque::new(),
                since: now,
                state_lost_pending: false,
                lost_meanwhile: false,
                due: None,
                deep: false,
            }),
            in_flight: AtomicU64::new(0),
            created: now,
            last_activity_ns: AtomicU64::new(0),
            counted_active: AtomicBool::new(false),
            report_pending: AtomicBool::new(false),
        })
    }

    /// Locks the state. A poisoned lock is recovered: every critical section leaves the
    /// state consistent before anything that could panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock_recovered()
    }

    /// Requests holding a lease on this session.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts one more request in flight. Call with the state locked, after checking that
    /// the phase is `Ready`, so the idle sweeper (which checks under the same lock) never
    /// pauses a session a request is about to use.
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlightGuard {
            entry: Arc::clone(self),
        }
    }

    fn nanos_since_created(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.created).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Marks the session active now (a request ended, or it just became ready).
    pub(crate) fn touch(&self, now: Instant) {
        self.last_activity_ns
            .fetch_max(self.nanos_since_created(now), Ordering::Release);
    }

    /// Restarts the idle clock without it counting as traffic to report: a refused pause
    /// is not activity, and reporting it (an activity stamp on a shared store) would make
    /// two idle replicas refuse each other's pauses forever. (Only the request path marks
    /// a session for the activity reporter.)
    pub(crate) fn defer_idle(&self, now: Instant) {
        self.touch(now);
    }

    /// How long the session has had no request in flight (zero while one is).
    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        if self.in_flight() > 0 {
            return Duration::ZERO;
        }
        let last = self.last_activity_ns.load(Ordering::Acquire);
        Duration::from_nanos(self.nanos_since_created(now).saturating_sub(last))
    }
}

/// Counts one request in flight for a session until dropped; dropping it stamps the
/// session's last activity. Lock-free, so it may be dropped anywhere (even while the
/// entry's own lock is held, as when a grant cannot be delivered).
pub(crate) struct InFlightGuard {
    entry: Arc<SessionEntry>,
}

impl InFlightGuard {
    /// The session's short hash (cached on its entry).
    pub(crate) fn session_hash(&self) -> &str {
        &self.entry.short_hash
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Stamp before decrementing: a sweeper that sees zero in flight (Acquire) also sees
        // the stamp, so it never measures idleness from a stale activity time.
        self.entry.touch(Instant::now());
        self.entry.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
