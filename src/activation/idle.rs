//! `IdleScheduler`: applies `idle.policy` and `idle.session_ttl` by deadline, and reports
//! activity.
//!
//! Idleness is decided by deadline, not by scanning the table: every session in a settled
//! phase sits in [`Deadlines`](super::deadlines) at the instant it must be looked at
//! again, and one task pops what is due (woken by a `Notify` when an earlier deadline
//! arrives, else sleeping until the first one). `idle.timeout` counts from the end of the
//! session's last request (a held `Permit` — an open stream or WebSocket — is a request in
//! flight). The in-flight check and the move to `Pausing`/`Releasing` happen under the
//! entry's lock, the same lock the fast path takes to count a request, so a session is
//! never paused under live traffic. The task yields every [`CHUNK`] sessions, so a burst
//! of deadlines never stalls request tasks sharing its worker thread.
//!
//! Activity reports (`backend.record_activity`, at most once per
//! `activity_report_interval` per session with traffic) come from a second loop over the
//! sessions the request path marked since the last round (see [`Reporter`]), not from a
//! table scan either.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::deadlines::Deadlines;
use super::entry::SessionEntry;
use super::lifecycle::{Event, SessionPhase};
use super::transition::{Payload, Transitions};
use crate::lock::MutexExt;

/// Sessions handled between two yields to the runtime.
const CHUNK: usize = 1024;

/// Decides when sessions are idle and steps them (`IdleDue`, `TtlExpired`).
pub(crate) struct IdleScheduler {
    transitions: Weak<Transitions>,
    deadlines: Arc<Deadlines>,
}

impl IdleScheduler {
    pub(crate) fn new(transitions: &Arc<Transitions>) -> IdleScheduler {
        IdleScheduler {
            transitions: Arc::downgrade(transitions),
            deadlines: Arc::clone(&transitions.deadlines),
        }
    }

    /// Starts the deadline loop and the activity reporter; both end within a second of
    /// the activator being dropped.
    pub(crate) fn spawn(&self) {
        let Some(transitions) = self.transitions.upgrade() else {
            return;
        };
        let interval = transitions.settings.activity_report_interval;
        let nap = transitions.settings.sweep_interval;
        drop(transitions);
        tokio::spawn(deadline_loop(
            self.transitions.clone(),
            Arc::clone(&self.deadlines),
            nap,
        ));
        tokio::spawn(report_loop(self.transitions.clone(), interval));
    }
}

/// Pops due sessions and checks them; sleeps until the first deadline, an earlier one
/// being inserted, or `nap` (`idle.sweep_interval`: the longest it sleeps without noticing
/// that the activator is gone).
async fn deadline_loop(weak: Weak<Transitions>, deadlines: Arc<Deadlines>, nap: Duration) {
    loop {
        // Registered before popping, so a deadline inserted meanwhile still wakes us.
        let changed = deadlines.changed.notified();
        let Some(transitions) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        let (due, next) = deadlines.pop_due(now, CHUNK);
        let full = due.len() == CHUNK;
        for (at, entry) in due {
            check(&transitions, &entry, at, now);
        }
        drop(transitions);
        if full {
            tokio::task::yield_now().await;
            continue;
        }
        let wake = next.map_or(now + nap, |n| n.min(now + nap));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = changed => {}
        }
    }
}

/// Looks at one session whose deadline `at` came.
fn check(transitions: &Arc<Transitions>, entry: &Arc<SessionEntry>, at: Instant, now: Instant) {
    let settings = &transitions.settings;
    let mut st = entry.lock();
    if st.due != Some(at) {
        return; // rescheduled (or unscheduled) since it was popped
    }
    st.due = None;
    let event = match st.phase {
        SessionPhase::Ready => {
            if entry.in_flight() > 0 {
                transitions
                    .deadlines
                    .schedule(entry, &mut st, now + settings.idle_timeout);
                transitions.set_active(entry, true);
                return;
            }
            let idle = entry.idle_for(now);
            if idle < settings.idle_timeout {
                transitions.deadlines.schedule(
                    entry,
                    &mut st,
                    now + (settings.idle_timeout - idle),
                );
                transitions.set_active(entry, true);
                return;
            }
            transitions.set_active(entry, false);
            Event::IdleDue(settings.idle_policy)
        }
        SessionPhase::Paused if !settings.deep_after.is_zero() && !st.deep => {
            let deep_at = st.since + settings.deep_after;
            if now < deep_at {
                transitions.deadlines.schedule(entry, &mut st, deep_at);
                return;
            }
            Event::DeepDue
        }
        SessionPhase::Paused | SessionPhase::Lost | SessionPhase::Unbound => {
            let until = st.since + settings.session_ttl;
            if now < until {
                transitions.deadlines.schedule(entry, &mut st, until);
                return;
            }
            Event::TtlExpired
        }
        _ => return,
    };
    // A step that changes nothing (policy keep, draining, a request queued) leaves the
    // entry settled without a deadline: the executor schedules it again.
    drop(transitions.apply(entry, st, event, Payload::default()).task);
}

/// Sessions with traffic since the last report round; the request path adds a session the
/// first time it sees traffic after a round (one relaxed load per request otherwise).
#[derive(Default)]
pub(crate) struct Reporter {
    marked: Mutex<Vec<Arc<SessionEntry>>>,
}

impl Reporter {
    /// Notes traffic on `entry`.
    #[inline]
    pub(crate) fn note(&self, entry: &Arc<SessionEntry>) {
        if !entry.report_pending.load(Ordering::Relaxed)
            && !entry.report_pending.swap(true, Ordering::AcqRel)
        {
            self.marked.lock_recovered().push(Arc::clone(entry));
        }
    }

    fn take(&self) -> Vec<Arc<SessionEntry>> {
        std::mem::take(&mut *self.marked.lock_recovered())
    }
}

async fn report_loop(weak: Weak<Transitions>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(transitions) = weak.upgrade() else {
            return;
        };
        let marked = transitions.reporter.take();
        for (i, entry) in marked.into_iter().enumerate() {
            if i > 0 && i % CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            let sandbox = {
                let st = entry.lock();
                (st.phase == SessionPhase::Ready)
                    .then(|| st.bound.as_ref().map(|b| b.sandbox.clone()))
                    .flatten()
            };
            if let Some(sandbox) = sandbox {
                transitions.backend.record_activity(&entry.key, &sandbox);
            }
            // A request still in flight (a stream) is traffic next round too.
            entry.report_pending.store(false, Ordering::Release);
            if entry.in_flight() > 0 {
                transitions.reporter.note(&entry);
            }
        }
    }
}
