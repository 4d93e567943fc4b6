//! The activator's place among its replicas: one identity, one kube client, leadership and
//! the schedules' tick store.
//!
//! # Layout
//!
//! - [`ReplicaId`] (`replica`): the one name of this process (Lease holder, activity
//!   stamps, `replica_id` in `GET /api/stats`).
//! - [`KubeContext`] (`kube`): the one `kube::Client`, its namespace and the replica ID,
//!   handed to the Kubernetes backend, the elector and the tick store.
//! - [`Leadership`]: who may act alone (autoscale, fire schedules). [`LeaseElector`]
//!   (`lease`) on Kubernetes, [`SoleReplica`] otherwise.
//! - [`TickStore`] (`ticks`): the schedules' fired ticks, on the Lease or in a local file.
//!
//! [`Cluster::start`] builds all of it from the configuration; the server hands the
//! pieces to the backend, the autoscaler and the scheduler, none of which know about each
//! other.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{BackendKind, Config, ConfigError};
use crate::metrics::Metrics;

mod kube;
mod lease;
mod replica;
mod ticks;

pub use self::kube::{KubeContext, client_config};
pub use lease::{LeaseElector, LeaseError};
pub use replica::ReplicaId;
pub use ticks::{
    FileTickStore, FiredTicks, LeaseTickStore, SCHEDULE_STATE_FILE, TICKS_ANNOTATION, TickStore,
    TickStoreError, claim_in,
};

/// Upper bound on giving the Lease up at shutdown.
const RELEASE_BOUND: Duration = Duration::from_secs(5);

/// Who may act alone (decide the pool size, fire schedules). Implementations answer from
/// memory and never block: callers ask on every tick.
pub trait Leadership: Send + Sync + 'static {
    /// True while this replica holds leadership and may act on it.
    fn is_leader(&self) -> bool;
}

/// The only replica: always the leader.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoleReplica;

impl Leadership for SoleReplica {
    fn is_leader(&self) -> bool {
        true
    }
}

/// This replica's cluster membership, built once at start.
pub struct Cluster {
    replica: ReplicaId,
    kube: Option<KubeContext>,
    leadership: Arc<dyn Leadership>,
    elector: Option<Arc<LeaseElector>>,
    ticks: Arc<dyn TickStore>,
    election: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// With `backend.kind: kubernetes`: connects the one kube client and starts leader
    /// election on the Lease `backend.kubernetes.lease_name`, whose annotation also keeps
    /// the fired ticks. Otherwise: the sole replica, ticks in
    /// `<backend.workdir_root>/schedule-state.json`. `activator_autoscaler_leader` follows
    /// leadership from here on.
    pub async fn start(config: &Config, metrics: &Arc<Metrics>) -> Result<Cluster, ConfigError> {
        let replica = ReplicaId::from_env();
        if config.backend.kind != BackendKind::Kubernetes {
            metrics.autoscaler_leader.set(1);
            return Ok(Cluster {
                ticks: Arc::new(FileTickStore::new(
                    config.backend.workdir_root.join(SCHEDULE_STATE_FILE),
                )),
                replica,
                kube: None,
                leadership: Arc::new(SoleReplica),
                elector: None,
                election: None,
                metrics: metrics.clone(),
            });
        }
        let k = &config.backend.kubernetes;
        let kube =
            KubeContext::connect(k.kubeconfig.as_deref(), k.namespace.as_deref(), replica).await?;
        Ok(Cluster::with_kube(
            kube,
            &k.lease_name,
            config.autoscaler.lease_duration.as_duration(),
            metrics,
        ))
    }

    /// Leader election on Lease `lease_name` over an existing context (tests, embedders).
    pub fn with_kube(
        kube: KubeContext,
        lease_name: &str,
        lease_duration: Duration,
        metrics: &Arc<Metrics>,
    ) -> Cluster {
        let elector = LeaseElector::new(kube.api(), lease_name, &kube.replica, lease_duration);
        let election = elector.spawn(metrics.clone());
        Cluster {
            replica: kube.replica.clone(),
            ticks: Arc::new(LeaseTickStore::new(kube.api(), lease_name)),
            leadership: elector.clone(),
            elector: Some(elector),
            election: Some(election),
            kube: Some(kube),
            metrics: metrics.clone(),
        }
    }

    /// This process's identity.
    pub fn replica(&self) -> &ReplicaId {
        &self.replica
    }

    /// The kube client and namespace, with the Kubernetes backend.
    pub fn kube(&self) -> Option<&KubeContext> {
        self.kube.as_ref()
    }

    /// Whether this replica may act alone right now.
    pub fn leadership(&self) -> Arc<dyn Leadership> {
        self.leadership.clone()
    }

    /// Where schedules record fired ticks.
    pub fn ticks(&self) -> Arc<dyn TickStore> {
        self.ticks.clone()
    }

    /// Stops electing and gives the Lease up, so another replica takes over at once
    /// instead of after a whole `lease_duration`. Bounded by five seconds. A stopped
    /// replica leads nothing: `activator_autoscaler_leader` drops to 0.
    pub async fn stop(mut self) {
        if let Some(task) = &self.election {
            task.abort();
        }
        self.metrics.autoscaler_leader.set(0);
        let Some(elector) = self.elector.take() else {
            return;
        };
        match tokio::time::timeout(RELEASE_BOUND, elector.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the leader lease"),
            Err(_) => {
                tracing::warn!("releasing the leader lease timed out after {RELEASE_BOUND:?}")
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(task) = &self.election {
            task.abort();
        }
    }
}
