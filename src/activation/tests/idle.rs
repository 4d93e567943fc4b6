//! Idle policy tests: pause/resume, leases holding sessions, Busy, TTL, release, keep, activity reports.

use super::*;
use crate::lock::MutexExt;

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
        *r.backend.released.lock_recovered(),
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
    assert_eq!(r.backend.released.lock_recovered().len(), 1);
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
