//! The Kubernetes backend (agent-sandbox flavour) through a real kube client over HTTP
//! against kube-testbed, whose controller reproduces agent-sandbox `2fd412d55eca` step by
//! step, with demo-sandbox processes as pods on their own loopback addresses: warm
//! claims, cold creates, the adoption race, the suspend/resume condition sequence,
//! Unschedulable, Finished, two replicas, restart recovery. What the testbed itself
//! writes is pinned in tests/it/kubernetes_testbed_controller.rs.

use crate::kube_support;

use std::time::Duration;

use agent_activator::backend::kubernetes::{SESSION_ID_ANNOTATION, SESSION_LABEL};
use agent_activator::backend::{ActivationKind, BackendError, BackendEvent, SandboxBackend};
use kube_support::*;

const SANDBOX: &str = "agents.x-k8s.io";

#[tokio::test]
async fn claims_a_warm_sandbox_and_dials_pod_ip_and_the_configured_port() {
    // Pods listen on their own 127.x.y.z at 18080, as containers do on a cluster; the
    // backend is configured as in production (no port annotation honoured).
    let tb = testbed_with(|o| o.pod_port = 18080).await;
    tb.seed_agent_sandbox("default", "default", 2).unwrap();
    wait_pods(&tb, 2).await;
    let mut cfg = config("agent-sandbox", "default", "");
    cfg.backend.kubernetes.write_session_id = false;
    cfg.backend.kubernetes.port_from_annotation = false;
    cfg.backend.kubernetes.port = 18080;
    let b = backend(&tb, &cfg);

    let k = key("alpha");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Claim);
    let pod = tb
        .pods()
        .into_iter()
        .find(|p| p.sandbox == got.sandbox.as_str())
        .unwrap();
    assert_eq!(got.endpoint, pod.addr);
    assert_eq!(got.endpoint.port(), 18080);
    assert_ne!(got.endpoint.ip().to_string(), "127.0.0.1");
    let (status, state, _) = kube_support::http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    assert_eq!(state["pid"].as_u64().map(|p| p as u32), pod.pid);

    // One claim, named by the hash, labelled, without the raw ID, with the backstop.
    let claims = tb.list(AGENT_SANDBOX, "SandboxClaim", "default");
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];
    assert_eq!(claim["metadata"]["name"], b.claim_name(&k).as_str());
    assert_eq!(
        claim["metadata"]["labels"][SESSION_LABEL].as_str().unwrap(),
        &k.sha256_hex()[..32]
    );
    assert_eq!(
        claim["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "agent-activator"
    );
    assert!(
        claim["metadata"]["annotations"]
            .get(SESSION_ID_ANNOTATION)
            .is_none()
    );
    assert!(!claim.to_string().contains("alpha"));
    assert_eq!(claim["spec"]["lifecycle"]["shutdownPolicy"], "Delete");

    // The pool is back to two unclaimed sandboxes (three pods in all).
    wait_pods(&tb, 3).await;
    b.release(&k, &got.sandbox).await.unwrap();
    wait_pods(&tb, 2).await;
    assert!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").is_empty());
}

#[tokio::test]
async fn the_port_annotation_is_ignored_unless_enabled() {
    // The testbed's pods pick free ports and announce them by annotation.
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let pod = tb.pods()[0].clone();

    let mut strict = config("agent-sandbox", "default", "");
    strict.backend.kubernetes.port_from_annotation = false;
    strict.backend.kubernetes.port = 9;
    let b = backend(&tb, &strict);
    let got = b.claim(&key("strict"), budget(WAIT)).await.unwrap();
    assert_eq!(got.sandbox.as_str(), pod.sandbox);
    assert_eq!(got.endpoint.ip(), pod.addr.ip());
    assert_eq!(
        got.endpoint.port(),
        9,
        "the annotation must not choose the port"
    );

    let trusting = backend(&tb, &config("agent-sandbox", "default", ""));
    let again = trusting.claim(&key("strict"), budget(WAIT)).await.unwrap();
    assert_eq!(again.endpoint, pod.addr);
}

#[tokio::test]
async fn cold_creates_when_the_pool_is_empty_and_a_deleted_sandbox_is_lost() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 0).unwrap();
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let k = key("cold");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Create);
    assert_eq!(got.sandbox.as_str(), b.claim_name(&k));
    let (status, _, _) = kube_support::http(got.endpoint, "GET", "/healthz", None).await;
    assert_eq!(status, 200);

    let mut events = b.subscribe();
    let sandboxes = tb.resource(SANDBOX, "Sandbox");
    tb.store
        .delete(sandboxes, "default", got.sandbox.as_str())
        .unwrap();
    let ev = next_event(&mut events).await;
    assert!(
        matches!(ev, BackendEvent::Lost { ref sandbox, .. } if *sandbox == got.sandbox),
        "{ev:?}"
    );
}

#[tokio::test]
async fn two_claims_racing_for_the_last_warm_sandbox_never_share_it() {
    // Both claims are first seen in one controller pass, so both write the same
    // candidate into agents.x-k8s.io/sandbox-name; only one adoption wins. 400 ms
    // between steps keeps the loser's annotation up long enough that a backend trusting
    // it would route the loser's session into the winner's sandbox.
    let tb = testbed_with(|o| {
        o.bind_delay = Duration::from_millis(300);
        o.step_delay = Duration::from_millis(400);
    })
    .await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let (ka, kb) = (key("racer-a"), key("racer-b"));
    let (ra, rb) = tokio::join!(b.claim(&ka, budget(WAIT)), b.claim(&kb, budget(WAIT)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_ne!(ra.sandbox, rb.sandbox, "{ra:?} {rb:?}");
    assert_ne!(ra.endpoint, rb.endpoint);
    for (k, got) in [(&ka, &ra), (&kb, &rb)] {
        let claim = object(&tb, AGENT_SANDBOX, "SandboxClaim", &b.claim_name(k)).unwrap();
        let sandbox = object(&tb, SANDBOX, "Sandbox", got.sandbox.as_str()).unwrap();
        assert_eq!(
            sandbox["metadata"]["ownerReferences"][0]["uid"], claim["metadata"]["uid"],
            "{sandbox}"
        );
        assert_eq!(claim["status"]["sandbox"]["name"], got.sandbox.as_str());
    }
}

#[tokio::test]
async fn suspend_waits_for_the_pod_to_be_gone_and_resume_for_a_new_ready_pod() {
    // The pod keeps running (and its IP stays in status) for 600 ms after Ready goes
    // False/SandboxSuspended: the pause is complete only at Suspended=True/PodTerminated.
    let tb = testbed_with(|o| o.terminate_delay = Duration::from_millis(600)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let k = key("resumable");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    for _ in 0..3 {
        kube_support::http(got.endpoint, "POST", "/counter", None).await;
    }
    let (_, before, _) = kube_support::http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(before["counter"], 3);

    b.pause(&got.sandbox).await.unwrap();
    let sandbox = object(&tb, SANDBOX, "Sandbox", got.sandbox.as_str()).unwrap();
    assert_eq!(sandbox["spec"]["operatingMode"], "Suspended");
    assert!(sandbox["status"].get("podIPs").is_none(), "{sandbox}");
    // The old pod no longer answers when pause returns.
    assert!(
        tokio::net::TcpStream::connect(got.endpoint).await.is_err(),
        "the old pod still accepts connections after pause returned"
    );

    let endpoint = b
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    assert_ne!(
        endpoint, got.endpoint,
        "a resumed pod is a new pod with a new IP"
    );
    let (status, after, _) = kube_support::http(endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    assert_ne!(after["pid"], before["pid"]);
    assert_eq!(after["counter"], 0, "agent-sandbox suspend loses memory");
}

#[tokio::test]
async fn a_claim_nobody_binds_in_time_is_no_capacity_and_is_cleaned_up() {
    // The controller takes 3 s to act on a claim; the admission budget is 300 ms.
    let tb = testbed(Duration::from_secs(3)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let started = tokio::time::Instant::now();
    let budget = agent_activator::backend::ClaimBudget {
        admission_deadline: started + Duration::from_millis(300),
        deadline: started + WAIT,
    };
    let err = b.claim(&key("impatient"), budget).await.unwrap_err();
    assert!(matches!(err, BackendError::NoCapacity(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The claim it created is deleted, so the warm sandbox is not taken by nobody.
    wait_until(&tb, "the abandoned claim is deleted", |tb| {
        tb.list(AGENT_SANDBOX, "SandboxClaim", "default").is_empty()
    })
    .await;
    assert_eq!(tb.pods().len(), 1);
}

#[tokio::test]
async fn an_unanswering_api_server_fails_claims_within_the_budget() {
    // A listener that never accepts: held for the whole test, so no other process can
    // take the port meanwhile (binding, releasing and reusing a port races).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let cfg = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(cfg).unwrap();
    let kube = agent_activator::cluster::KubeContext::new(
        client,
        "default",
        agent_activator::cluster::ReplicaId::named("unreachable"),
    );
    let b = agent_activator::backend::kubernetes::KubernetesBackend::new(
        &kube,
        &config("agent-sandbox", "default", ""),
    );
    let started = tokio::time::Instant::now();
    let err = b
        .claim(&key("nowhere"), budget(Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::ControlPlane(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn an_unschedulable_pod_is_no_capacity_not_a_timeout() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 0).unwrap();
    tb.controller.as_ref().unwrap().set_capacity(Some(0));
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let started = tokio::time::Instant::now();
    let budget = agent_activator::backend::ClaimBudget {
        admission_deadline: started + Duration::from_millis(800),
        deadline: started + WAIT,
    };
    let err = b.claim(&key("no-room"), budget).await.unwrap_err();
    assert!(
        matches!(err, BackendError::NoCapacity(ref m) if m.contains("Unschedulable")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The claim it created is abandoned.
    wait_until(&tb, "the abandoned claim is deleted", |tb| {
        tb.list(AGENT_SANDBOX, "SandboxClaim", "default").is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_finished_pod_loses_the_session() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let got = b.claim(&key("doomed-pod"), budget(WAIT)).await.unwrap();
    let mut events = b.subscribe();
    let pid = tb
        .pods()
        .into_iter()
        .find(|p| p.sandbox == got.sandbox.as_str())
        .and_then(|p| p.pid)
        .unwrap();
    // The container process dies: pod Failed, Sandbox Finished=True.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let ev = next_event(&mut events).await;
    assert!(
        matches!(ev, BackendEvent::Lost { ref sandbox, ref reason } if *sandbox == got.sandbox && reason.contains("Finished")),
        "{ev:?}"
    );
    let err = b
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Lost(_)), "{err:?}");
}

#[tokio::test]
async fn two_replicas_share_one_claim_and_see_each_others_transitions() {
    let tb = testbed(Duration::from_millis(30)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("agent-sandbox", "default", "");
    let (a, b) = (backend(&tb, &cfg), backend(&tb, &cfg));
    let k = key("shared");
    let (ra, rb) = tokio::join!(a.claim(&k, budget(WAIT)), b.claim(&k, budget(WAIT)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.sandbox, rb.sandbox);
    assert_eq!(ra.endpoint, rb.endpoint);
    assert_eq!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").len(), 1);

    // B serves traffic: its activity digest lists the session, so A's pause refuses.
    b.record_activity(&k, &rb.sandbox);
    let hash = k.sha256_hex()[..16].to_owned();
    wait_until(&tb, "B's digest lists the session", |tb| {
        tb.list("", "ConfigMap", "default").iter().any(|cm| {
            cm["data"]["replica"] == b.replica()
                && cm["data"]["sessions"]
                    .as_str()
                    .is_some_and(|s| s.contains(&hash))
        })
    })
    .await;
    // A learns it through its digest watch (no API call of its own).
    tokio::time::timeout(WAIT, async {
        while !a.served_elsewhere(&k) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("A sees B's digest");
    let err = a.pause(&ra.sandbox).await.unwrap_err();
    assert!(matches!(err, BackendError::Busy(_)), "{err:?}");
    assert_eq!(
        object(&tb, SANDBOX, "Sandbox", ra.sandbox.as_str()).unwrap()["spec"]["operatingMode"]
            .as_str()
            .unwrap_or("Running"),
        "Running"
    );

    // B pauses (its own digest does not block it); A hears about it.
    let mut a_events = a.subscribe();
    b.pause(&rb.sandbox).await.unwrap();
    let ev = next_event(&mut a_events).await;
    assert!(
        matches!(ev, BackendEvent::Paused { ref sandbox } if *sandbox == ra.sandbox),
        "{ev:?}"
    );

    // A resumes; B hears the new address.
    let mut b_events = b.subscribe();
    let endpoint = a
        .resume(&ra.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    match next_event(&mut b_events).await {
        BackendEvent::Resumed {
            sandbox,
            endpoint: e,
        } => {
            assert_eq!(sandbox, rb.sandbox);
            assert_eq!(e, endpoint);
        }
        other => panic!("expected Resumed, got {other:?}"),
    }

    // Someone else deletes the claim: A hears Lost.
    let mut a_events = a.subscribe();
    let claims = tb.resource(AGENT_SANDBOX, "SandboxClaim");
    tb.store
        .delete(claims, "default", &a.claim_name(&k))
        .unwrap();
    let ev = next_event(&mut a_events).await;
    assert!(matches!(ev, BackendEvent::Lost { .. }), "{ev:?}");
}

#[tokio::test]
async fn a_restarted_replica_recovers_bindings_and_adopts_paused_sandboxes() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 2).unwrap();
    wait_pods(&tb, 2).await;
    let cfg = config("agent-sandbox", "default", "");
    let (running, paused) = (key("running"), key("paused"));
    let (r1, p1) = {
        let first = backend(&tb, &cfg);
        let r1 = first.claim(&running, budget(WAIT)).await.unwrap();
        let p1 = first.claim(&paused, budget(WAIT)).await.unwrap();
        first.pause(&p1.sandbox).await.unwrap();
        first.shutdown().await;
        (r1, p1)
    };

    let second = backend(&tb, &cfg);
    let mut rec = second.recover().await.unwrap();
    rec.sort_by(|a, b| a.sandbox.cmp(&b.sandbox));
    assert_eq!(rec.len(), 2);
    let r = rec.iter().find(|r| r.sandbox == r1.sandbox).unwrap();
    assert_eq!(r.session.as_ref(), Some(&running));
    assert_eq!(r.session_hash, running.sha256_hex());
    assert_eq!(r.endpoint, Some(r1.endpoint));
    assert!(!r.paused);
    let p = rec.iter().find(|r| r.sandbox == p1.sandbox).unwrap();
    assert!(p.paused);
    assert_eq!(p.endpoint, None);

    let again = second.claim(&running, budget(WAIT)).await.unwrap();
    assert_eq!((again.sandbox, again.endpoint), (r1.sandbox, r1.endpoint));
    let thawed = second.claim(&paused, budget(WAIT)).await.unwrap();
    assert_eq!(thawed.kind, ActivationKind::Resume);
    assert_eq!(thawed.sandbox, p1.sandbox);
    assert_eq!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").len(), 2);
}

#[tokio::test]
async fn warm_pool_target_goes_through_scale() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    b.set_warm_pool_target(3).await.unwrap();
    let pool = object(&tb, AGENT_SANDBOX, "SandboxWarmPool", "default").unwrap();
    assert_eq!(pool["spec"]["replicas"], 3);
    wait_pods(&tb, 3).await;
    let scale = tb
        .audit
        .snapshot()
        .into_iter()
        .filter(|((v, _, r), _)| v == "patch" && r == "sandboxwarmpools/scale")
        .count();
    assert_eq!(scale, 1, "the write went through /scale");
}

#[tokio::test]
async fn api_errors_are_retried_inside_the_budget_then_reported() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    tb.faults
        .fail_next_matching(3, 500, "POST", "sandboxclaims");
    let got = b.claim(&key("flaky"), budget(WAIT)).await.unwrap();
    assert_eq!(tb.faults.pending(), 0);
    tb.faults.fail_next_matching(2, 429, "PATCH", "/sandboxes/");
    tb.faults
        .fail_next_matching(2, 503, "GET", "sandboxclaims/");
    b.pause(&got.sandbox).await.unwrap();
    assert_eq!(tb.faults.pending(), 0);

    tb.faults
        .fail_next_matching(10_000, 500, "POST", "sandboxclaims");
    let started = tokio::time::Instant::now();
    let err = b
        .claim(&key("doomed"), budget(Duration::from_millis(800)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::ControlPlane(ref m) if m.contains("500")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    tb.faults.clear();
}

#[tokio::test]
async fn dropped_watches_and_410_gone_relist_and_keep_events_flowing() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("agent-sandbox", "default", "");
    let (a, other) = (backend(&tb, &cfg), backend(&tb, &cfg));
    let k = key("watched");
    let got = a.claim(&k, budget(WAIT)).await.unwrap();
    other.claim(&k, budget(WAIT)).await.unwrap();
    let mut events = a.subscribe();

    tb.faults.fail_next_matching(2, 500, "GET", "/sandboxes");
    tb.faults.drop_watches();
    tb.store.compact();
    other.pause(&got.sandbox).await.unwrap();

    let ev = next_event(&mut events).await;
    assert!(
        matches!(ev, BackendEvent::Paused { ref sandbox } if *sandbox == got.sandbox),
        "{ev:?}"
    );
    assert!(tb.store.expired_watches() >= 1, "no watch saw 410 Gone");
    let endpoint = a
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    let (status, _, _) = kube_support::http(endpoint, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let second = a.claim(&key("after-relist"), budget(WAIT)).await.unwrap();
    let (status, _, _) = kube_support::http(second.endpoint, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
}
