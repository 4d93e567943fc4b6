//! The claim, resume, pause and release calls: each bounded, counted, and ended by one step.
//!
//! Every backend call is bounded; a claim or resume that overruns its deadline gets one
//! more `activation.timeout` of grace while its waiters time out on their own (a late
//! success is kept for later requests, so a sandbox bound late is never leaked and a
//! session never claims twice concurrently).

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use super::{Payload, Transitions};
use crate::activation::entry::{Bound, SessionEntry};
use crate::activation::hooks::{HookCall, HookKind};
use crate::activation::lifecycle::{self, Event};
use crate::activation::{ActivationError, HeldFor};
use crate::backend::{ActivationKind, BackendError, ClaimBudget, DeepPause, SandboxId};
use crate::events::EventKind;
use crate::session::SessionKey;

/// The `result` label of `activator_activations_total` for a backend error.
fn result_label(e: &BackendError) -> &'static str {
    match e {
        BackendError::NoCapacity(_) => "no_capacity",
        BackendError::Timeout(_) => "timeout",
        BackendError::Lost(_) => "lost",
        _ => "error",
    }
}

impl Transitions {
    /// Awaits `fut` until `deadline` plus one `activation.timeout` of grace. Waiters are
    /// not failed at `deadline` here: each one's own wait ends by then, while a request
    /// arriving later still profits from a late result.
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

    pub(super) async fn run_claim(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
    ) -> Result<(), ActivationError> {
        let started = Instant::now();
        let admission_deadline = started + self.settings.admission_timeout;
        let budget = ClaimBudget {
            admission_deadline,
            deadline: admission_deadline + self.settings.activation_timeout,
        };
        let total = self.settings.admission_timeout + self.settings.activation_timeout;
        let outcome = self
            .bounded(
                self.backend.claim_with(&entry.key, &entry.spec, budget),
                budget.deadline,
            )
            .await;
        self.claim_ended();
        self.metrics
            .admission_wait
            .observe(started.elapsed().as_secs_f64());

        let (event, payload, result) = match outcome {
            Some(Ok(binding)) => {
                let held_for = HeldFor::of_claim(&binding);
                self.count_activation(binding.kind, "ok", started);
                if !entry.spec.is_empty() {
                    let cold = binding.kind == ActivationKind::Create;
                    self.metrics
                        .customized_claims_total
                        .with_label_values(&[if cold { "true" } else { "false" }])
                        .inc();
                }
                let payload = Payload {
                    binding: Some(Bound {
                        sandbox: binding.sandbox,
                        endpoint: Some(binding.endpoint),
                    }),
                    kind: Some(binding.kind),
                    held_for: Some(held_for),
                    ..Payload::default()
                };
                (Event::ClaimOk, payload, Ok(()))
            }
            Some(Err(e)) => {
                self.count_activation(ActivationKind::Claim, result_label(&e), started);
                tracing::info!(session = %entry.key, error = %e, "claim failed");
                failed(Event::ClaimFailed, ActivationError::Backend(e))
            }
            None => {
                self.count_activation(ActivationKind::Claim, "timeout", started);
                tracing::warn!(session = %entry.key, "claim did not finish within its grace period");
                failed(Event::ClaimFailed, ActivationError::Timeout(total))
            }
        };
        let payload = Payload {
            waited: Some(started.elapsed()),
            ..payload
        };
        self.apply(&entry, entry.lock(), event, payload);
        result
    }

    pub(super) async fn run_resume(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: Option<SandboxId>,
        held_for: HeldFor,
    ) -> Result<(), ActivationError> {
        let started = Instant::now();
        let budget = self.settings.activation_timeout;
        let deadline = started + budget;
        // Only a recovered entry could lack a sandbox: nothing to resume, so it is lost.
        let outcome = match &sandbox {
            Some(sandbox) => {
                self.bounded(self.backend.resume(sandbox, deadline), deadline)
                    .await
            }
            None => Some(Err(BackendError::Unsupported("resume without a sandbox"))),
        };
        // After a resume, before the held requests are released (they are granted when
        // the step below applies): an aborting hook pauses the sandbox again.
        let hook_failed = match (&outcome, &sandbox) {
            (Some(Ok(endpoint)), Some(sandbox)) => {
                self.resume_hook_aborts(&entry, sandbox, *endpoint).await
            }
            _ => false,
        };
        let st = entry.lock();
        let (event, payload, result) = match outcome {
            Some(Ok(_)) if hook_failed => failed(
                Event::ResumeFailed,
                ActivationError::Hook(HookKind::AfterResume.as_str()),
            ),
            Some(Ok(endpoint)) => {
                let payload = Payload {
                    endpoint: Some(endpoint),
                    kind: Some(ActivationKind::Resume),
                    held_for: Some(held_for),
                    ..Payload::default()
                };
                (Event::ResumeOk, payload, Ok(()))
            }
            Some(Err(BackendError::Lost(_))) => {
                failed(Event::ResumeLost, ActivationError::SandboxLost)
            }
            _ if sandbox.is_none() => failed(Event::ResumeLost, ActivationError::SandboxLost),
            Some(Err(e)) => {
                tracing::warn!(session = %entry.key, sandbox = ?sandbox, error = %e, "resume failed");
                failed(Event::ResumeFailed, ActivationError::Backend(e))
            }
            None => failed(Event::ResumeFailed, ActivationError::Timeout(budget)),
        };
        let event = lifecycle::resolve(event, &self.facts(&entry, &st));
        let label = match (event, &result) {
            (Event::ResumeOk, _) => "ok",
            (Event::ResumeLost, _) => "lost",
            (_, Err(ActivationError::Hook(_))) => "hook_aborted",
            (_, Err(ActivationError::Backend(e))) => result_label(e),
            _ => "timeout",
        };
        self.count_activation(ActivationKind::Resume, label, started);
        let result = if event == Event::ResumeLost {
            Err(ActivationError::SandboxLost)
        } else {
            result
        };
        let payload = Payload {
            waited: Some(started.elapsed()),
            ..payload
        };
        self.apply(&entry, st, event, payload);
        result
    }

    pub(super) async fn run_pause(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: Option<SandboxId>,
    ) -> Result<(), ActivationError> {
        let started = Instant::now();
        let timeout = self.settings.activation_timeout;
        // `None`: the before_pause hook failed with `on_failure: abort`.
        let outcome = match &sandbox {
            Some(sandbox)
                if self
                    .hook_aborts(&entry, HookKind::BeforePause, sandbox)
                    .await =>
            {
                None
            }
            Some(sandbox) => Some(
                tokio::time::timeout(timeout, self.backend.pause(sandbox))
                    .await
                    .ok(),
            ),
            None => Some(Some(Err(BackendError::Unsupported(
                "pause without a sandbox",
            )))),
        };
        let st = entry.lock();
        let Some(outcome) = outcome else {
            // The sandbox keeps running, as after `Busy`: the idle clock starts over.
            let event = lifecycle::resolve(Event::PauseRefused, &self.facts(&entry, &st));
            self.metrics
                .pauses_total
                .with_label_values(&["hook_aborted"])
                .inc();
            let payload = Payload {
                waited: Some(started.elapsed()),
                ..Payload::default()
            };
            self.apply(&entry, st, event, payload);
            return Err(ActivationError::Hook(HookKind::BeforePause.as_str()));
        };
        let (event, label, result) = match outcome {
            Some(Ok(())) => (Event::PauseOk, "ok", Ok(())),
            // A pause that overran may have half-happened: treat the sandbox as paused
            // so the next request resumes it rather than hitting a frozen one.
            None => (
                Event::PauseTimedOut,
                "timeout",
                Err(ActivationError::Timeout(timeout)),
            ),
            Some(Err(BackendError::Lost(_))) => {
                (Event::PauseLost, "lost", Err(ActivationError::SandboxLost))
            }
            Some(Err(e)) => {
                // Busy (another replica saw traffic) or unsupported: stay active.
                let label = if matches!(e, BackendError::Busy(_)) {
                    "busy"
                } else {
                    tracing::warn!(session = %entry.key, sandbox = ?sandbox, error = %e, "pause failed");
                    "error"
                };
                (Event::PauseRefused, label, Err(ActivationError::Backend(e)))
            }
        };
        let event = lifecycle::resolve(event, &self.facts(&entry, &st));
        let (label, result) = if event == Event::PauseLost {
            ("lost", Err(ActivationError::SandboxLost))
        } else {
            (label, result)
        };
        self.metrics.pauses_total.with_label_values(&[label]).inc();
        let payload = Payload {
            waited: Some(started.elapsed()),
            ..Payload::default()
        };
        self.apply(&entry, st, event, payload);
        result
    }

    /// The deep idle tier: the backend suspends (binding kept) or stops (binding gone) the
    /// paused sandbox.
    pub(super) async fn run_deep(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: Option<SandboxId>,
    ) -> Result<(), ActivationError> {
        let started = Instant::now();
        let timeout = self.settings.activation_timeout;
        let outcome = match &sandbox {
            Some(sandbox) => {
                tokio::time::timeout(timeout, self.backend.deep_pause(&entry.key, sandbox))
                    .await
                    .ok()
            }
            None => Some(Err(BackendError::Unsupported(
                "deep pause without a sandbox",
            ))),
        };
        let st = entry.lock();
        let (event, label) = match outcome {
            Some(Ok(DeepPause::Suspended)) => (Event::DeepOk, "suspended"),
            Some(Ok(DeepPause::Stopped)) => (Event::DeepStopped, "stopped"),
            Some(Err(BackendError::Lost(_))) => (Event::PauseLost, "lost"),
            None => (Event::DeepFailed, "timeout"),
            Some(Err(e)) => {
                tracing::warn!(session = %entry.key, sandbox = ?sandbox, error = %e, "deep pause failed");
                (Event::DeepFailed, "error")
            }
        };
        let event = lifecycle::resolve(event, &self.facts(&entry, &st));
        let label = if event == Event::PauseLost {
            "lost"
        } else {
            label
        };
        self.metrics
            .deep_pauses_total
            .with_label_values(&[label])
            .inc();
        let payload = Payload {
            waited: Some(started.elapsed()),
            reason: Some("deep"),
            ..Payload::default()
        };
        self.apply(&entry, st, event, payload);
        Ok(())
    }

    pub(super) async fn run_release(
        self: Arc<Self>,
        entry: Arc<SessionEntry>,
        sandbox: Option<SandboxId>,
        reason: &'static str,
    ) -> Result<(), ActivationError> {
        let result = match &sandbox {
            Some(sandbox) => self.release_in_backend(&entry.key, sandbox, reason).await,
            None => Ok(()),
        };
        let payload = Payload {
            reason: Some(reason),
            ..Payload::default()
        };
        self.apply(&entry, entry.lock(), Event::ReleaseDone, payload);
        result
    }

    /// `backend.release`, bounded and counted; failures are logged (the session is
    /// forgotten either way: nothing better can be done with it).
    pub(crate) async fn release_in_backend(
        &self,
        key: &SessionKey,
        sandbox: &SandboxId,
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
}

impl Transitions {
    /// Runs hook `kind` (if configured) against the session's running sandbox; whether
    /// it failed with `on_failure: abort`.
    async fn hook_aborts(&self, entry: &SessionEntry, kind: HookKind, sandbox: &SandboxId) -> bool {
        let endpoint = entry.lock().bound.as_ref().and_then(|b| b.endpoint);
        match endpoint {
            Some(endpoint) => self.run_hook(entry, kind, sandbox, endpoint).await,
            None => false,
        }
    }

    /// The after_resume hook at the resumed `endpoint`; on an abort the sandbox is paused
    /// again (bounded) so that it is what the session's phase says. Whether it aborted.
    async fn resume_hook_aborts(
        &self,
        entry: &SessionEntry,
        sandbox: &SandboxId,
        endpoint: std::net::SocketAddr,
    ) -> bool {
        if !self
            .run_hook(entry, HookKind::AfterResume, sandbox, endpoint)
            .await
        {
            return false;
        }
        let timeout = self.settings.activation_timeout;
        match tokio::time::timeout(timeout, self.backend.pause(sandbox)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(session = %entry.short_hash, %sandbox, error = %e, "pausing again after a failed after_resume hook failed");
            }
            Err(_) => {
                tracing::warn!(session = %entry.short_hash, %sandbox, "pausing again after a failed after_resume hook timed out");
            }
        }
        true
    }

    /// Calls hook `kind` at `endpoint` and publishes it; whether it aborts.
    async fn run_hook(
        &self,
        entry: &SessionEntry,
        kind: HookKind,
        sandbox: &SandboxId,
        endpoint: std::net::SocketAddr,
    ) -> bool {
        let Some(HookCall {
            result,
            abort,
            took,
        }) = self.hooks.call(kind, endpoint, &entry.short_hash).await
        else {
            return false;
        };
        self.publish(EventKind::Hook, entry, Some(sandbox), |d| {
            d.hook(kind.as_str()).reason(result.label()).wait(took)
        });
        abort
    }
}

/// A failed call: its event, the error waiters get, and the call's result.
fn failed(event: Event, err: ActivationError) -> (Event, Payload, Result<(), ActivationError>) {
    let payload = Payload {
        error: Some(err.clone()),
        ..Payload::default()
    };
    (event, payload, Err(err))
}
