//! The session table (`SessionKey -> Arc<SessionEntry>` in a `DashMap`) and both acquire paths.
//!
//! Lock order: a table shard lock may be held while an entry is locked (the fast path
//! does), never the reverse — code that removes an entry drops the entry's lock first
//! (see [`Shared::settle`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::entry::{EntryState, Grant, Phase, SessionEntry};
use super::events::Orphans;
use super::queue::{ActivationQueue, WaitTicket};
use super::{ActivationError, Lease};
use crate::backend::{ActivationKind, DynBackend};
use crate::config::{Config, IdlePolicy, OnSandboxLoss, SessionIdLogging};
use crate::events::{EventBus, EventKind, Publisher};
use crate::metrics::Metrics;
use crate::session::SessionKey;

/// The configuration the activation layer reads, resolved once.
pub(crate) struct Settings {
    pub activation_timeout: Duration,
    pub admission_timeout: Duration,
    pub idle_timeout: Duration,
    pub session_ttl: Duration,
    pub sweep_interval: Duration,
    pub idle_policy: IdlePolicy,
    pub on_loss: OnSandboxLoss,
    pub full_ids: bool,
    pub can_pause: bool,
    /// Shortest interval between two `record_activity` calls for one session.
    pub activity_report_interval: Duration,
}

impl Settings {
    fn new(config: &Config, can_pause: bool) -> Settings {
        let mut idle_policy = config.effective_idle_policy(can_pause);
        if idle_policy == IdlePolicy::Pause && !can_pause {
            tracing::warn!(
                "idle.policy: pause is not supported by this backend; idle sessions are released"
            );
            idle_policy = IdlePolicy::Release;
        }
        Settings {
            activation_timeout: config.activation.timeout.into(),
            admission_timeout: config.session.admission_timeout.into(),
            idle_timeout: config.idle.timeout.into(),
            session_ttl: config.idle.session_ttl.into(),
            sweep_interval: config.idle.sweep_interval.into(),
            idle_policy,
            on_loss: config.activation.on_sandbox_loss,
            full_ids: config.log.session_ids == SessionIdLogging::Full,
            can_pause,
            activity_report_interval: Duration::from_secs(1),
        }
    }
}

/// Everything the activator's tasks share.
pub(crate) struct Shared {
    pub table: DashMap<SessionKey, Arc<SessionEntry>>,
    pub backend: DynBackend,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub queue: Arc<ActivationQueue>,
    /// Claims running for new sessions.
    pub claiming: AtomicUsize,
    pub shutting_down: AtomicBool,
    /// Woken whenever a transition ends (admin operations wait on it).
    pub settled: Notify,
    pub orphans: Orphans,
    /// Active sessions as counted by the last idle sweep (read by the stats sampler and
    /// the autoscaler every second, so they never scan the table themselves).
    pub active_counted: AtomicUsize,
    /// Transitions published on `GET /api/events`.
    pub events: Publisher,
}

impl Shared {
    pub(crate) fn new(config: &Config, backend: DynBackend, metrics: Arc<Metrics>) -> Arc<Shared> {
        let settings = Settings::new(config, backend.capabilities().pause);
        let queue = Arc::new(ActivationQueue::new(
            config.activation.max_queued_per_session,
            config.activation.max_queued_total,
            metrics.queued_requests.clone(),
        ));
        let events = Publisher::new(
            Arc::new(EventBus::new(config.telemetry.events.buffer)),
            &metrics,
        );
        Arc::new(Shared {
            table: DashMap::new(),
            backend,
            metrics,
            settings,
            queue,
            claiming: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            settled: Notify::new(),
            orphans: Orphans::default(),
            active_counted: AtomicUsize::new(0),
            events,
        })
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// The fast path: a lease if the session is bound and ready. No await, no allocation.
    #[inline]
    pub(crate) fn try_ready(&self, key: &SessionKey) -> Option<Lease> {
        let row = self.table.get(key)?;
        let entry = row.value();
        let st = entry.lock();
        if st.phase != Phase::Ready || st.state_lost_pending {
            return None;
        }
        let bound = st.bound.as_ref()?;
        let endpoint = bound.endpoint?;
        let sandbox = bound.sandbox.clone();
        // Counted under the lock the idle sweeper checks, so no pause can start now.
        let guard = entry.start_request();
        drop(st);
        Some(Lease {
            endpoint,
            sandbox,
            activation: ActivationKind::None,
            waited: Duration::ZERO,
            state_lost: false,
            _guard: guard,
        })
    }

    /// The slow path: join the session's queue, starting a claim or resume if none runs.
    pub(crate) async fn acquire_slow(
        self: &Arc<Self>,
        key: &SessionKey,
    ) -> Result<Lease, ActivationError> {
        let arrived = Instant::now();
        loop {
            match self.slow_step(key, arrived) {
                SlowStep::Retry => continue,
                SlowStep::Done(result) => return result,
                SlowStep::Wait(ticket, rx, budget) => {
                    let grant = ticket.wait(rx, arrived + budget, budget).await?;
                    return Ok(Lease::from_grant(grant, arrived.elapsed()));
                }
            }
        }
    }

    /// The locked part of the slow path (kept out of the async fn: no lock across await).
    fn slow_step(self: &Arc<Self>, key: &SessionKey, arrived: Instant) -> SlowStep {
        let entry = self.entry_for(key);
        let mut st = entry.lock();
        match st.phase {
            Phase::Gone => {
                // Removed while we looked it up: look again (it is out of the table).
                drop(st);
                self.forget(&entry);
                return SlowStep::Retry;
            }
            Phase::Ready => {
                if let Some(lease) = ready_lease(&entry, &mut st, arrived) {
                    return SlowStep::Done(Ok(lease));
                }
            }
            Phase::Lost => {
                // Reported once; the next request for this ID starts a new session.
                self.publish_rejected(&entry, &ActivationError::SandboxLost, None);
                st.phase = Phase::Gone;
                self.settle(&entry, st);
                return SlowStep::Done(Err(ActivationError::SandboxLost));
            }
            Phase::Unbound | Phase::Paused if self.is_shutting_down() => {
                drop(st);
                self.publish_rejected(&entry, &ActivationError::ShuttingDown, None);
                self.discard_if_unused(&entry);
                return SlowStep::Done(Err(ActivationError::ShuttingDown));
            }
            _ => {}
        }
        let new_session = matches!(
            st.phase,
            Phase::Unbound | Phase::Activating | Phase::Releasing
        );
        let (ticket, rx) = match self.queue.enqueue(&entry, &mut st) {
            Ok(t) => t,
            Err(e) => {
                drop(st);
                self.publish_rejected(&entry, &e, None);
                self.discard_if_unused(&entry);
                return SlowStep::Done(Err(e));
            }
        };
        let waits_for = match st.phase {
            Phase::Unbound | Phase::Activating => "claim",
            Phase::Paused | Phase::Resuming => "resume",
            Phase::Pausing => "pausing",
            _ => "releasing",
        };
        let sandbox = st.bound.as_ref().map(|b| &b.sandbox);
        self.publish(EventKind::Queued, &entry, sandbox, |d| d.reason(waits_for));
        match st.phase {
            Phase::Unbound => self.start_claim(&entry, &mut st),
            Phase::Paused => drop(self.start_resume(&entry, &mut st)),
            _ => {}
        }
        drop(st);
        let mut budget = self.settings.activation_timeout;
        if new_session {
            budget += self.settings.admission_timeout;
        }
        SlowStep::Wait(ticket, rx, budget)
    }

    /// The entry for `key`, inserting an `Unbound` one (or one recovered by hash) if absent.
    fn entry_for(&self, key: &SessionKey) -> Arc<SessionEntry> {
        if let Some(row) = self.table.get(key) {
            return Arc::clone(row.value());
        }
        // Computed before taking the shard's write lock: hashing is not free.
        let recovered = self.orphans.take(key);
        match self.table.entry(key.clone()) {
            Entry::Occupied(row) => {
                if let Some(r) = recovered {
                    self.orphans.put_back(r);
                }
                Arc::clone(row.get())
            }
            Entry::Vacant(slot) => {
                let fresh = match recovered {
                    Some(r) => r.into_entry(key.clone()),
                    None => SessionEntry::new(key.clone(), Phase::Unbound, None),
                };
                Arc::clone(slot.insert(fresh).value())
            }
        }
    }

    /// Removes `entry` from the table if it is still the one stored under its key.
    pub(crate) fn forget(&self, entry: &Arc<SessionEntry>) {
        self.table
            .remove_if(&entry.key, |_, stored| Arc::ptr_eq(stored, entry));
    }

    /// Ends a transition: unlocks, removes the entry if it is `Gone`, wakes admin waiters.
    pub(crate) fn settle(
        &self,
        entry: &Arc<SessionEntry>,
        st: std::sync::MutexGuard<'_, EntryState>,
    ) {
        let gone = st.phase == Phase::Gone;
        drop(st);
        if gone {
            self.forget(entry);
        }
        self.settled.notify_waiters();
    }

    /// Drops a brand-new entry that ended up with nothing to do (queue full, shutting down).
    fn discard_if_unused(&self, entry: &Arc<SessionEntry>) {
        let mut st = entry.lock();
        if st.phase == Phase::Unbound && st.waiters.is_empty() && !st.state_lost_pending {
            st.phase = Phase::Gone;
            drop(st);
            self.forget(entry);
        }
    }

    pub(crate) fn queued_requests(&self) -> usize {
        self.queue.total()
    }

    pub(crate) fn waiting_sessions(&self) -> usize {
        self.claiming.load(Ordering::Acquire)
    }
}

/// What the locked part of the slow path decided.
enum SlowStep {
    Retry,
    Done(Result<Lease, ActivationError>),
    Wait(
        WaitTicket,
        oneshot::Receiver<Result<Grant, ActivationError>>,
        Duration,
    ),
}

/// A lease on a ready session found on the slow path (it became ready meanwhile).
fn ready_lease(entry: &Arc<SessionEntry>, st: &mut EntryState, arrived: Instant) -> Option<Lease> {
    let bound = st.bound.as_ref()?;
    let endpoint = bound.endpoint?;
    let sandbox = bound.sandbox.clone();
    Some(Lease {
        endpoint,
        sandbox,
        activation: ActivationKind::None,
        waited: arrived.elapsed(),
        state_lost: std::mem::take(&mut st.state_lost_pending),
        _guard: entry.start_request(),
    })
}
