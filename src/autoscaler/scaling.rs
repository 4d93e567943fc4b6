//! `Scaling`: starts the stats sampler, leader election, the autoscaler loop and the
//! schedules for a running server, and stops them on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use kube::Api;
use tokio::task::JoinHandle;

use super::lease::{self, LeaseElector, LeaseTickStore};
use super::{Autoscaler, Leadership, SoleReplica};
use crate::activation::Activator;
use crate::backend::DynBackend;
use crate::config::{BackendKind, Config, ConfigError, SessionSource};
use crate::metrics::Metrics;
use crate::schedule::{FileTickStore, HttpWakeupSender, Scheduler, TickStore, WallClock};
use crate::stats::{SessionCounts, StatsSampler, TrafficStats};

/// File under `backend.workdir_root` that records fired schedule ticks without Kubernetes.
pub const SCHEDULE_STATE_FILE: &str = "schedule-state.json";

/// The running scaling machinery of one server.
pub struct Scaling {
    autoscaler: Arc<Autoscaler>,
    elector: Option<Arc<LeaseElector>>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the rest of the server hands to [`Scaling::start`].
pub struct ScalingDeps {
    pub stats: Arc<TrafficStats>,
    pub activator: Arc<Activator>,
    pub backend: DynBackend,
    pub metrics: Arc<Metrics>,
    /// The bound proxy listener: schedules send their requests there.
    pub proxy_addr: SocketAddr,
}

impl Scaling {
    /// Starts sampling always, the autoscaler loop when `autoscaler.enabled`, leader
    /// election with the Kubernetes backend, and the schedules.
    pub async fn start(config: &Config, deps: ScalingDeps) -> Result<Scaling, ConfigError> {
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

        let mut elector = None;
        let mut lease_store = None;
        let leader: Arc<dyn Leadership> = if config.backend.kind == BackendKind::Kubernetes {
            let k = &config.backend.kubernetes;
            let client = lease::client(k.kubeconfig.as_deref()).await?;
            let namespace = k
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let api = Api::namespaced(client, &namespace);
            let e = LeaseElector::new(
                api.clone(),
                &k.lease_name,
                &replica_identity(),
                config.autoscaler.lease_duration.as_duration(),
            );
            tasks.push(e.spawn(deps.metrics.clone()));
            lease_store = Some(LeaseTickStore::new(api, &k.lease_name));
            elector = Some(e.clone());
            e
        } else {
            deps.metrics.autoscaler_leader.set(1);
            Arc::new(SoleReplica)
        };

        let autoscaler = Autoscaler::new(
            config,
            sampler,
            deps.backend.clone(),
            deps.metrics.clone(),
            leader.clone(),
        );
        if config.autoscaler.enabled {
            tasks.push(autoscaler.spawn());
        }

        if !config.schedules.is_empty() {
            let schedules = config
                .schedules
                .iter()
                .enumerate()
                .map(|(i, s)| s.parse(i, config.session.max_id_length))
                .collect::<Result<Vec<_>, _>>()?;
            let store: Arc<dyn TickStore> = match lease_store {
                Some(s) => Arc::new(s),
                None => Arc::new(FileTickStore::new(
                    config.backend.workdir_root.join(SCHEDULE_STATE_FILE),
                )),
            };
            let source = config
                .session
                .sources
                .first()
                .cloned()
                .unwrap_or_else(|| SessionSource::Header("X-Session-ID".into()));
            let timeout = config.proxy.request_timeout.as_duration()
                + config.activation.timeout.as_duration();
            let sender = Arc::new(HttpWakeupSender::new(deps.proxy_addr, source, timeout));
            let scheduler = Scheduler::new(
                schedules,
                store,
                leader,
                sender,
                deps.metrics.clone(),
                WallClock::System,
            );
            tasks.extend(scheduler.spawn());
        }
        Ok(Scaling {
            autoscaler,
            elector,
            tasks,
        })
    }

    /// The autoscaler (for `GET /api/stats`).
    pub fn autoscaler(&self) -> &Arc<Autoscaler> {
        &self.autoscaler
    }

    /// Stops every task and gives up the Lease so another replica takes over at once.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(e) = self.elector {
            let bound = std::time::Duration::from_secs(5);
            match tokio::time::timeout(bound, e.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::warn!(error = %err, "cannot release the autoscaler lease"),
                Err(_) => tracing::warn!("releasing the autoscaler lease timed out"),
            }
        }
    }
}

/// This replica's name in the Lease: `POD_NAME` (downward API), else `HOSTNAME`, else
/// `agent-activator`, plus a random suffix per process start (as client-go does), so two
/// processes never share an identity even when they share a host name.
fn replica_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent-activator".into());
    let suffix: [u8; 4] = rand::random();
    format!("{host}_{}", hex::encode(suffix))
}
