//! Sandbox loss (both policies), events from other replicas, and restart recovery.

use super::*;
use crate::lock::MutexExt;

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
            .lock_recovered()
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
