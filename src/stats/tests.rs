use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, advance};

use super::*;
use crate::config::AutoscalerConfig;
use crate::metrics::Metrics;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

#[tokio::test(start_paused = true)]
async fn concurrency_integral_is_time_weighted() {
    let stats = TrafficStats::new();
    let t0 = Instant::now();
    let i0 = stats.concurrency_micros(t0);
    stats.request_started();
    stats.request_started();
    advance(Duration::from_millis(500)).await;
    stats.request_finished();
    advance(Duration::from_millis(500)).await;
    assert_eq!(stats.in_flight(), 1);
    let i1 = stats.concurrency_micros(Instant::now());
    // 2 requests for 0.5 s + 1 request for 0.5 s = 1.5 concurrency-seconds.
    assert_eq!(concurrency_micros_between(i0, i1), 1_500_000);
    advance(Duration::from_millis(250)).await;
    stats.request_finished();
    advance(Duration::from_secs(3)).await;
    let i2 = stats.concurrency_micros(Instant::now());
    assert_eq!(concurrency_micros_between(i1, i2), 250_000);
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.requests(), 2);
}

#[test]
fn integral_difference_survives_wrapping() {
    let top = INTEGRAL_MASK - 10;
    assert_eq!(concurrency_micros_between(top, 5), 16);
}

#[test]
fn window_averages_over_filled_part_then_whole_window() {
    let mut w = StatsWindow::new(Duration::from_secs(10), 20.0);
    assert_eq!((w.stable_len(), w.panic_len()), (10, 2));
    w.record(window_bucket(4.0, 8.0));
    w.record(window_bucket(2.0, 4.0));
    assert!(close(w.stable().concurrency, 3.0));
    assert!(close(w.panic().rps, 6.0));
    for _ in 0..10 {
        w.record(window_bucket(1.0, 1.0));
    }
    w.record(window_bucket(11.0, 21.0));
    // Ten buckets: nine ones and the 11.
    assert!(close(w.stable().concurrency, 2.0));
    assert!(close(w.panic().concurrency, 6.0));
    assert!(close(w.panic().rps, 11.0));
}

#[test]
fn weighted_exponential_window_follows_knative_weights() {
    use crate::config::MetricAggregation;
    // knative/serving 98e5ef90aa70 pkg/autoscaler/aggregation/bucketing.go: for n buckets
    // c = 1 - (1 - 0.9999)^(1/n), bucket i (newest first) weighs c (1 - c)^i.
    let mut w = StatsWindow::new(Duration::from_secs(10), 20.0)
        .with_aggregation(MetricAggregation::WeightedExponential);
    for _ in 0..10 {
        w.record(window_bucket(5.0, 5.0));
    }
    // A full window of 5s carries 99.99 % of the weight.
    assert!(close(w.stable().concurrency, 4.9995), "{:?}", w.stable());
    w.record(window_bucket(0.0, 0.0));
    // The newest bucket (0) weighs c = 0.6019: the average falls to 1.990, where the
    // plain mean would still be 4.5.
    assert!(close(w.stable().concurrency, 1.990_036), "{:?}", w.stable());
    // Panic window: 2 buckets, c = 0.99: 0 x 0.99 + 5 x 0.99 x 0.01.
    assert!(close(w.panic().rps, 0.0495), "{:?}", w.panic());
}

fn window_bucket(concurrency: f64, rps: f64) -> window::Bucket {
    window::Bucket { concurrency, rps }
}

#[test]
fn snapshots_add_up_across_replicas() {
    let mut a = StatsSnapshot {
        stable_rps: 3.0,
        waiting_sessions: 1,
        active_sessions: 2,
        replicas: 1,
        ..StatsSnapshot::default()
    };
    let b = StatsSnapshot {
        stable_rps: 4.5,
        waiting_sessions: 2,
        replicas: 1,
        ..StatsSnapshot::default()
    };
    a.add(&b);
    assert!(close(a.stable_rps, 7.5));
    assert_eq!(
        (a.waiting_sessions, a.active_sessions, a.replicas),
        (3, 2, 2)
    );
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["waiting_sessions"], 3);
    let back: StatsSnapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back, a);
}

#[tokio::test(start_paused = true)]
async fn sampler_buckets_requests_and_sets_gauges() {
    let stats = Arc::new(TrafficStats::new());
    let metrics = Arc::new(Metrics::new());
    let config = AutoscalerConfig::default();
    let sessions: sampler::SessionCountSource = Arc::new(|| SessionCounts {
        active: 2,
        waiting: 1,
    });
    let sampler = StatsSampler::new(stats.clone(), &config, sessions, metrics.clone());
    // Second 1: 10 requests, each in flight the whole second.
    for _ in 0..10 {
        stats.request_started();
    }
    advance(Duration::from_secs(1)).await;
    for _ in 0..10 {
        stats.request_finished();
    }
    let s = sampler.sample(Instant::now());
    assert!(close(s.stable_concurrency, 10.0), "{s:?}");
    assert!(close(s.stable_rps, 10.0), "{s:?}");
    // Second 2: nothing.
    advance(Duration::from_secs(1)).await;
    let s = sampler.sample(Instant::now());
    assert!(close(s.stable_concurrency, 5.0), "{s:?}");
    // The panic window (6 s) is not full yet: both seconds count.
    assert!(close(s.panic_rps, 5.0), "{s:?}");
    assert_eq!((s.active_sessions, s.waiting_sessions), (2, 1));
    assert!(close(metrics.stable_rps.get(), 5.0));
    assert_eq!(metrics.active_sessions.get(), 2);
    assert_eq!(sampler.latest().requests_total, 10);
}

#[tokio::test(start_paused = true)]
async fn first_request_at_zero_wakes_once() {
    let stats = TrafficStats::new();
    let wake = stats.wake();
    stats.request_started();
    assert!(
        tokio::time::timeout(Duration::from_millis(10), wake.notified())
            .await
            .is_err(),
        "not armed: no wake-up"
    );
    stats.set_at_zero(true);
    stats.request_started();
    assert!(!stats.is_at_zero());
    tokio::time::timeout(Duration::from_millis(10), wake.notified())
        .await
        .expect("armed: the first request wakes the autoscaler");
    stats.request_started();
    assert!(
        tokio::time::timeout(Duration::from_millis(10), wake.notified())
            .await
            .is_err(),
        "only the first request wakes"
    );
}
