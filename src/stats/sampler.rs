//! `StatsSampler`: closes a one-second bucket every second and publishes the snapshot.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::window::{Bucket, StatsSnapshot, StatsWindow};
use super::{TrafficStats, concurrency_micros_between};
use crate::config::AutoscalerConfig;
use crate::lock::MutexExt;
use crate::metrics::Metrics;

/// Session counts read from the session table at each sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounts {
    /// Bound sessions with a request in flight or inside their idle window.
    pub active: u64,
    /// New sessions waiting for a sandbox.
    pub waiting: u64,
}

/// Reads the session counts (the activator's `active_sessions()`/`waiting_sessions()`).
pub type SessionCountSource = Arc<dyn Fn() -> SessionCounts + Send + Sync>;

/// Bucket length.
pub const BUCKET: Duration = Duration::from_secs(1);

struct SamplerState {
    window: StatsWindow,
    last_at: Instant,
    last_integral: u64,
    last_requests: u64,
}

/// Turns [`TrafficStats`] counters into windowed averages, gauges and snapshots.
pub struct StatsSampler {
    stats: Arc<TrafficStats>,
    sessions: SessionCountSource,
    metrics: Arc<Metrics>,
    // A std mutex: no await while it is held, and only the sampler task and rare
    // snapshot readers take it.
    state: Mutex<SamplerState>,
    latest: ArcSwap<StatsSnapshot>,
}

impl StatsSampler {
    /// A sampler over `stats` with the windows of `config`.
    pub fn new(
        stats: Arc<TrafficStats>,
        config: &AutoscalerConfig,
        sessions: SessionCountSource,
        metrics: Arc<Metrics>,
    ) -> Arc<StatsSampler> {
        let now = Instant::now();
        let window = StatsWindow::new(
            config.stable_window.as_duration(),
            config.panic_window_percentage,
        )
        .with_aggregation(config.metric_aggregation);
        let state = SamplerState {
            last_integral: stats.concurrency_micros(now),
            last_requests: stats.requests(),
            last_at: now,
            window,
        };
        let sampler = StatsSampler {
            stats,
            sessions,
            metrics,
            state: Mutex::new(state),
            latest: ArcSwap::from_pointee(StatsSnapshot::default()),
        };
        let first = sampler.snapshot_of(&sampler.lock().window);
        sampler.latest.store(Arc::new(first));
        Arc::new(sampler)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SamplerState> {
        // A poisoned lock only means a panic elsewhere; the window is still usable.
        self.state.lock_recovered()
    }

    /// The counters behind this sampler.
    pub fn traffic(&self) -> &Arc<TrafficStats> {
        &self.stats
    }

    /// Closes the bucket that ends at `now`, updates the gauges and returns the snapshot.
    pub fn sample(&self, now: Instant) -> Arc<StatsSnapshot> {
        let integral = self.stats.concurrency_micros(now);
        let requests = self.stats.requests();
        let snapshot = {
            let mut st = self.lock();
            let elapsed = now.saturating_duration_since(st.last_at).as_secs_f64();
            if elapsed > 0.0 {
                let busy = concurrency_micros_between(st.last_integral, integral) as f64 / 1e6;
                let arrived = requests.wrapping_sub(st.last_requests) as f64;
                st.window.record(Bucket {
                    concurrency: busy / elapsed,
                    rps: arrived / elapsed,
                });
                st.last_at = now;
                st.last_integral = integral;
                st.last_requests = requests;
            }
            self.snapshot_of(&st.window)
        };
        let m = &self.metrics;
        m.stable_concurrency.set(snapshot.stable_concurrency);
        m.panic_concurrency.set(snapshot.panic_concurrency);
        m.stable_rps.set(snapshot.stable_rps);
        m.panic_rps.set(snapshot.panic_rps);
        m.active_sessions.set(snapshot.active_sessions as i64);
        let snapshot = Arc::new(snapshot);
        self.latest.store(snapshot.clone());
        snapshot
    }

    fn snapshot_of(&self, window: &StatsWindow) -> StatsSnapshot {
        let stable = window.stable();
        let panic = window.panic();
        let sessions = (self.sessions)();
        StatsSnapshot {
            stable_window_seconds: window.stable_len() as f64 * BUCKET.as_secs_f64(),
            panic_window_seconds: window.panic_len() as f64 * BUCKET.as_secs_f64(),
            stable_concurrency: stable.concurrency,
            panic_concurrency: panic.concurrency,
            stable_rps: stable.rps,
            panic_rps: panic.rps,
            in_flight: self.stats.in_flight().max(0) as u64,
            requests_total: self.stats.requests(),
            active_sessions: sessions.active,
            waiting_sessions: sessions.waiting,
            replicas: 1,
            replica_id: String::new(),
        }
    }

    /// The snapshot of the last closed bucket.
    pub fn latest(&self) -> Arc<StatsSnapshot> {
        self.latest.load_full()
    }

    /// The last closed bucket's averages with the in-flight and session counts of right
    /// now: what `GET /api/stats` serves and what an immediate decision uses.
    pub fn current(&self) -> StatsSnapshot {
        let mut snapshot = (*self.latest()).clone();
        let sessions = (self.sessions)();
        snapshot.in_flight = self.stats.in_flight().max(0) as u64;
        snapshot.requests_total = self.stats.requests();
        snapshot.active_sessions = sessions.active;
        snapshot.waiting_sessions = sessions.waiting;
        snapshot
    }

    /// Samples every second until the returned task is aborted.
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let sampler = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + BUCKET, BUCKET);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sampler.sample(Instant::now());
            }
        })
    }
}
