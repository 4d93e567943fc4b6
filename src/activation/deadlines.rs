//! `Deadlines`: sessions ordered by the instant their phase must be looked at again.
//!
//! The shape of mini-redis `db.rs`: an ordered set of `(deadline, id)` plus the entry for
//! each id, one task (the `IdleScheduler`) woken by a `Notify` when an earlier deadline
//! arrives. A `Ready` session is due when its idle window would end (`idle.timeout` after
//! it became ready); a `Paused` one when `idle.deep_after` runs out (if set and it is not
//! in the deep tier yet), else, like `Lost` and `Unbound` ones, when `idle.session_ttl`
//! runs out. Requests do not touch the set: a session found busy when due is put back at its
//! last activity plus `idle.timeout`, so an active session costs one check per
//! `idle.timeout`, and an idle one is decided within one check of its deadline, whatever
//! the table size.
//!
//! Lock order: an entry's lock may be held while this set is locked, never the reverse.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::entry::{EntryState, SessionEntry};
use crate::lock::MutexExt;

/// The deadline-ordered set of sessions.
#[derive(Default)]
pub(crate) struct Deadlines {
    set: Mutex<BTreeMap<(Instant, u64), Arc<SessionEntry>>>,
    /// Woken when a deadline earlier than every other one is inserted.
    pub(crate) changed: Notify,
}

impl Deadlines {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(Instant, u64), Arc<SessionEntry>>> {
        self.set.lock_recovered()
    }

    /// (Re)schedules `entry` at `at`, replacing its previous deadline. Call with the
    /// entry locked (`st` is its state).
    pub(crate) fn schedule(&self, entry: &Arc<SessionEntry>, st: &mut EntryState, at: Instant) {
        let mut set = self.lock();
        if let Some(old) = st.due.take() {
            set.remove(&(old, entry.id));
        }
        let first = set.keys().next().is_none_or(|(first, _)| at < *first);
        set.insert((at, entry.id), Arc::clone(entry));
        st.due = Some(at);
        drop(set);
        if first {
            self.changed.notify_one();
        }
    }

    /// Takes `entry` out of the set. Call with the entry locked.
    pub(crate) fn unschedule(&self, entry: &SessionEntry, st: &mut EntryState) {
        if let Some(old) = st.due.take() {
            self.lock().remove(&(old, entry.id));
        }
    }

    /// Removes and returns up to `max` entries due at `now`, and the next deadline after
    /// them. The entries' `due` stamps stay as they were: the caller checks, under each
    /// entry's lock, that the stamp is the one it popped (else the entry was rescheduled
    /// meanwhile and the pop is stale).
    pub(crate) fn pop_due(
        &self,
        now: Instant,
        max: usize,
    ) -> (Vec<(Instant, Arc<SessionEntry>)>, Option<Instant>) {
        let mut set = self.lock();
        let mut due = Vec::new();
        while due.len() < max {
            let Some(entry) = set.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let ((at, _), e) = entry.remove_entry();
            due.push((at, e));
        }
        let next = set.keys().next().map(|(at, _)| *at);
        (due, next)
    }
}
