//! `TrafficStats`: lock-free request counters the autoscaler turns into windowed averages.
//!
//! CONTRACT: the proxy calls [`TrafficStats::request_started`] when a request arrives and
//! [`TrafficStats::request_finished`] when its response body ends. Both must stay
//! lock-free; windowing (1 s buckets, stable/panic windows) happens off the hot path.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Raw traffic counters for one service.
#[derive(Debug, Default)]
pub struct TrafficStats {
    in_flight: AtomicI64,
    requests: AtomicU64,
}

impl TrafficStats {
    pub fn new() -> TrafficStats {
        TrafficStats::default()
    }

    /// A request arrived.
    #[inline]
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's response body ended (or it failed).
    #[inline]
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests currently in flight.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests seen since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
