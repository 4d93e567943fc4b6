//! The Agent Pod Autoscaler: a pure [`decide`] with Knative KPA semantics, and the loop
//! that feeds it every `tick_interval` and applies its output through the backend.
//!
//! Only the leading replica decides ([`Leadership`], from [`crate::cluster`]): a Kubernetes
//! Lease with the Kubernetes backend, otherwise the single process. The leader sums its own stats with every peer's `GET /api/stats`
//! (Knative's autoscaler scraping activators). Followers export
//! `activator_desired_sandboxes 0`, so `max()` over replicas is the decision.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::backend::{DynBackend, SandboxState};
use crate::cluster::{Leadership, ReplicaId};
use crate::config::Config;
use crate::lock::MutexExt;
use crate::metrics::Metrics;
use crate::stats::StatsSampler;

mod decide;
mod peers;
mod scaling;

pub use decide::{Decision, Inputs, ScalerState, decide, pool_target};
pub use peers::PeerCollector;
pub use scaling::{Scaling, ScalingDeps};

/// The running autoscaler: decision state plus what it needs to observe and act.
pub struct Autoscaler {
    config: Config,
    sampler: Arc<StatsSampler>,
    backend: DynBackend,
    metrics: Arc<Metrics>,
    leader: Arc<dyn Leadership>,
    peers: PeerCollector,
    // A std mutex: held only inside `decide`, never across an await.
    state: Mutex<LoopState>,
}

#[derive(Default)]
struct LoopState {
    scaler: ScalerState,
    /// The pool target last applied successfully.
    applied: Option<u32>,
}

/// What one step did, for logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Not the leader: nothing decided.
    Follower,
    /// Decided; `applied` is the pool target sent to the backend, if any was sent.
    Decided {
        decision: Decision,
        applied: Option<u32>,
    },
}

impl Autoscaler {
    pub fn new(
        config: &Config,
        sampler: Arc<StatsSampler>,
        backend: DynBackend,
        metrics: Arc<Metrics>,
        leader: Arc<dyn Leadership>,
        replica: ReplicaId,
        pool: Option<Arc<str>>,
    ) -> Arc<Autoscaler> {
        // Replicas share one admin token (one Secret), so the leader presents its own.
        let token = config
            .admin
            .auth
            .bearer_token_file
            .as_deref()
            .and_then(|f| crate::config::read_token(f).ok());
        let peers = PeerCollector::new(
            config.autoscaler.peers.clone(),
            config.autoscaler.peer_timeout.as_duration(),
            replica,
            token,
        )
        .for_pool(pool);
        Arc::new(Autoscaler {
            config: config.clone(),
            sampler,
            backend,
            metrics,
            leader,
            peers,
            state: Mutex::new(LoopState::default()),
        })
    }

    /// This replica's identity in `/api/stats` (peers skip themselves by it).
    pub fn replica_id(&self) -> &ReplicaId {
        self.peers.own_id()
    }

    /// The pool's configuration it decides with (`autoscaler.*`, `backend.*`).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `GET /api/stats`: this replica's signals right now.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::to_value(self.snapshot()).unwrap_or(serde_json::Value::Null)
    }

    /// This replica's signals right now, named with its replica ID.
    pub fn snapshot(&self) -> crate::stats::StatsSnapshot {
        let mut snapshot = self.sampler.current();
        snapshot.replica_id = self.peers.own_id().to_string();
        snapshot
    }

    /// Runs [`Self::step`] every `tick_interval`, and at once when the first request
    /// arrives while the decision is zero.
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let period = this.config.autoscaler.tick_interval.as_duration();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let wake = this.sampler.traffic().wake();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {
                        tracing::debug!("first request at zero: deciding now");
                    }
                }
                this.step(Instant::now()).await;
            }
        })
    }

    /// One decision: gather signals, decide, export, and apply when configured.
    pub async fn step(&self, now: Instant) -> Step {
        let leading = self.leader.is_leader();
        self.metrics.autoscaler_leader.set(i64::from(leading));
        if !leading {
            self.metrics.desired_sandboxes.set(0);
            self.metrics.panic_mode.set(0);
            self.metrics.warm_pool_target.set(0);
            // A future leadership starts from a clean slate, as a new Knative decider.
            *self.lock() = LoopState::default();
            return Step::Follower;
        }
        let mut stats = self.sampler.current();
        for peer in self.peers.collect().await {
            stats.add(&peer);
        }
        let (ready, bound) = self.sandbox_counts();
        let inputs = Inputs {
            now,
            stats,
            ready,
            warm_pool: self.config.backend.warm_pool,
            sessions_per_sandbox: self.config.session.max_sessions_per_sandbox,
        };
        let (decision, target, to_apply) = {
            let mut st = self.lock();
            let decision = decide(&mut st.scaler, &inputs, &self.config.autoscaler);
            let target = pool_target(decision.desired, bound);
            let to_apply =
                (self.config.autoscaler.apply && st.applied != Some(target)).then_some(target);
            (decision, target, to_apply)
        };
        self.metrics
            .desired_sandboxes
            .set(i64::from(decision.desired));
        self.metrics.warm_pool_target.set(i64::from(target));
        self.metrics.panic_mode.set(i64::from(decision.panic));
        // Arm the immediate wake-up while the decision is zero.
        self.sampler.traffic().set_at_zero(decision.desired == 0);
        tracing::debug!(?decision, ready, bound, "autoscaler decision");
        let mut applied = None;
        if let Some(target) = to_apply {
            // Leadership is re-checked right before acting: a leader that lost its
            // Lease while collecting stats does not apply.
            if self.leader.is_leader() {
                applied = self.apply(target).await;
            }
        }
        Step::Decided { decision, applied }
    }

    async fn apply(&self, target: u32) -> Option<u32> {
        let bound = self
            .config
            .autoscaler
            .tick_interval
            .as_duration()
            .max(Duration::from_secs(5));
        match tokio::time::timeout(bound, self.backend.set_warm_pool_target(target)).await {
            Ok(Ok(())) => {
                tracing::info!(target, "warm pool target applied");
                self.lock().applied = Some(target);
                Some(target)
            }
            Ok(Err(e)) => {
                tracing::warn!(target, error = %e, "cannot apply the warm pool target");
                None
            }
            Err(_) => {
                tracing::warn!(
                    target,
                    "applying the warm pool target timed out after {bound:?}"
                );
                None
            }
        }
    }

    /// (ready, bound): running sandboxes able to take traffic, and those bound to sessions.
    fn sandbox_counts(&self) -> (u32, u32) {
        let counts = self.backend.sandbox_counts();
        let count = |s: SandboxState| u32::try_from(counts.get(s)).unwrap_or(u32::MAX);
        let bound = count(SandboxState::Bound);
        (bound.saturating_add(count(SandboxState::Warm)), bound)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoopState> {
        self.state.lock_recovered()
    }
}

#[cfg(test)]
mod tests;
