//! Listings, counts, and admin-initiated release/pause/resume.
//!
//! An admin operation on a session in the middle of a transition waits (bounded by
//! `activation.timeout`) until the transition settles, then steps the settled state
//! (`AdminRelease`, `AdminPause`, `AdminResume`). The call it starts runs in a spawned
//! task like any other, so a dropped admin request never leaves a session half-way.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use tokio::time::Instant;

use super::entry::SessionEntry;
use super::lifecycle::{Event, Reply, SessionPhase};
use super::transition::{Payload, Transitions};
use super::{ActivationError, SessionInfo};
use crate::backend::BackendError;
use crate::session::SessionKey;

fn info(transitions: &Transitions, entry: &SessionEntry, now: Instant) -> SessionInfo {
    let st = entry.lock();
    SessionInfo {
        session: if transitions.settings.full_ids {
            entry.key.as_str().to_owned()
        } else {
            entry.short_hash.to_string()
        },
        sandbox: st.bound.as_ref().map(|b| b.sandbox.clone()),
        state: st.phase.label(),
        in_flight: entry.in_flight(),
        idle_seconds: entry.idle_for(now).as_secs_f64(),
        endpoint: st.bound.as_ref().and_then(|b| b.endpoint),
    }
}

pub(crate) fn sessions(transitions: &Transitions) -> Vec<SessionInfo> {
    let now = Instant::now();
    let mut out: Vec<SessionInfo> = transitions
        .table
        .snapshot()
        .iter()
        .map(|e| info(transitions, e, now))
        .filter(|i| i.state != SessionPhase::Gone.label())
        .collect();
    out.sort_by(|a, b| a.session.cmp(&b.session));
    out
}

/// Where a listing resumes: the full SHA-256 (64 lowercase hex) of the last row's ID.
///
/// Rows are ordered by that hash, which every entry already carries a 12-character prefix
/// of (`short_hash`), so the order costs no hashing except on a prefix tie. An ID that is
/// added or removed between two pages cannot shift the others: every session present
/// throughout a walk is listed exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor(String);

impl SessionCursor {
    /// Parses a cursor from a query string; `None` unless it is 64 lowercase hex digits.
    pub fn parse(raw: &str) -> Option<SessionCursor> {
        (raw.len() == 64 && raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| SessionCursor(raw.to_owned()))
    }

    /// The cursor text, as `next_cursor` carries it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `entry` sorts after this cursor.
    fn before(&self, entry: &SessionEntry) -> bool {
        match entry.short_hash.as_bytes().cmp(&self.0.as_bytes()[..SHORT]) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => entry.key.sha256_hex().as_str() > self.0.as_str(),
        }
    }
}

/// Length of `SessionEntry::short_hash`.
const SHORT: usize = 12;

/// One page of `GET /api/sessions`.
#[derive(Debug, Clone)]
pub struct SessionPage {
    /// At most `limit` rows, ordered by the SHA-256 of the session ID.
    pub sessions: Vec<SessionInfo>,
    /// Where the next page starts; `None` when this page reached the end of the table.
    pub next_cursor: Option<SessionCursor>,
    /// Sessions in the table (every phase but `Gone`), from the live counts.
    pub total: i64,
    /// Each row's own cursor (the full hash of its ID), aligned with `sessions`: pages
    /// of several pools are merged by it.
    pub cursors: Vec<SessionCursor>,
}

/// A table entry ordered by the SHA-256 of its key (short hash first, the full hash only
/// on a tie).
struct ByHash(Arc<SessionEntry>);

impl Ord for ByHash {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .short_hash
            .cmp(&other.0.short_hash)
            .then_with(|| self.0.key.sha256_hex().cmp(&other.0.key.sha256_hex()))
    }
}

impl PartialOrd for ByHash {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ByHash {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ByHash {}

/// The `limit` sessions after `after`, in hash order: one pass over the table keeping a
/// bounded max-heap, O(n log limit) comparisons of 12-byte prefixes, and only the rows
/// kept are locked and rendered. Blocking work for a big table: callers on a runtime run
/// it with `spawn_blocking`.
pub(crate) fn sessions_page(
    transitions: &Transitions,
    after: Option<&SessionCursor>,
    limit: usize,
) -> SessionPage {
    let limit = limit.max(1);
    let mut heap: BinaryHeap<ByHash> = BinaryHeap::with_capacity(limit + 1);
    let mut more = false;
    transitions.table.for_each(|entry| {
        if after.is_some_and(|c| !c.before(entry)) {
            return;
        }
        if heap.len() < limit {
            heap.push(ByHash(Arc::clone(entry)));
            return;
        }
        more = true;
        let beats_top =
            heap.peek()
                .is_some_and(|top| match entry.short_hash.cmp(&top.0.short_hash) {
                    Ordering::Less => true,
                    Ordering::Greater => false,
                    Ordering::Equal => entry.key.sha256_hex() < top.0.key.sha256_hex(),
                });
        if beats_top {
            heap.pop();
            heap.push(ByHash(Arc::clone(entry)));
        }
    });
    let rows = heap.into_sorted_vec();
    let next_cursor = if more {
        rows.last()
            .map(|last| SessionCursor(last.0.key.sha256_hex()))
    } else {
        None
    };
    let now = Instant::now();
    let (sessions, cursors) = rows
        .iter()
        .map(|r| (info(transitions, &r.0, now), r))
        // An entry being removed: skipped, the cursor still moves past it.
        .filter(|(i, _)| i.state != SessionPhase::Gone.label())
        .map(|(i, r)| (i, SessionCursor(r.0.key.sha256_hex())))
        .unzip();
    let total = SessionPhase::ALL
        .into_iter()
        .filter(|p| *p != SessionPhase::Gone)
        .map(|p| transitions.table.count_of(p))
        .sum();
    SessionPage {
        sessions,
        next_cursor,
        total,
        cursors,
    }
}

pub(crate) fn session(transitions: &Transitions, key: &SessionKey) -> Option<SessionInfo> {
    let entry = transitions.table.get(key)?;
    let info = info(transitions, &entry, Instant::now());
    (info.state != SessionPhase::Gone.label()).then_some(info)
}

/// Counts per state, kept by the executor: O(1) in sessions.
pub(crate) fn session_counts(transitions: &Transitions) -> Vec<(&'static str, i64)> {
    SessionPhase::ALL
        .into_iter()
        .filter(|p| *p != SessionPhase::Gone)
        .map(|p| (p.label(), transitions.table.count_of(p)))
        .collect()
}

/// The keys of the sessions whose short hash is `hash` (a scan: admin use only, run with
/// `spawn_blocking` on a big table).
pub(crate) fn keys_by_hash(transitions: &Transitions, hash: &str) -> Vec<SessionKey> {
    let mut keys = Vec::new();
    transitions.table.for_each(|e| {
        if &*e.short_hash == hash {
            keys.push(e.key.clone());
        }
    });
    keys
}

/// Steps the session's settled state on `event`, waiting for running transitions to end.
pub(crate) async fn admin_op(
    transitions: &Arc<Transitions>,
    key: &SessionKey,
    event: Event,
) -> Result<bool, ActivationError> {
    if event == Event::AdminPause && !transitions.settings.can_pause {
        return Err(ActivationError::Backend(BackendError::Unsupported("pause")));
    }
    let budget = transitions.settings.activation_timeout;
    let deadline = Instant::now() + budget;
    loop {
        let Some(entry) = transitions.table.get(key) else {
            return Ok(false);
        };
        // Registered before looking, so a transition ending in between still wakes us.
        let settled = transitions.settled.notified();
        let mut settled = std::pin::pin!(settled);
        settled.as_mut().enable();
        let applied = transitions.apply(&entry, entry.lock(), event, Payload::default());
        match (applied.reply, applied.task) {
            (Reply::Retry, _) => {
                transitions.table.forget(&entry);
                continue;
            }
            (Reply::Wait, _) => {
                if tokio::time::timeout_at(deadline, settled).await.is_err() {
                    return Err(ActivationError::Timeout(budget));
                }
            }
            (Reply::Run, Some(task)) => {
                // The task bounds its own backend call; this bound is a backstop.
                let limit = deadline + budget;
                return match tokio::time::timeout_at(limit, task).await {
                    Ok(Ok(result)) => result.map(|()| true),
                    Ok(Err(join)) => Err(ActivationError::Backend(BackendError::ControlPlane(
                        format!("session task failed: {join}"),
                    ))),
                    Err(_) => Err(ActivationError::Timeout(budget)),
                };
            }
            (Reply::Refuse(_), _) => {
                return Err(applied.refused.unwrap_or(ActivationError::SandboxLost));
            }
            (Reply::Done(answer), _) => return Ok(answer),
            _ => return Ok(false),
        }
    }
}
