//! `LeaseElector`: leader election on a `coordination.k8s.io/v1` Lease.
//!
//! The algorithm is client-go's: the holder renews every `lease_duration / 3`; another
//! replica takes over only after it has seen the record unchanged for a whole
//! `lease_duration` (measured on its own clock, so clock skew between nodes does not
//! matter); a holder that could not renew for `2/3 x lease_duration` stops acting before
//! anyone can take over. Every write is a `replace` carrying the `resourceVersion` read,
//! so two replicas racing for the Lease cannot both win.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Leadership, ReplicaId};
use crate::lock::MutexExt;

/// Attempts of one read-modify-replace cycle when another writer got in between.
pub(super) const CONFLICT_ATTEMPTS: usize = 3;

/// A failed Lease operation.
#[derive(Debug, thiserror::Error)]
#[error("lease {name}: {source}")]
pub struct LeaseError {
    name: String,
    #[source]
    source: kube::Error,
}

pub(super) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

struct Observed {
    /// (holder, renew time, resourceVersion) as last read.
    record: (Option<String>, Option<String>, Option<String>),
    /// When this replica first saw `record`.
    at: Instant,
}

/// Leader election on one Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// Leadership holds until then (last successful renewal + renew deadline).
    leader_until: Mutex<Option<Instant>>,
    observed: Mutex<Option<Observed>>,
}

impl LeaseElector {
    /// An elector for Lease `name` in the namespace of `api`, as `identity` (this
    /// replica's [`ReplicaId`]).
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &ReplicaId,
        lease_duration: Duration,
    ) -> Arc<Self> {
        Arc::new(LeaseElector {
            api,
            name: name.to_owned(),
            identity: identity.to_string(),
            lease_duration,
            leader_until: Mutex::new(None),
            observed: Mutex::new(None),
        })
    }

    /// Renewal period.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 3
    }

    fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            name: self.name.clone(),
            source,
        }
    }

    fn set_leader_until(&self, until: Option<Instant>) {
        *self.leader_until.lock_recovered() = until;
    }

    /// One election round: create, renew or take over the Lease when allowed. Returns
    /// whether this replica leads afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaseError> {
        for _ in 0..CONFLICT_ATTEMPTS {
            match self.attempt().await {
                Ok(leading) => return Ok(leading),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(self.is_leader())
    }

    async fn attempt(&self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let stamp = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    tracing::info!(lease = %self.name, "acquired the leader lease");
                    self.set_leader_until(Some(now + self.renew_deadline()));
                    Ok(true)
                }
                // Another replica created it first: not leading this round.
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (
            holder.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
            lease.metadata.resource_version.clone(),
        );
        let first_seen = {
            let mut observed = self.observed.lock_recovered();
            match observed.as_ref() {
                Some(o) if o.record == record => o.at,
                _ => {
                    *observed = Some(Observed { record, at: now });
                    now
                }
            }
        };
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let expired =
            holder.is_none() || now.saturating_duration_since(first_seen) >= self.lease_duration;
        if !mine && !expired {
            self.set_leader_until(None);
            return Ok(false);
        }
        if !mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = Some(stamp.clone());
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(stamp);
        spec.lease_duration_seconds = Some(secs);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    tracing::info!(lease = %self.name, "took over the leader lease");
                }
                self.set_leader_until(Some(now + self.renew_deadline()));
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over without waiting.
    pub async fn release(&self) -> Result<(), LeaseError> {
        self.set_leader_until(None);
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Runs election rounds every [`Self::retry_period`].
    pub fn spawn(self: &Arc<Self>, metrics: Arc<crate::metrics::Metrics>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.retry_period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let round = tokio::time::timeout(this.retry_period(), this.try_acquire_or_renew());
                match round.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "leader election round failed"),
                    Err(_) => tracing::warn!("leader election round timed out"),
                }
                metrics.autoscaler_leader.set(i64::from(this.is_leader()));
            }
        })
    }
}

impl Leadership for LeaseElector {
    fn is_leader(&self) -> bool {
        let until = *self.leader_until.lock_recovered();
        until.is_some_and(|t| Instant::now() < t)
    }
}
