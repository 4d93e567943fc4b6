//! The session lifecycle as a pure state machine: `(SessionPhase, Event) -> (SessionPhase, Effects)`.
//!
//! No I/O, no clock, no locks: [`step`] reads the entry's phase, one [`Event`] and a few
//! [`Facts`] about the entry, and says where the session goes and what must happen
//! ([`Effects`]). `transition::Transitions::commit` is the one place that executes a
//! step (spawns the backend call, grants or fails the queue, moves the binding), so a
//! new phase or an event hook is a few lines here and one there. The table in
//! docs/architecture.md ("Session lifecycle") is this function, and `lifecycle/tests.rs`
//! checks it row by row.

use crate::config::{IdlePolicy, OnSandboxLoss};

#[cfg(test)]
mod tests;

/// Where a session is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SessionPhase {
    /// In the table without a sandbox and without an activation running: a brand-new entry,
    /// or (with `on_sandbox_loss: reclaim`) a session whose sandbox died.
    Unbound,
    /// A claim is running.
    Activating,
    /// Bound and ready: the fast path serves it.
    Ready,
    /// A pause is running; arriving requests queue and trigger a resume afterwards.
    Pausing,
    /// The sandbox is paused; the next request resumes it.
    Paused,
    /// The deep idle tier runs (`idle.deep_after`): the paused sandbox is suspended
    /// through its spec (Kubernetes) or stopped (process backend), releasing its memory.
    Suspending,
    /// A resume is running.
    Resuming,
    /// A release is running; queued requests get a fresh claim afterwards.
    Releasing,
    /// The sandbox died (`on_sandbox_loss: fail`); the next request gets `SandboxLost`.
    Lost,
    /// Removed from the table; a request holding this entry looks the key up again.
    Gone,
}

impl SessionPhase {
    /// Every phase, in declaration order.
    pub(crate) const ALL: [SessionPhase; 10] = [
        SessionPhase::Unbound,
        SessionPhase::Activating,
        SessionPhase::Ready,
        SessionPhase::Pausing,
        SessionPhase::Paused,
        SessionPhase::Suspending,
        SessionPhase::Resuming,
        SessionPhase::Releasing,
        SessionPhase::Lost,
        SessionPhase::Gone,
    ];

    /// The `state` label and the admin API's `state` field.
    pub(crate) fn label(self) -> &'static str {
        match self {
            SessionPhase::Unbound => "unbound",
            SessionPhase::Activating => "activating",
            SessionPhase::Ready => "active",
            SessionPhase::Pausing => "pausing",
            SessionPhase::Paused => "paused",
            SessionPhase::Suspending => "suspending",
            SessionPhase::Resuming => "resuming",
            SessionPhase::Releasing => "releasing",
            SessionPhase::Lost => "lost",
            SessionPhase::Gone => "gone",
        }
    }

    /// A claim, resume, pause or release is running for the entry.
    pub(crate) fn is_transition(self) -> bool {
        matches!(
            self,
            SessionPhase::Activating
                | SessionPhase::Pausing
                | SessionPhase::Suspending
                | SessionPhase::Resuming
                | SessionPhase::Releasing
        )
    }
}

/// Why a release is made (the `reason` label of `activator_releases_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReleaseReason {
    Idle,
    Ttl,
    Admin,
}

impl ReleaseReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::Idle => "idle",
            ReleaseReason::Ttl => "ttl",
            ReleaseReason::Admin => "admin",
        }
    }
}

/// Something that happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A request arrived on the slow path (the fast path serves `Ready` without a step).
    Request,
    /// A new entry ended up with nothing to do (its request was refused).
    Abandoned,
    ClaimOk,
    ClaimFailed,
    ResumeOk,
    /// The resume failed or overran: the sandbox is still paused as far as we know.
    ResumeFailed,
    /// The resume found the sandbox gone.
    ResumeLost,
    PauseOk,
    /// The pause overran: it may have half-happened, so the sandbox counts as paused.
    PauseTimedOut,
    /// `Busy` (another replica saw traffic) or an error: the sandbox still runs.
    PauseRefused,
    /// The pause (or the deep tier) found the sandbox gone.
    PauseLost,
    /// Paused for `idle.deep_after` and not yet in the deep tier.
    DeepDue,
    /// The deep tier suspended the sandbox; it stays bound (resume = a cold start).
    DeepOk,
    /// The deep tier stopped the sandbox: the session has none left, its state is gone.
    DeepStopped,
    /// The deep tier failed: the sandbox stays paused as it was.
    DeepFailed,
    ReleaseDone,
    /// The backend says the sandbox died.
    Lost,
    /// Another replica paused the sandbox.
    PausedElsewhere,
    /// Another replica resumed the sandbox (the endpoint comes with it).
    ResumedElsewhere,
    /// Nothing in flight for `idle.timeout`; carries the effective `idle.policy`.
    IdleDue(IdlePolicy),
    /// The phase's time-to-live (`idle.session_ttl`) ran out.
    TtlExpired,
    AdminRelease,
    AdminPause,
    AdminResume,
}

/// What [`step`] needs to know about the entry besides its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// Requests are waiting in the session's queue.
    pub queued: bool,
    /// A request holds a lease on the session.
    pub in_flight: bool,
    /// The activator is draining: no new claims or resumes.
    pub shutting_down: bool,
    /// The next lease must say `state_lost` (the previous sandbox died, `reclaim`).
    pub state_lost_pending: bool,
    /// A `Lost` event arrived while the running pause or resume ran.
    pub lost_meanwhile: bool,
    pub on_loss: OnSandboxLoss,
}

/// A backend call to spawn; each has its own transition phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Claim,
    Resume,
    Pause,
    /// The deep idle tier (`SandboxBackend::deep_pause`).
    DeepPause,
    Release(ReleaseReason),
}

impl Call {
    /// The phase a session is in while this call runs (what makes it single-flight).
    pub(crate) fn phase(self) -> SessionPhase {
        match self {
            Call::Claim => SessionPhase::Activating,
            Call::Resume => SessionPhase::Resuming,
            Call::Pause => SessionPhase::Pausing,
            Call::DeepPause => SessionPhase::Suspending,
            Call::Release(_) => SessionPhase::Releasing,
        }
    }
}

/// Which error a refused request or failed waiter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The ended transition's own error (backend error or timeout).
    Outcome,
    ShuttingDown,
    SandboxLost,
    /// A request is in flight (admin pause refuses live traffic).
    Busy,
}

/// What happens to the queued requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiters {
    /// Each gets its own lease on the now-ready session, in arrival order.
    Grant,
    /// Each gets the same error.
    Fail(Cause),
}

/// What happens to the session's binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindingChange {
    /// Take the binding the claim returned.
    Adopt,
    /// Take the endpoint the resume (or another replica) reported.
    SetEndpoint,
    /// Paused: requests have nowhere to go until a resume.
    DropEndpoint,
    /// Released: no sandbox any more.
    Clear,
    /// The sandbox died: drop it and release it in the backend (frees slots and claims).
    ReleaseDead,
}

/// The idle clock: when a session counts as last active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleClock {
    /// Active now (it just became ready): counts as traffic.
    Touch,
    /// Restart the idle window without it counting as traffic to report.
    Defer,
}

/// What the caller of a step is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Nobody waits on this step (a background event or a finished call).
    None,
    /// The request is served now (the session is ready).
    Serve,
    /// The request waits in the queue for the running (or just started) transition.
    Queue,
    /// The request or admin operation gets this error.
    Refuse(Cause),
    /// The entry is gone: look the key up again.
    Retry,
    /// Admin: a transition runs; wait for it to settle, then step again.
    Wait,
    /// Admin: nothing to run; the answer (`true`: already in the asked state).
    Done(bool),
    /// Admin: await the call this step started.
    Run,
}

/// Everything a step asks the executor to do, besides moving the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effects {
    pub call: Option<Call>,
    pub waiters: Option<Waiters>,
    pub binding: Option<BindingChange>,
    pub clock: Option<IdleClock>,
    /// Mark the next lease `state_lost`.
    pub state_lost: bool,
    /// Remember that the sandbox died under the running pause or resume.
    pub flag_lost: bool,
    /// Count and log a lost session.
    pub count_loss: bool,
    /// The session is in the deep tier now (not to be deepened again while paused).
    pub deep_done: bool,
    pub reply: Reply,
}

impl Effects {
    const NONE: Effects = Effects {
        call: None,
        waiters: None,
        binding: None,
        clock: None,
        state_lost: false,
        flag_lost: false,
        count_loss: false,
        deep_done: false,
        reply: Reply::None,
    };

    fn reply(reply: Reply) -> Effects {
        Effects {
            reply,
            ..Effects::NONE
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub phase: SessionPhase,
    pub effects: Effects,
}

impl Step {
    fn stay(phase: SessionPhase, effects: Effects) -> Step {
        Step { phase, effects }
    }

    /// Starts `call`: its phase, its spawn, and what the caller is told.
    fn start(call: Call, reply: Reply) -> Step {
        Step {
            phase: call.phase(),
            effects: Effects {
                call: Some(call),
                reply,
                ..Effects::NONE
            },
        }
    }
}

/// A pause or resume result once a `Lost` event seen meanwhile is applied: such a result
/// is not trusted, whatever the backend said.
pub(crate) fn resolve(event: Event, facts: &Facts) -> Event {
    if !facts.lost_meanwhile {
        return event;
    }
    match event {
        Event::ResumeOk | Event::ResumeFailed => Event::ResumeLost,
        Event::PauseOk
        | Event::PauseTimedOut
        | Event::PauseRefused
        | Event::DeepOk
        | Event::DeepFailed => Event::PauseLost,
        other => other,
    }
}

/// The lifecycle: where `phase` goes on `event`, and what must happen. A pair the table
/// does not list (a late event for a phase that has moved on) changes nothing.
pub(crate) fn step(phase: SessionPhase, event: Event, facts: &Facts) -> Step {
    use SessionPhase as P;
    let event = resolve(event, facts);
    let ignore = Step::stay(phase, Effects::NONE);
    match (phase, event) {
        (
            P::Gone,
            Event::Request | Event::AdminRelease | Event::AdminPause | Event::AdminResume,
        ) => Step::stay(phase, Effects::reply(Reply::Retry)),
        (P::Gone, _) => ignore,

        // === requests (slow path) ===
        (P::Ready, Event::Request) => Step::stay(phase, Effects::reply(Reply::Serve)),
        // Reported once; the next request for this ID starts a new session.
        (P::Lost, Event::Request) => {
            Step::stay(P::Gone, Effects::reply(Reply::Refuse(Cause::SandboxLost)))
        }
        (P::Unbound | P::Paused, Event::Request) if facts.shutting_down => {
            Step::stay(phase, Effects::reply(Reply::Refuse(Cause::ShuttingDown)))
        }
        (P::Unbound, Event::Request) => Step::start(Call::Claim, Reply::Queue),
        (P::Paused, Event::Request) => Step::start(Call::Resume, Reply::Queue),
        (_, Event::Request) => Step::stay(phase, Effects::reply(Reply::Queue)),
        (P::Unbound, Event::Abandoned) if !facts.queued && !facts.state_lost_pending => {
            Step::stay(P::Gone, Effects::NONE)
        }

        // === claim ===
        (P::Activating, Event::ClaimOk) => Step::stay(
            P::Ready,
            Effects {
                binding: Some(BindingChange::Adopt),
                clock: Some(IdleClock::Touch),
                waiters: Some(Waiters::Grant),
                ..Effects::NONE
            },
        ),
        (P::Activating, Event::ClaimFailed) => Step::stay(
            // Keep the entry so the session's next lease still says its state was lost.
            if facts.state_lost_pending {
                P::Unbound
            } else {
                P::Gone
            },
            Effects {
                waiters: Some(Waiters::Fail(Cause::Outcome)),
                ..Effects::NONE
            },
        ),

        // === resume ===
        (P::Resuming, Event::ResumeOk) => Step::stay(
            P::Ready,
            Effects {
                binding: Some(BindingChange::SetEndpoint),
                clock: Some(IdleClock::Touch),
                waiters: Some(Waiters::Grant),
                ..Effects::NONE
            },
        ),
        // Still paused as far as we know: the next request tries again.
        (P::Resuming, Event::ResumeFailed) => Step::stay(
            P::Paused,
            Effects {
                waiters: Some(Waiters::Fail(Cause::Outcome)),
                ..Effects::NONE
            },
        ),
        (P::Resuming, Event::ResumeLost) => lose(facts),

        // === pause ===
        (P::Pausing, Event::PauseOk | Event::PauseTimedOut) => {
            let mut s = serve_queue(P::Paused, Call::Resume, facts);
            s.effects.binding = Some(BindingChange::DropEndpoint);
            s
        }
        // Stay active and restart the idle clock, so the next idle check does not retry
        // at once; a refused pause is not traffic to report.
        (P::Pausing, Event::PauseRefused) => Step::stay(
            P::Ready,
            Effects {
                clock: Some(IdleClock::Defer),
                waiters: Some(Waiters::Grant),
                ..Effects::NONE
            },
        ),
        (P::Pausing, Event::PauseLost) => lose(facts),

        // === deep idle tier ===
        (P::Paused, Event::DeepDue) if facts.shutting_down || facts.queued => ignore,
        (P::Paused, Event::DeepDue) => Step::start(Call::DeepPause, Reply::None),
        (P::Suspending, Event::DeepOk) => {
            let mut s = serve_queue(P::Paused, Call::Resume, facts);
            s.effects.deep_done = true;
            s
        }
        // Not deepened: paused as before; tried again `deep_after` later.
        (P::Suspending, Event::DeepFailed) => serve_queue(P::Paused, Call::Resume, facts),
        (P::Suspending, Event::DeepStopped) => stopped(facts),
        (P::Suspending, Event::PauseLost) => lose(facts),

        // === release ===
        (P::Releasing, Event::ReleaseDone) => {
            let mut s = serve_queue(P::Gone, Call::Claim, facts);
            s.effects.binding = Some(BindingChange::Clear);
            s
        }

        // === loss and other replicas ===
        (P::Ready | P::Paused, Event::Lost) => lose(facts),
        // The running pause or resume turns its result into a loss when it ends.
        (P::Pausing | P::Resuming | P::Suspending, Event::Lost) => Step::stay(
            phase,
            Effects {
                flag_lost: true,
                ..Effects::NONE
            },
        ),
        (P::Ready, Event::PausedElsewhere) => Step::stay(
            P::Paused,
            Effects {
                binding: Some(BindingChange::DropEndpoint),
                ..Effects::NONE
            },
        ),
        (P::Paused | P::Ready, Event::ResumedElsewhere) => Step::stay(
            P::Ready,
            Effects {
                binding: Some(BindingChange::SetEndpoint),
                clock: (phase == P::Paused).then_some(IdleClock::Touch),
                ..Effects::NONE
            },
        ),

        // === idleness ===
        (P::Ready, Event::IdleDue(_)) if facts.shutting_down || facts.in_flight => ignore,
        (P::Ready, Event::IdleDue(IdlePolicy::Pause)) => Step::start(Call::Pause, Reply::None),
        (P::Ready, Event::IdleDue(IdlePolicy::Release)) => {
            Step::start(Call::Release(ReleaseReason::Idle), Reply::None)
        }
        (P::Paused, Event::TtlExpired) if !facts.shutting_down => {
            Step::start(Call::Release(ReleaseReason::Ttl), Reply::None)
        }
        // Nobody came back for a lost or sandbox-less session: forget it.
        (P::Lost | P::Unbound, Event::TtlExpired) if !facts.queued => {
            Step::stay(P::Gone, Effects::NONE)
        }

        // === admin: acts on settled phases only ===
        (_, Event::AdminRelease | Event::AdminPause | Event::AdminResume)
            if phase.is_transition() =>
        {
            Step::stay(phase, Effects::reply(Reply::Wait))
        }
        (_, Event::AdminRelease) => Step::start(Call::Release(ReleaseReason::Admin), Reply::Run),
        (P::Ready, Event::AdminPause) if facts.in_flight => {
            Step::stay(phase, Effects::reply(Reply::Refuse(Cause::Busy)))
        }
        (P::Ready, Event::AdminPause) => Step::start(Call::Pause, Reply::Run),
        (P::Paused, Event::AdminPause) | (P::Ready, Event::AdminResume) => {
            Step::stay(phase, Effects::reply(Reply::Done(true)))
        }
        (P::Paused, Event::AdminResume) if facts.shutting_down => {
            Step::stay(phase, Effects::reply(Reply::Refuse(Cause::ShuttingDown)))
        }
        (P::Paused, Event::AdminResume) => Step::start(Call::Resume, Reply::Run),
        (P::Lost, Event::AdminPause | Event::AdminResume) => {
            Step::stay(phase, Effects::reply(Reply::Refuse(Cause::SandboxLost)))
        }
        (_, Event::AdminPause | Event::AdminResume) => {
            Step::stay(phase, Effects::reply(Reply::Done(false)))
        }

        _ => ignore,
    }
}

/// The one rule for requests queued when a transition ends: none -> `settled`; while
/// shutting down they fail and the session is `settled`; else `next` starts for them.
fn serve_queue(settled: SessionPhase, next: Call, facts: &Facts) -> Step {
    if !facts.queued {
        Step::stay(settled, Effects::NONE)
    } else if facts.shutting_down {
        Step::stay(
            settled,
            Effects {
                waiters: Some(Waiters::Fail(Cause::ShuttingDown)),
                ..Effects::NONE
            },
        )
    } else {
        Step::start(next, Reply::None)
    }
}

/// The deep tier stopped the sandbox on purpose: like a loss for the session (its state
/// is gone, `on_sandbox_loss` decides what the next request gets), but nothing died, so
/// nothing is counted as lost and there is no dead binding left to release.
fn stopped(facts: &Facts) -> Step {
    let mut s = lose(facts);
    s.effects.binding = Some(BindingChange::Clear);
    s.effects.count_loss = false;
    s
}

/// The sandbox died. Never re-pins silently: with `fail` the session is `Lost` until one
/// request has been told (or the queued ones are told now); with `reclaim` it gets a
/// fresh sandbox and its first lease says `state_lost`.
fn lose(facts: &Facts) -> Step {
    let mut s = match facts.on_loss {
        OnSandboxLoss::Reclaim => {
            let mut s = serve_queue(SessionPhase::Unbound, Call::Claim, facts);
            s.effects.state_lost = true;
            s
        }
        OnSandboxLoss::Fail if facts.queued => Step::stay(
            SessionPhase::Gone,
            Effects {
                waiters: Some(Waiters::Fail(Cause::SandboxLost)),
                ..Effects::NONE
            },
        ),
        OnSandboxLoss::Fail => Step::stay(SessionPhase::Lost, Effects::NONE),
    };
    s.effects.binding = Some(BindingChange::ReleaseDead);
    s.effects.count_loss = true;
    s
}
