//! `Orphans`: bindings recovered after a restart that are known only by a hash of the ID.
//!
//! Bindings known only by hash (`RecoveredBinding::session_hash`, a lowercase hex prefix
//! of the ID's SHA-256, any length) wait here; when a session that is not in the table
//! arrives, its SHA-256 is computed once and every stored prefix length is tried, so the
//! lookup costs nothing while no orphans exist.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::entry::{Bound, SessionEntry};
use super::lifecycle::SessionPhase;
use crate::backend::{ClaimSpec, RecoveredBinding};
use crate::lock::MutexExt;
use crate::session::SessionKey;

/// Recovered bindings whose raw session ID is unknown, by hash prefix.
#[derive(Default)]
pub(crate) struct Orphans {
    any: AtomicBool,
    inner: Mutex<OrphanMap>,
}

#[derive(Default)]
struct OrphanMap {
    by_hash: HashMap<String, RecoveredBinding>,
    lengths: BTreeSet<usize>,
}

impl Orphans {
    pub(crate) fn insert(&self, mut binding: RecoveredBinding) {
        binding.session_hash.make_ascii_lowercase();
        let mut map = self.inner.lock_recovered();
        map.lengths.insert(binding.session_hash.len());
        map.by_hash.insert(binding.session_hash.clone(), binding);
        self.any.store(true, Ordering::Release);
    }

    /// Takes the binding recovered for `key`, if any.
    pub(crate) fn take(&self, key: &SessionKey) -> Option<RecoveredBinding> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let full = key.sha256_hex();
        let mut map = self.inner.lock_recovered();
        let lengths: Vec<usize> = map.lengths.iter().copied().collect();
        let found = lengths
            .into_iter()
            .filter(|&n| n > 0 && n <= full.len())
            .find_map(|n| map.by_hash.remove(&full[..n]));
        if map.by_hash.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        found
    }

    /// Returns a binding taken by a request that lost the race to insert its entry.
    pub(crate) fn put_back(&self, binding: RecoveredBinding) {
        self.insert(binding);
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.lock_recovered().by_hash.len()
    }
}

impl RecoveredBinding {
    /// The table entry for a recovered binding: `Paused` unless it runs at a known address.
    /// `spec` is the customisation the new key's request asked for: the backend's store
    /// does not keep it, so a re-claim after a loss applies this one.
    pub(crate) fn into_entry(self, key: SessionKey, spec: Arc<ClaimSpec>) -> Arc<SessionEntry> {
        let phase = match (self.paused, self.endpoint) {
            (false, Some(_)) => SessionPhase::Ready,
            _ => SessionPhase::Paused,
        };
        let endpoint = if phase == SessionPhase::Ready {
            self.endpoint
        } else {
            None
        };
        let entry = SessionEntry::new(
            key,
            phase,
            Some(Bound {
                sandbox: self.sandbox,
                endpoint,
            }),
            spec,
        );
        entry.touch(Instant::now());
        entry
    }
}
