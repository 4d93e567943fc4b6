//! What a held request waited for: the `waited_for` label of
//! `activator_request_held_seconds`, the one histogram of hold time by path.

use crate::backend::{ActivationKind, Binding};

/// The path a held request took to a ready sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldFor {
    /// A ready sandbox from the warm pool (or a free static endpoint).
    WarmClaim,
    /// No warm sandbox (or a customisation that needs its own): one was started.
    ColdCreate,
    /// The session's paused (frozen) sandbox was thawed.
    ResumeFrozen,
    /// The session's sandbox was in the deep idle tier (`idle.deep_after`: suspended,
    /// scaled to zero) and had to come back, or a claim adopted a suspended sandbox.
    ResumeSuspended,
    /// The claim waited for capacity first (`backend.max_sandboxes` reached, every static
    /// endpoint full); observed for the whole hold, also when it ends in `no_capacity`.
    QueuedNoCapacity,
}

impl HeldFor {
    pub const ALL: [HeldFor; 5] = [
        HeldFor::WarmClaim,
        HeldFor::ColdCreate,
        HeldFor::ResumeFrozen,
        HeldFor::ResumeSuspended,
        HeldFor::QueuedNoCapacity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HeldFor::WarmClaim => "warm_claim",
            HeldFor::ColdCreate => "cold_create",
            HeldFor::ResumeFrozen => "resume_frozen",
            HeldFor::ResumeSuspended => "resume_suspended",
            HeldFor::QueuedNoCapacity => "queued_no_capacity",
        }
    }

    /// What a request held for this claim waited for.
    pub fn of_claim(binding: &Binding) -> HeldFor {
        if binding.queued_for_capacity {
            return HeldFor::QueuedNoCapacity;
        }
        match binding.kind {
            ActivationKind::Create => HeldFor::ColdCreate,
            // A claim that adopted a suspended sandbox (another replica's, or ours before a
            // restart) and brought it back.
            ActivationKind::Resume => HeldFor::ResumeSuspended,
            ActivationKind::Claim | ActivationKind::None => HeldFor::WarmClaim,
        }
    }

    /// What a request held for a resume waited for: `deep` is whether the session was in
    /// the deep idle tier.
    pub fn of_resume(deep: bool) -> HeldFor {
        if deep {
            HeldFor::ResumeSuspended
        } else {
            HeldFor::ResumeFrozen
        }
    }
}
