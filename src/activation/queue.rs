//! `ActivationQueue`: the bounded FIFO of requests waiting for a session's transition.
//!
//! Each session's waiters live in its entry (`EntryState::waiters`); this module enforces
//! the per-session and global bounds, hands out [`WaitTicket`]s that take a waiter back out
//! of the queue when its request gives up (timeout or client gone), and fans a result out
//! to every waiter exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus::IntGauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::entry::{EntryState, Grant, SessionEntry, Waiter};
use super::{ActivationError, HeldFor};
use crate::backend::ActivationKind;

/// Global queue accounting shared by every session.
pub(crate) struct ActivationQueue {
    max_per_session: usize,
    max_total: usize,
    total: AtomicUsize,
    next_id: AtomicU64,
    gauge: IntGauge,
}

impl ActivationQueue {
    pub(crate) fn new(max_per_session: usize, max_total: usize, gauge: IntGauge) -> Self {
        ActivationQueue {
            max_per_session,
            max_total,
            total: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            gauge,
        }
    }

    /// Requests waiting across all sessions.
    pub(crate) fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Appends a waiter to `st`'s queue if both bounds allow it. Call with the entry locked.
    pub(crate) fn enqueue(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
    ) -> Result<
        (
            WaitTicket,
            oneshot::Receiver<Result<Grant, ActivationError>>,
        ),
        ActivationError,
    > {
        if st.waiters.len() >= self.max_per_session {
            return Err(ActivationError::QueueFull("per-session limit reached"));
        }
        let max = self.max_total;
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(ActivationError::QueueFull("global limit reached"));
        }
        self.gauge.inc();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        st.waiters.push_back(Waiter { id, tx });
        let ticket = WaitTicket {
            entry: Arc::clone(entry),
            queue: Arc::clone(self),
            id,
        };
        Ok((ticket, rx))
    }

    fn dequeued(&self, n: usize) {
        if n > 0 {
            self.total.fetch_sub(n, Ordering::AcqRel);
            self.gauge.sub(n as i64);
        }
    }

    /// Releases every waiter of a ready session in arrival order, each with its own
    /// in-flight count. The first delivered grant carries `state_lost` if it is pending.
    /// Call with the entry locked and `st.phase == Ready`.
    pub(crate) fn grant_all(
        &self,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        kind: ActivationKind,
        held_for: Option<HeldFor>,
    ) {
        let Some((sandbox, endpoint)) = st
            .bound
            .as_ref()
            .and_then(|b| Some((b.sandbox.clone(), b.endpoint?)))
        else {
            // Unreachable by construction (Ready always has an endpoint); never strand
            // waiters if it happens anyway.
            debug_assert!(false, "grant_all on a session without an endpoint");
            self.fail_all(st, &ActivationError::SandboxLost);
            return;
        };
        let n = st.waiters.len();
        for w in st.waiters.drain(..) {
            let grant = Grant {
                guard: entry.start_request(),
                endpoint,
                sandbox: sandbox.clone(),
                kind,
                held_for,
                state_lost: st.state_lost_pending,
            };
            // A waiter whose request is gone drops the grant here (lock-free guard drop).
            if w.tx.send(Ok(grant)).is_ok() {
                st.state_lost_pending = false;
            }
        }
        self.dequeued(n);
    }

    /// Gives every waiter the same error. Call with the entry locked.
    pub(crate) fn fail_all(&self, st: &mut EntryState, err: &ActivationError) {
        let n = st.waiters.len();
        for w in st.waiters.drain(..) {
            let _ = w.tx.send(Err(err.clone()));
        }
        self.dequeued(n);
    }
}

/// A queued request's claim on its place. Dropping it (the request timed out or its
/// client went away) takes the waiter out of the queue if it is still there.
pub(crate) struct WaitTicket {
    entry: Arc<SessionEntry>,
    queue: Arc<ActivationQueue>,
    id: u64,
}

impl WaitTicket {
    /// Waits for the grant until `deadline`.
    pub(crate) async fn wait(
        self,
        rx: oneshot::Receiver<Result<Grant, ActivationError>>,
        deadline: Instant,
        budget: std::time::Duration,
    ) -> Result<Grant, ActivationError> {
        let result = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            // The sender was dropped without a result: only if the entry itself was
            // dropped, which a live transition never does. Report it as a timeout.
            Ok(Err(_)) => Err(ActivationError::Timeout(budget)),
            Err(_) => Err(ActivationError::Timeout(budget)),
        };
        drop(self);
        result
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        let mut st = self.entry.lock();
        if let Some(pos) = st.waiters.iter().position(|w| w.id == self.id) {
            st.waiters.remove(pos);
            drop(st);
            self.queue.dequeued(1);
        }
    }
}
