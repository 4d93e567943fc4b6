//! The transition table of docs/architecture.md ("Session lifecycle"), row by row.

use super::*;
use SessionPhase as P;

fn facts() -> Facts {
    Facts {
        queued: false,
        in_flight: false,
        shutting_down: false,
        state_lost_pending: false,
        lost_meanwhile: false,
        on_loss: OnSandboxLoss::Fail,
    }
}

fn queued() -> Facts {
    Facts {
        queued: true,
        ..facts()
    }
}

fn reclaim(f: Facts) -> Facts {
    Facts {
        on_loss: OnSandboxLoss::Reclaim,
        ..f
    }
}

fn draining(f: Facts) -> Facts {
    Facts {
        shutting_down: true,
        ..f
    }
}

/// One expected transition: where the session goes, the call it starts, what the queue
/// gets, the binding change, and what the caller is told.
struct Row {
    from: SessionPhase,
    event: Event,
    facts: Facts,
    to: SessionPhase,
    call: Option<Call>,
    waiters: Option<Waiters>,
    binding: Option<BindingChange>,
    reply: Reply,
}

fn row(from: SessionPhase, event: Event, facts: Facts, to: SessionPhase) -> Row {
    Row {
        from,
        event,
        facts,
        to,
        call: None,
        waiters: None,
        binding: None,
        reply: Reply::None,
    }
}

impl Row {
    fn call(mut self, c: Call) -> Row {
        self.call = Some(c);
        self
    }
    fn waiters(mut self, w: Waiters) -> Row {
        self.waiters = Some(w);
        self
    }
    fn binding(mut self, b: BindingChange) -> Row {
        self.binding = Some(b);
        self
    }
    fn reply(mut self, r: Reply) -> Row {
        self.reply = r;
        self
    }

    fn check(&self, n: usize) {
        let s = step(self.from, self.event, &self.facts);
        let at = format!("row {n}: {:?} --{:?}-->", self.from, self.event);
        assert_eq!(s.phase, self.to, "{at} phase");
        assert_eq!(s.effects.call, self.call, "{at} call");
        assert_eq!(s.effects.waiters, self.waiters, "{at} waiters");
        assert_eq!(s.effects.binding, self.binding, "{at} binding");
        assert_eq!(s.effects.reply, self.reply, "{at} reply");
        if let Some(call) = s.effects.call {
            assert_eq!(call.phase(), s.phase, "{at} a call runs in its own phase");
        }
    }
}

use BindingChange as B;
use Cause as C;
use Event as E;
use Waiters as W;

#[test]
fn requests() {
    let rows = [
        // (none), unbound | request | activating | claim (one, spawned)
        row(P::Unbound, E::Request, facts(), P::Activating)
            .call(Call::Claim)
            .reply(Reply::Queue),
        // paused | request | resuming | resume (one, spawned)
        row(P::Paused, E::Request, facts(), P::Resuming)
            .call(Call::Resume)
            .reply(Reply::Queue),
        // A transition runs: the request queues for it, nothing new starts.
        row(P::Activating, E::Request, facts(), P::Activating).reply(Reply::Queue),
        row(P::Resuming, E::Request, facts(), P::Resuming).reply(Reply::Queue),
        row(P::Pausing, E::Request, facts(), P::Pausing).reply(Reply::Queue),
        row(P::Releasing, E::Request, facts(), P::Releasing).reply(Reply::Queue),
        row(P::Ready, E::Request, facts(), P::Ready).reply(Reply::Serve),
        // lost | request | (none): told once (502 sandbox_lost)
        row(P::Lost, E::Request, facts(), P::Gone).reply(Reply::Refuse(C::SandboxLost)),
        row(P::Gone, E::Request, facts(), P::Gone).reply(Reply::Retry),
        // Draining: no new claims or resumes.
        row(P::Unbound, E::Request, draining(facts()), P::Unbound)
            .reply(Reply::Refuse(C::ShuttingDown)),
        row(P::Paused, E::Request, draining(facts()), P::Paused)
            .reply(Reply::Refuse(C::ShuttingDown)),
        row(P::Ready, E::Request, draining(facts()), P::Ready).reply(Reply::Serve),
        // A refused brand-new entry is dropped, unless it must still say state_lost.
        row(P::Unbound, E::Abandoned, facts(), P::Gone),
        row(
            P::Unbound,
            E::Abandoned,
            Facts {
                state_lost_pending: true,
                ..facts()
            },
            P::Unbound,
        ),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
}

#[test]
fn claims_and_resumes() {
    let rows = [
        // activating | claim ok / failed | active / (none)
        row(P::Activating, E::ClaimOk, queued(), P::Ready)
            .waiters(W::Grant)
            .binding(B::Adopt),
        row(P::Activating, E::ClaimFailed, queued(), P::Gone).waiters(W::Fail(C::Outcome)),
        row(
            P::Activating,
            E::ClaimFailed,
            Facts {
                state_lost_pending: true,
                ..queued()
            },
            P::Unbound,
        )
        .waiters(W::Fail(C::Outcome)),
        // resuming | ok / failed / Lost | active / paused / lost
        row(P::Resuming, E::ResumeOk, queued(), P::Ready)
            .waiters(W::Grant)
            .binding(B::SetEndpoint),
        row(P::Resuming, E::ResumeFailed, queued(), P::Paused).waiters(W::Fail(C::Outcome)),
        row(P::Resuming, E::ResumeLost, facts(), P::Lost).binding(B::ReleaseDead),
        row(P::Resuming, E::ResumeLost, queued(), P::Gone)
            .waiters(W::Fail(C::SandboxLost))
            .binding(B::ReleaseDead),
        // A Lost event seen while the resume ran turns its success into a loss.
        row(
            P::Resuming,
            E::ResumeOk,
            Facts {
                lost_meanwhile: true,
                ..facts()
            },
            P::Lost,
        )
        .binding(B::ReleaseDead),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
}

#[test]
fn idleness_and_pauses() {
    let pause = E::IdleDue(IdlePolicy::Pause);
    let release = E::IdleDue(IdlePolicy::Release);
    let rows = [
        // active | idle, policy pause, nothing in flight | pausing | pause
        row(P::Ready, pause, facts(), P::Pausing).call(Call::Pause),
        row(
            P::Ready,
            pause,
            Facts {
                in_flight: true,
                ..facts()
            },
            P::Ready,
        ),
        row(P::Ready, pause, draining(facts()), P::Ready),
        row(P::Ready, E::IdleDue(IdlePolicy::Keep), facts(), P::Ready),
        // active | idle, policy release | releasing | release
        row(P::Ready, release, facts(), P::Releasing).call(Call::Release(ReleaseReason::Idle)),
        // pausing | ok / Busy or error | paused / active | resume at once if requests queued
        row(P::Pausing, E::PauseOk, facts(), P::Paused).binding(B::DropEndpoint),
        row(P::Pausing, E::PauseTimedOut, facts(), P::Paused).binding(B::DropEndpoint),
        row(P::Pausing, E::PauseOk, queued(), P::Resuming)
            .call(Call::Resume)
            .binding(B::DropEndpoint),
        row(P::Pausing, E::PauseOk, draining(queued()), P::Paused)
            .waiters(W::Fail(C::ShuttingDown))
            .binding(B::DropEndpoint),
        row(P::Pausing, E::PauseRefused, queued(), P::Ready).waiters(W::Grant),
        row(P::Pausing, E::PauseLost, facts(), P::Lost).binding(B::ReleaseDead),
        // paused | paused > idle.session_ttl | releasing | release
        row(P::Paused, E::TtlExpired, facts(), P::Releasing)
            .call(Call::Release(ReleaseReason::Ttl)),
        row(P::Paused, E::TtlExpired, draining(facts()), P::Paused),
        // Nobody came back: lost and sandbox-less entries are forgotten after the TTL.
        row(P::Lost, E::TtlExpired, facts(), P::Gone),
        row(P::Unbound, E::TtlExpired, facts(), P::Gone),
        row(P::Unbound, E::TtlExpired, queued(), P::Unbound),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
}

#[test]
fn the_deep_idle_tier() {
    let rows = [
        // paused | paused > idle.deep_after, not deep yet | suspending | deep pause
        row(P::Paused, E::DeepDue, facts(), P::Suspending).call(Call::DeepPause),
        row(P::Paused, E::DeepDue, draining(facts()), P::Paused),
        // suspending | suspended (Kubernetes) | paused, deep | resume at once if queued
        row(P::Suspending, E::DeepOk, facts(), P::Paused),
        row(P::Suspending, E::DeepOk, queued(), P::Resuming).call(Call::Resume),
        row(P::Suspending, E::DeepFailed, facts(), P::Paused),
        row(P::Suspending, E::DeepFailed, queued(), P::Resuming).call(Call::Resume),
        // suspending | stopped (process) | lost / unbound (state lost) | nothing to release
        row(P::Suspending, E::DeepStopped, facts(), P::Lost).binding(B::Clear),
        row(P::Suspending, E::DeepStopped, reclaim(facts()), P::Unbound).binding(B::Clear),
        row(
            P::Suspending,
            E::DeepStopped,
            reclaim(queued()),
            P::Activating,
        )
        .call(Call::Claim)
        .binding(B::Clear),
        row(P::Suspending, E::DeepStopped, queued(), P::Gone)
            .waiters(W::Fail(C::SandboxLost))
            .binding(B::Clear),
        // suspending | the sandbox vanished | lost / unbound | release of the dead binding
        row(P::Suspending, E::PauseLost, facts(), P::Lost).binding(B::ReleaseDead),
        // Requests wait for the deep tier; a loss meanwhile turns its result into a loss.
        row(P::Suspending, E::Request, facts(), P::Suspending).reply(Reply::Queue),
        row(P::Suspending, E::Lost, facts(), P::Suspending),
        // Only a paused session goes deep.
        row(P::Ready, E::DeepDue, facts(), P::Ready),
        row(P::Lost, E::DeepDue, facts(), P::Lost),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
    assert!(step(P::Suspending, E::DeepOk, &facts()).effects.deep_done);
    assert!(
        !step(P::Suspending, E::DeepFailed, &facts())
            .effects
            .deep_done
    );
    let stopped = step(P::Suspending, E::DeepStopped, &reclaim(facts()));
    assert!(stopped.effects.state_lost, "the next lease says state_lost");
    assert!(
        !stopped.effects.count_loss,
        "a deliberate stop is not a loss"
    );
    let lost_meanwhile = Facts {
        lost_meanwhile: true,
        ..facts()
    };
    assert_eq!(
        step(P::Suspending, E::DeepOk, &lost_meanwhile).phase,
        P::Lost
    );
}

#[test]
fn releases_losses_and_other_replicas() {
    let rows = [
        // releasing | done | (none), or activating if requests queued | claim
        row(P::Releasing, E::ReleaseDone, facts(), P::Gone).binding(B::Clear),
        row(P::Releasing, E::ReleaseDone, queued(), P::Activating)
            .call(Call::Claim)
            .binding(B::Clear),
        row(P::Releasing, E::ReleaseDone, draining(queued()), P::Gone)
            .waiters(W::Fail(C::ShuttingDown))
            .binding(B::Clear),
        // active, paused | Lost event | lost / unbound | release of the dead binding
        row(P::Ready, E::Lost, facts(), P::Lost).binding(B::ReleaseDead),
        row(P::Paused, E::Lost, facts(), P::Lost).binding(B::ReleaseDead),
        row(P::Ready, E::Lost, reclaim(facts()), P::Unbound).binding(B::ReleaseDead),
        row(P::Paused, E::Lost, reclaim(queued()), P::Activating)
            .call(Call::Claim)
            .binding(B::ReleaseDead),
        row(P::Paused, E::Lost, draining(reclaim(queued())), P::Unbound)
            .waiters(W::Fail(C::ShuttingDown))
            .binding(B::ReleaseDead),
        // A loss during a pause or resume waits for that call to end.
        row(P::Pausing, E::Lost, facts(), P::Pausing),
        row(P::Resuming, E::Lost, facts(), P::Resuming),
        // A claim reports its own outcome; a release ends anyway.
        row(P::Activating, E::Lost, facts(), P::Activating),
        row(P::Releasing, E::Lost, facts(), P::Releasing),
        // active / paused | Paused / Resumed event (another replica) | paused / active
        row(P::Ready, E::PausedElsewhere, facts(), P::Paused).binding(B::DropEndpoint),
        row(P::Paused, E::ResumedElsewhere, facts(), P::Ready).binding(B::SetEndpoint),
        row(P::Ready, E::ResumedElsewhere, facts(), P::Ready).binding(B::SetEndpoint),
        row(P::Resuming, E::PausedElsewhere, facts(), P::Resuming),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
    let lost = step(P::Ready, E::Lost, &reclaim(facts()));
    assert!(lost.effects.state_lost, "reclaim marks the next lease");
    assert!(lost.effects.count_loss);
    assert!(step(P::Pausing, E::Lost, &facts()).effects.flag_lost);
}

#[test]
fn admin() {
    let busy = Facts {
        in_flight: true,
        ..facts()
    };
    let rows = [
        // active, paused | admin DELETE | releasing | release
        row(P::Ready, E::AdminRelease, facts(), P::Releasing)
            .call(Call::Release(ReleaseReason::Admin))
            .reply(Reply::Run),
        row(P::Paused, E::AdminRelease, facts(), P::Releasing)
            .call(Call::Release(ReleaseReason::Admin))
            .reply(Reply::Run),
        row(P::Ready, E::AdminPause, facts(), P::Pausing)
            .call(Call::Pause)
            .reply(Reply::Run),
        row(P::Ready, E::AdminPause, busy, P::Ready).reply(Reply::Refuse(C::Busy)),
        row(P::Paused, E::AdminPause, facts(), P::Paused).reply(Reply::Done(true)),
        row(P::Unbound, E::AdminPause, facts(), P::Unbound).reply(Reply::Done(false)),
        row(P::Lost, E::AdminPause, facts(), P::Lost).reply(Reply::Refuse(C::SandboxLost)),
        // paused | admin resume | resuming | resume
        row(P::Paused, E::AdminResume, facts(), P::Resuming)
            .call(Call::Resume)
            .reply(Reply::Run),
        row(P::Paused, E::AdminResume, draining(facts()), P::Paused)
            .reply(Reply::Refuse(C::ShuttingDown)),
        row(P::Ready, E::AdminResume, facts(), P::Ready).reply(Reply::Done(true)),
        row(P::Lost, E::AdminResume, facts(), P::Lost).reply(Reply::Refuse(C::SandboxLost)),
        row(P::Gone, E::AdminRelease, facts(), P::Gone).reply(Reply::Retry),
    ];
    for (n, r) in rows.iter().enumerate() {
        r.check(n);
    }
    // Mid-transition, every admin operation waits for it to settle.
    for from in P::ALL.into_iter().filter(|p| p.is_transition()) {
        for event in [E::AdminRelease, E::AdminPause, E::AdminResume] {
            row(from, event, facts(), from).reply(Reply::Wait).check(0);
        }
    }
}

/// Every pair the table does not list changes nothing: a late result for a phase that
/// has moved on can never move a session.
#[test]
fn unlisted_pairs_change_nothing() {
    let results = [
        E::ClaimOk,
        E::ClaimFailed,
        E::ResumeOk,
        E::ResumeFailed,
        E::ResumeLost,
        E::PauseOk,
        E::PauseTimedOut,
        E::PauseRefused,
        E::PauseLost,
        E::ReleaseDone,
        E::DeepOk,
        E::DeepStopped,
        E::DeepFailed,
    ];
    let owner = |e: Event| match e {
        E::ClaimOk | E::ClaimFailed => P::Activating,
        E::DeepOk | E::DeepStopped | E::DeepFailed => P::Suspending,
        E::ResumeOk | E::ResumeFailed | E::ResumeLost => P::Resuming,
        E::ReleaseDone => P::Releasing,
        _ => P::Pausing,
    };
    for from in P::ALL {
        for event in results {
            // The deep tier reports a vanished sandbox as a pause does.
            if owner(event) == from || (event == E::PauseLost && from == P::Suspending) {
                continue;
            }
            for f in [facts(), queued(), draining(reclaim(queued()))] {
                let s = step(from, event, &f);
                assert_eq!(s.phase, from, "{from:?} --{event:?}--> moved");
                assert_eq!(
                    s.effects,
                    Effects::NONE,
                    "{from:?} --{event:?}--> had effects"
                );
            }
        }
    }
    for from in [P::Unbound, P::Activating, P::Lost, P::Gone] {
        for event in [
            E::PausedElsewhere,
            E::ResumedElsewhere,
            E::IdleDue(IdlePolicy::Pause),
        ] {
            let s = step(from, event, &facts());
            assert_eq!(
                (s.phase, s.effects),
                (from, Effects::NONE),
                "{from:?} --{event:?}"
            );
        }
    }
}
