//! `IdleScheduler`: applies `idle.policy` and `idle.session_ttl`, and reports activity.
//!
//! Every `idle.sweep_interval` it looks at each session once. `idle.timeout` counts from
//! the end of the session's last request (a held `Permit` — an open stream or WebSocket —
//! is a request in flight). The in-flight check and the move to `Pausing`/`Releasing`
//! happen under the entry's lock, the same lock the fast path takes to count a request,
//! so a session is never paused under live traffic.
//!
//! The pass is also where active sessions are counted (for the autoscaler), so the table
//! is scanned once per interval, not once per reader; and it yields to the runtime every
//! [`SWEEP_CHUNK`] entries, so a table of 100,000 sessions never stalls request tasks
//! sharing its worker thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use tokio::time::{Instant, MissedTickBehavior};

use super::entry::SessionEntry;
use super::lifecycle::{Event, SessionPhase};
use super::transition::{Payload, Transitions};
use crate::backend::SandboxId;

/// Entries examined between two yields to the runtime.
const SWEEP_CHUNK: usize = 1024;

/// Decides when sessions are idle and steps them (`IdleDue`, `TtlExpired`).
pub(crate) struct IdleScheduler {
    transitions: Weak<Transitions>,
    /// Active sessions as counted by the last pass (read by the stats sampler and the
    /// autoscaler every second, so they never scan the table themselves).
    active: AtomicUsize,
}

impl IdleScheduler {
    pub(crate) fn new(transitions: &Arc<Transitions>) -> Arc<IdleScheduler> {
        Arc::new(IdleScheduler {
            transitions: Arc::downgrade(transitions),
            active: AtomicUsize::new(0),
        })
    }

    /// Starts the loop; it ends once the transitions' owner is dropped.
    pub(crate) fn spawn(self: &Arc<Self>) {
        let Some(transitions) = self.transitions.upgrade() else {
            return;
        };
        let period = transitions.settings.sweep_interval;
        drop(transitions);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(transitions) = this.transitions.upgrade() else {
                    return;
                };
                this.sweep(&transitions, Instant::now()).await;
            }
        });
    }

    /// Bound sessions with a request in flight or inside their idle window, as counted by
    /// the last pass.
    pub(crate) fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// One pass over the table at `now`, yielding every [`SWEEP_CHUNK`] entries.
    pub(crate) async fn sweep(&self, transitions: &Arc<Transitions>, now: Instant) {
        let settings = &transitions.settings;
        // Snapshot first: entries are locked below, never while a shard lock is held
        // by this loop (see the lock order in `table`).
        let entries = transitions.table.snapshot();
        let mut report: Vec<(Arc<SessionEntry>, SandboxId)> = Vec::new();
        let mut active = 0;
        for (i, entry) in entries.into_iter().enumerate() {
            if i > 0 && i % SWEEP_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            let st = entry.lock();
            let event = match st.phase {
                SessionPhase::Ready => {
                    if let Some(b) = &st.bound
                        && entry.activity_to_report(now, settings.activity_report_interval)
                    {
                        report.push((Arc::clone(&entry), b.sandbox.clone()));
                    }
                    if entry.in_flight() > 0 || entry.idle_for(now) < settings.idle_timeout {
                        active += 1;
                        continue;
                    }
                    Event::IdleDue(settings.idle_policy)
                }
                SessionPhase::Paused | SessionPhase::Lost | SessionPhase::Unbound
                    if now.saturating_duration_since(st.since) >= settings.session_ttl =>
                {
                    Event::TtlExpired
                }
                _ => continue,
            };
            drop(
                transitions
                    .apply(&entry, st, event, Payload::default())
                    .task,
            );
        }
        self.active.store(active, Ordering::Relaxed);
        for (entry, sandbox) in report {
            transitions.backend.record_activity(&entry.key, &sandbox);
        }
    }
}
