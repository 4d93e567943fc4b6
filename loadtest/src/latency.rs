//! Latency accounting: HdrHistogram in microseconds, and the open-loop schedule that keeps
//! percentiles free of coordinated omission.
//!
//! Open loop: request `i` is *intended* at `start + i / rate`. Its latency is measured from
//! that intended time, not from when a connection happened to be free to send it, so a
//! stall shows up in every request that should have been sent during it (as a user would
//! see it), not just in the one request that hit it.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Highest latency the histograms hold (longer values are clamped to it).
const MAX_TRACKABLE_US: u64 = 600_000_000;

/// A latency histogram with microsecond resolution and 3 significant digits.
#[derive(Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            hist: Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Records one latency (clamped to 1 us .. 600 s).
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_TRACKABLE_US);
        self.hist.saturating_record(us);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so `add` cannot fail; keep going if it ever did.
        let _ = self.hist.add(&other.hist);
    }

    /// p50 .. max in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.hist;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        LatencySummary {
            count: h.len(),
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() { 0 } else { h.max() },
        }
    }

    /// (percentile, microseconds) points from p0 to p99.999 on a log-of-nines scale, for
    /// percentile plots.
    pub fn percentile_curve(&self) -> Vec<(f64, u64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        // Nines: 0 = p0, 1 = p90, 2 = p99, ... in 0.1 steps up to p99.999.
        for step in 0..=50 {
            let nines = f64::from(step) / 10.0;
            let pct = 100.0 * (1.0 - 10f64.powf(-nines));
            out.push((pct, self.hist.value_at_percentile(pct)));
        }
        out.push((100.0, self.hist.max()));
        out
    }
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// The intended send times of an open-loop run at a constant rate.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoopSchedule {
    start: Instant,
    period: Duration,
}

impl OpenLoopSchedule {
    /// `rate` requests per second from `start` (a rate of 0 is treated as 1/s).
    pub fn new(start: Instant, rate: f64) -> OpenLoopSchedule {
        let rate = if rate > 0.0 { rate } else { 1.0 };
        OpenLoopSchedule {
            start,
            period: Duration::from_secs_f64(1.0 / rate),
        }
    }

    /// When request `index` should be sent. Computed from the start, so it never drifts.
    pub fn intended(&self, index: u64) -> Instant {
        self.start + self.period.mul_f64(index as f64)
    }
}

/// Latency of a request intended at `intended` and completed at `done` (never negative).
pub fn open_loop_latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_percentiles() {
        let mut l = Latencies::new();
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        // 3 significant digits: values are within 0.1 %.
        assert!((49_900..=50_100).contains(&s.p50_us), "{s:?}");
        assert!((98_900..=99_100).contains(&s.p99_us), "{s:?}");
        assert!((99_900..=100_100).contains(&s.max_us), "{s:?}");
        let mut other = Latencies::new();
        other.record(Duration::from_secs(2));
        l.merge(&other);
        assert_eq!(l.summary().count, 101);
        assert!(l.summary().max_us >= 1_999_000);
        let curve = l.percentile_curve();
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }

    #[test]
    fn schedule_does_not_drift() {
        let start = Instant::now();
        let s = OpenLoopSchedule::new(start, 3.0);
        assert_eq!(s.intended(0), start);
        let at = s.intended(3_000_000) - start;
        assert!(at.as_secs_f64() - 1_000_000.0 < 0.001, "{at:?}");
        assert_eq!(
            open_loop_latency(s.intended(10), start),
            Duration::ZERO,
            "a request finishing before its intended time counts as zero, not negative"
        );
    }
}
