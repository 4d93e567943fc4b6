//! Idleness by deadline, the sandbox index and the incremental gauges, against a scan of
//! the table (the answer they replace).

use super::*;
use crate::lock::MutexExt;

/// Counts per state by scanning every entry: what the incremental gauges must equal.
fn scanned_counts(r: &Rig) -> Vec<(&'static str, i64)> {
    let mut counts: Vec<(&'static str, i64)> = r
        .activator
        .session_counts()
        .into_iter()
        .map(|(l, _)| (l, 0))
        .collect();
    for info in r.activator.sessions() {
        counts.iter_mut().find(|(l, _)| *l == info.state).unwrap().1 += 1;
    }
    counts
}

fn count(r: &Rig, state: &str) -> i64 {
    let counts = r.activator.session_counts();
    assert_eq!(counts, scanned_counts(r), "gauges equal a scan");
    counts.iter().find(|(l, _)| *l == state).unwrap().1
}

#[tokio::test(start_paused = true)]
async fn each_session_is_paused_at_its_own_deadline() {
    let r = rig();
    // Ready at t=0, 3 and 6 s; idle.timeout is 10 s.
    let keys: Vec<SessionKey> = (0..3).map(|i| key(&format!("staggered-{i}"))).collect();
    for k in &keys {
        drop(ready(&r, k).await);
        sleep(Duration::from_secs(3)).await;
    }
    // t = 9 s: nobody is due yet.
    assert_eq!(count(&r, "active"), 3);
    assert_eq!(r.activator.active_sessions(), 3);
    let mut at = 9.0;
    for (i, k) in keys.iter().enumerate() {
        let due = 10.0 + 3.0 * i as f64;
        // Just before its deadline: still active; just after: paused.
        sleep(Duration::from_secs_f64(due - 0.01 - at)).await;
        assert_eq!(state(&r, k), "active", "session {i} before {due} s");
        sleep(Duration::from_millis(20)).await;
        at = due + 0.01;
        assert_eq!(state(&r, k), "paused", "session {i} after {due} s");
        assert_eq!(count(&r, "paused"), i as i64 + 1);
        assert_eq!(r.activator.active_sessions(), 2 - i);
    }
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 3);
}

#[tokio::test(start_paused = true)]
async fn a_request_pushes_the_deadline_back() {
    let r = rig();
    let k = key("pushed");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(8)).await;
    drop(r.activator.try_acquire_ready(&k).expect("fast path"));
    // The first deadline (10 s) finds it 2 s idle and moves it to 18 s.
    sleep(Duration::from_millis(9_900)).await;
    assert_eq!(state(&r, &k), "active");
    sleep(Duration::from_millis(200)).await;
    assert_eq!(state(&r, &k), "paused");
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 1);
}

#[tokio::test(start_paused = true)]
async fn keep_policy_counts_active_again_on_traffic() {
    let mut c = config();
    c.idle.policy = Some(IdlePolicy::Keep);
    let r = rig_with(c, true);
    let k = key("kept");
    drop(ready(&r, &k).await);
    sleep(Duration::from_secs(11)).await;
    assert_eq!(state(&r, &k), "active");
    assert_eq!(r.activator.active_sessions(), 0, "idle past its window");
    let permit = r.activator.try_acquire_ready(&k).expect("fast path");
    assert_eq!(
        r.activator.active_sessions(),
        1,
        "counted at once, not at a sweep"
    );
    drop(permit);
    sleep(Duration::from_secs(21)).await;
    assert_eq!(r.activator.active_sessions(), 0);
    assert_eq!(ScriptedBackend::count(&r.backend.pauses), 0);
}

#[tokio::test(start_paused = true)]
async fn ttl_and_forgetting_follow_their_deadlines() {
    let mut c = config();
    c.idle.session_ttl = crate::config::Dur::secs(30);
    let r = rig_with(c, true);
    let k = key("ttl");
    let sandbox = ready(&r, &k).await.sandbox.clone();
    sleep(Duration::from_millis(10_100)).await;
    assert_eq!(state(&r, &k), "paused");
    sleep(Duration::from_secs(29)).await;
    assert_eq!(state(&r, &k), "paused");
    sleep(Duration::from_secs(2)).await;
    assert_eq!(state(&r, &k), "none", "released 30 s after the pause");
    assert!(
        r.backend
            .released
            .lock_recovered()
            .contains(&(k.clone(), sandbox))
    );
    assert_eq!(count(&r, "paused"), 0);
    assert_eq!(r.activator.session_total(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_backend_event_reaches_only_the_sessions_on_its_sandbox() {
    let r = rig();
    let keys: Vec<SessionKey> = (0..50).map(|i| key(&format!("many-{i}"))).collect();
    let mut sandboxes = Vec::new();
    for k in &keys {
        sandboxes.push(ready(&r, k).await.sandbox.clone());
    }
    r.backend
        .events
        .send(BackendEvent::Lost {
            sandbox: sandboxes[17].clone(),
            reason: "crashed".into(),
        })
        .unwrap();
    settle().await;
    for (i, k) in keys.iter().enumerate() {
        let want = if i == 17 { "lost" } else { "active" };
        assert_eq!(state(&r, k), want, "session {i}");
    }
    assert_eq!(count(&r, "lost"), 1);
    assert_eq!(count(&r, "active"), 49);
    // The dead sandbox left the index: a second event for it changes nothing.
    r.backend
        .events
        .send(BackendEvent::Lost {
            sandbox: sandboxes[17].clone(),
            reason: "again".into(),
        })
        .unwrap();
    settle().await;
    assert_eq!(r.metrics.sessions_lost_total.get(), 1);
    // A paused-elsewhere event moves only its own session too.
    r.backend
        .events
        .send(BackendEvent::Paused {
            sandbox: sandboxes[3].clone(),
        })
        .unwrap();
    settle().await;
    assert_eq!(state(&r, &keys[3]), "paused");
    assert_eq!(count(&r, "paused"), 1);
    assert_eq!(count(&r, "active"), 48);
}

#[tokio::test(start_paused = true)]
async fn gauges_follow_every_transition() {
    let mut c = config();
    c.activation.on_sandbox_loss = OnSandboxLoss::Reclaim;
    let r = rig_with(c, true);
    r.backend.script().claim_delay = Duration::from_millis(100);
    let a = key("gauge-a");
    let b = key("gauge-b");
    let act = r.activator.clone();
    let a2 = a.clone();
    let pending = tokio::spawn(async move { act.acquire(&a2).await });
    settle().await;
    assert_eq!(count(&r, "activating"), 1);
    drop(pending.await.unwrap().expect("claimed"));
    let sb = ready(&r, &b).await.sandbox.clone();
    assert_eq!(count(&r, "active"), 2);
    r.backend
        .events
        .send(BackendEvent::Lost {
            sandbox: sb,
            reason: "crashed".into(),
        })
        .unwrap();
    settle().await;
    assert_eq!(count(&r, "unbound"), 1);
    assert!(r.activator.release(&a).await.unwrap());
    assert_eq!(count(&r, "active"), 0);
    assert!(ready(&r, &b).await.state_lost);
    assert_eq!(count(&r, "active"), 1);
    assert_eq!(count(&r, "unbound"), 0);
}
