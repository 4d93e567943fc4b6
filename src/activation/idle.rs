//! The idle sweeper: applies `idle.policy`, `idle.session_ttl`, and reports activity.
//!
//! Every `idle.sweep_interval` it looks at each session once. `idle.timeout` counts from
//! the end of the session's last request (a held `Lease` — an open stream or WebSocket —
//! is a request in flight). The in-flight check and the move to `Pausing`/`Releasing`
//! happen under the entry's lock, the same lock the fast path takes to count a request,
//! so a session is never paused under live traffic.
//!
//! The pass is also where active sessions are counted (for the autoscaler), so the table
//! is scanned once per interval, not once per reader; and it yields to the runtime every
//! [`SWEEP_CHUNK`] entries, so a table of 100,000 sessions never stalls request tasks
//! sharing its worker thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::{Instant, MissedTickBehavior};

use super::entry::{Phase, SessionEntry};
use super::table::Shared;
use crate::backend::SandboxId;
use crate::config::IdlePolicy;

/// Entries examined between two yields to the runtime.
const SWEEP_CHUNK: usize = 1024;

impl Shared {
    /// Starts the sweeper and the backend-event listener; both end once `self` is dropped.
    pub(crate) fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.settings.sweep_interval;
        tokio::spawn(sweep_loop(weak.clone(), period));
        tokio::spawn(super::events::event_loop(weak, self.backend.subscribe()));
    }

    /// One pass over the table at `now`, yielding every [`SWEEP_CHUNK`] entries.
    pub(crate) async fn sweep(self: &Arc<Self>, now: Instant) {
        // Snapshot first: entries are locked below, never while a shard lock is held
        // by this loop (see the lock order in `table`).
        let entries: Vec<Arc<SessionEntry>> =
            self.table.iter().map(|r| Arc::clone(r.value())).collect();
        let mut report: Vec<(Arc<SessionEntry>, SandboxId)> = Vec::new();
        let mut active = 0;
        for (i, entry) in entries.into_iter().enumerate() {
            if i > 0 && i % SWEEP_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            let mut st = entry.lock();
            match st.phase {
                Phase::Ready => {
                    if let Some(b) = &st.bound
                        && entry.activity_to_report(now, self.settings.activity_report_interval)
                    {
                        report.push((Arc::clone(&entry), b.sandbox.clone()));
                    }
                    let busy =
                        entry.in_flight() > 0 || entry.idle_for(now) < self.settings.idle_timeout;
                    if busy {
                        active += 1;
                    }
                    if busy || self.is_shutting_down() {
                        continue;
                    }
                    match self.settings.idle_policy {
                        IdlePolicy::Pause => {
                            drop(self.start_pause(&entry, &mut st));
                        }
                        IdlePolicy::Release => {
                            drop(self.start_release(&entry, &mut st, "idle"));
                        }
                        IdlePolicy::Keep => {}
                    }
                }
                Phase::Paused
                    if !self.is_shutting_down()
                        && now.saturating_duration_since(st.since) >= self.settings.session_ttl =>
                {
                    drop(self.start_release(&entry, &mut st, "ttl"));
                }
                // Nobody came back for a lost or sandbox-less session: forget it after the TTL.
                Phase::Lost | Phase::Unbound
                    if st.waiters.is_empty()
                        && now.saturating_duration_since(st.since) >= self.settings.session_ttl =>
                {
                    st.phase = Phase::Gone;
                    self.settle(&entry, st);
                }
                _ => {}
            }
        }
        self.active_counted.store(active, Ordering::Relaxed);
        for (entry, sandbox) in report {
            self.backend.record_activity(&entry.key, &sandbox);
        }
    }
}

async fn sweep_loop(weak: Weak<Shared>, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        shared.sweep(Instant::now()).await;
    }
}
