//! Hand-computed KPA cases for `decide`, and the loop on paused time.

use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::{AutoscalerConfig, Dur, ScalingMetric};
use crate::stats::StatsSnapshot;

mod simulation;

/// Concurrency metric, target 10 at 70 %: 7 in flight per sandbox.
fn concurrency() -> AutoscalerConfig {
    AutoscalerConfig {
        metric: ScalingMetric::Concurrency,
        target: 10.0,
        initial_scale: 0,
        ..AutoscalerConfig::default()
    }
}

fn observe(now: Instant, ready: u32, stable: f64, panic: f64) -> Inputs {
    Inputs {
        now,
        stats: StatsSnapshot {
            stable_concurrency: stable,
            panic_concurrency: panic,
            stable_rps: stable,
            panic_rps: panic,
            ..StatsSnapshot::default()
        },
        ready,
        warm_pool: 0,
        sessions_per_sandbox: 1,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn stable_mode_divides_by_target_times_utilisation() {
    let c = concurrency();
    let mut st = ScalerState::default();
    let t = Instant::now();
    // ceil(20 / 7) = 3.
    let d = decide(&mut st, &observe(t, 3, 20.0, 20.0), &c);
    assert_eq!((d.desired, d.panic), (3, false));
    // rps: ceil(30 / (10 x 0.7)) = 5.
    let rps = AutoscalerConfig {
        metric: ScalingMetric::Rps,
        ..c.clone()
    };
    let d = decide(
        &mut ScalerState::default(),
        &observe(t, 5, 30.0, 30.0),
        &rps,
    );
    assert_eq!(d.desired, 5);
    // Exactly at target: 14 / 7 = 2, no rounding up.
    let d = decide(&mut ScalerState::default(), &observe(t, 2, 14.0, 14.0), &c);
    assert_eq!(d.desired, 2);
}

#[test]
fn panic_starts_at_twice_ready_holds_the_maximum_and_ends_a_stable_window_later() {
    let c = concurrency();
    let mut st = ScalerState::default();
    let t0 = Instant::now();
    // Stable ceil(7/7)=1, panic ceil(35/7)=5; 5 / 2 ready = 2.5 >= 2.0: panic.
    let d = decide(&mut st, &observe(t0, 2, 7.0, 35.0), &c);
    assert_eq!((d.desired, d.panic), (5, true));
    assert_eq!((d.stable_desired, d.panic_desired), (1, 5));
    // Below 2.0 x ready (7/7=1 with 5 ready) but still panicking: no scale-down.
    let d = decide(&mut st, &observe(t0 + secs(2), 5, 7.0, 7.0), &c);
    assert_eq!((d.desired, d.panic), (5, true));
    // Crossing again at 30 s extends the panic to 90 s; the maximum rises to 12.
    let d = decide(&mut st, &observe(t0 + secs(30), 5, 7.0, 80.0), &c);
    assert_eq!((d.desired, d.panic), (12, true));
    let d = decide(&mut st, &observe(t0 + secs(89), 12, 7.0, 7.0), &c);
    assert_eq!((d.desired, d.panic), (12, true));
    // 60 s after the last crossing: stable mode; ceil(7/7)=1 but at most halved: 6.
    let d = decide(&mut st, &observe(t0 + secs(90), 12, 7.0, 7.0), &c);
    assert_eq!((d.desired, d.panic), (6, false));
}

#[test]
fn stable_value_counts_in_panic_when_larger() {
    let c = concurrency();
    let mut st = ScalerState::default();
    // Panic ceil(14/7)=2 >= 2 x 1 ready: panic; stable ceil(21/7)=3 is larger and wins.
    let d = decide(&mut st, &observe(Instant::now(), 1, 21.0, 14.0), &c);
    assert_eq!((d.desired, d.panic), (3, true));
}

#[test]
fn rate_limits_bound_each_step() {
    let c = AutoscalerConfig {
        max_scale_up_rate: 2.0,
        ..concurrency()
    };
    let t = Instant::now();
    // ceil(1000/7)=143, but at most ceil(2 x 2 ready) = 4.
    let d = decide(
        &mut ScalerState::default(),
        &observe(t, 2, 1000.0, 1000.0),
        &c,
    );
    assert_eq!(d.desired, 4);
    // Down: 10 ready, no load: at least floor(10 / 2) = 5.
    let d = decide(&mut ScalerState::default(), &observe(t, 10, 0.0, 0.0), &c);
    assert_eq!(d.desired, 5);
    // Default up rate 1000: 143 is within ceil(1000 x 2).
    let d = decide(
        &mut ScalerState::default(),
        &observe(t, 2, 1000.0, 1000.0),
        &concurrency(),
    );
    assert_eq!(d.desired, 143);
}

#[test]
fn min_and_max_scale_bound_the_result() {
    let t = Instant::now();
    let c = AutoscalerConfig {
        min_scale: 2,
        max_scale: 3,
        ..concurrency()
    };
    let d = decide(&mut ScalerState::default(), &observe(t, 2, 0.0, 0.0), &c);
    assert_eq!(d.desired, 2);
    let d = decide(&mut ScalerState::default(), &observe(t, 3, 70.0, 70.0), &c);
    assert_eq!(d.desired, 3);
}

#[test]
fn scale_to_zero_waits_for_the_grace_period() {
    let c = concurrency(); // grace 30 s
    let mut st = ScalerState::default();
    let t0 = Instant::now();
    assert_eq!(decide(&mut st, &observe(t0, 1, 5.0, 5.0), &c).desired, 1);
    // Demand gone: the last sandbox stays for 30 s.
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(2), 1, 0.0, 0.0), &c).desired,
        1
    );
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(31), 1, 0.0, 0.0), &c).desired,
        1
    );
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(32), 1, 0.0, 0.0), &c).desired,
        0
    );
    // Already at zero: stays there.
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(34), 0, 0.0, 0.0), &c).desired,
        0
    );
    // Demand during the grace period restarts it.
    let mut st = ScalerState::default();
    decide(&mut st, &observe(t0, 1, 5.0, 5.0), &c);
    decide(&mut st, &observe(t0 + secs(10), 1, 0.0, 0.0), &c);
    decide(&mut st, &observe(t0 + secs(20), 1, 1.0, 1.0), &c);
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(45), 1, 0.0, 0.0), &c).desired,
        1
    );
}

#[test]
fn a_request_at_zero_scales_up_before_its_bucket_closes() {
    let c = AutoscalerConfig {
        scale_to_zero_grace: Dur::secs(0),
        ..concurrency()
    };
    let mut st = ScalerState::default();
    let t0 = Instant::now();
    assert_eq!(decide(&mut st, &observe(t0, 0, 0.0, 0.0), &c).desired, 0);
    let mut inputs = observe(t0 + secs(1), 0, 0.0, 0.0);
    inputs.stats.in_flight = 1;
    assert_eq!(decide(&mut st, &inputs, &c).desired, 1);
    // activation-scale: coming up from zero starts with at least that many.
    let c = AutoscalerConfig {
        activation_scale: 3,
        ..c
    };
    let mut st = ScalerState::default();
    inputs.stats.in_flight = 0;
    inputs.stats.waiting_sessions = 1;
    assert_eq!(decide(&mut st, &inputs, &c).desired, 3);
}

#[test]
fn initial_scale_holds_until_reached_once() {
    let c = AutoscalerConfig {
        initial_scale: 2,
        ..concurrency()
    };
    let mut st = ScalerState::default();
    let t0 = Instant::now();
    assert_eq!(decide(&mut st, &observe(t0, 0, 0.0, 0.0), &c).desired, 2);
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(2), 1, 0.0, 0.0), &c).desired,
        2
    );
    // Reached: normal rules (halving from 2 ready, then grace holds 1).
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(4), 2, 0.0, 0.0), &c).desired,
        1
    );
    // A fleet that never gets there is released after one stable window.
    let mut st = ScalerState::default();
    decide(&mut st, &observe(t0, 0, 0.0, 0.0), &c);
    let d = decide(&mut st, &observe(t0 + secs(60), 0, 0.0, 0.0), &c);
    assert_eq!(d.desired, 0, "initial scale and grace both ran out");
}

#[test]
fn scale_down_delay_holds_the_recent_maximum() {
    let c = AutoscalerConfig {
        scale_down_delay: Dur::secs(10),
        ..concurrency()
    };
    let mut st = ScalerState::default();
    let t0 = Instant::now();
    assert_eq!(decide(&mut st, &observe(t0, 5, 35.0, 35.0), &c).desired, 5);
    // ceil(14/7)=2, but 5 was wanted less than 10 s ago.
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(5), 5, 14.0, 14.0), &c).desired,
        5
    );
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(9), 5, 14.0, 14.0), &c).desired,
        5
    );
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(10), 5, 14.0, 14.0), &c).desired,
        2
    );
    // Scale-up is never delayed.
    assert_eq!(
        decide(&mut st, &observe(t0 + secs(11), 2, 42.0, 42.0), &c).desired,
        6
    );
}

#[test]
fn session_metric_is_sessions_plus_waiting_plus_warm_pool() {
    let c = AutoscalerConfig {
        metric: ScalingMetric::Session,
        initial_scale: 0,
        ..AutoscalerConfig::default()
    };
    let t = Instant::now();
    let mut inputs = observe(t, 6, 0.0, 0.0);
    inputs.stats.active_sessions = 3;
    inputs.stats.waiting_sessions = 2;
    inputs.warm_pool = 3;
    let d = decide(&mut ScalerState::default(), &inputs, &c);
    assert_eq!((d.desired, d.panic), (8, false));
    // Blocked sessions with only 3 ready: 8 / 3 >= 2, panic.
    inputs.ready = 3;
    let d = decide(&mut ScalerState::default(), &inputs, &c);
    assert_eq!((d.desired, d.panic), (8, true));
    // Shared sandboxes: 5 sessions, 2 per sandbox -> 3, plus the pool.
    inputs.sessions_per_sandbox = 2;
    inputs.ready = 6;
    let d = decide(&mut ScalerState::default(), &inputs, &c);
    assert_eq!(d.desired, 6);
    // No sessions, no pool: zero (after the grace the last one goes).
    let mut idle = observe(t, 0, 0.0, 0.0);
    idle.warm_pool = 0;
    assert_eq!(decide(&mut ScalerState::default(), &idle, &c).desired, 0);
}

#[test]
fn pool_target_tops_up_bound_sandboxes() {
    assert_eq!(pool_target(8, 3), 5);
    assert_eq!(pool_target(2, 5), 0);
    assert_eq!(pool_target(0, 0), 0);
}
