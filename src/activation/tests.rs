//! Unit tests of the activation layer on paused tokio time with a scripted backend.

use std::sync::Arc;
use std::time::Duration;

use super::Activator;
use super::fake_backend::ScriptedBackend;
use crate::backend::{ActivationKind, DynBackend};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::SessionKey;

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
            order.lock().unwrap().push(i);
            lease
        }));
        // Each request is queued before the next one arrives.
        settle().await;
    }
    for t in tasks {
        drop(t.await.unwrap());
    }
    assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
}
