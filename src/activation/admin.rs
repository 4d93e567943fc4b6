//! Listings, counts, and admin-initiated release/pause/resume.
//!
//! An admin operation on a session in the middle of a transition waits (bounded by
//! `activation.timeout`) until the transition settles, then acts on the settled state.
//! The transition it starts runs in a spawned task like any other, so a dropped admin
//! request never leaves a session half-way.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::entry::{EntryState, Phase, SessionEntry};
use super::table::Shared;
use super::{ActivationError, SessionInfo};
use crate::backend::BackendError;
use crate::session::SessionKey;

/// What an admin operation decided with the entry locked.
enum Step {
    Done(Result<bool, ActivationError>),
    Wait,
    Run(JoinHandle<Result<(), ActivationError>>),
}

impl Shared {
    fn info(&self, entry: &SessionEntry, now: Instant) -> SessionInfo {
        let st = entry.lock();
        SessionInfo {
            session: if self.settings.full_ids {
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

    fn snapshot(&self) -> Vec<Arc<SessionEntry>> {
        self.table.iter().map(|r| Arc::clone(r.value())).collect()
    }

    pub(crate) fn sessions(&self) -> Vec<SessionInfo> {
        let now = Instant::now();
        let mut out: Vec<SessionInfo> = self
            .snapshot()
            .iter()
            .map(|e| self.info(e, now))
            .filter(|i| i.state != Phase::Gone.label())
            .collect();
        out.sort_by(|a, b| a.session.cmp(&b.session));
        out
    }

    pub(crate) fn session(&self, key: &SessionKey) -> Option<SessionInfo> {
        let entry = Arc::clone(self.table.get(key)?.value());
        let info = self.info(&entry, Instant::now());
        (info.state != Phase::Gone.label()).then_some(info)
    }

    pub(crate) fn session_counts(&self) -> Vec<(&'static str, i64)> {
        let mut counts: Vec<(&'static str, i64)> = Phase::LABELS.iter().map(|l| (*l, 0)).collect();
        for entry in self.snapshot() {
            let label = entry.lock().phase.label();
            if let Some(c) = counts.iter_mut().find(|(l, _)| *l == label) {
                c.1 += 1;
            }
        }
        counts
    }

    /// The keys of the sessions whose short hash is `hash` (a scan: admin use only).
    pub(crate) fn keys_by_hash(&self, hash: &str) -> Vec<SessionKey> {
        self.table
            .iter()
            .filter(|r| &*r.value().short_hash == hash)
            .map(|r| r.key().clone())
            .collect()
    }

    /// As counted by the last idle sweep (at most `idle.sweep_interval` old).
    pub(crate) fn active_sessions(&self) -> usize {
        self.active_counted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `decide` on the session's settled state, waiting for transitions to end.
    async fn admin_op(
        self: &Arc<Self>,
        key: &SessionKey,
        decide: impl Fn(&Arc<Self>, &Arc<SessionEntry>, &mut EntryState) -> Step,
    ) -> Result<bool, ActivationError> {
        let budget = self.settings.activation_timeout;
        let deadline = Instant::now() + budget;
        loop {
            let Some(entry) = self.table.get(key).map(|r| Arc::clone(r.value())) else {
                return Ok(false);
            };
            // Registered before looking, so a transition ending in between still wakes us.
            let settled = self.settled.notified();
            let mut settled = std::pin::pin!(settled);
            settled.as_mut().enable();
            let step = {
                let mut st = entry.lock();
                if st.phase == Phase::Gone {
                    drop(st);
                    self.forget(&entry);
                    continue;
                }
                if st.phase.is_transition() {
                    Step::Wait
                } else {
                    decide(self, &entry, &mut st)
                }
            };
            match step {
                Step::Done(r) => return r,
                Step::Wait => {
                    if tokio::time::timeout_at(deadline, settled).await.is_err() {
                        return Err(ActivationError::Timeout(budget));
                    }
                }
                Step::Run(task) => {
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
            }
        }
    }

    pub(crate) async fn admin_release(
        self: &Arc<Self>,
        key: &SessionKey,
    ) -> Result<bool, ActivationError> {
        self.admin_op(key, |this, entry, st| {
            Step::Run(this.start_release(entry, st, "admin"))
        })
        .await
    }

    pub(crate) async fn admin_pause(
        self: &Arc<Self>,
        key: &SessionKey,
    ) -> Result<bool, ActivationError> {
        if !self.settings.can_pause {
            return Err(ActivationError::Backend(BackendError::Unsupported("pause")));
        }
        self.admin_op(key, |this, entry, st| match st.phase {
            Phase::Ready if entry.in_flight() > 0 => {
                let sandbox = st.bound.as_ref().map(|b| b.sandbox.clone());
                Step::Done(match sandbox {
                    Some(s) => Err(ActivationError::Backend(BackendError::Busy(s))),
                    None => Ok(false),
                })
            }
            Phase::Ready => match this.start_pause(entry, st) {
                Some(task) => Step::Run(task),
                None => Step::Done(Ok(false)),
            },
            Phase::Paused => Step::Done(Ok(true)),
            Phase::Lost => Step::Done(Err(ActivationError::SandboxLost)),
            _ => Step::Done(Ok(false)),
        })
        .await
    }

    pub(crate) async fn admin_resume(
        self: &Arc<Self>,
        key: &SessionKey,
    ) -> Result<bool, ActivationError> {
        self.admin_op(key, |this, entry, st| match st.phase {
            Phase::Paused if this.is_shutting_down() => {
                Step::Done(Err(ActivationError::ShuttingDown))
            }
            Phase::Paused => Step::Run(this.start_resume(entry, st)),
            Phase::Ready => Step::Done(Ok(true)),
            Phase::Lost => Step::Done(Err(ActivationError::SandboxLost)),
            _ => Step::Done(Ok(false)),
        })
        .await
    }
}
