//! What the activation layer tells the event stream (`crate::events`): one call per
//! transition outcome, each a lock, a push and a broadcast (never a wait).

use std::sync::Arc;
use std::time::Duration;

use super::ActivationError;
use super::entry::SessionEntry;
use super::table::Shared;
use crate::backend::SandboxId;
use crate::events::{EventDraft, EventKind};

impl Shared {
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
        let draft = self
            .draft(EventKind::Rejected, entry)
            .reason(reject_reason(err));
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
        ActivationError::Backend(BackendError::NoCapacity(_)) => "no_capacity",
        ActivationError::Backend(BackendError::Timeout(_)) => "activation_timeout",
        ActivationError::Backend(BackendError::Lost(_)) => "sandbox_lost",
        ActivationError::Backend(BackendError::Busy(_)) => "sandbox_busy",
        ActivationError::Backend(BackendError::Unsupported(_)) => "unsupported",
        ActivationError::Backend(BackendError::StartFailed(_)) => "sandbox_start_failed",
        ActivationError::Backend(BackendError::ControlPlane(_)) => "control_plane",
    }
}
