//! `SessionTable`: `SessionKey -> Arc<SessionEntry>` in a `DashMap`, its indexes and gauges.
//!
//! Besides the map: sessions by sandbox (so a backend event touches only its own
//! entries), live counts per phase (so `/metrics` is O(1) in sessions), and recovered
//! orphans. The executor (`Transitions::commit`) keeps the index and counts current.
//!
//! Lock order: a table shard lock may be held while an entry is locked (the fast path
//! does), never the reverse — code that removes an entry drops the entry's lock first
//! (see `Transitions::settle`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::entry::SessionEntry;
use super::lifecycle::SessionPhase;
use super::orphans::Orphans;
use crate::backend::{ClaimSpec, SandboxId};
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// What `SessionTable::entry_for` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// The key had an entry.
    Existing,
    /// A new `Unbound` entry.
    Fresh,
    /// A binding recovered by hash became the key's entry.
    Recovered,
}

/// Source of [`SessionTable::id`]s: unique per table in the process.
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// Every session the activator knows, one entry per key.
pub(crate) struct SessionTable {
    map: DashMap<SessionKey, Arc<SessionEntry>>,
    /// This table among all in the process (a lease cache names the table it read).
    id: u64,
    /// Bumped after every removal from `map`. Entries are only ever inserted into vacant
    /// keys, so while it is unchanged an entry once found under a key is still the one
    /// stored there: a per-connection lease cache (`acquire::LeaseCache`) checks it
    /// instead of probing the map.
    generation: AtomicU64,
    /// Recovered bindings waiting for a request whose ID hashes to them.
    pub(crate) orphans: Orphans,
    /// Entries per phase (`Gone` is not counted), indexed like `SessionPhase::ALL`.
    counts: [AtomicI64; 9],
    /// Entries by the sandbox they are bound to. Lock order: entry, then this.
    by_sandbox: Mutex<HashMap<SandboxId, Vec<Arc<SessionEntry>>>>,
}

impl Default for SessionTable {
    fn default() -> SessionTable {
        SessionTable {
            map: DashMap::default(),
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            orphans: Orphans::default(),
            counts: Default::default(),
            by_sandbox: Mutex::default(),
        }
    }
}

impl SessionTable {
    /// Which table this is (unique in the process).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Changes after every removal (see the field): read before a lookup whose result is
    /// cached, compare before the cached result is used.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

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

    /// The entry for `key`, inserting an `Unbound` one (or one recovered by hash) if absent;
    /// a new entry keeps `spec` (an existing one keeps its own).
    pub(crate) fn entry_for(
        &self,
        key: &SessionKey,
        spec: &Arc<ClaimSpec>,
    ) -> (Arc<SessionEntry>, Found) {
        if let Some(entry) = self.get(key) {
            return (entry, Found::Existing);
        }
        // Computed before taking the shard's write lock: hashing is not free.
        let recovered = self.orphans.take(key);
        match self.map.entry(key.clone()) {
            Entry::Occupied(row) => {
                if let Some(r) = recovered {
                    self.orphans.put_back(r);
                }
                (Arc::clone(row.get()), Found::Existing)
            }
            Entry::Vacant(slot) => {
                let (fresh, found) = match recovered {
                    Some(r) => (r.into_entry(key.clone(), spec.clone()), Found::Recovered),
                    None => (
                        SessionEntry::new(key.clone(), SessionPhase::Unbound, None, spec.clone()),
                        Found::Fresh,
                    ),
                };
                self.inserted(&fresh);
                (Arc::clone(slot.insert(fresh).value()), found)
            }
        }
    }

    /// Counts and indexes a new entry (before anyone else can see it).
    fn inserted(&self, entry: &Arc<SessionEntry>) {
        let st = entry.lock();
        self.count(st.phase, 1);
        if let Some(b) = &st.bound {
            self.index(&b.sandbox, entry);
        }
    }

    fn count(&self, phase: SessionPhase, delta: i64) {
        if phase != SessionPhase::Gone {
            self.counts[phase as usize].fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// An entry moved from `from` to `to` (called by the executor, entry locked).
    pub(crate) fn moved(&self, from: SessionPhase, to: SessionPhase) {
        self.count(from, -1);
        self.count(to, 1);
    }

    /// Entries in `phase`, without scanning.
    pub(crate) fn count_of(&self, phase: SessionPhase) -> i64 {
        self.counts[phase as usize].load(Ordering::Relaxed).max(0)
    }

    fn sandboxes(&self) -> MutexGuard<'_, HashMap<SandboxId, Vec<Arc<SessionEntry>>>> {
        self.by_sandbox.lock_recovered()
    }

    /// Records that `entry` is bound to `sandbox` (entry locked).
    pub(crate) fn index(&self, sandbox: &SandboxId, entry: &Arc<SessionEntry>) {
        self.sandboxes()
            .entry(sandbox.clone())
            .or_default()
            .push(Arc::clone(entry));
    }

    /// Records that `entry` is no longer bound to `sandbox` (entry locked).
    pub(crate) fn unindex(&self, sandbox: &SandboxId, entry: &Arc<SessionEntry>) {
        let mut map = self.sandboxes();
        if let Some(list) = map.get_mut(sandbox) {
            list.retain(|e| !Arc::ptr_eq(e, entry));
            if list.is_empty() {
                map.remove(sandbox);
            }
        }
    }

    /// The entries bound to `sandbox`: a hash lookup, whatever the table size.
    pub(crate) fn on_sandbox(&self, sandbox: &SandboxId) -> Vec<Arc<SessionEntry>> {
        self.sandboxes().get(sandbox).cloned().unwrap_or_default()
    }

    /// Whether `key` has an entry (in any phase).
    pub(crate) fn contains(&self, key: &SessionKey) -> bool {
        self.map.contains_key(key)
    }

    /// Entries stored, in any phase.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Inserts a recovered entry unless the key is already present; returns it if it was.
    pub(crate) fn insert_if_absent(
        &self,
        key: SessionKey,
        make: impl FnOnce() -> Arc<SessionEntry>,
    ) -> Option<Arc<SessionEntry>> {
        match self.map.entry(key) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                let entry = make();
                self.inserted(&entry);
                Some(Arc::clone(slot.insert(entry).value()))
            }
        }
    }

    /// Removes `entry` if it is still the one stored under its key.
    pub(crate) fn forget(&self, entry: &Arc<SessionEntry>) {
        let removed = self
            .map
            .remove_if(&entry.key, |_, stored| Arc::ptr_eq(stored, entry));
        if removed.is_some() {
            // After the removal: a cache that still sees the old generation holds an entry
            // that was in the map when it looked, as a map probe racing this removal would.
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Calls `f` on every entry, one shard read-locked at a time: a listing walks the table
    /// without cloning what it does not keep. `f` must be short (it delays inserts into that
    /// shard) and must not touch the map.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<SessionEntry>)) {
        for r in self.map.iter() {
            f(r.value());
        }
    }

    /// Every entry, cloned out so that no shard lock is held while entries are locked.
    pub(crate) fn snapshot(&self) -> Vec<Arc<SessionEntry>> {
        self.map.iter().map(|r| Arc::clone(r.value())).collect()
    }
}
