//! Scaling-signal costs: the hot-path counters the proxy calls per request (single
//! thread and contended by 2 threads), and one autoscaler decision.
//! Run: `cargo bench --bench autoscaler`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use agent_activator::autoscaler::{Inputs, ScalerState, decide};
use agent_activator::config::{AutoscalerConfig, ScalingMetric};
use agent_activator::stats::{StatsSnapshot, TrafficStats};

/// A runtime to enter: `TrafficStats` reads tokio's clock.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

fn counters(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let stats = TrafficStats::new();
    c.bench_function("stats/request_started+finished", |b| {
        b.iter(|| {
            stats.request_started();
            stats.request_finished();
        })
    });
    // Another thread hammering the same counters: the cost of sharing the cache line.
    let shared = Arc::new(TrafficStats::new());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (s, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            let _g = rt.enter();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.request_started();
                s.request_finished();
            }
        })
    };
    c.bench_function("stats/request_started+finished contended", |b| {
        b.iter(|| {
            shared.request_started();
            shared.request_finished();
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = other.join();
}

fn decision(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let config = AutoscalerConfig {
        metric: ScalingMetric::Concurrency,
        target: 10.0,
        scale_down_delay: agent_activator::config::Dur(Duration::from_secs(30)),
        ..AutoscalerConfig::default()
    };
    let mut state = ScalerState::default();
    let mut inputs = Inputs {
        now: tokio::time::Instant::now(),
        stats: StatsSnapshot {
            stable_concurrency: 35.0,
            panic_concurrency: 80.0,
            ..StatsSnapshot::default()
        },
        ready: 5,
        warm_pool: 0,
        sessions_per_sandbox: 1,
    };
    c.bench_function("autoscaler/decide", |b| {
        b.iter(|| {
            inputs.now += Duration::from_secs(2);
            black_box(decide(&mut state, black_box(&inputs), &config))
        })
    });
}

criterion_group!(benches, counters, decision);
criterion_main!(benches);
