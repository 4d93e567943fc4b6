//! `Scaling`: starts the stats sampler and the autoscaler loop for a running server, and
//! stops them on shutdown.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::Autoscaler;
use crate::activation::Activator;
use crate::backend::DynBackend;
use crate::cluster::{Leadership, ReplicaId};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::stats::{SessionCounts, StatsSampler, TrafficStats};

/// The running scaling machinery of one server.
pub struct Scaling {
    autoscaler: Arc<Autoscaler>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the rest of the server hands to [`Scaling::start`].
pub struct ScalingDeps {
    pub stats: Arc<TrafficStats>,
    pub activator: Arc<Activator>,
    pub backend: DynBackend,
    pub metrics: Arc<Metrics>,
    /// Whether this replica decides (from [`crate::cluster::Cluster`]).
    pub leader: Arc<dyn Leadership>,
    /// This replica's identity in `GET /api/stats`.
    pub replica: ReplicaId,
    /// With `pools:`, the pool this autoscaler decides for (peers are asked for its
    /// signals only).
    pub pool: Option<Arc<str>>,
}

impl Scaling {
    /// Starts sampling always, and the autoscaler loop when `autoscaler.enabled`.
    pub fn start(config: &Config, deps: ScalingDeps) -> Scaling {
        let activator = deps.activator.clone();
        let sampler = StatsSampler::new(
            deps.stats.clone(),
            &config.autoscaler,
            Arc::new(move || SessionCounts {
                active: activator.active_sessions() as u64,
                waiting: activator.waiting_sessions() as u64,
            }),
            deps.metrics.clone(),
        );
        let mut tasks = vec![sampler.spawn()];
        let autoscaler = Autoscaler::new(
            config,
            sampler,
            deps.backend,
            deps.metrics,
            deps.leader,
            deps.replica,
            deps.pool,
        );
        if config.autoscaler.enabled {
            tasks.push(autoscaler.spawn());
        }
        Scaling { autoscaler, tasks }
    }

    /// The autoscaler (for `GET /api/stats`).
    pub fn autoscaler(&self) -> &Arc<Autoscaler> {
        &self.autoscaler
    }

    /// Stops every task.
    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
