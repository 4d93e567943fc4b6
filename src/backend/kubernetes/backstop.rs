//! The leak backstop: every claim is created to expire `shutdown_after` from now, and the
//! expiry of each session that saw traffic is pushed forward, coarsely (when less than
//! half of it is left), so a live session costs one write per `shutdown_after / 2` and a
//! session nobody serves any more is ended by the cluster itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Patch, PatchParams};
use tokio::time::Instant;

use super::api::{ApiSet, FIELD_MANAGER};
use super::cache::Cache;
use super::flavour::ShutdownTarget;
use super::retry;
use crate::lock::MutexExt;

/// Claims of sessions with traffic since the last round, and the horizon.
pub struct Backstop {
    horizon: Duration,
    live: Mutex<HashSet<String>>,
}

impl Backstop {
    pub fn new(horizon: Duration) -> Backstop {
        Backstop {
            horizon,
            live: Mutex::new(HashSet::new()),
        }
    }

    /// The expiry for a claim created or refreshed now (RFC 3339).
    pub fn expiry(&self) -> String {
        let at =
            Utc::now() + chrono::Duration::from_std(self.horizon).unwrap_or(chrono::Duration::MAX);
        at.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    /// Marks the session's claim as live.
    pub fn touch(&self, claim: &str) {
        let mut live = self.live.lock_recovered();
        if !live.contains(claim) {
            live.insert(claim.to_owned());
        }
    }

    /// How often a round runs: an eighth of the horizon (at most 10 minutes).
    fn period(&self) -> Duration {
        (self.horizon / 8).min(Duration::from_secs(600))
    }

    /// Pushes expiries forward every period until aborted.
    pub async fn run(self: Arc<Self>, api: ApiSet, cache: Arc<Cache>) {
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.round(&api, &cache).await;
        }
    }

    /// One round: for each live claim whose expiry is less than half the horizon away,
    /// one merge patch moving it to a full horizon from now.
    pub async fn round(&self, api: &ApiSet, cache: &Cache) {
        let claims: Vec<String> = self.live.lock_recovered().drain().collect();
        let flavour = api.flavour;
        let refresh_before = Utc::now()
            + chrono::Duration::from_std(self.horizon / 2).unwrap_or(chrono::Duration::MAX);
        for claim in claims {
            let target = cache.read(|st| {
                let c = st.claim(&claim)?;
                let sandbox = st.sandbox_of_claim(&claim).map(str::to_owned);
                let current = flavour.shutdown_time(
                    c,
                    sandbox.as_deref().and_then(|s| st.sandbox(s)).map(|a| &**a),
                );
                let due = current
                    .as_deref()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_none_or(|t| t.with_timezone(&Utc) < refresh_before);
                due.then_some(sandbox)
            });
            let Some(sandbox) = target else {
                continue;
            };
            let (on, patch) = flavour.shutdown_patch(&self.expiry());
            let (handle, name) = match on {
                ShutdownTarget::Claim => (&api.claims, claim.clone()),
                ShutdownTarget::Sandbox => match sandbox {
                    Some(s) => (&api.sandboxes, s),
                    None => continue,
                },
            };
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let patch = Patch::Merge(patch);
            let deadline = Instant::now() + Duration::from_secs(10);
            if let Err(e) = retry::call(deadline, || handle.patch(&name, &pp, &patch)).await {
                tracing::debug!(object = name, "leak backstop not moved: {e:?}");
            }
        }
    }
}
