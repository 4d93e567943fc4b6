//! Cluster-wide idleness: each replica stamps the claim with its last traffic (at most
//! once per interval); a pause is refused while another replica's stamp is fresh.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::DynamicObject;
use tokio::time::Instant;

/// `<RFC 3339 time> <replica>` of the last request any replica saw for the session.
pub const LAST_ACTIVITY: &str = "agent-activator.dev/last-activity";
/// `<RFC 3339 time> <replica>` of the pause decision; written fenced by resourceVersion, so
/// a concurrent activity stamp makes one of the two writes fail with 409.
pub const PAUSING: &str = "agent-activator.dev/pausing";

/// Map size at which stale entries are pruned.
const PRUNE_AT: usize = 4096;

/// This replica's activity stamps and the rules for reading others'.
pub struct ActivityLog {
    replica: String,
    interval: Duration,
    idle_timeout: Duration,
    last_write: Mutex<HashMap<String, Instant>>,
}

impl ActivityLog {
    /// `replica` distinguishes this activator's stamps from other replicas'.
    pub fn new(replica: String, interval: Duration, idle_timeout: Duration) -> ActivityLog {
        ActivityLog {
            replica,
            interval,
            idle_timeout,
            last_write: Mutex::new(HashMap::new()),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// True (and remembered) if `session` was not stamped by us within the interval.
    pub fn due(&self, session: &str) -> bool {
        let now = Instant::now();
        let mut last = self.last_write.lock().expect("activity lock");
        match last.get(session) {
            Some(t) if now.duration_since(*t) < self.interval => false,
            _ => {
                // Entries older than the interval no longer matter; drop them now and then
                // so sessions released elsewhere do not accumulate.
                if last.len() >= PRUNE_AT {
                    let interval = self.interval;
                    last.retain(|_, t| now.duration_since(*t) < interval);
                }
                last.insert(session.to_owned(), now);
                true
            }
        }
    }

    /// Forgets a released session.
    pub fn forget(&self, session: &str) {
        self.last_write
            .lock()
            .expect("activity lock")
            .remove(session);
    }

    /// A stamp for now, by this replica.
    pub fn stamp(&self) -> String {
        format!(
            "{} {}",
            Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            self.replica
        )
    }

    /// Another replica stamped `claim` less than `idle.timeout` ago.
    pub fn busy_elsewhere(&self, claim: &DynamicObject) -> bool {
        let Some((at, who)) = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_ACTIVITY))
            .and_then(|v| parse_stamp(v))
        else {
            return false;
        };
        if who == self.replica {
            return false;
        }
        let age = Utc::now().signed_duration_since(at);
        // A stamp from the future (clock skew) counts as fresh.
        age.to_std().map_or(true, |age| age < self.idle_timeout)
    }
}

fn parse_stamp(v: &str) -> Option<(DateTime<Utc>, &str)> {
    let (time, who) = v.split_once(' ')?;
    let at = DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc);
    Some((at, who))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn claim_with(stamp: &str) -> DynamicObject {
        let mut o = DynamicObject {
            types: None,
            metadata: Default::default(),
            data: serde_json::Value::Null,
        };
        o.metadata.annotations = Some(BTreeMap::from([(LAST_ACTIVITY.into(), stamp.into())]));
        o
    }

    #[test]
    fn only_fresh_stamps_of_other_replicas_are_busy() {
        let log = ActivityLog::new(
            "a".into(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        );
        let other = ActivityLog::new(
            "b".into(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        );
        assert!(log.busy_elsewhere(&claim_with(&other.stamp())));
        assert!(!log.busy_elsewhere(&claim_with(&log.stamp())));
        let old = (Utc::now() - chrono::Duration::seconds(301)).to_rfc3339();
        assert!(!log.busy_elsewhere(&claim_with(&format!("{old} b"))));
        assert!(!log.busy_elsewhere(&claim_with("garbage")));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_at_most_once_per_interval() {
        let log = ActivityLog::new(
            "a".into(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        );
        assert!(log.due("c"));
        assert!(!log.due("c"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(log.due("c"));
        assert!(log.due("d"));
    }
}
