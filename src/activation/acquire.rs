//! Both acquire paths: the no-await fast path and the queued slow path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::entry::{EntryState, Grant, SessionEntry};
use super::lifecycle::{self, Event, Reply, SessionPhase};
use super::queue::WaitTicket;
use super::table::Found;
use super::transition::{Payload, Transitions};
use super::{ActivationError, HeldFor, Permit};
use crate::backend::{ActivationKind, BackendError, ClaimSpec};
use crate::session::SessionKey;

/// The fast path: a permit if the session is bound and ready. No await, no allocation.
#[inline]
pub(crate) fn try_ready(transitions: &Transitions, key: &SessionKey) -> Option<Permit> {
    transitions
        .table
        .with(key, |entry| ready_now(transitions, entry))?
}

/// The fast path through a connection's [`LeaseCache`]: the same answer as [`try_ready`],
/// without the table probe (hashing the key, a shard lock) when the connection carried
/// the session lately and the table has removed nothing since.
#[inline]
pub(crate) fn try_ready_cached(
    transitions: &Transitions,
    key: &SessionKey,
    cache: &mut LeaseCache,
) -> Option<Permit> {
    let table = &transitions.table;
    // Read before any lookup whose result is cached (see `SessionTable::generation`).
    let generation = table.generation();
    if cache.table != table.id() || cache.generation != generation {
        *cache = LeaseCache {
            table: table.id(),
            generation,
            ..LeaseCache::default()
        };
    }
    if let Some(entry) = cache.entries.iter().flatten().find(|e| e.key == *key) {
        return ready_now(transitions, entry);
    }
    let (permit, entry) = table.with(key, |entry| {
        (ready_now(transitions, entry), Arc::clone(entry))
    })?;
    let slot = cache.next % cache.entries.len();
    cache.entries[slot] = Some(entry);
    cache.next = slot + 1;
    permit
}

/// Sessions a client connection carried lately: each key's table entry, valid while the
/// table's generation is the one read when they were looked up (no entry has left the
/// table since, so each is still the one stored under its key). A few, not one: a
/// gateway multiplexes several users' sessions on each keep-alive connection.
#[derive(Default)]
pub struct LeaseCache {
    table: u64,
    generation: u64,
    entries: [Option<Arc<SessionEntry>>; LEASE_CACHE_ENTRIES],
    /// Where the next miss is stored (round robin).
    next: usize,
}

impl LeaseCache {
    /// The key of a cached session whose ID is `raw` (shared, not allocated). Keys are
    /// values: any equal key names the same session, whatever the table did since.
    pub fn key(&self, raw: &str) -> Option<SessionKey> {
        self.entries
            .iter()
            .flatten()
            .find(|e| e.key.as_str() == raw)
            .map(|e| e.key.clone())
    }
}

/// Sessions a [`LeaseCache`] remembers.
const LEASE_CACHE_ENTRIES: usize = 8;

/// A permit on `entry` if it is bound and ready (its lock taken briefly).
#[inline]
fn ready_now(transitions: &Transitions, entry: &Arc<SessionEntry>) -> Option<Permit> {
    let st = entry.lock();
    if st.phase != SessionPhase::Ready || st.state_lost_pending {
        return None;
    }
    let bound = st.bound.as_ref()?;
    let endpoint = bound.endpoint?;
    let sandbox = bound.sandbox.clone();
    // Counted under the lock the idle scheduler checks, so no pause can start now.
    let guard = entry.start_request();
    transitions.set_active(entry, true);
    transitions.reporter.note(entry);
    drop(st);
    Some(Permit {
        endpoint,
        sandbox,
        activation: ActivationKind::None,
        waited: Duration::ZERO,
        state_lost: false,
        _guard: guard,
    })
}

/// The slow path: join the session's queue, starting a claim or resume if none runs.
/// `spec` customises the session if this request creates it.
pub(crate) async fn acquire_slow(
    transitions: &Arc<Transitions>,
    key: &SessionKey,
    spec: &Arc<ClaimSpec>,
) -> Result<Permit, ActivationError> {
    let arrived = Instant::now();
    loop {
        match slow_step(transitions, key, spec, arrived) {
            SlowStep::Retry => continue,
            SlowStep::Done(result) => return result,
            SlowStep::Wait(ticket, rx, budget) => {
                let waited = ticket.wait(rx, arrived + budget, budget).await;
                let held_for = match &waited {
                    Ok(grant) => grant.held_for,
                    Err(ActivationError::Backend(BackendError::NoCapacity(_))) => {
                        Some(HeldFor::QueuedNoCapacity)
                    }
                    Err(_) => None,
                };
                if let Some(h) = held_for {
                    transitions
                        .metrics
                        .request_held
                        .with_label_values(&[h.as_str()])
                        .observe(arrived.elapsed().as_secs_f64());
                }
                return Ok(Permit::from_grant(waited?, arrived.elapsed()));
            }
        }
    }
}

/// What the locked part of the slow path decided.
enum SlowStep {
    Retry,
    Done(Result<Permit, ActivationError>),
    Wait(
        WaitTicket,
        oneshot::Receiver<Result<Grant, ActivationError>>,
        Duration,
    ),
}

/// The locked part of the slow path (kept out of the async fn: no lock across await).
/// The request is queued before the step is committed, so a full queue refuses it
/// without starting anything.
fn slow_step(
    transitions: &Arc<Transitions>,
    key: &SessionKey,
    spec: &Arc<ClaimSpec>,
    arrived: Instant,
) -> SlowStep {
    let (entry, found) = transitions.table.entry_for(key, spec);
    if found == Found::Recovered {
        transitions.register(&entry);
    }
    let mut st = entry.lock();
    let new_session = matches!(
        st.phase,
        SessionPhase::Unbound | SessionPhase::Activating | SessionPhase::Releasing
    );
    let step = lifecycle::step(st.phase, Event::Request, &transitions.facts(&entry, &st));
    match step.effects.reply {
        Reply::Retry => {
            // Removed while we looked it up: look again (it is out of the table).
            drop(st);
            transitions.table.forget(&entry);
            SlowStep::Retry
        }
        Reply::Serve => match ready_permit(transitions, &entry, &mut st, arrived) {
            Some(permit) => SlowStep::Done(Ok(permit)),
            None => enqueue(transitions, &entry, st, step, new_session),
        },
        Reply::Refuse(cause) => {
            let err = transitions.error(cause, &st, None);
            transitions.publish_rejected(&entry, &err, None);
            transitions.commit(&entry, &mut st, Event::Request, step, Payload::default());
            transitions.settle(&entry, st);
            discard_if_unused(transitions, &entry);
            SlowStep::Done(Err(err))
        }
        _ => enqueue(transitions, &entry, st, step, new_session),
    }
}

fn enqueue(
    transitions: &Arc<Transitions>,
    entry: &Arc<SessionEntry>,
    mut st: std::sync::MutexGuard<'_, EntryState>,
    step: lifecycle::Step,
    new_session: bool,
) -> SlowStep {
    let (ticket, rx) = match transitions.queue.enqueue(entry, &mut st) {
        Ok(t) => t,
        Err(e) => {
            drop(st);
            transitions.publish_rejected(entry, &e, None);
            discard_if_unused(transitions, entry);
            return SlowStep::Done(Err(e));
        }
    };
    transitions.publish_queued(entry, &st);
    // Nobody awaits the started call: the queued request gets its grant instead.
    drop(transitions.commit(entry, &mut st, Event::Request, step, Payload::default()));
    drop(st);
    let mut budget = transitions.settings.activation_timeout;
    if new_session {
        budget += transitions.settings.admission_timeout;
    }
    SlowStep::Wait(ticket, rx, budget)
}

/// Drops a brand-new entry that ended up with nothing to do (queue full, shutting down).
fn discard_if_unused(transitions: &Arc<Transitions>, entry: &Arc<SessionEntry>) {
    let st = entry.lock();
    if st.phase == SessionPhase::Unbound {
        transitions.apply(entry, st, Event::Abandoned, Payload::default());
    }
}

/// A permit on a ready session found on the slow path (it became ready meanwhile).
fn ready_permit(
    transitions: &Transitions,
    entry: &Arc<SessionEntry>,
    st: &mut EntryState,
    arrived: Instant,
) -> Option<Permit> {
    let bound = st.bound.as_ref()?;
    transitions.set_active(entry, true);
    transitions.reporter.note(entry);
    let endpoint = bound.endpoint?;
    let sandbox = bound.sandbox.clone();
    Some(Permit {
        endpoint,
        sandbox,
        activation: ActivationKind::None,
        waited: arrived.elapsed(),
        state_lost: std::mem::take(&mut st.state_lost_pending),
        _guard: entry.start_request(),
    })
}
