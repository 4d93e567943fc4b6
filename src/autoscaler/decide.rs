//! `decide`: the pure scaling decision with Knative KPA semantics.
//!
//! Per decision (every `tick_interval`, or at once when a request arrives at zero):
//! 1. observed stable/panic values of the metric -> desired counts
//!    `ceil(observed / (target x utilisation))` (`session`: sessions + warm pool);
//! 2. both clamped to `[floor(ready / max_scale_down_rate), ceil(ready x max_scale_up_rate)]`;
//! 3. panic starts when `panic_desired / ready >= panic threshold`, is extended while that
//!    holds and ends one stable window after it last held; while panicking the result is
//!    the largest count seen in this panic (no scale-down);
//! 4. scale-down delay: the result is the largest count of the last `scale_down_delay`;
//! 5. scale-to-zero grace, activation scale, initial scale, then `[min_scale, max_scale]`.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::config::{AutoscalerConfig, ScalingMetric};
use crate::stats::StatsSnapshot;

/// What one decision looks at.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub now: Instant,
    /// Signals summed over every activator replica.
    pub stats: StatsSnapshot,
    /// Running sandboxes able to take traffic (warm + bound).
    pub ready: u32,
    /// `backend.warm_pool`: spare sandboxes the `session` metric keeps on top of demand.
    pub warm_pool: u32,
    /// `session.max_sessions_per_sandbox` (1 = exclusive sandboxes).
    pub sessions_per_sandbox: u32,
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Sandboxes wanted (running: bound + warm).
    pub desired: u32,
    /// Whether the autoscaler is in panic mode after this decision.
    pub panic: bool,
    /// The stable-window value of the metric that drove the decision.
    pub observed_stable: f64,
    /// The panic-window value of the metric.
    pub observed_panic: f64,
    /// Desired count from the stable window alone (after rate limits).
    pub stable_desired: u32,
    /// Desired count from the panic window alone (after rate limits).
    pub panic_desired: u32,
}

/// What the autoscaler remembers between decisions.
#[derive(Debug, Clone, Default)]
pub struct ScalerState {
    /// Last time the panic threshold was crossed while panicking (Knative's `panicTime`).
    panic_since: Option<Instant>,
    /// Largest desired count of the current panic.
    max_panic: u32,
    /// Desired counts of the last `scale_down_delay`.
    delay_window: VecDeque<(Instant, u32)>,
    /// Since when the demand has been zero (for the scale-to-zero grace).
    zero_since: Option<Instant>,
    /// The service has reached `initial_scale` once.
    initial_reached: bool,
    /// The previous decision's output.
    last: Option<u32>,
    /// The first decision's time.
    started: Option<Instant>,
}

impl ScalerState {
    /// Whether the last decision was in panic mode.
    pub fn panicking(&self) -> bool {
        self.panic_since.is_some()
    }

    /// The previous decision's output.
    pub fn last_desired(&self) -> Option<u32> {
        self.last
    }
}

/// The observed stable and panic values and the per-sandbox target they are divided by.
fn observed(inputs: &Inputs, config: &AutoscalerConfig) -> (f64, f64, f64) {
    let s = &inputs.stats;
    let target = config.target * config.target_utilization_percentage / 100.0;
    match config.metric {
        ScalingMetric::Rps => (s.stable_rps, s.panic_rps, target),
        ScalingMetric::Concurrency => (s.stable_concurrency, s.panic_concurrency, target),
        ScalingMetric::Session => {
            // One sandbox per `sessions_per_sandbox` sessions; no utilisation headroom
            // because the warm pool is the headroom.
            let sessions = (s.active_sessions + s.waiting_sessions) as f64;
            (
                sessions,
                sessions,
                f64::from(inputs.sessions_per_sandbox.max(1)),
            )
        }
    }
}

fn ceil_div(value: f64, target: f64) -> u32 {
    let n = (value / target).ceil();
    if n.is_finite() && n > 0.0 {
        n.min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

/// One scaling decision. `state` carries panic mode, the delay window and the grace timer
/// from one call to the next.
pub fn decide(state: &mut ScalerState, inputs: &Inputs, config: &AutoscalerConfig) -> Decision {
    let now = inputs.now;
    let ready = f64::from(inputs.ready.max(1));
    let (observed_stable, observed_panic, target) = observed(inputs, config);
    let mut stable_desired = ceil_div(observed_stable, target);
    let mut panic_desired = ceil_div(observed_panic, target);
    if config.metric == ScalingMetric::Session {
        stable_desired = stable_desired.saturating_add(inputs.warm_pool);
        panic_desired = panic_desired.saturating_add(inputs.warm_pool);
    }
    // Knative's immediate report: a request in flight or a session waiting is demand even
    // before its first bucket closes.
    let spot_demand = inputs.stats.in_flight + inputs.stats.waiting_sessions > 0;
    if spot_demand {
        stable_desired = stable_desired.max(1);
        panic_desired = panic_desired.max(1);
    }

    // Rate limits relative to the ready count.
    let max_up = (config.max_scale_up_rate * ready)
        .ceil()
        .min(f64::from(u32::MAX)) as u32;
    let max_down = (ready / config.max_scale_down_rate).floor() as u32;
    let limit = |n: u32| {
        n.min(max_up)
            .max(if inputs.ready > 0 { max_down } else { 0 })
    };
    stable_desired = limit(stable_desired);
    panic_desired = limit(panic_desired);

    // Panic mode.
    let over_threshold =
        f64::from(panic_desired) / ready >= config.panic_threshold_percentage / 100.0;
    match state.panic_since {
        _ if over_threshold => state.panic_since = Some(now),
        Some(since) if now >= since + config.stable_window.as_duration() => {
            state.panic_since = None;
            state.max_panic = 0;
        }
        _ => {}
    }
    let mut desired = stable_desired;
    if state.panic_since.is_some() {
        desired = desired.max(panic_desired);
        state.max_panic = state.max_panic.max(desired);
        desired = state.max_panic;
    }

    // Scale-down delay: hold the largest count of the last `scale_down_delay`.
    let delay = config.scale_down_delay.as_duration();
    if !delay.is_zero() {
        state.delay_window.push_back((now, desired));
        while let Some(&(at, _)) = state.delay_window.front() {
            if now.saturating_duration_since(at) >= delay {
                state.delay_window.pop_front();
            } else {
                break;
            }
        }
        desired = state
            .delay_window
            .iter()
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(desired);
    }

    let last = state.last.unwrap_or(0);
    // Scale-to-zero grace: the last sandbox stays until demand was zero this long.
    if desired == 0 {
        let since = *state.zero_since.get_or_insert(now);
        let grace = config.scale_to_zero_grace.as_duration();
        if last > 0 && now.saturating_duration_since(since) < grace {
            desired = 1;
        }
    } else {
        state.zero_since = None;
    }
    // Activation scale: coming up from zero starts with at least this many.
    if desired > 0 && (last == 0 || inputs.ready == 0) {
        desired = desired.max(config.activation_scale);
    }
    // Initial scale holds until the service has reached it once (or one stable window
    // passed, so a fleet that cannot start does not pin the count forever).
    let started = *state.started.get_or_insert(now);
    if inputs.ready >= config.initial_scale
        || now.saturating_duration_since(started) >= config.stable_window.as_duration()
    {
        state.initial_reached = true;
    }
    if !state.initial_reached {
        desired = desired.max(config.initial_scale);
    }
    desired = desired.max(config.min_scale);
    if config.max_scale > 0 {
        desired = desired.min(config.max_scale);
    }
    state.last = Some(desired);
    Decision {
        desired,
        panic: state.panic_since.is_some(),
        observed_stable,
        observed_panic,
        stable_desired,
        panic_desired,
    }
}

/// Turns desired sandboxes into the backend's one lever, the warm-pool target: the
/// sandboxes bound to sessions stay (only the idle policy releases them), so the pool
/// makes up the difference.
pub fn pool_target(desired: u32, bound: u32) -> u32 {
    desired.saturating_sub(bound)
}
