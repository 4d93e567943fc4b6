//! Graceful shutdown: the phase signal every listener watches, the tracker that counts
//! connections and relayed streams, and the OS signal future (SIGTERM/SIGINT).
//!
//! Phases: `Running` -> `Unready` (readiness 503 while everything keeps serving and the
//! listener keeps accepting, for `proxy.drain_delay`, so endpoints can be updated) ->
//! `Draining` (listeners closed, connections asked to finish, idle ones closed at once)
//! -> `Closed` (whatever is still open after `proxy.drain_timeout` is cut).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Where the process is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Readiness is 503; still accepting and serving (`proxy.drain_delay`).
    Unready,
    /// No new connections; in-flight requests and streams may finish.
    Draining,
    /// The drain window is over: remaining connections and streams are dropped.
    Closed,
}

/// The shutdown phase, shared by the server, its listeners and the admin readiness check.
#[derive(Clone)]
pub struct Shutdown {
    phase: Arc<watch::Sender<Phase>>,
    tracker: Tracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            phase: Arc::new(watch::channel(Phase::Running).0),
            tracker: Tracker::default(),
        }
    }

    /// Moves to `phase` if that is later than the current one. Returns whether it moved.
    pub fn advance(&self, phase: Phase) -> bool {
        self.phase.send_if_modified(|p| {
            if *p < phase {
                *p = phase;
                true
            } else {
                false
            }
        })
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// True once shutdown has begun (readiness turns 503), drain delay included.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Unready
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// Counts connections and relayed streams that a drain waits for.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }
}

/// Counts live connections and upgraded streams; [`Tracker::idle`] waits for zero.
#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    count: AtomicUsize,
    idle: Notify,
}

/// Held by one connection task or stream relay; dropping it may wake [`Tracker::idle`].
pub struct TrackGuard {
    inner: Arc<TrackerInner>,
}

impl Tracker {
    /// Counts one more connection or stream until the guard drops.
    pub fn track(&self) -> TrackGuard {
        self.inner.count.fetch_add(1, Ordering::AcqRel);
        TrackGuard {
            inner: self.inner.clone(),
        }
    }

    /// How many are open now.
    pub fn count(&self) -> usize {
        self.inner.count.load(Ordering::Acquire)
    }

    /// Resolves when nothing is tracked.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.inner.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received: draining"),
                    _ = int.recv() => tracing::info!("SIGINT received: draining"),
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; falling back to Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward() {
        let s = Shutdown::new();
        assert!(!s.is_draining());
        assert!(s.advance(Phase::Draining));
        assert!(!s.advance(Phase::Running));
        assert!(s.is_draining());
        s.reached(Phase::Draining).await;
        assert!(s.advance(Phase::Closed));
        s.reached(Phase::Draining).await;
    }

    #[tokio::test]
    async fn tracker_waits_for_zero() {
        let s = Shutdown::new();
        let g1 = s.tracker().track();
        let g2 = s.tracker().track();
        let t = s.tracker().clone();
        let waiter = tokio::spawn(async move { t.idle().await });
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("idle after the last guard")
            .unwrap();
    }
}
