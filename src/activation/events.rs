//! `EventRouter`: backend events (lost, paused or resumed elsewhere) and restart recovery.
//!
//! Recovery: bindings the backend reports with the raw session ID are re-inserted as
//! entries right away; those known only by hash wait in `Orphans` (see `orphans`).

use std::sync::{Arc, Weak};

use tokio::sync::broadcast;

use super::ActivationError;
use super::entry::SessionEntry;
use super::lifecycle::Event;
use super::transition::{Payload, Transitions};
use crate::backend::{BackendEvent, SandboxId};

/// Routes backend events to the sessions bound to their sandbox.
pub(crate) struct EventRouter {
    transitions: Weak<Transitions>,
}

impl EventRouter {
    pub(crate) fn new(transitions: &Arc<Transitions>) -> EventRouter {
        EventRouter {
            transitions: Arc::downgrade(transitions),
        }
    }

    /// Starts the listener; it ends once either side goes away.
    pub(crate) fn spawn(&self) {
        let Some(transitions) = self.transitions.upgrade() else {
            return;
        };
        let events = transitions.backend.subscribe();
        drop(transitions);
        tokio::spawn(event_loop(self.transitions.clone(), events));
    }

    /// Re-populates the table from `backend.recover()`.
    pub(crate) async fn recover(&self) -> Result<usize, ActivationError> {
        let Some(transitions) = self.transitions.upgrade() else {
            return Ok(0);
        };
        let timeout = transitions.settings.activation_timeout;
        let found = tokio::time::timeout(timeout, transitions.backend.recover())
            .await
            .map_err(|_| ActivationError::Timeout(timeout))??;
        let n = found.len();
        let table = &transitions.table;
        for binding in found {
            match binding.session.clone() {
                Some(key) => {
                    // The store does not keep the customisation: a re-claim after a
                    // loss of a recovered session claims plain (docs/configuration.md).
                    let plain = transitions.settings.customizer.plain();
                    if let Some(entry) =
                        table.insert_if_absent(key.clone(), || binding.into_entry(key, plain))
                    {
                        transitions.register(&entry);
                    }
                }
                None => table.orphans.insert(binding),
            }
        }
        tracing::info!(
            recovered = n,
            by_hash_only = table.orphans.len(),
            "session bindings recovered"
        );
        Ok(n)
    }
}

/// Applies one backend event to the sessions bound to its sandbox.
pub(crate) fn route(transitions: &Arc<Transitions>, event: BackendEvent) {
    let (sandbox, step, endpoint) = match &event {
        BackendEvent::Lost { sandbox, .. } => (sandbox, Event::Lost, None),
        BackendEvent::Paused { sandbox } => (sandbox, Event::PausedElsewhere, None),
        BackendEvent::Resumed { sandbox, endpoint } => {
            (sandbox, Event::ResumedElsewhere, Some(*endpoint))
        }
    };
    for entry in entries_on(transitions, sandbox) {
        let st = entry.lock();
        if st.bound.as_ref().map(|b| &b.sandbox) != Some(sandbox) {
            continue;
        }
        match &event {
            BackendEvent::Lost { reason, .. } => {
                tracing::info!(session = %entry.key, %sandbox, reason, phase = st.phase.label(), "sandbox lost");
            }
            BackendEvent::Paused { .. } if entry.in_flight() > 0 => {
                tracing::warn!(session = %entry.key, %sandbox,
                    "sandbox paused elsewhere while requests are in flight here");
            }
            _ => {}
        }
        // An OOM kill says so on the event stream (`lost` with `reason: oom`).
        let oom = matches!(&event, BackendEvent::Lost { reason, .. }
            if reason.starts_with(crate::backend::LOST_OOM));
        let payload = Payload {
            endpoint,
            reason: oom.then_some("oom"),
            ..Payload::default()
        };
        drop(transitions.apply(&entry, st, step, payload).task);
    }
}

/// Entries whose binding names `sandbox`: one lookup in the table's sandbox index.
fn entries_on(transitions: &Transitions, sandbox: &SandboxId) -> Vec<Arc<SessionEntry>> {
    transitions.table.on_sandbox(sandbox)
}

/// Feeds backend events to the activator until either side goes away.
async fn event_loop(weak: Weak<Transitions>, mut events: broadcast::Receiver<BackendEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => match weak.upgrade() {
                Some(transitions) => route(&transitions, event),
                None => return,
            },
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "backend events lagged; some were dropped");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
