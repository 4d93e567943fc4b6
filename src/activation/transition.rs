//! The claim, resume, pause and release tasks, and what a lost sandbox does to a session.
//!
//! Each `start_*` runs with the entry locked: it moves the phase to the transition's own
//! phase (which is what makes the transition single-flight) and spawns the backend call,
//! so a request that gives up never cancels it. Every backend call is bounded; a claim or
//! resume that overruns its deadline gets one more `activation.timeout` of grace while
//! its waiters time out on their own (a late success is kept for later requests, so a
//! sandbox bound late is never leaked and a session never claims twice concurrently).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ActivationError;
use super::entry::{Bound, EntryState, Phase, SessionEntry};
use super::table::Shared;
use crate::backend::{ActivationKind, BackendError, ClaimBudget};
use crate::events::EventKind;

/// The `result` label of `activator_activations_total` for a backend error.
fn result_label(e: &BackendError) -> &'static str {
    match e {
        BackendError::NoCapacity(_) => "no_capacity",
        BackendError::Timeout(_) => "timeout",
        BackendError::Lost(_) => "lost",
        _ => "error",
    }
}

impl Shared {
    /// Awaits `fut` until `deadline` plus one `activation.timeout` of grace. Waiters are
    /// not failed at `deadline` here: each one's own wait ends by then (see
    /// `Shared::acquire_slow`), while a request arriving later still profits from a late
    /// result.
    async fn bounded<T>(&self, fut: impl Future<Output = T>, deadline: Instant) -> Option<T> {
        tokio::time::timeout_at(deadline + self.settings.activation_timeout, fut)
            .await
            .ok()
    }

    fn count_activation(&self, kind: ActivationKind, result: &str, started: Instant) {
        self.metrics
            .activations_total
            .with_label_values(&[kind.as_str(), result])
            .inc();
        if result == "ok" {
            self.metrics
                .activation_duration
                .with_label_values(&[kind.as_str()])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    // === claim ===

    /// Starts the one claim for an `Unbound` session. Call with the entry locked.
    pub(crate) fn start_claim(self: &Arc<Self>, entry: &Arc<SessionEntry>, st: &mut EntryState) {
        st.phase = Phase::Activating;
        st.bound = None;
        let this = Arc::clone(self);
        let entry = Arc::clone(entry);
        tokio::spawn(async move { this.run_claim(entry).await });
    }

    async fn run_claim(self: Arc<Self>, entry: Arc<SessionEntry>) {
        let started = Instant::now();
        let admission_deadline = started + self.settings.admission_timeout;
        let budget = ClaimBudget {
            admission_deadline,
            deadline: admission_deadline + self.settings.activation_timeout,
        };
        let total = self.settings.admission_timeout + self.settings.activation_timeout;
        self.claiming.fetch_add(1, Ordering::AcqRel);
        self.metrics.waiting_sessions.inc();
        let outcome = self
            .bounded(self.backend.claim(&entry.key, budget), budget.deadline)
            .await;
        self.claiming.fetch_sub(1, Ordering::AcqRel);
        self.metrics.waiting_sessions.dec();
        self.metrics
            .admission_wait
            .observe(started.elapsed().as_secs_f64());

        let mut st = entry.lock();
        match outcome {
            Some(Ok(binding)) => {
                self.count_activation(binding.kind, "ok", started);
                self.publish(EventKind::Claimed, &entry, Some(&binding.sandbox), |d| {
                    d.activation(binding.kind.as_str()).wait(started.elapsed())
                });
                st.bound = Some(Bound {
                    sandbox: binding.sandbox,
                    endpoint: Some(binding.endpoint),
                });
                st.phase = Phase::Ready;
                entry.touch(Instant::now());
                self.queue.grant_all(&entry, &mut st, binding.kind);
            }
            Some(Err(e)) => {
                self.count_activation(ActivationKind::Claim, result_label(&e), started);
                tracing::info!(session = %entry.key, error = %e, "claim failed");
                let err = ActivationError::Backend(e);
                self.publish_rejected(&entry, &err, Some(started.elapsed()));
                self.claim_failed(&mut st, err);
            }
            None => {
                self.count_activation(ActivationKind::Claim, "timeout", started);
                tracing::warn!(session = %entry.key, "claim did not finish within its grace period");
                let err = ActivationError::Timeout(total);
                self.publish_rejected(&entry, &err, Some(started.elapsed()));
                self.claim_failed(&mut st, err);
            }
        }
        self.settle(&entry, st);
    }

    fn claim_failed(&self, st: &mut EntryState, err: ActivationError) {
        self.queue.fail_all(st, &err);
        if st.state_lost_pending {
            // Keep the entry so the session's next lease still says its state was lost.
            st.phase = Phase::Unbound;
            st.since = Instant::now();
        } else {
            st.phase = Phase::Gone;
        }
    }

    // === resume ===

    /// Starts the one resume for a `Paused` session. Call with the entry locked.
    pub(crate) fn start_resume(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
    ) -> JoinHandle<Result<(), ActivationError>> {
        st.phase = Phase::Resuming;
        st.lost_meanwhile = false;
        let this = Arc::clone(self);
        let entry = Arc::clone(entry);
        tokio::spawn(async move { this.run_resume(entry).await })
    }

    async fn run_resume(self: Arc<Self>, entry: Arc<SessionEntry>) -> Result<(), ActivationError> {
        let started = Instant::now();
        let sandbox = entry.lock().bound.as_ref().map(|b| b.sandbox.clone());
        let Some(sandbox) = sandbox else {
            let mut st = entry.lock();
            self.mark_lost(&entry, &mut st);
            self.settle(&entry, st);
            return Err(ActivationError::SandboxLost);
        };
        let budget = self.settings.activation_timeout;
        let deadline = started + budget;
        let outcome = self
            .bounded(self.backend.resume(&sandbox, deadline), deadline)
            .await;
        let mut st = entry.lock();
        let outcome = if std::mem::take(&mut st.lost_meanwhile) {
            Some(Err(BackendError::Lost(sandbox.clone())))
        } else {
            outcome
        };
        let result = match outcome {
            Some(Ok(endpoint)) => {
                self.count_activation(ActivationKind::Resume, "ok", started);
                let cause = if st.waiters.is_empty() {
                    "admin"
                } else {
                    "request"
                };
                self.publish(EventKind::Resumed, &entry, Some(&sandbox), |d| {
                    d.activation("resume").wait(started.elapsed()).reason(cause)
                });
                st.bound = Some(Bound {
                    sandbox,
                    endpoint: Some(endpoint),
                });
                st.phase = Phase::Ready;
                entry.touch(Instant::now());
                self.queue
                    .grant_all(&entry, &mut st, ActivationKind::Resume);
                Ok(())
            }
            Some(Err(BackendError::Lost(_))) => {
                self.count_activation(ActivationKind::Resume, "lost", started);
                self.mark_lost(&entry, &mut st);
                Err(ActivationError::SandboxLost)
            }
            Some(Err(e)) => {
                self.count_activation(ActivationKind::Resume, result_label(&e), started);
                tracing::warn!(session = %entry.key, %sandbox, error = %e, "resume failed");
                let err = ActivationError::Backend(e);
                self.publish_rejected(&entry, &err, Some(started.elapsed()));
                self.queue.fail_all(&mut st, &err);
                // Still paused as far as we know: the next request tries again.
                st.phase = Phase::Paused;
                Err(err)
            }
            None => {
                self.count_activation(ActivationKind::Resume, "timeout", started);
                let err = ActivationError::Timeout(budget);
                self.publish_rejected(&entry, &err, Some(started.elapsed()));
                self.queue.fail_all(&mut st, &err);
                st.phase = Phase::Paused;
                Err(err)
            }
        };
        self.settle(&entry, st);
        result
    }

    // === pause ===

    /// Starts a pause of a `Ready` session with nothing in flight. Call with the entry
    /// locked (the in-flight check and this phase change must happen under one lock).
    pub(crate) fn start_pause(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
    ) -> Option<JoinHandle<Result<(), ActivationError>>> {
        let sandbox = st.bound.as_ref()?.sandbox.clone();
        st.phase = Phase::Pausing;
        st.lost_meanwhile = false;
        let this = Arc::clone(self);
        let entry = Arc::clone(entry);
        Some(tokio::spawn(
            async move { this.run_pause(entry, sandbox).await },
        ))
    }

    async fn run_pause(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: crate::backend::SandboxId,
    ) -> Result<(), ActivationError> {
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            self.settings.activation_timeout,
            self.backend.pause(&sandbox),
        )
        .await;
        let mut st = entry.lock();
        let outcome = if std::mem::take(&mut st.lost_meanwhile) {
            Ok(Err(BackendError::Lost(sandbox.clone())))
        } else {
            outcome
        };
        let now = Instant::now();
        let (label, result) = match outcome {
            Ok(Ok(())) | Err(_) => {
                // A pause that overran may have half-happened: treat the sandbox as paused
                // so the next request resumes it rather than hitting a frozen one.
                let result = match outcome {
                    Ok(_) => Ok(()),
                    Err(_) => Err(ActivationError::Timeout(self.settings.activation_timeout)),
                };
                st.phase = Phase::Paused;
                st.since = now;
                if let Some(b) = st.bound.as_mut() {
                    b.endpoint = None;
                }
                self.publish(EventKind::Paused, &entry, Some(&sandbox), |d| {
                    d.wait(started.elapsed())
                });
                if !st.waiters.is_empty() {
                    // Requests arrived while pausing: resume right away.
                    if self.is_shutting_down() {
                        self.queue.fail_all(&mut st, &ActivationError::ShuttingDown);
                    } else {
                        drop(self.start_resume(&entry, &mut st));
                    }
                }
                (if result.is_ok() { "ok" } else { "timeout" }, result)
            }
            Ok(Err(BackendError::Lost(_))) => {
                self.mark_lost(&entry, &mut st);
                ("lost", Err(ActivationError::SandboxLost))
            }
            Ok(Err(e)) => {
                // Busy (another replica saw traffic) or unsupported: stay active, restart
                // the idle clock so the sweeper does not retry at once.
                let label = if matches!(e, BackendError::Busy(_)) {
                    "busy"
                } else {
                    tracing::warn!(session = %entry.key, %sandbox, error = %e, "pause failed");
                    "error"
                };
                st.phase = Phase::Ready;
                entry.defer_idle(now);
                self.queue.grant_all(&entry, &mut st, ActivationKind::None);
                (label, Err(ActivationError::Backend(e)))
            }
        };
        self.metrics.pauses_total.with_label_values(&[label]).inc();
        self.settle(&entry, st);
        result
    }

    // === release ===

    /// Starts releasing a session's sandbox. Call with the entry locked.
    pub(crate) fn start_release(
        self: &Arc<Self>,
        entry: &Arc<SessionEntry>,
        st: &mut EntryState,
        reason: &'static str,
    ) -> JoinHandle<Result<(), ActivationError>> {
        st.phase = Phase::Releasing;
        let sandbox = st.bound.as_ref().map(|b| b.sandbox.clone());
        let this = Arc::clone(self);
        let entry = Arc::clone(entry);
        tokio::spawn(async move { this.run_release(entry, sandbox, reason).await })
    }

    async fn run_release(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: Option<crate::backend::SandboxId>,
        reason: &'static str,
    ) -> Result<(), ActivationError> {
        let result = match &sandbox {
            Some(sandbox) => self.release_in_backend(&entry.key, sandbox, reason).await,
            None => Ok(()),
        };
        let mut st = entry.lock();
        self.publish(EventKind::Released, &entry, sandbox.as_ref(), |d| {
            d.reason(reason)
        });
        st.bound = None;
        if st.waiters.is_empty() {
            st.phase = Phase::Gone;
        } else if self.is_shutting_down() {
            self.queue.fail_all(&mut st, &ActivationError::ShuttingDown);
            st.phase = Phase::Gone;
        } else {
            // Requests arrived while releasing: they get a fresh sandbox.
            self.start_claim(&entry, &mut st);
        }
        self.settle(&entry, st);
        result
    }

    /// `backend.release`, bounded and counted; failures are logged (the session is
    /// forgotten either way: nothing better can be done with it).
    pub(crate) async fn release_in_backend(
        &self,
        key: &crate::session::SessionKey,
        sandbox: &crate::backend::SandboxId,
        reason: &'static str,
    ) -> Result<(), ActivationError> {
        self.metrics
            .releases_total
            .with_label_values(&[reason])
            .inc();
        let outcome = tokio::time::timeout(
            self.settings.activation_timeout,
            self.backend.release(key, sandbox),
        )
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(session = %key, %sandbox, reason, error = %e, "release failed");
                Err(ActivationError::Backend(e))
            }
            Err(_) => {
                tracing::warn!(session = %key, %sandbox, reason, "release timed out");
                Err(ActivationError::Timeout(self.settings.activation_timeout))
            }
        }
    }

    // === loss ===

    /// The session's sandbox died. Never re-pins silently: with `fail` the session is
    /// `Lost` until one request has been told (`SandboxLost`); with `reclaim` it gets a
    /// fresh sandbox and its first lease says `state_lost`. Call with the entry locked.
    pub(crate) fn mark_lost(self: &Arc<Self>, entry: &Arc<SessionEntry>, st: &mut EntryState) {
        self.metrics.sessions_lost_total.inc();
        tracing::warn!(session = %entry.key, "sandbox lost");
        let lost = st.bound.as_ref().map(|b| &b.sandbox);
        self.publish(EventKind::Lost, entry, lost, |d| d);
        if let Some(old) = st.bound.take() {
            // Tell the backend the session no longer holds it (frees slots and claims).
            let this = Arc::clone(self);
            let key = entry.key.clone();
            tokio::spawn(async move {
                let _ = this.release_in_backend(&key, &old.sandbox, "lost").await;
            });
        }
        st.since = Instant::now();
        match self.settings.on_loss {
            crate::config::OnSandboxLoss::Reclaim => {
                st.state_lost_pending = true;
                if st.waiters.is_empty() {
                    st.phase = Phase::Unbound;
                } else if self.is_shutting_down() {
                    self.queue.fail_all(st, &ActivationError::ShuttingDown);
                    st.phase = Phase::Unbound;
                } else {
                    self.start_claim(entry, st);
                }
            }
            crate::config::OnSandboxLoss::Fail => {
                if st.waiters.is_empty() {
                    st.phase = Phase::Lost;
                } else {
                    // The queued requests are the ones told.
                    self.queue.fail_all(st, &ActivationError::SandboxLost);
                    st.phase = Phase::Gone;
                }
            }
        }
    }
}
