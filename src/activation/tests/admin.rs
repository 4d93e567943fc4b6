//! Admin operations and shutdown.

use super::*;

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
