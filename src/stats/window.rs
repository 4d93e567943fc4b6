//! `StatsWindow`: one-second buckets averaged over the stable and the panic window.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::MetricAggregation;

/// One closed bucket: what happened during (about) one second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Time-weighted average of requests in flight during the bucket.
    pub concurrency: f64,
    /// Requests that arrived during the bucket, per second.
    pub rps: f64,
}

/// Buckets of the last stable window; the panic window is its newest part.
#[derive(Debug, Clone)]
pub struct StatsWindow {
    buckets: VecDeque<Bucket>,
    stable_len: usize,
    panic_len: usize,
    aggregation: MetricAggregation,
}

/// Sum of the weights over a whole window (knative/serving 98e5ef90aa70
/// pkg/autoscaler/aggregation/bucketing.go, `weightPrecision`).
const WEIGHT_PRECISION: f64 = 0.9999;
/// Smallest decay per bucket, so very long windows do not degrade to a plain mean
/// (same file, `minExponent`).
const MIN_EXPONENT: f64 = 0.2;

/// Decay per bucket for a window of `n` buckets (same file, `computeSmoothingCoeff`).
fn smoothing_coeff(n: usize) -> f64 {
    (1.0 - (1.0 - WEIGHT_PRECISION).powf(1.0 / n as f64)).max(MIN_EXPONENT)
}

impl StatsWindow {
    /// A window of `stable` (rounded to whole seconds, at least 1) whose panic window is
    /// `panic_percentage` % of it (at least one bucket).
    pub fn new(stable: Duration, panic_percentage: f64) -> StatsWindow {
        let stable_len = (stable.as_secs_f64().round() as usize).max(1);
        let panic_len =
            ((stable_len as f64 * panic_percentage / 100.0).round() as usize).clamp(1, stable_len);
        StatsWindow {
            buckets: VecDeque::with_capacity(stable_len),
            stable_len,
            panic_len,
            aggregation: MetricAggregation::Linear,
        }
    }

    /// Averages with `aggregation` instead of the plain mean.
    pub fn with_aggregation(mut self, aggregation: MetricAggregation) -> StatsWindow {
        self.aggregation = aggregation;
        self
    }

    /// Buckets in the stable window.
    pub fn stable_len(&self) -> usize {
        self.stable_len
    }

    /// Buckets in the panic window.
    pub fn panic_len(&self) -> usize {
        self.panic_len
    }

    /// Appends the newest bucket, dropping the oldest beyond the stable window.
    pub fn record(&mut self, bucket: Bucket) {
        if self.buckets.len() == self.stable_len {
            self.buckets.pop_front();
        }
        self.buckets.push_back(bucket);
    }

    /// Averages over the newest `n` buckets (see [`MetricAggregation`]).
    fn average(&self, n: usize) -> Bucket {
        match self.aggregation {
            MetricAggregation::Linear => self.mean(n),
            MetricAggregation::WeightedExponential => self.weighted(n),
        }
    }

    /// Knative's `WeightedFloat64Buckets.WindowAverage`: newest first, bucket `i` weighs
    /// `c (1 - c)^i` with `c` = [`smoothing_coeff`] of the window's length. Not normalised:
    /// buckets not yet seen count as zero, as Knative's zero-initialised ring does.
    fn weighted(&self, n: usize) -> Bucket {
        let c = smoothing_coeff(n);
        let mut weight = c;
        let (mut conc, mut rps) = (0.0, 0.0);
        for b in self.buckets.iter().rev().take(n) {
            conc += b.concurrency * weight;
            rps += b.rps * weight;
            weight *= 1.0 - c;
        }
        Bucket {
            concurrency: conc,
            rps,
        }
    }

    /// The plain mean of the newest `n` buckets. Before the window has filled up, the
    /// mean is over the buckets seen so far (Knative does the same after a restart).
    fn mean(&self, n: usize) -> Bucket {
        let n = n.min(self.buckets.len());
        if n == 0 {
            return Bucket {
                concurrency: 0.0,
                rps: 0.0,
            };
        }
        let (c, r) = self
            .buckets
            .iter()
            .rev()
            .take(n)
            .fold((0.0, 0.0), |(c, r), b| (c + b.concurrency, r + b.rps));
        Bucket {
            concurrency: c / n as f64,
            rps: r / n as f64,
        }
    }

    /// Averages over the stable window.
    pub fn stable(&self) -> Bucket {
        self.average(self.stable_len)
    }

    /// Averages over the panic window.
    pub fn panic(&self) -> Bucket {
        self.average(self.panic_len)
    }
}

/// One replica's scaling signals: the JSON of `GET /api/stats`, and what the leading
/// autoscaler sums over every replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Length of the stable window in seconds.
    pub stable_window_seconds: f64,
    /// Length of the panic window in seconds.
    pub panic_window_seconds: f64,
    /// Time-weighted average in-flight requests over the stable window.
    pub stable_concurrency: f64,
    /// The same over the panic window.
    pub panic_concurrency: f64,
    /// Requests per second over the stable window.
    pub stable_rps: f64,
    /// Requests per second over the panic window.
    pub panic_rps: f64,
    /// Requests in flight right now.
    pub in_flight: u64,
    /// Requests seen since the replica started.
    pub requests_total: u64,
    /// Bound sessions with a request in flight or inside their idle window.
    pub active_sessions: u64,
    /// New sessions waiting for a sandbox.
    pub waiting_sessions: u64,
    /// Replicas summed into this snapshot (1 for one replica's own stats).
    #[serde(default = "one")]
    pub replicas: u32,
    /// The replica that produced the snapshot (random per process start); the leader
    /// skips its own address among the peers by it. Not summed.
    #[serde(default)]
    pub replica_id: String,
}

fn one() -> u32 {
    1
}

impl StatsSnapshot {
    /// Adds another replica's signals (Knative's autoscaler sums what activators report).
    pub fn add(&mut self, other: &StatsSnapshot) {
        self.stable_concurrency += other.stable_concurrency;
        self.panic_concurrency += other.panic_concurrency;
        self.stable_rps += other.stable_rps;
        self.panic_rps += other.panic_rps;
        self.in_flight += other.in_flight;
        self.requests_total += other.requests_total;
        self.active_sessions += other.active_sessions;
        self.waiting_sessions += other.waiting_sessions;
        self.replicas += other.replicas;
    }
}
