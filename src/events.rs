//! The event stream: every session and sandbox transition as a numbered [`Event`] in a
//! bounded ring, fanned out to live subscribers without ever waiting for them.
//!
//! The emitter (a transition task, usually with a session entry locked) takes one short
//! `std::sync::Mutex` (no `.await` under it, a push and a broadcast send: O(1) whatever the
//! number of subscribers) so sequence numbers, ring order and broadcast order are the same.
//! Subscribers read through a `tokio::sync::broadcast` receiver: one that falls further
//! behind than the ring holds gets `Lagged` and is dropped by its reader
//! (`admin/stream.rs`); the emitter never notices. A reconnecting subscriber names the last
//! sequence it saw and gets the rest of the ring first, then the live stream, with no gap
//! and no duplicate (both are taken under the same lock).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::lock::MutexExt;
use crate::metrics::Metrics;
use crate::sandbox::SandboxId;

/// What happened. `as_str` is the `kind` field of the JSON event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A session got a sandbox (from the warm pool, or created); `activation`, `wait_ms`.
    Claimed,
    /// This replica paused the session's sandbox (idle policy or admin); `cause`.
    Paused,
    /// The session's sandbox was paused by someone else (another replica, the platform),
    /// seen through the backend's event stream.
    Frozen,
    /// The session's sandbox runs again (`cause`: request, admin, or peer); `wait_ms`.
    Resumed,
    /// The session gave its sandbox back; `cause`: idle | ttl | admin | lost | shutdown | deep
    /// (the deep idle tier stopped it).
    Released,
    /// The session's sandbox died.
    Lost,
    /// A request joined the session's wait queue; `cause`: what it waits for.
    Queued,
    /// A request for the session was refused; `reason`: the error code it got.
    Rejected,
    /// A pause/resume hook was called (`hook`: before_pause | after_resume; `reason`: ok |
    /// status | error | timeout; `wait_ms`: how long it took).
    Hook,
}

impl EventKind {
    /// Every kind, in documentation order.
    pub const ALL: [EventKind; 9] = [
        EventKind::Claimed,
        EventKind::Paused,
        EventKind::Frozen,
        EventKind::Resumed,
        EventKind::Released,
        EventKind::Lost,
        EventKind::Queued,
        EventKind::Rejected,
        EventKind::Hook,
    ];

    /// The `kind` field and the `kind` label of `activator_events_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Claimed => "claimed",
            EventKind::Paused => "paused",
            EventKind::Frozen => "frozen",
            EventKind::Resumed => "resumed",
            EventKind::Released => "released",
            EventKind::Lost => "lost",
            EventKind::Queued => "queued",
            EventKind::Rejected => "rejected",
            EventKind::Hook => "hook",
        }
    }
}

/// One transition, as `GET /api/events` sends it (`data:` line, JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Monotonic per process, starting at 1; the SSE `id:`.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub kind: EventKind,
    /// The session's short hash (never the raw ID).
    pub session: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxId>,
    /// `claim`, `create` or `resume`: what the session waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<&'static str>,
    /// How long the transition (or the wait that ended in it) took, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<f64>,
    /// Why: `idle`, `admin`, `request`, `peer`, `ttl`, ... (`rejected`: the error code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The session's pool (only with `pools:` configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<Arc<str>>,
    /// `rejected` with `claim_rejected`: the control plane's reason and message (e.g.
    /// `EnvVarsInjectionRejected: ...`), at most [`DETAIL_MAX`] bytes. For operators only;
    /// clients never see it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Arc<str>>,
    /// `hook` events: which hook (`before_pause`, `after_resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
}

/// Longest [`Event::detail`], in bytes (cut at a character boundary).
pub const DETAIL_MAX: usize = 512;

/// The fields an emitter fills in; the bus adds `seq` and `time_ms`.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub kind: EventKind,
    pub session: Arc<str>,
    pub sandbox: Option<SandboxId>,
    pub activation: Option<&'static str>,
    pub wait: Option<Duration>,
    pub reason: Option<&'static str>,
    /// Set by the pool's [`Publisher`].
    pub pool: Option<Arc<str>>,
    pub detail: Option<Arc<str>>,
    pub hook: Option<&'static str>,
}

impl EventDraft {
    /// A draft of `kind` for the session with this short hash.
    pub fn new(kind: EventKind, session: Arc<str>) -> EventDraft {
        EventDraft {
            kind,
            session,
            sandbox: None,
            activation: None,
            wait: None,
            reason: None,
            pool: None,
            detail: None,
            hook: None,
        }
    }

    pub fn sandbox(mut self, sandbox: Option<SandboxId>) -> Self {
        self.sandbox = sandbox;
        self
    }

    pub fn activation(mut self, kind: &'static str) -> Self {
        self.activation = Some(kind);
        self
    }

    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    pub fn reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// Sets [`Event::detail`], cut to [`DETAIL_MAX`] bytes.
    pub fn detail(mut self, detail: &str) -> Self {
        let mut end = detail.len().min(DETAIL_MAX);
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        self.detail = Some(Arc::from(&detail[..end]));
        self
    }

    pub fn hook(mut self, hook: &'static str) -> Self {
        self.hook = Some(hook);
        self
    }
}

/// What a new subscriber gets: the events it missed (oldest first), whether some it asked
/// for had already left the ring, and the live receiver that continues right after them.
pub struct Subscription {
    pub backlog: Vec<Arc<Event>>,
    /// The requested resume point is older than the ring: events were lost in between.
    pub gap: bool,
    pub live: broadcast::Receiver<Arc<Event>>,
}

struct Ring {
    next_seq: u64,
    events: VecDeque<Arc<Event>>,
}

/// The bounded event ring and its broadcast channel. Cheap to share behind an `Arc`.
pub struct EventBus {
    capacity: usize,
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventBus {
    /// A bus keeping the last `capacity` events (at least 1).
    pub fn new(capacity: usize) -> EventBus {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        EventBus {
            capacity,
            ring: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(capacity.min(4096)),
            }),
            tx,
        }
    }

    /// How many events the ring keeps (and how far a subscriber may fall behind).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    // A poisoned lock only means an emitter panicked mid-push; the ring is still a valid
    // deque, so keep going rather than take the proxy down with it.
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock_recovered()
    }

    /// Numbers, stores and broadcasts one event. Never waits for a subscriber.
    pub fn emit(&self, draft: EventDraft) -> u64 {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut ring = self.ring();
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let event = Arc::new(Event {
            seq,
            time_ms,
            kind: draft.kind,
            session: draft.session,
            sandbox: draft.sandbox,
            activation: draft.activation,
            wait_ms: draft.wait.map(|d| d.as_secs_f64() * 1000.0),
            reason: draft.reason,
            pool: draft.pool,
            detail: draft.detail,
            hook: draft.hook,
        });
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(Arc::clone(&event));
        // Err only means nobody listens right now.
        let _ = self.tx.send(event);
        seq
    }

    /// Subscribes to events after `after` (a sequence number the subscriber has seen), or
    /// to new events only when `None`.
    pub fn subscribe(&self, after: Option<u64>) -> Subscription {
        let ring = self.ring();
        let live = self.tx.subscribe();
        let Some(after) = after else {
            return Subscription {
                backlog: Vec::new(),
                gap: false,
                live,
            };
        };
        let oldest = ring.events.front().map_or(ring.next_seq, |e| e.seq);
        let backlog = ring
            .events
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect();
        Subscription {
            backlog,
            // Asked to resume from before what the ring still holds (and not from the future).
            gap: after + 1 < oldest && after < ring.next_seq,
            live,
        }
    }

    /// The last `n` events, oldest first (for a page's first paint).
    pub fn recent(&self, n: usize) -> Vec<Arc<Event>> {
        let ring = self.ring();
        let skip = ring.events.len().saturating_sub(n);
        ring.events.iter().skip(skip).cloned().collect()
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.ring().next_seq
    }
}

/// The emitting side: the bus plus `activator_events_total{kind}`, resolved per kind once.
pub struct Publisher {
    bus: Arc<EventBus>,
    counters: [IntCounter; EventKind::ALL.len()],
    /// Written into every event (several pools share one bus).
    pool: Option<Arc<str>>,
}

impl Publisher {
    /// A publisher onto `bus` counting into `metrics`.
    pub fn new(bus: Arc<EventBus>, metrics: &Metrics) -> Publisher {
        let counters =
            EventKind::ALL.map(|k| metrics.events_total.with_label_values(&[k.as_str()]));
        Publisher {
            bus,
            counters,
            pool: None,
        }
    }

    /// Names `pool` in every event this publisher emits.
    pub fn for_pool(mut self, pool: Option<Arc<str>>) -> Publisher {
        self.pool = pool;
        self
    }

    /// Publishes one event; never waits.
    pub fn emit(&self, mut draft: EventDraft) {
        self.counters[draft.kind as usize].inc();
        if draft.pool.is_none() {
            draft.pool.clone_from(&self.pool);
        }
        self.bus.emit(draft);
    }

    /// The bus subscribers read from.
    pub fn bus(&self) -> &Arc<EventBus> {
        &self.bus
    }
}

#[cfg(test)]
mod tests;
