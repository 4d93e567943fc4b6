//! Unit tests of the activation layer on paused tokio time with a scripted backend.

use std::sync::Arc;
use std::time::Duration;

use super::{ActivationError, Activator, Permit};
use crate::backend::{ActivationKind, BackendError, BackendEvent, DynBackend, SandboxId};
use crate::config::{Config, IdlePolicy, OnSandboxLoss};
use crate::lock::MutexExt;
use crate::metrics::Metrics;
use crate::session::SessionKey;
use crate::testing::ScriptedBackend;

mod admin;
mod deadlines;
mod idle;
mod lease_cache;
mod loss;
use tokio::time::sleep;

fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

fn config() -> Config {
    let mut c = Config::default();
    c.activation.timeout = crate::config::Dur::secs(5);
    c.session.admission_timeout = crate::config::Dur::secs(2);
    c.idle.timeout = crate::config::Dur::secs(10);
    c.idle.sweep_interval = crate::config::Dur::secs(1);
    c.idle.session_ttl = crate::config::Dur::secs(100);
    c
}

struct Rig {
    activator: Arc<Activator>,
    backend: Arc<ScriptedBackend>,
    metrics: Arc<Metrics>,
}

fn rig_with(config: Config, can_pause: bool) -> Rig {
    let backend = Arc::new(ScriptedBackend::new(can_pause));
    let metrics = Arc::new(Metrics::new());
    let dyn_backend: DynBackend = backend.clone();
    let activator = Activator::new(&config, dyn_backend, metrics.clone());
    activator.spawn_background();
    Rig {
        activator,
        backend,
        metrics,
    }
}

fn rig() -> Rig {
    rig_with(config(), true)
}

fn state(r: &Rig, k: &SessionKey) -> &'static str {
    r.activator.session(k).map(|i| i.state).unwrap_or("none")
}

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_acquires_make_one_claim() {
    let r = rig();
    r.backend.script().claim_delay = Duration::from_millis(200);
    let k = key("one-session");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let a = r.activator.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move { a.acquire(&k).await }));
    }
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap().expect("lease"));
    }
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 1);
    assert!(leases.iter().all(|l| l.sandbox == leases[0].sandbox));
    assert!(leases.iter().all(|l| l.activation == ActivationKind::Claim));
    assert_eq!(r.activator.session(&k).unwrap().in_flight, 100);
    drop(leases);
    assert_eq!(r.activator.session(&k).unwrap().in_flight, 0);
    assert_eq!(r.activator.queued_requests(), 0);
    assert_eq!(r.metrics.queued_requests.get(), 0);
    // Ready now: the fast path answers without waiting.
    let lease = r.activator.try_acquire_ready(&k).expect("fast path");
    assert_eq!(lease.activation, ActivationKind::None);
    assert_eq!(lease.waited, Duration::ZERO);
    assert_eq!(
        lease.session_hash(),
        k.short_hash(),
        "cached hash is the key's"
    );
}

#[tokio::test(start_paused = true, flavor = "current_thread")]
async fn waiters_are_released_in_arrival_order() {
    let r = rig();
    r.backend.script().claim_delay = Duration::from_millis(100);
    let k = key("fifo");
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let a = r.activator.clone();
        let k = k.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let lease = a.acquire(&k).await.unwrap();
            order.lock_recovered().push(i);
            lease
        }));
        // Each request is queued before the next one arrives.
        settle().await;
    }
    for t in tasks {
        drop(t.await.unwrap());
    }
    assert_eq!(*order.lock_recovered(), (0..10).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn per_session_and_total_queue_bounds() {
    let mut c = config();
    c.activation.max_queued_per_session = 3;
    c.activation.max_queued_total = 4;
    let r = rig_with(c, true);
    r.backend.script().claim_delay = Duration::from_secs(1);
    let a = key("a");
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let act = r.activator.clone();
        let a = a.clone();
        waiting.push(tokio::spawn(async move { act.acquire(&a).await }));
    }
    settle().await;
    assert_eq!(r.activator.queued_requests(), 3);
    let err = r.activator.acquire(&a).await.unwrap_err();
    assert!(matches!(err, ActivationError::QueueFull(_)), "{err:?}");
    // One slot left overall: session b takes it, session c is refused.
    let act = r.activator.clone();
    let b = tokio::spawn(async move { act.acquire(&key("b")).await });
    settle().await;
    let err = r.activator.acquire(&key("c")).await.unwrap_err();
    assert!(matches!(err, ActivationError::QueueFull(_)), "{err:?}");
    assert_eq!(
        state(&r, &key("c")),
        "none",
        "a refused new session leaves nothing behind"
    );
    assert_eq!(r.metrics.queued_requests.get(), 4);
    assert_eq!(
        r.activator.waiting_sessions(),
        2,
        "a and b are being claimed"
    );
    assert_eq!(r.metrics.waiting_sessions.get(), 2);
    for t in waiting {
        t.await.unwrap().expect("queued request served");
    }
    b.await.unwrap().expect("queued request served");
    assert_eq!(r.activator.queued_requests(), 0);
    assert_eq!(r.metrics.queued_requests.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn activation_timeout_fails_every_waiter() {
    let r = rig();
    // Longer than admission + activation timeout plus the grace period.
    r.backend.script().claim_delay = Duration::from_secs(3600);
    let k = key("slow");
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let a = r.activator.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move { a.acquire(&k).await }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, ActivationError::Timeout(_)), "{err:?}");
    }
    assert_eq!(r.activator.queued_requests(), 0);
    // After the grace period the claim is abandoned and the session forgotten.
    sleep(Duration::from_secs(10)).await;
    assert_eq!(state(&r, &k), "none");
    assert_eq!(r.activator.waiting_sessions(), 0);
    let timeouts = r
        .metrics
        .activations_total
        .with_label_values(&["claim", "timeout"])
        .get();
    assert_eq!(timeouts, 1);
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 1);
}

#[tokio::test(start_paused = true)]
async fn late_claim_is_kept_for_the_next_request() {
    let r = rig();
    // Past the 7 s budget but inside the grace period.
    r.backend.script().claim_delay = Duration::from_secs(9);
    let k = key("late");
    let err = r.activator.acquire(&k).await.unwrap_err();
    assert!(matches!(err, ActivationError::Timeout(_)), "{err:?}");
    assert_eq!(state(&r, &k), "activating");
    // A request during the grace period joins the same claim.
    let lease = r.activator.acquire(&k).await.expect("late claim is used");
    assert_eq!(lease.activation, ActivationKind::Claim);
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 1);
}

#[tokio::test(start_paused = true)]
async fn claim_failure_fans_out_then_next_request_retries() {
    let r = rig();
    {
        let mut s = r.backend.script();
        s.claim_delay = Duration::from_millis(50);
        s.claim_results
            .push_back(Err(BackendError::NoCapacity("full".into())));
    }
    let k = key("fails");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let a = r.activator.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move { a.acquire(&k).await }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(
            matches!(err, ActivationError::Backend(BackendError::NoCapacity(_))),
            "{err:?}"
        );
    }
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 1);
    assert_eq!(state(&r, &k), "none");
    r.activator
        .acquire(&k)
        .await
        .expect("second claim succeeds");
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 2);
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_client_does_not_cancel_the_claim() {
    let r = rig();
    r.backend.script().claim_delay = Duration::from_millis(500);
    let k = key("gone-client");
    let a = r.activator.clone();
    let k2 = k.clone();
    let task = tokio::spawn(async move { a.acquire(&k2).await });
    settle().await;
    assert_eq!(r.activator.queued_requests(), 1);
    task.abort();
    settle().await;
    assert_eq!(
        r.activator.queued_requests(),
        0,
        "the waiter left the queue"
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(state(&r, &k), "active");
    assert!(r.activator.try_acquire_ready(&k).is_some());
}

async fn ready(r: &Rig, k: &SessionKey) -> Permit {
    r.activator.acquire(k).await.expect("lease")
}

#[tokio::test(start_paused = true)]
async fn lease_is_send_and_static() {
    fn assert_send_static<T: Send + 'static>(_: &T) {}
    let r = rig();
    let lease = ready(&r, &key("send")).await;
    assert_send_static(&lease);
    let held = tokio::spawn(async move { lease.endpoint });
    held.await.unwrap();
}
