//! Cluster-wide idleness at a write cost that grows with replicas and state changes, not
//! with active sessions: each replica publishes one activity digest (a ConfigMap listing
//! the sessions it served within `idle.timeout`); a replica refuses to pause a sandbox
//! whose session appears in another replica's fresh digest.
//!
//! A digest is rewritten every `activity_write_interval` (to drop idle sessions and prove
//! the replica alive) and, at most once a second, when a session new to this replica
//! shows up, so a session that moves between replicas is visible to the others within
//! about a second. Digests older than three intervals (a dead replica) are ignored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::api::FIELD_MANAGER;
use super::retry::{self, Failure};
use crate::lock::{MutexExt, RwLockExt};

/// `<RFC 3339 time> <replica>` of a pause decision on a claim; written fenced by
/// resourceVersion, so two replicas pausing at once serialise on the claim.
pub const PAUSING: &str = "agent-activator.dev/pausing";
/// Label selecting activity digests.
pub const DIGEST_LABEL: &str = "agent-activator.dev/activity-digest";
/// Hex characters of the session hash in a digest (64 bits: a collision only makes a
/// pause wait, never routes anything).
pub const DIGEST_HASH_CHARS: usize = 16;
/// Most sessions one digest lists (a ConfigMap holds at most 1 MiB). A replica with more
/// publishes `overflow: "true"`, and the others then pause nothing: idle sandboxes cost
/// money, a paused busy one would cost requests.
pub const MAX_DIGEST_SESSIONS: usize = 50_000;
/// Least time between two digest writes of one replica.
const MIN_GAP: Duration = Duration::from_secs(1);

/// This replica's activity and the digests every replica published.
pub struct ActivityLog {
    replica: String,
    interval: Duration,
    idle_timeout: Duration,
    local: Mutex<Local>,
    others: RwLock<HashMap<String, Digest>>,
    wake: Notify,
}

#[derive(Default)]
struct Local {
    /// Session hash -> last traffic seen here.
    seen: HashMap<String, Instant>,
    /// Hashes in the digest last written.
    published: HashSet<String>,
    dirty: bool,
}

/// One replica's published digest.
#[derive(Debug, Clone, Default)]
struct Digest {
    at: Option<DateTime<Utc>>,
    overflow: bool,
    sessions: HashSet<String>,
}

impl ActivityLog {
    /// `replica` distinguishes this activator's digest from the others'.
    pub fn new(replica: String, interval: Duration, idle_timeout: Duration) -> ActivityLog {
        ActivityLog {
            replica,
            interval,
            idle_timeout,
            local: Mutex::new(Local::default()),
            others: RwLock::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The digest object's name for this replica.
    pub fn object_name(&self, prefix: &str) -> String {
        digest_name(prefix, &self.replica)
    }

    /// Records traffic for the session with SHA-256 `sha`. No API call: a session new to
    /// this replica wakes the publisher.
    pub fn record(&self, sha: &str) {
        let h = &sha[..DIGEST_HASH_CHARS.min(sha.len())];
        let mut l = self.local.lock_recovered();
        l.seen.insert(h.to_owned(), Instant::now());
        if !l.published.contains(h) && !l.dirty {
            l.dirty = true;
            drop(l);
            self.wake.notify_one();
        }
    }

    /// Forgets a released session.
    pub fn forget(&self, sha: &str) {
        let h = &sha[..DIGEST_HASH_CHARS.min(sha.len())];
        self.local.lock_recovered().seen.remove(h);
    }

    /// The sessions to publish now (traffic within `idle.timeout`), marking them published.
    fn take_snapshot(&self) -> (Vec<String>, bool) {
        let now = Instant::now();
        let mut l = self.local.lock_recovered();
        let idle = self.idle_timeout;
        l.seen.retain(|_, t| now.duration_since(*t) < idle);
        let mut list: Vec<String> = l.seen.keys().cloned().collect();
        list.sort_unstable();
        let overflow = list.len() > MAX_DIGEST_SESSIONS;
        list.truncate(MAX_DIGEST_SESSIONS);
        l.published = list.iter().cloned().collect();
        l.dirty = false;
        (list, overflow)
    }

    /// A stamp for now, by this replica.
    pub fn stamp(&self) -> String {
        format!(
            "{} {}",
            Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            self.replica
        )
    }

    /// Another replica's fresh digest lists the session with SHA-256 `sha`.
    pub fn busy_elsewhere(&self, sha: &str) -> bool {
        let h = &sha[..DIGEST_HASH_CHARS.min(sha.len())];
        let fresh_after = Utc::now()
            - chrono::Duration::from_std(self.interval * 3).unwrap_or(chrono::Duration::MAX);
        self.others
            .read_recovered()
            .iter()
            .filter(|(r, _)| **r != self.replica)
            .filter(|(_, d)| d.at.is_some_and(|t| t >= fresh_after))
            .any(|(_, d)| d.overflow || d.sessions.contains(h))
    }

    /// Writes this replica's digest whenever it is due, until aborted.
    pub async fn run_publisher(self: Arc<Self>, api: Api<ConfigMap>, name: String) {
        let mut last: Option<Instant> = None;
        loop {
            let due = last.map_or(Instant::now(), |t| t + self.interval);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = self.wake.notified() => {
                    if let Some(t) = last {
                        tokio::time::sleep_until(t + MIN_GAP).await;
                    }
                }
            }
            last = Some(Instant::now());
            let (sessions, overflow) = self.take_snapshot();
            if let Err(e) = self.publish(&api, &name, &sessions, overflow).await {
                // The next round retries; meanwhile the old digest ages out, which only
                // lets others pause what we no longer serve.
                tracing::warn!(digest = name, "activity digest not written: {e}");
                self.local.lock_recovered().dirty = true;
            }
        }
    }

    async fn publish(
        &self,
        api: &Api<ConfigMap>,
        name: &str,
        sessions: &[String],
        overflow: bool,
    ) -> Result<(), kube::Error> {
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "labels": {
                    DIGEST_LABEL: "true",
                    "app.kubernetes.io/managed-by": "agent-activator",
                },
            },
            "data": {
                "replica": self.replica,
                "published": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                "overflow": overflow.to_string(),
                "sessions": sessions.join("\n"),
            },
        });
        let deadline = Instant::now() + self.interval.max(MIN_GAP);
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(&body);
        match retry::call(deadline, || api.patch(name, &pp, &patch)).await {
            Ok(_) => Ok(()),
            Err(Some(e)) if retry::classify(&e) == Failure::NotFound => {
                let cm: ConfigMap = serde_json::from_value(body).expect("digest deserializes");
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                api.create(&post, &cm).await.map(|_| ())
            }
            Err(Some(e)) => Err(e),
            Err(None) => Ok(()),
        }
    }

    /// Deletes this replica's digest (shutdown), so others need not wait for it to age.
    pub async fn withdraw(&self, api: &Api<ConfigMap>, name: &str) {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }

    /// Mirrors every replica's digest from a watch until aborted.
    pub async fn run_watch(self: Arc<Self>, api: Api<ConfigMap>) {
        let cfg = watcher::Config::default().labels(DIGEST_LABEL);
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut relist: Option<HashMap<String, Digest>> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => relist = Some(HashMap::new()),
                Ok(Event::InitApply(cm)) => {
                    if let (Some(buf), Some((r, d))) = (relist.as_mut(), parse_digest(&cm)) {
                        buf.insert(r, d);
                    }
                }
                Ok(Event::InitDone) => {
                    *self.others.write_recovered() = relist.take().unwrap_or_default();
                }
                Ok(Event::Apply(cm)) => {
                    if let Some((r, d)) = parse_digest(&cm) {
                        self.others.write_recovered().insert(r, d);
                    }
                }
                Ok(Event::Delete(cm)) => {
                    if let Some((r, _)) = parse_digest(&cm) {
                        self.others.write_recovered().remove(&r);
                    }
                }
                Err(e) => tracing::warn!("activity digest watch error (retrying): {e}"),
            }
        }
    }
}

/// `<claim_prefix>activity-<replica>`, lowercased and cut to a DNS subdomain.
pub fn digest_name(prefix: &str, replica: &str) -> String {
    let clean: String = replica
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("{prefix}activity-{clean}");
    name.truncate(253);
    name.trim_end_matches('-').to_owned()
}

fn parse_digest(cm: &ConfigMap) -> Option<(String, Digest)> {
    let data = cm.data.as_ref()?;
    let replica = data.get("replica")?.clone();
    let at = data
        .get("published")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let sessions = data
        .get("sessions")
        .map(|s| {
            s.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let overflow = data.get("overflow").is_some_and(|o| o == "true");
    Some((
        replica,
        Digest {
            at,
            overflow,
            sessions,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(replica: &str) -> ActivityLog {
        ActivityLog::new(
            replica.into(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        )
    }

    fn sha(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn only_sessions_in_fresh_digests_of_other_replicas_are_busy() {
        let a = log("a");
        let fresh = Digest {
            at: Some(Utc::now()),
            overflow: false,
            sessions: [sha('b')[..16].to_owned()].into(),
        };
        let stale = Digest {
            at: Some(Utc::now() - chrono::Duration::seconds(31)),
            overflow: false,
            sessions: [sha('c')[..16].to_owned()].into(),
        };
        let own = fresh.clone();
        {
            let mut o = a.others.write_recovered();
            o.insert("b".into(), fresh);
            o.insert("c".into(), stale);
            o.insert("a".into(), own);
        }
        assert!(a.busy_elsewhere(&sha('b')));
        assert!(!a.busy_elsewhere(&sha('c')), "a stale digest is ignored");
        assert!(!a.busy_elsewhere(&sha('d')));
        a.others.write_recovered().remove("b");
        assert!(
            !a.busy_elsewhere(&sha('b')),
            "its own digest does not count"
        );
        a.others.write_recovered().insert(
            "e".into(),
            Digest {
                at: Some(Utc::now()),
                overflow: true,
                sessions: HashSet::new(),
            },
        );
        assert!(
            a.busy_elsewhere(&sha('z')),
            "an overflowing digest blocks every pause"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_keep_sessions_seen_within_the_idle_timeout_and_only_new_ones_are_dirty() {
        let a = log("a");
        a.record(&sha('1'));
        assert!(a.local.lock_recovered().dirty);
        assert_eq!(a.take_snapshot(), (vec![sha('1')[..16].to_owned()], false));
        a.record(&sha('1'));
        assert!(
            !a.local.lock_recovered().dirty,
            "already published: nothing to write"
        );
        tokio::time::advance(Duration::from_secs(200)).await;
        a.record(&sha('2'));
        assert!(a.local.lock_recovered().dirty);
        tokio::time::advance(Duration::from_secs(150)).await;
        // '1' was last seen 350 s ago (> 300 s idle timeout): dropped.
        assert_eq!(a.take_snapshot().0, vec![sha('2')[..16].to_owned()]);
    }

    #[test]
    fn digest_names_are_dns_names() {
        assert_eq!(digest_name("sess-", "Pod_A.1"), "sess-activity-pod-a-1");
    }
}
