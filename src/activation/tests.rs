//! Unit tests of the activation layer on paused tokio time with a scripted backend.

use std::sync::Arc;
use std::time::Duration;

use super::fake_backend::ScriptedBackend;
use super::{ActivationError, Activator, Lease};
use crate::backend::{ActivationKind, BackendError, BackendEvent, DynBackend, SandboxId};
use crate::config::{Config, IdlePolicy, OnSandboxLoss};
use crate::metrics::Metrics;
use crate::session::SessionKey;
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

async fn ready(r: &Rig, k: &SessionKey) -> Lease {
    r.activator.acquire(k).await.expect("lease")
}

#[tokio::test(start_paused = true)]
async fn idle_session_pauses_then_resumes_on_next_request() {
    let r = rig();
    let k = key("idle");
    let first = ready(&r, &k).await;
    let sandbox = first.sandbox.clone();
    drop(first);
    sleep(Duration::from_secs(9)).await;
    assert_eq!(state(&r, &k), "active", "inside the idle window");
    sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&r, &k), "paused");
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 1);
    assert!(r.activator.try_acquire_ready(&k).is_none());
    let lease = ready(&r, &k).await;
    assert_eq!(lease.activation, ActivationKind::Resume);
    assert_eq!(lease.sandbox, sandbox, "same sandbox after resume");
    assert_eq!(ScriptedBackend::count(&r.backend.resumes), 1);
    assert_eq!(r.metrics.pauses_total.with_label_values(&["ok"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_held_lease_prevents_pausing() {
    let r = rig();
    let k = key("streaming");
    let stream = ready(&r, &k).await;
    sleep(Duration::from_secs(60)).await;
    assert_eq!(state(&r, &k), "active");
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 0);
    assert_eq!(r.activator.active_sessions(), 1);
    // The idle clock starts when the stream ends.
    drop(stream);
    sleep(Duration::from_secs(5)).await;
    assert_eq!(state(&r, &k), "active");
    sleep(Duration::from_secs(7)).await;
    assert_eq!(state(&r, &k), "paused");
    assert_eq!(r.activator.active_sessions(), 0);
}

#[tokio::test(start_paused = true)]
async fn request_while_pausing_waits_and_resumes() {
    let r = rig();
    r.backend.script().pause_delay = Duration::from_secs(2);
    let k = key("pausing");
    drop(ready(&r, &k).await);
    sleep(Duration::from_millis(11_500)).await;
    assert_eq!(state(&r, &k), "pausing");
    let lease = ready(&r, &k).await;
    assert_eq!(lease.activation, ActivationKind::Resume);
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 1);
    assert_eq!(ScriptedBackend::count(&r.backend.resumes), 1);
    assert_eq!(state(&r, &k), "active");
}

#[tokio::test(start_paused = true)]
async fn busy_elsewhere_keeps_the_session_active() {
    let r = rig();
    r.backend
        .script()
        .pause_results
        .push_back(Err(BackendError::Busy(SandboxId::new("sbx-0"))));
    let k = key("busy");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "active");
    assert_eq!(r.metrics.pauses_total.with_label_values(&["busy"]).get(), 1);
    // The idle clock restarted: the next attempt is a full idle timeout later.
    sleep(Duration::from_secs(5)).await;
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 1);
    sleep(Duration::from_secs(7)).await;
    assert_eq!(state(&r, &k), "paused");
}

#[tokio::test(start_paused = true)]
async fn paused_past_ttl_is_released() {
    let r = rig();
    let k = key("ttl");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "paused");
    sleep(Duration::from_secs(101)).await;
    assert_eq!(state(&r, &k), "none");
    assert_eq!(
        *r.backend.released.lock().unwrap(),
        vec![(k.clone(), sandbox)]
    );
    assert_eq!(
        r.metrics.releases_total.with_label_values(&["ttl"]).get(),
        1
    );
    // The next request is a new session.
    assert_eq!(ready(&r, &k).await.activation, ActivationKind::Claim);
}

#[tokio::test(start_paused = true)]
async fn release_policy_frees_the_sandbox() {
    let r = rig_with(config(), false);
    let k = key("release");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "none");
    assert_eq!(r.backend.released.lock().unwrap().len(), 1);
    assert_eq!(
        r.metrics.releases_total.with_label_values(&["idle"]).get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn keep_policy_keeps() {
    let mut c = config();
    c.idle.policy = Some(IdlePolicy::Keep);
    let r = rig_with(c, true);
    let k = key("keep");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(500)).await;
    assert_eq!(state(&r, &k), "active");
}

fn lose(r: &Rig, sandbox: &SandboxId) {
    r.backend
        .events
        .send(BackendEvent::Lost {
            sandbox: sandbox.clone(),
            reason: "crashed".into(),
        })
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn lost_sandbox_fails_once_then_starts_over() {
    let r = rig();
    let k = key("lost");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    lose(&r, &sandbox);
    settle().await;
    assert_eq!(state(&r, &k), "lost");
    assert!(
        r.activator.try_acquire_ready(&k).is_none(),
        "never re-pinned"
    );
    let err = r.activator.acquire(&k).await.unwrap_err();
    assert!(matches!(err, ActivationError::SandboxLost), "{err:?}");
    let fresh = ready(&r, &k).await;
    assert_ne!(fresh.sandbox, sandbox);
    assert!(!fresh.state_lost);
    assert_eq!(r.metrics.sessions_lost_total.get(), 1);
    settle().await;
    assert!(
        r.backend
            .released
            .lock()
            .unwrap()
            .contains(&(k.clone(), sandbox))
    );
}

#[tokio::test(start_paused = true)]
async fn lost_sandbox_with_reclaim_says_state_was_lost() {
    let mut c = config();
    c.activation.on_sandbox_loss = OnSandboxLoss::Reclaim;
    let r = rig_with(c, true);
    let k = key("reclaim");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    lose(&r, &sandbox);
    settle().await;
    let first = ready(&r, &k).await;
    assert_ne!(first.sandbox, sandbox);
    assert!(first.state_lost);
    assert_eq!(first.activation, ActivationKind::Claim);
    let second = ready(&r, &k).await;
    assert!(!second.state_lost, "only the first lease says so");
}

#[tokio::test(start_paused = true)]
async fn resume_of_a_lost_sandbox_reports_the_loss() {
    let r = rig();
    let k = key("lost-paused");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "paused");
    r.backend
        .script()
        .resume_results
        .push_back(Err(BackendError::Lost(SandboxId::new("sbx-0"))));
    let err = r.activator.acquire(&k).await.unwrap_err();
    assert!(matches!(err, ActivationError::SandboxLost), "{err:?}");
    assert_eq!(ready(&r, &k).await.activation, ActivationKind::Claim);
}

#[tokio::test(start_paused = true)]
async fn events_from_other_replicas_update_the_entry() {
    let r = rig();
    let k = key("replicated");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    r.backend
        .events
        .send(BackendEvent::Paused {
            sandbox: sandbox.clone(),
        })
        .unwrap();
    settle().await;
    assert_eq!(state(&r, &k), "paused");
    let moved = std::net::SocketAddr::from(([127, 0, 0, 1], 31_000));
    r.backend
        .events
        .send(BackendEvent::Resumed {
            sandbox,
            endpoint: moved,
        })
        .unwrap();
    settle().await;
    let lease = r.activator.try_acquire_ready(&k).expect("ready again");
    assert_eq!(lease.endpoint, moved);
    assert_eq!(ScriptedBackend::count(&r.backend.resumes), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_refuses_new_activations_and_keeps_ready_sessions() {
    let r = rig();
    let live = key("live");
    drop(ready(&r, &live).await);
    let idle = key("idle-at-shutdown");
    drop(ready(&r, &idle).await);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &idle), "paused");
    drop(ready(&r, &live).await);
    r.activator.begin_shutdown();
    assert!(r.activator.try_acquire_ready(&live).is_some());
    assert!(matches!(
        r.activator.acquire(&key("new")).await,
        Err(ActivationError::ShuttingDown)
    ));
    assert_eq!(state(&r, &key("new")), "none");
    assert!(matches!(
        r.activator.acquire(&idle).await,
        Err(ActivationError::ShuttingDown)
    ));
    // No idle pausing while draining.
    sleep(Duration::from_secs(30)).await;
    assert_eq!(state(&r, &live), "active");
}

#[tokio::test(start_paused = true)]
async fn admin_operations() {
    let r = rig();
    let k = key("admin");
    let unknown = key("unknown");
    assert!(!r.activator.release(&unknown).await.unwrap());
    assert!(!r.activator.pause(&unknown).await.unwrap());
    assert!(!r.activator.resume(&unknown).await.unwrap());
    let lease = ready(&r, &k).await;
    let err = r.activator.pause(&k).await.unwrap_err();
    assert!(
        matches!(err, ActivationError::Backend(BackendError::Busy(_))),
        "live traffic is never paused: {err:?}"
    );
    drop(lease);
    assert!(r.activator.pause(&k).await.unwrap());
    assert_eq!(state(&r, &k), "paused");
    assert!(r.activator.pause(&k).await.unwrap(), "idempotent");
    assert!(r.activator.resume(&k).await.unwrap());
    assert_eq!(state(&r, &k), "active");
    let info = r.activator.session(&k).unwrap();
    assert_eq!(info.session, k.short_hash());
    assert!(info.endpoint.is_some());
    assert_eq!(r.activator.sessions().len(), 1);
    assert!(r.activator.release(&k).await.unwrap());
    assert_eq!(state(&r, &k), "none");
    assert_eq!(
        r.metrics.releases_total.with_label_values(&["admin"]).get(),
        1
    );
    let counts = r.activator.session_counts();
    assert!(counts.iter().all(|(_, n)| *n == 0), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn admin_pause_is_unsupported_without_backend_support() {
    let r = rig_with(config(), false);
    let k = key("static");
    drop(ready(&r, &k).await);
    let err = r.activator.pause(&k).await.unwrap_err();
    assert!(
        matches!(err, ActivationError::Backend(BackendError::Unsupported(_))),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn admin_release_waits_for_a_running_claim() {
    let r = rig();
    r.backend.script().claim_delay = Duration::from_secs(1);
    let k = key("claiming");
    let a = r.activator.clone();
    let k2 = k.clone();
    let req = tokio::spawn(async move { a.acquire(&k2).await });
    settle().await;
    assert_eq!(state(&r, &k), "activating");
    assert!(r.activator.release(&k).await.unwrap());
    assert!(
        req.await.unwrap().is_ok(),
        "the queued request was served first"
    );
    assert_eq!(state(&r, &k), "none");
}

#[tokio::test(start_paused = true)]
async fn recovered_bindings_attach_by_id_and_by_hash() {
    let r = rig();
    let by_id = key("known-id");
    let by_hash = key("hashed-id");
    let mut hash = by_hash.sha256_hex();
    hash.truncate(40);
    r.backend.script().recovered = vec![
        crate::backend::RecoveredBinding {
            session: Some(by_id.clone()),
            session_hash: by_id.sha256_hex(),
            sandbox: SandboxId::new("sbx-7"),
            endpoint: Some(ScriptedBackend::endpoint_of(7)),
            paused: false,
        },
        crate::backend::RecoveredBinding {
            session: None,
            session_hash: hash,
            sandbox: SandboxId::new("sbx-8"),
            endpoint: None,
            paused: true,
        },
    ];
    assert_eq!(r.activator.recover().await.unwrap(), 2);
    let lease = r
        .activator
        .try_acquire_ready(&by_id)
        .expect("ready after recovery");
    assert_eq!(lease.sandbox.as_str(), "sbx-7");
    assert_eq!(state(&r, &by_hash), "none", "unknown until it shows up");
    let lease = ready(&r, &by_hash).await;
    assert_eq!(lease.sandbox.as_str(), "sbx-8");
    assert_eq!(lease.activation, ActivationKind::Resume);
    assert_eq!(ScriptedBackend::count(&r.backend.claims), 0);
}

#[tokio::test(start_paused = true)]
async fn activity_is_reported_while_traffic_flows() {
    let r = rig();
    let k = key("activity");
    let stream = ready(&r, &k).await;
    sleep(Duration::from_secs(5)).await;
    let seen = ScriptedBackend::count(&r.backend.activity);
    assert!((4..=6).contains(&seen), "about once a second: {seen}");
    drop(stream);
    sleep(Duration::from_secs(2)).await;
    let after = ScriptedBackend::count(&r.backend.activity);
    sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ScriptedBackend::count(&r.backend.activity),
        after,
        "idle: no reports"
    );
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

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_requests_to_a_paused_session_make_one_resume() {
    let r = rig();
    r.backend.script().resume_delay = Duration::from_millis(300);
    let k = key("paused-burst");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "paused");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let a = r.activator.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move { a.acquire(&k).await }));
    }
    for t in tasks {
        let lease = t.await.unwrap().expect("lease");
        assert_eq!(lease.activation, ActivationKind::Resume);
        assert_eq!(lease.waited, Duration::from_millis(300));
    }
    assert_eq!(ScriptedBackend::count(&r.backend.resumes), 1);
    assert_eq!(
        r.metrics
            .activations_total
            .with_label_values(&["resume", "ok"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn loss_during_a_resume_is_not_trusted_away() {
    let r = rig();
    r.backend.script().resume_delay = Duration::from_secs(1);
    let k = key("lost-mid-resume");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    sleep(Duration::from_secs(12)).await;
    assert_eq!(state(&r, &k), "paused");
    let a = r.activator.clone();
    let k2 = k.clone();
    let req = tokio::spawn(async move { a.acquire(&k2).await });
    settle().await;
    assert_eq!(state(&r, &k), "resuming");
    lose(&r, &sandbox);
    let err = req.await.unwrap().unwrap_err();
    assert!(matches!(err, ActivationError::SandboxLost), "{err:?}");
    assert_eq!(r.metrics.sessions_lost_total.get(), 1);
    assert_eq!(ready(&r, &k).await.activation, ActivationKind::Claim);
}
