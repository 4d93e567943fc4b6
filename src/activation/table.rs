//! `SessionTable`: `SessionKey -> Arc<SessionEntry>` in a `DashMap`, plus recovered orphans.
//!
//! Lock order: a table shard lock may be held while an entry is locked (the fast path
//! does), never the reverse — code that removes an entry drops the entry's lock first
//! (see `Transitions::settle`).

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::entry::SessionEntry;
use super::lifecycle::SessionPhase;
use super::orphans::Orphans;
use crate::session::SessionKey;

/// Every session the activator knows, one entry per key.
#[derive(Default)]
pub(crate) struct SessionTable {
    map: DashMap<SessionKey, Arc<SessionEntry>>,
    /// Recovered bindings waiting for a request whose ID hashes to them.
    pub(crate) orphans: Orphans,
}

impl SessionTable {
    /// The entry stored under `key`.
    pub(crate) fn get(&self, key: &SessionKey) -> Option<Arc<SessionEntry>> {
        self.map.get(key).map(|r| Arc::clone(r.value()))
    }

    /// Runs `f` on the entry under `key` while its shard is read-locked (no `Arc` clone:
    /// the fast path's one lookup).
    #[inline]
    pub(crate) fn with<T>(
        &self,
        key: &SessionKey,
        f: impl FnOnce(&Arc<SessionEntry>) -> T,
    ) -> Option<T> {
        let row = self.map.get(key)?;
        Some(f(row.value()))
    }

    /// The entry for `key`, inserting an `Unbound` one (or one recovered by hash) if absent.
    pub(crate) fn entry_for(&self, key: &SessionKey) -> Arc<SessionEntry> {
        if let Some(entry) = self.get(key) {
            return entry;
        }
        // Computed before taking the shard's write lock: hashing is not free.
        let recovered = self.orphans.take(key);
        match self.map.entry(key.clone()) {
            Entry::Occupied(row) => {
                if let Some(r) = recovered {
                    self.orphans.put_back(r);
                }
                Arc::clone(row.get())
            }
            Entry::Vacant(slot) => {
                let fresh = match recovered {
                    Some(r) => r.into_entry(key.clone()),
                    None => SessionEntry::new(key.clone(), SessionPhase::Unbound, None),
                };
                Arc::clone(slot.insert(fresh).value())
            }
        }
    }

    /// Whether `key` has an entry (in any phase).
    pub(crate) fn contains(&self, key: &SessionKey) -> bool {
        self.map.contains_key(key)
    }

    /// Entries stored, in any phase.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Inserts a recovered entry unless the key is already present.
    pub(crate) fn insert_if_absent(
        &self,
        key: SessionKey,
        make: impl FnOnce() -> Arc<SessionEntry>,
    ) {
        self.map.entry(key).or_insert_with(make);
    }

    /// Removes `entry` if it is still the one stored under its key.
    pub(crate) fn forget(&self, entry: &Arc<SessionEntry>) {
        self.map
            .remove_if(&entry.key, |_, stored| Arc::ptr_eq(stored, entry));
    }

    /// Every entry, cloned out so that no shard lock is held while entries are locked.
    pub(crate) fn snapshot(&self) -> Vec<Arc<SessionEntry>> {
        self.map.iter().map(|r| Arc::clone(r.value())).collect()
    }
}
