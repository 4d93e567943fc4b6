//! What the activation layer tells the event stream (`crate::events`): one event per
//! transition outcome, each a lock, a push and a broadcast (never a wait).
//!
//! [`Transitions::publish_step`] is called by the one executor (`Transitions::commit`) for
//! every step, so a transition cannot happen without its event.

use std::sync::Arc;
use std::time::Duration;

use super::ActivationError;
use super::entry::{EntryState, SessionEntry};
use super::lifecycle::{Event, SessionPhase, Step};
use super::transition::{Payload, Transitions};
use crate::backend::SandboxId;
use crate::events::{EventDraft, EventKind};

impl Transitions {
    /// Publishes what `step` (on `event`, from the locked state `st`) means for the
    /// stream. Call before the step's effects change the binding.
    pub(crate) fn publish_step(
        &self,
        entry: &SessionEntry,
        st: &EntryState,
        event: Event,
        step: &Step,
        payload: &Payload,
    ) {
        let from = st.phase;
        if step.phase == from && step.effects.binding.is_none() {
            // Ignored, queued or refused: the acquire path publishes requests itself.
            return;
        }
        let sandbox = st.bound.as_ref().map(|b| &b.sandbox);
        if step.effects.count_loss {
            // `reason` set only for a loss the backend explained (`oom`).
            let reason = payload.reason.filter(|_| event == Event::Lost);
            self.publish(EventKind::Lost, entry, sandbox, |d| match reason {
                Some(r) => d.reason(r),
                None => d,
            });
        }
        let waited = |d: EventDraft| match payload.waited {
            Some(w) => d.wait(w),
            None => d,
        };
        match event {
            Event::ClaimOk => {
                let claimed = payload.binding.as_ref().map(|b| &b.sandbox);
                let kind = payload.kind.map(|k| k.as_str()).unwrap_or("claim");
                self.publish(EventKind::Claimed, entry, claimed, |d| {
                    waited(d.activation(kind))
                });
            }
            Event::ClaimFailed | Event::ResumeFailed => {
                if let Some(err) = &payload.error {
                    self.publish_rejected(entry, err, payload.waited);
                }
            }
            Event::ResumeOk => {
                let cause = if st.waiters.is_empty() {
                    "admin"
                } else {
                    "request"
                };
                self.publish(EventKind::Resumed, entry, sandbox, |d| {
                    waited(d.activation("resume")).reason(cause)
                });
            }
            Event::PauseOk | Event::PauseTimedOut => {
                self.publish(EventKind::Paused, entry, sandbox, waited);
            }
            Event::DeepOk => {
                self.publish(EventKind::Paused, entry, sandbox, |d| {
                    waited(d).reason("deep")
                });
            }
            Event::DeepStopped => {
                self.publish(EventKind::Released, entry, sandbox, |d| d.reason("deep"));
            }
            Event::PausedElsewhere => {
                self.publish(EventKind::Frozen, entry, sandbox, |d| d.reason("peer"));
            }
            Event::ResumedElsewhere if from == SessionPhase::Paused => {
                self.publish(EventKind::Resumed, entry, sandbox, |d| d.reason("peer"));
            }
            Event::ReleaseDone => {
                let reason = payload.reason.unwrap_or("admin");
                self.publish(EventKind::Released, entry, sandbox, |d| d.reason(reason));
            }
            _ => {}
        }
    }

    /// A request joined `st`'s queue (call with the entry locked, before the step).
    pub(crate) fn publish_queued(&self, entry: &SessionEntry, st: &EntryState) {
        let waits_for = match st.phase {
            SessionPhase::Unbound | SessionPhase::Activating => "claim",
            SessionPhase::Paused | SessionPhase::Resuming => "resume",
            SessionPhase::Pausing => "pausing",
            SessionPhase::Suspending => "suspending",
            _ => "releasing",
        };
        let sandbox = st.bound.as_ref().map(|b| &b.sandbox);
        self.publish(EventKind::Queued, entry, sandbox, |d| d.reason(waits_for));
    }

    fn draft(&self, kind: EventKind, entry: &SessionEntry) -> EventDraft {
        EventDraft::new(kind, Arc::from(&*entry.short_hash))
    }

    /// Publishes `kind` for `entry` with its sandbox, finished by `fill`.
    pub(crate) fn publish(
        &self,
        kind: EventKind,
        entry: &SessionEntry,
        sandbox: Option<&SandboxId>,
        fill: impl FnOnce(EventDraft) -> EventDraft,
    ) {
        let draft = self.draft(kind, entry).sandbox(sandbox.cloned());
        self.events.emit(fill(draft));
    }

    /// A request was refused with `err` (after `waited`, if it waited at all).
    pub(crate) fn publish_rejected(
        &self,
        entry: &SessionEntry,
        err: &ActivationError,
        waited: Option<Duration>,
    ) {
        let mut draft = self
            .draft(EventKind::Rejected, entry)
            .reason(reject_reason(err));
        if let ActivationError::Backend(crate::backend::BackendError::Rejected(why)) = err {
            // The controller's own words, for operators (never in the client's body).
            draft = draft.detail(why);
        }
        self.events.emit(match waited {
            Some(w) => draft.wait(w),
            None => draft,
        });
    }
}

/// The error code a refused request gets (as `proxy::error` names it).
pub(crate) fn reject_reason(err: &ActivationError) -> &'static str {
    use crate::backend::BackendError;
    match err {
        ActivationError::QueueFull(_) => "queue_full",
        ActivationError::Timeout(_) => "activation_timeout",
        ActivationError::SandboxLost => "sandbox_lost",
        ActivationError::ShuttingDown => "shutting_down",
        ActivationError::Hook(_) => "hook_failed",
        ActivationError::Backend(BackendError::NoCapacity(_)) => "no_capacity",
        ActivationError::Backend(BackendError::Timeout(_)) => "activation_timeout",
        ActivationError::Backend(BackendError::Lost(_)) => "sandbox_lost",
        ActivationError::Backend(BackendError::Busy(_)) => "sandbox_busy",
        ActivationError::Backend(BackendError::Unsupported(_)) => "unsupported",
        ActivationError::Backend(BackendError::StartFailed(_)) => "sandbox_start_failed",
        ActivationError::Backend(BackendError::ControlPlane(_)) => "control_plane",
        ActivationError::Backend(BackendError::Conflict(_)) => "claim_conflict",
        ActivationError::Backend(BackendError::Rejected(_)) => "claim_rejected",
    }
}
