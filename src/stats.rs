//! `TrafficStats`: lock-free request counters the autoscaler turns into windowed averages.
//!
//! CONTRACT: the proxy calls [`TrafficStats::request_started`] when a request arrives and
//! [`TrafficStats::request_finished`] when its response body ends. Both stay lock-free;
//! windowing (1 s buckets, stable/panic windows) happens off the hot path in
//! [`StatsWindow`], fed once a second by [`StatsSampler`].
//!
//! # Time-weighted concurrency without a lock
//!
//! The integral of in-flight requests over time equals the sum over requests of the time
//! each was in flight: with `S` = sum of start times, `E` = sum of end times of finished
//! requests and `n` requests in flight at time `t`, `integral(0..t) = E - S + n*t`.
//! `E - S` and `n` must be read together, so they share one `AtomicU64`: `n` in the low
//! 20 bits, `E - S` in microseconds modulo 2^44 in the high 44 bits. A start adds
//! `1 - (s << 20)`, a finish adds `(e << 20) - 1`: one wrapping `fetch_add` per event and
//! a reader always sees a consistent pair. Integrals are therefore modulo 2^44 us
//! (203 days); the sampler only subtracts readings one second apart. At most 2^20 - 1
//! requests may be in flight at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

mod sampler;
mod window;

pub use sampler::{SessionCounts, StatsSampler};
pub use window::{StatsSnapshot, StatsWindow};

/// Bits of the packed word holding the in-flight count.
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Concurrency integrals are microseconds modulo 2^44.
const INTEGRAL_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

/// Raw traffic counters for one service.
#[derive(Debug)]
pub struct TrafficStats {
    /// Origin of the microsecond timestamps.
    base: Instant,
    /// `(E - S) << 20 | in_flight`, see the module docs.
    packed: AtomicU64,
    requests: AtomicU64,
    /// Set by the autoscaler while it wants zero sandboxes; the next request clears it
    /// and wakes the autoscaler so scale-from-zero does not wait for a tick.
    at_zero: AtomicBool,
    wake: Arc<Notify>,
}

impl Default for TrafficStats {
    fn default() -> Self {
        TrafficStats::new()
    }
}

impl TrafficStats {
    pub fn new() -> TrafficStats {
        TrafficStats {
            base: Instant::now(),
            packed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            at_zero: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Microseconds since `base`; only the low 44 bits matter.
    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_micros() as u64
    }

    /// A request arrived.
    #[inline]
    pub fn request_started(&self) {
        let s = self.micros(Instant::now());
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.packed
            .fetch_add(1u64.wrapping_sub(s << COUNT_BITS), Ordering::AcqRel);
        // The common case is one relaxed load; the swap and the wake-up happen once per
        // scale-from-zero.
        if self.at_zero.load(Ordering::Relaxed) && self.at_zero.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// A request's response body ended (or it failed).
    #[inline]
    pub fn request_finished(&self) {
        let e = self.micros(Instant::now());
        self.packed
            .fetch_add((e << COUNT_BITS).wrapping_sub(1), Ordering::AcqRel);
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> i64 {
        (self.packed.load(Ordering::Acquire) & COUNT_MASK) as i64
    }

    /// Requests seen since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The integral of in-flight requests from start until `now`, in microseconds modulo
    /// 2^44. Subtract two readings with [`concurrency_micros_between`].
    pub fn concurrency_micros(&self, now: Instant) -> u64 {
        let packed = self.packed.load(Ordering::Acquire);
        let n = packed & COUNT_MASK;
        let ends_minus_starts = packed >> COUNT_BITS;
        ends_minus_starts.wrapping_add(n.wrapping_mul(self.micros(now))) & INTEGRAL_MASK
    }

    /// Arms (true) or disarms the immediate wake-up on the next request.
    pub fn set_at_zero(&self, at_zero: bool) {
        self.at_zero.store(at_zero, Ordering::Release);
    }

    /// Whether the wake-up is armed.
    pub fn is_at_zero(&self) -> bool {
        self.at_zero.load(Ordering::Acquire)
    }

    /// Notified when the first request arrives while armed with [`Self::set_at_zero`].
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

/// Concurrency-microseconds between two readings of [`TrafficStats::concurrency_micros`].
pub fn concurrency_micros_between(earlier: u64, later: u64) -> u64 {
    later.wrapping_sub(earlier) & INTEGRAL_MASK
}

#[cfg(test)]
mod tests;
