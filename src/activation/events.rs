//! Backend events (lost, paused or resumed elsewhere) and restart recovery.
//!
//! Recovery: bindings the backend reports with the raw session ID are re-inserted as
//! entries right away. Bindings known only by hash (`RecoveredBinding::session_hash`, a
//! lowercase hex prefix of the ID's SHA-256, any length) wait in [`Orphans`]; when a
//! session that is not in the table arrives, its SHA-256 is computed once and every
//! stored prefix length is tried — so the lookup costs nothing while no orphans exist.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::ActivationError;
use super::entry::{Bound, Phase, SessionEntry};
use super::table::Shared;
use crate::backend::{BackendEvent, RecoveredBinding, SandboxId};
use crate::events::EventKind;
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
    fn insert(&self, mut binding: RecoveredBinding) {
        binding.session_hash.make_ascii_lowercase();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_hash
            .len()
    }
}

impl RecoveredBinding {
    /// The table entry for a recovered binding: `Paused` unless it runs at a known address.
    pub(crate) fn into_entry(self, key: SessionKey) -> Arc<SessionEntry> {
        let phase = match (self.paused, self.endpoint) {
            (false, Some(_)) => Phase::Ready,
            _ => Phase::Paused,
        };
        let endpoint = if phase == Phase::Ready {
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
        );
        entry.touch(Instant::now());
        entry
    }
}

impl Shared {
    /// Re-populates the table from `backend.recover()`.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<usize, ActivationError> {
        let found = tokio::time::timeout(self.settings.activation_timeout, self.backend.recover())
            .await
            .map_err(|_| ActivationError::Timeout(self.settings.activation_timeout))??;
        let n = found.len();
        for binding in found {
            match binding.session.clone() {
                Some(key) => {
                    self.table
                        .entry(key.clone())
                        .or_insert_with(|| binding.into_entry(key));
                }
                None => self.orphans.insert(binding),
            }
        }
        tracing::info!(
            recovered = n,
            by_hash_only = self.orphans.len(),
            "session bindings recovered"
        );
        Ok(n)
    }

    /// Applies one backend event to the sessions bound to its sandbox.
    pub(crate) fn on_event(self: &Arc<Self>, event: BackendEvent) {
        let sandbox = match &event {
            BackendEvent::Lost { sandbox, .. }
            | BackendEvent::Paused { sandbox }
            | BackendEvent::Resumed { sandbox, .. } => sandbox.clone(),
        };
        for entry in self.entries_on(&sandbox) {
            let mut st = entry.lock();
            if st.bound.as_ref().map(|b| &b.sandbox) != Some(&sandbox) {
                continue;
            }
            match (&event, st.phase) {
                (BackendEvent::Lost { reason, .. }, Phase::Ready | Phase::Paused) => {
                    tracing::info!(session = %entry.key, %sandbox, reason, "sandbox lost");
                    self.mark_lost(&entry, &mut st);
                }
                (BackendEvent::Paused { .. }, Phase::Ready) => {
                    if entry.in_flight() > 0 {
                        tracing::warn!(session = %entry.key, %sandbox,
                            "sandbox paused elsewhere while requests are in flight here");
                    }
                    st.phase = Phase::Paused;
                    st.since = Instant::now();
                    if let Some(b) = st.bound.as_mut() {
                        b.endpoint = None;
                    }
                    self.publish(EventKind::Frozen, &entry, Some(&sandbox), |d| {
                        d.reason("peer")
                    });
                }
                (BackendEvent::Resumed { endpoint, .. }, Phase::Paused | Phase::Ready) => {
                    if let Some(b) = st.bound.as_mut() {
                        b.endpoint = Some(*endpoint);
                    }
                    if st.phase == Phase::Paused {
                        st.phase = Phase::Ready;
                        entry.touch(Instant::now());
                        self.publish(EventKind::Resumed, &entry, Some(&sandbox), |d| {
                            d.reason("peer")
                        });
                    }
                }
                (BackendEvent::Lost { reason, .. }, Phase::Pausing | Phase::Resuming) => {
                    // The running pause/resume turns its result into a loss when it ends.
                    tracing::info!(session = %entry.key, %sandbox, reason, "sandbox lost mid-transition");
                    st.lost_meanwhile = true;
                }
                // A claim reports the outcome of its own backend call.
                _ => continue,
            }
            self.settle(&entry, st);
        }
    }

    /// Entries whose binding names `sandbox` (a scan: events are rare next to requests).
    fn entries_on(&self, sandbox: &SandboxId) -> Vec<Arc<SessionEntry>> {
        let all: Vec<Arc<SessionEntry>> =
            self.table.iter().map(|r| Arc::clone(r.value())).collect();
        all.into_iter()
            .filter(|e| e.lock().bound.as_ref().map(|b| &b.sandbox) == Some(sandbox))
            .collect()
    }
}

/// Feeds backend events to the activator until either side goes away.
pub(crate) async fn event_loop(weak: Weak<Shared>, mut events: broadcast::Receiver<BackendEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => match weak.upgrade() {
                Some(shared) => shared.on_event(event),
                None => return,
            },
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "backend events lagged; some were dropped");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
