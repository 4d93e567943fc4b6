//! `Transitions`: executes lifecycle steps: the one place a session's phase changes.
//!
//! [`Transitions::apply`] (and, for the slow path, [`Transitions::commit`]) reads the
//! entry's facts, asks the pure [`lifecycle::step`] where the session goes, and carries out
//! its effects with the entry locked: moves the binding, grants or fails the queue, spawns
//! the backend call. Nothing else assigns `EntryState::phase`. The calls themselves (the
//! claim, resume, pause and release tasks) are in `transition/calls.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::deadlines::Deadlines;
use super::entry::{Bound, EntryState, SessionEntry};
use super::idle::Reporter;
use super::lifecycle::{
    self, BindingChange, Call, Cause, Event, Facts, IdleClock, Reply, SessionPhase, Step, Waiters,
};
use super::queue::ActivationQueue;
use super::settings::Settings;
use super::table::SessionTable;
use super::{ActivationError, HeldFor};
use crate::backend::{ActivationKind, BackendError, DynBackend, SandboxId};
use crate::config::Config;
use crate::events::{EventBus, Publisher};
use crate::metrics::Metrics;

mod calls;

/// A spawned backend call; admin operations await it.
pub(crate) type CallTask = JoinHandle<Result<(), ActivationError>>;

/// Data a step's effects may need: what the ended backend call returned.
#[derive(Default)]
pub(crate) struct Payload {
    /// For `BindingChange::Adopt`: the claimed sandbox.
    pub binding: Option<Bound>,
    /// For `BindingChange::SetEndpoint`.
    pub endpoint: Option<SocketAddr>,
    /// What granted waiters waited for.
    pub kind: Option<ActivationKind>,
    /// The path the granted waiters took (`activator_request_held_seconds`).
    pub held_for: Option<HeldFor>,
    /// For `Cause::Outcome`: the call's error.
    pub error: Option<ActivationError>,
    /// How long the ended call took (for the event stream).
    pub waited: Option<std::time::Duration>,
    /// Why a release was made (for the event stream).
    pub reason: Option<&'static str>,
}

/// What an applied step tells its caller.
pub(crate) struct Applied {
    pub reply: Reply,
    /// The backend call the step started, if any.
    pub task: Option<CallTask>,
    /// For `Reply::Refuse`: the error, as the entry stood before the step.
    pub refused: Option<ActivationError>,
}

/// The session table and everything a transition touches (the activator's private
/// context): owns the one executor of lifecycle steps.
pub(crate) struct Transitions {
    pub(crate) table: SessionTable,
    pub(crate) backend: DynBackend,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: Settings,
    pub(crate) queue: Arc<ActivationQueue>,
    /// Claims running for new sessions.
    claiming: AtomicUsize,
    shutting_down: AtomicBool,
    /// Woken whenever a step settles (admin operations wait on it).
    pub(crate) settled: Notify,
    /// Transitions published on `GET /api/events`.
    pub(crate) events: Publisher,
    /// Settled sessions by the instant the idle scheduler looks at them next.
    pub(crate) deadlines: Arc<Deadlines>,
    /// Sessions with traffic to report to the backend.
    pub(crate) reporter: Reporter,
    /// `Ready` sessions with a request in flight or inside their idle window.
    active: AtomicUsize,
    /// `hooks.*`: calls into the sandbox before a pause and after a resume.
    pub(crate) hooks: super::hooks::Hooks,
}

impl Transitions {
    pub(crate) fn new(
        config: &Config,
        backend: DynBackend,
        metrics: Arc<Metrics>,
        bus: Option<(Arc<EventBus>, Arc<str>)>,
    ) -> Arc<Transitions> {
        let settings = Settings::new(config, backend.capabilities().pause);
        let queue = Arc::new(ActivationQueue::new(
            config.activation.max_queued_per_session,
            config.activation.max_queued_total,
            metrics.queued_requests.clone(),
        ));
        let events = match bus {
            Some((bus, pool)) => Publisher::new(bus, &metrics).for_pool(Some(pool)),
            None => Publisher::new(
                Arc::new(EventBus::new(config.telemetry.events.buffer)),
                &metrics,
            ),
        };
        let hooks = super::hooks::Hooks::new(&config.hooks, metrics.hook_calls_total.clone());
        Arc::new(Transitions {
            hooks,
            events,
            deadlines: Arc::default(),
            reporter: Reporter::default(),
            active: AtomicUsize::new(0),
            table: SessionTable::default(),
            backend,
            metrics,
            settings,
            queue,
            claiming: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            settled: Notify::new(),
        })
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// New sessions whose claim runs now.
    pub(crate) fn claiming(&self) -> usize {
        self.claiming.load(Ordering::Acquire)
    }

    /// What the lifecycle needs to know about a locked entry.
    pub(crate) fn facts(&self, entry: &SessionEntry, st: &EntryState) -> Facts {
        Facts {
            queued: !st.waiters.is_empty(),
            in_flight: entry.in_flight() > 0,
            shutting_down: self.is_shutting_down(),
            state_lost_pending: st.state_lost_pending,
            lost_meanwhile: st.lost_meanwhile,
            on_loss: self.settings.on_loss,
        }
    }

    /// Steps a locked entry on `event` and executes the effects; if the phase moved,
    /// settles (removes a `Gone` entry, wakes admin waiters). Unlocks either way.
    pub(crate) fn apply(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        mut st: MutexGuard<'_, EntryState>,
        event: Event,
        payload: Payload,
    ) -> Applied {
        let facts = self.facts(entry, &st);
        let event = lifecycle::resolve(event, &facts);
        let step = lifecycle::step(st.phase, event, &facts);
        let moved = step.phase != st.phase;
        let reply = step.effects.reply;
        let refused = match reply {
            Reply::Refuse(cause) => Some(self.error(cause, &st, None)),
            _ => None,
        };
        let task = self.commit(entry, &mut st, event, step, payload);
        if moved {
            self.settle(entry, st);
        }
        Applied {
            reply,
            task,
            refused,
        }
    }

    /// Executes `step` on a locked entry: binding, flags, phase, idle clock, waiters, then
    /// the backend call (spawned, so a request that gives up never cancels it).
    pub(crate) fn commit(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        event: Event,
        step: Step,
        mut payload: Payload,
    ) -> Option<CallTask> {
        let fx = step.effects;
        let now = Instant::now();
        let from = st.phase;
        // Cleared when the phase leaves Paused; a resume still needs to know.
        let deep_before = st.deep;
        let before = st.bound.as_ref().map(|b| b.sandbox.clone());
        // Published first: the event names the sandbox the session had before the step.
        self.publish_step(entry, st, event, &step, &payload);
        match fx.binding {
            Some(BindingChange::Adopt) => st.bound = payload.binding.take(),
            Some(BindingChange::SetEndpoint) => {
                if let Some(b) = st.bound.as_mut() {
                    b.endpoint = payload.endpoint;
                }
            }
            Some(BindingChange::DropEndpoint) => {
                if let Some(b) = st.bound.as_mut() {
                    b.endpoint = None;
                }
            }
            Some(BindingChange::Clear) => st.bound = None,
            Some(BindingChange::ReleaseDead) => {
                if let Some(old) = st.bound.take() {
                    let this = Arc::clone(self);
                    let key = entry.key.clone();
                    tokio::spawn(async move {
                        let _ = this.release_in_backend(&key, &old.sandbox, "lost").await;
                    });
                }
            }
            None => {}
        }
        if fx.count_loss {
            self.metrics.sessions_lost_total.inc();
            tracing::warn!(session = %entry.key, "sandbox lost");
        }
        if fx.state_lost {
            st.state_lost_pending = true;
        }
        if st.phase != step.phase {
            st.phase = step.phase;
            st.since = now;
            st.lost_meanwhile = false;
            if !matches!(st.phase, SessionPhase::Paused | SessionPhase::Suspending) {
                st.deep = false;
            }
        }
        if fx.deep_done {
            st.deep = true;
        }
        if fx.flag_lost {
            st.lost_meanwhile = true;
        }
        match fx.clock {
            Some(IdleClock::Touch) => {
                entry.touch(now);
                self.reporter.note(entry);
            }
            Some(IdleClock::Defer) => entry.defer_idle(now),
            None => {}
        }
        match fx.waiters {
            Some(Waiters::Grant) => {
                let kind = payload.kind.unwrap_or(ActivationKind::None);
                self.queue.grant_all(entry, st, kind, payload.held_for);
            }
            Some(Waiters::Fail(cause)) => {
                let err = self.error(cause, st, payload.error.take());
                self.queue.fail_all(st, &err);
            }
            None => {}
        }
        let task = fx.call.map(|call| self.spawn(entry, st, call, deep_before));
        self.bookkeep(entry, st, from, before, now);
        task
    }

    /// Keeps the table's indexes, the phase counts, the deadlines and the active count
    /// true after a step (entry locked).
    fn bookkeep(
        &self,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        from: SessionPhase,
        before: Option<SandboxId>,
        now: Instant,
    ) {
        let after = st.bound.as_ref().map(|b| &b.sandbox);
        if before.as_ref() != after {
            if let Some(b) = &before {
                self.table.unindex(b, entry);
            }
            if let Some(a) = after {
                self.table.index(a, entry);
            }
        }
        let changed = from != st.phase;
        if changed {
            self.table.moved(from, st.phase);
            self.set_active(entry, st.phase == SessionPhase::Ready);
        }
        self.keep_scheduled(entry, st, changed, now);
    }

    /// Every settled session has a deadline: `Ready` when its idle window would end,
    /// `Paused`/`Lost`/`Unbound` when `idle.session_ttl` runs out; others have none.
    fn keep_scheduled(
        &self,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        changed: bool,
        now: Instant,
    ) {
        let deep = self.settings.deep_after;
        let wait = match st.phase {
            SessionPhase::Ready => Some(self.settings.idle_timeout),
            // The deep tier comes first (`deep_after` < `session_ttl`).
            SessionPhase::Paused if !deep.is_zero() && !st.deep => Some(deep),
            SessionPhase::Paused | SessionPhase::Lost | SessionPhase::Unbound => {
                Some(self.settings.session_ttl)
            }
            _ => None,
        };
        match wait {
            Some(w) if changed || st.due.is_none() => {
                // A configured wait too long for the clock means "never" in practice.
                let at = now
                    .checked_add(w)
                    .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400));
                self.deadlines.schedule(entry, st, at);
            }
            Some(_) => {}
            None => self.deadlines.unschedule(entry, st),
        }
    }

    /// Takes a recovered entry into the deadlines and the active count.
    pub(crate) fn register(&self, entry: &Arc<SessionEntry>) {
        let mut st = entry.lock();
        if st.phase == SessionPhase::Ready {
            self.set_active(entry, true);
        }
        self.keep_scheduled(entry, &mut st, false, Instant::now());
    }

    /// Counts `entry` in (or out of) the active sessions; exact, whatever the order of
    /// calls. Call with the entry locked.
    #[inline]
    pub(crate) fn set_active(&self, entry: &SessionEntry, on: bool) {
        if entry.counted_active.load(Ordering::Relaxed) != on
            && entry.counted_active.swap(on, Ordering::AcqRel) != on
        {
            if on {
                self.active.fetch_add(1, Ordering::Relaxed);
            } else {
                self.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// `Ready` sessions with a request in flight or inside their idle window (kept
    /// incrementally: reading it is free).
    pub(crate) fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// The error a refused request or failed waiter gets for `cause`.
    pub(crate) fn error(
        &self,
        cause: Cause,
        st: &EntryState,
        outcome: Option<ActivationError>,
    ) -> ActivationError {
        match cause {
            Cause::Outcome => {
                outcome.unwrap_or(ActivationError::Timeout(self.settings.activation_timeout))
            }
            Cause::ShuttingDown => ActivationError::ShuttingDown,
            Cause::SandboxLost => ActivationError::SandboxLost,
            Cause::Busy => match st.bound.as_ref() {
                Some(b) => ActivationError::Backend(BackendError::Busy(b.sandbox.clone())),
                None => ActivationError::SandboxLost,
            },
        }
    }

    /// Spawns `call` for a locked entry already moved to the call's phase.
    fn spawn(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        call: Call,
        deep: bool,
    ) -> CallTask {
        let this = Arc::clone(self);
        let entry = Arc::clone(entry);
        let sandbox = st.bound.as_ref().map(|b| b.sandbox.clone());
        match call {
            Call::Claim => {
                st.bound = None;
                // Counted here, under the entry's lock, so the count is exact the moment a
                // claim starts (the autoscaler's demand signal).
                self.claiming.fetch_add(1, Ordering::AcqRel);
                self.metrics.waiting_sessions.inc();
                tokio::spawn(async move { this.run_claim(entry).await })
            }
            Call::Resume => {
                let held_for = HeldFor::of_resume(deep);
                tokio::spawn(async move { this.run_resume(entry, sandbox, held_for).await })
            }
            Call::Pause => tokio::spawn(async move { this.run_pause(entry, sandbox).await }),
            Call::DeepPause => tokio::spawn(async move { this.run_deep(entry, sandbox).await }),
            Call::Release(reason) => {
                tokio::spawn(async move { this.run_release(entry, sandbox, reason.as_str()).await })
            }
        }
    }

    /// Ends a step: unlocks, removes the entry if it is `Gone`, wakes admin waiters.
    pub(crate) fn settle(&self, entry: &Arc<SessionEntry>, st: MutexGuard<'_, EntryState>) {
        let gone = st.phase == SessionPhase::Gone;
        drop(st);
        if gone {
            self.table.forget(entry);
        }
        self.settled.notify_waiters();
    }

    fn claim_ended(&self) {
        self.claiming.fetch_sub(1, Ordering::AcqRel);
        self.metrics.waiting_sessions.dec();
    }
}
