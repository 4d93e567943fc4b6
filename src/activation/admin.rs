//! Listings, counts, and admin-initiated release/pause/resume.
//!
//! An admin operation on a session in the middle of a transition waits (bounded by
//! `activation.timeout`) until the transition settles, then steps the settled state
//! (`AdminRelease`, `AdminPause`, `AdminResume`). The call it starts runs in a spawned
//! task like any other, so a dropped admin request never leaves a session half-way.

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

/// The keys of the sessions whose short hash is `hash` (a scan: admin use only).
pub(crate) fn keys_by_hash(transitions: &Transitions, hash: &str) -> Vec<SessionKey> {
    transitions
        .table
        .snapshot()
        .into_iter()
        .filter(|e| &*e.short_hash == hash)
        .map(|e| e.key.clone())
        .collect()
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
