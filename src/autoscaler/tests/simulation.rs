//! The loop on paused time: traffic arrives, bursts, idles and leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, advance};

use crate::autoscaler::{Autoscaler, Step};
use crate::cluster::{Leadership, ReplicaId, SoleReplica};
use crate::config::{AutoscalerConfig, Config, Dur, ScalingMetric};
use crate::metrics::Metrics;
use crate::stats::{SessionCounts, StatsSampler, TrafficStats};
use crate::testing::ScriptedBackend;

struct Rig {
    waiting: Arc<AtomicU64>,
    stats: Arc<TrafficStats>,
    sampler: Arc<StatsSampler>,
    fleet: Arc<ScriptedBackend>,
    metrics: Arc<Metrics>,
    scaler: Arc<Autoscaler>,
    active: Arc<AtomicU64>,
}

fn rig(autoscaler: AutoscalerConfig, leader: Arc<dyn Leadership>) -> Rig {
    rig_with(
        Config {
            autoscaler,
            ..Config::default()
        },
        leader,
    )
}

fn rig_with(config: Config, leader: Arc<dyn Leadership>) -> Rig {
    let metrics = Arc::new(Metrics::new());
    let stats = Arc::new(TrafficStats::new());
    let active = Arc::new(AtomicU64::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let (counted, queued) = (active.clone(), waiting.clone());
    let sampler = StatsSampler::new(
        stats.clone(),
        &config.autoscaler,
        Arc::new(move || SessionCounts {
            active: counted.load(Ordering::SeqCst),
            waiting: queued.load(Ordering::SeqCst),
        }),
        metrics.clone(),
    );
    let fleet = Arc::new(ScriptedBackend::new(false));
    let scaler = Autoscaler::new(
        &config,
        sampler.clone(),
        fleet.clone(),
        metrics.clone(),
        leader,
        ReplicaId::named("replica-under-test"),
        None,
    );
    Rig {
        waiting,
        stats,
        sampler,
        fleet,
        metrics,
        scaler,
        active,
    }
}

fn concurrency_target_one() -> AutoscalerConfig {
    AutoscalerConfig {
        metric: ScalingMetric::Concurrency,
        target: 1.0,
        apply: true,
        initial_scale: 0,
        ..AutoscalerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn desired_rises_panics_falls_and_reaches_zero() {
    let r = rig(concurrency_target_one(), Arc::new(SoleReplica));
    // Already serving the steady load (3 sandboxes) when the simulation starts.
    r.fleet.pool.warm.store(3, Ordering::SeqCst);
    let mut in_flight = 0u32;
    // (second, desired, panic) after every decision.
    let mut history: Vec<(u32, u32, bool)> = Vec::new();
    for sec in 0..240u32 {
        // Sessions: 2 steady conversations, a burst of 10 at 20 s, all gone at 40 s.
        let want = match sec {
            0..20 => 2,
            20..30 => 10,
            30..40 => 2,
            _ => 0,
        };
        while in_flight < want {
            r.stats.request_started();
            in_flight += 1;
        }
        while in_flight > want {
            r.stats.request_finished();
            in_flight -= 1;
        }
        r.active.store(u64::from(want), Ordering::SeqCst);
        advance(Duration::from_secs(1)).await;
        r.sampler.sample(Instant::now());
        if sec % 2 == 1 {
            match r.scaler.step(Instant::now()).await {
                Step::Decided { decision, .. } => {
                    history.push((sec, decision.desired, decision.panic))
                }
                Step::Follower => panic!("the sole replica leads"),
            }
        }
    }
    let at = |s: u32| history.iter().find(|h| h.0 == s).copied().unwrap();
    // Steady: ceil(2 / 0.7) = 3, no panic.
    assert_eq!(at(19), (19, 3, false), "{history:?}");
    // The burst panics and provisions for ceil(10 / 0.7) = 15.
    let burst: Vec<_> = history.iter().filter(|h| (20..30).contains(&h.0)).collect();
    assert!(burst.iter().any(|h| h.2), "{history:?}");
    assert!(burst.iter().any(|h| h.1 >= 15), "{history:?}");
    // While panicking nothing is scaled down.
    let panic_end = history.iter().rposition(|h| h.2).unwrap();
    let first_panic = history.iter().position(|h| h.2).unwrap();
    for w in history[first_panic..=panic_end].windows(2) {
        assert!(w[1].1 >= w[0].1, "scaled down in panic: {history:?}");
    }
    // After the panic: never up again, down to zero, and still at zero at the end.
    for w in history[panic_end..].windows(2) {
        assert!(w[1].1 <= w[0].1, "rose after the burst: {history:?}");
    }
    assert_eq!(history.last().unwrap().1, 0, "{history:?}");
    assert!(!history.last().unwrap().2);
    // Applied through the backend; the last target is zero and the gauges agree.
    assert_eq!(r.fleet.pool.targets().last(), Some(&0));
    assert_eq!(r.metrics.desired_sandboxes.get(), 0);
    assert_eq!(r.metrics.panic_mode.get(), 0);
    assert_eq!(r.metrics.autoscaler_leader.get(), 1);
    // Equal targets are applied once: far fewer applications than decisions.
    assert!(
        r.fleet.pool.targets().len() < history.len() / 2,
        "{:?}",
        r.fleet.pool.targets()
    );
}

#[tokio::test(start_paused = true)]
async fn first_request_at_zero_decides_without_waiting_for_the_tick() {
    let config = AutoscalerConfig {
        scale_to_zero_grace: Dur::secs(0),
        tick_interval: Dur::secs(10),
        ..concurrency_target_one()
    };
    let r = rig(config, Arc::new(SoleReplica));
    let task = r.scaler.spawn();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(r.metrics.desired_sandboxes.get(), 0);
    assert!(r.stats.is_at_zero(), "armed after deciding zero");
    let t0 = Instant::now();
    advance(Duration::from_secs(1)).await;
    r.stats.request_started();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(r.metrics.desired_sandboxes.get(), 1);
    assert_eq!(r.fleet.pool.ready(), 1, "applied at once");
    assert!(
        Instant::now() - t0 < Duration::from_secs(10),
        "before the next tick"
    );
    task.abort();
}

struct Switch(AtomicBool);

impl Leadership for Switch {
    fn is_leader(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn followers_neither_decide_nor_apply() {
    let leader = Arc::new(Switch(AtomicBool::new(false)));
    let r = rig(concurrency_target_one(), leader.clone());
    r.stats.request_started();
    assert_eq!(r.scaler.step(Instant::now()).await, Step::Follower);
    assert_eq!(r.metrics.autoscaler_leader.get(), 0);
    assert_eq!(r.metrics.desired_sandboxes.get(), 0);
    assert!(r.fleet.pool.targets().is_empty());
    leader.0.store(true, Ordering::SeqCst);
    let step = r.scaler.step(Instant::now()).await;
    assert!(
        matches!(
            step,
            Step::Decided {
                applied: Some(1),
                ..
            }
        ),
        "{step:?}"
    );
    assert_eq!(r.metrics.autoscaler_leader.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn apply_false_only_exports() {
    let config = AutoscalerConfig {
        apply: false,
        ..concurrency_target_one()
    };
    let r = rig(config, Arc::new(SoleReplica));
    r.stats.request_started();
    let step = r.scaler.step(Instant::now()).await;
    assert!(
        matches!(step, Step::Decided { applied: None, .. }),
        "{step:?}"
    );
    assert_eq!(r.metrics.desired_sandboxes.get(), 1);
    assert_eq!(r.metrics.warm_pool_target.get(), 1, "exported for HPA/KEDA");
    assert!(r.fleet.pool.targets().is_empty());
    let json = r.scaler.stats_json();
    assert_eq!(json["in_flight"], 1);
    assert_eq!(json["replica_id"], "replica-under-test");
    assert_eq!(r.scaler.replica_id().as_str(), "replica-under-test");
}

#[tokio::test(start_paused = true)]
async fn session_metric_follows_conversations_and_keeps_the_warm_pool() {
    let mut config = Config {
        autoscaler: AutoscalerConfig {
            metric: ScalingMetric::Session,
            apply: true,
            initial_scale: 0,
            ..AutoscalerConfig::default()
        },
        ..Config::default()
    };
    config.backend.warm_pool = 2;
    let r = rig_with(config, Arc::new(SoleReplica));
    r.fleet.pool.warm.store(2, Ordering::SeqCst);
    let mut history: Vec<(u32, u32, bool, u32)> = Vec::new();
    for sec in 0..200u32 {
        // 6 new conversations block at 10 s, are bound at 12 s, and end at 40 s.
        let (waiting, active) = match sec {
            10..12 => (6, 0),
            12..40 => (0, 6),
            _ => (0, 0),
        };
        r.waiting.store(waiting, Ordering::SeqCst);
        r.active.store(active, Ordering::SeqCst);
        if sec == 12 {
            // Claimed: 6 sandboxes move from the pool to bound.
            r.fleet.pool.bound.store(6, Ordering::SeqCst);
            let warm = r.fleet.pool.warm.load(Ordering::SeqCst);
            r.fleet
                .pool
                .warm
                .store(warm.saturating_sub(6), Ordering::SeqCst);
        }
        if sec == 40 {
            r.fleet.pool.bound.store(0, Ordering::SeqCst);
        }
        advance(Duration::from_secs(1)).await;
        r.sampler.sample(Instant::now());
        if sec % 2 == 1 {
            let Step::Decided { decision, .. } = r.scaler.step(Instant::now()).await else {
                panic!("the sole replica leads");
            };
            let target = u32::try_from(r.metrics.warm_pool_target.get()).unwrap();
            history.push((sec, decision.desired, decision.panic, target));
        }
    }
    let at = |s: u32| history.iter().find(|h| h.0 == s).copied().unwrap();
    assert_eq!(at(9), (9, 2, false, 2), "idle: the warm pool: {history:?}");
    // Blocked sessions are demand: 6 + 2 warm, 8 / 2 ready >= 200 %: panic.
    assert_eq!(at(11), (11, 8, true, 8), "{history:?}");
    // Bound: still 8 wanted, of which 2 are the pool.
    assert_eq!(at(13), (13, 8, true, 2), "{history:?}");
    // Conversations over: after the panic, back down to the warm pool, not below.
    let end = history.last().unwrap();
    assert_eq!((end.1, end.2, end.3), (2, false, 2), "{history:?}");
    assert_eq!(r.fleet.pool.targets().last(), Some(&2));
}
