//! The Kubernetes backend through a real kube client over HTTP against kube-testbed, with
//! demo-sandbox processes as pods: claims, cold creates, suspend/resume, two replicas,
//! restart recovery, OpenKruise, warm-pool scaling.

#[path = "support/kube.rs"]
mod kube_support;

use std::time::Duration;

use agent_activator::backend::kubernetes::{SESSION_ID_ANNOTATION, SESSION_LABEL};
use agent_activator::backend::{ActivationKind, BackendError, BackendEvent, SandboxBackend};
use kube_support::*;

#[tokio::test]
async fn claims_a_warm_sandbox_and_the_pool_refills() {
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "default", 2).unwrap();
    wait_pods(&tb, 2).await;
    let mut cfg = config("agent-sandbox", "default", "");
    cfg.backend.kubernetes.write_session_id = false;
    let b = backend(&tb, &cfg);

    let k = key("alpha");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Claim);
    assert!(got.sandbox.as_str().starts_with("default-"), "{got:?}");
    let pod = tb
        .pods()
        .into_iter()
        .find(|p| p.sandbox == got.sandbox.as_str())
        .unwrap();
    assert_eq!(got.endpoint.port(), pod.port);
    let (status, state, _) = kube_support::http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    assert_eq!(state["pid"].as_u64().map(|p| p as u32), pod.pid);

    // One claim, named by the hash, labelled, without the raw ID.
    let claims = tb.list(AGENT_SANDBOX, "SandboxClaim", "default");
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];
    assert_eq!(claim["metadata"]["name"], b.claim_name(&k).as_str());
    assert_eq!(
        claim["metadata"]["labels"][SESSION_LABEL].as_str().unwrap(),
        &k.sha256_hex()[..32]
    );
    assert!(
        claim["metadata"]["annotations"]
            .get(SESSION_ID_ANNOTATION)
            .is_none()
    );
    assert!(!claim.to_string().contains("alpha"));

    // The pool is back to two unclaimed sandboxes (three pods in all).
    wait_pods(&tb, 3).await;

    b.release(&k, &got.sandbox).await.unwrap();
    wait_pods(&tb, 2).await;
    assert!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").is_empty());
}

#[tokio::test]
async fn cold_creates_when_the_pool_is_empty() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 0).unwrap();
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let k = key("cold");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Create);
    assert_eq!(got.sandbox.as_str(), b.claim_name(&k));
    let (status, _, _) = kube_support::http(got.endpoint, "GET", "/healthz", None).await;
    assert_eq!(status, 200);

    // Someone deletes the Sandbox itself: the session's sandbox is lost.
    let mut events = b.subscribe();
    let sandboxes = tb.resource("agents.x-k8s.io", "Sandbox");
    tb.store
        .delete(sandboxes, "default", got.sandbox.as_str())
        .unwrap();
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, BackendEvent::Lost { ref sandbox, .. } if *sandbox == got.sandbox),
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_claim_nobody_binds_in_time_is_no_capacity_and_is_cleaned_up() {
    // The controller takes 3 s to bind; the admission budget is 300 ms.
    let tb = testbed(Duration::from_secs(3)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let deadline = tokio::time::Instant::now();
    let budget = agent_activator::backend::ClaimBudget {
        admission_deadline: deadline + Duration::from_millis(300),
        deadline: deadline + WAIT,
    };
    let err = b.claim(&key("impatient"), budget).await.unwrap_err();
    assert!(matches!(err, BackendError::NoCapacity(_)), "{err:?}");
    assert!(
        deadline.elapsed() < Duration::from_secs(2),
        "{:?}",
        deadline.elapsed()
    );
    // The claim it created is deleted, so the warm sandbox is not taken by nobody.
    wait_until(&tb, "the abandoned claim is deleted", |tb| {
        tb.list(AGENT_SANDBOX, "SandboxClaim", "default").is_empty()
    })
    .await;
    assert_eq!(tb.pods().len(), 1);
}

#[tokio::test]
async fn an_unreachable_api_server_fails_claims_within_the_budget() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
}

#[tokio::test]
async fn suspend_then_resume_moves_to_a_new_pod() {
    let tb = testbed(Duration::ZERO).await;
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
    let sandbox = tb
        .list("agents.x-k8s.io", "Sandbox", "default")
        .into_iter()
        .find(|s| s["metadata"]["name"] == got.sandbox.as_str())
        .unwrap();
    assert_eq!(sandbox["spec"]["operatingMode"], "Suspended");
    assert!(!tb.pods().iter().any(|p| p.sandbox == got.sandbox.as_str()));

    let endpoint = b
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    let (status, after, _) = kube_support::http(endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    // A new pod: another process, memory gone (agent-sandbox suspend deletes the pod).
    assert_ne!(after["pid"], before["pid"]);
    assert_eq!(after["counter"], 0);
    // Ready is authoritative even though the stale Suspended condition lingers.
    let sandbox = tb
        .list("agents.x-k8s.io", "Sandbox", "default")
        .into_iter()
        .find(|s| s["metadata"]["name"] == got.sandbox.as_str())
        .unwrap();
    assert!(
        sandbox["status"]["conditions"]
            .to_string()
            .contains("Suspended")
    );
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

    // B serves traffic: its stamp on the claim makes A's pause refuse.
    b.record_activity(&k, &rb.sandbox);
    wait_until(&tb, "B's activity stamp", |tb| {
        tb.list(AGENT_SANDBOX, "SandboxClaim", "default")[0]["metadata"]["annotations"]
            ["agent-activator.dev/last-activity"]
            .as_str()
            .is_some_and(|s| s.ends_with(b.replica()))
    })
    .await;
    let err = a.pause(&ra.sandbox).await.unwrap_err();
    assert!(matches!(err, BackendError::Busy(_)), "{err:?}");

    // B pauses (its own stamp does not block it); A hears about it.
    let mut a_events = a.subscribe();
    b.pause(&rb.sandbox).await.unwrap();
    let ev = tokio::time::timeout(WAIT, a_events.recv())
        .await
        .unwrap()
        .unwrap();
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
    let ev = tokio::time::timeout(WAIT, b_events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        BackendEvent::Resumed {
            sandbox,
            endpoint: e,
        } => {
            assert_eq!(sandbox, rb.sandbox);
            assert_eq!(e, endpoint);
        }
        other => panic!("expected Resumed, got {other:?}"),
    }

    // Someone else deletes the claim: both hear Lost.
    let mut a_events = a.subscribe();
    let claims = tb.resource(AGENT_SANDBOX, "SandboxClaim");
    tb.store
        .delete(claims, "default", &a.claim_name(&k))
        .unwrap();
    let ev = tokio::time::timeout(WAIT, a_events.recv())
        .await
        .unwrap()
        .unwrap();
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

    // Claiming again adopts: the running one as is, the paused one with a resume.
    let again = second.claim(&running, budget(WAIT)).await.unwrap();
    assert_eq!((again.sandbox, again.endpoint), (r1.sandbox, r1.endpoint));
    let thawed = second.claim(&paused, budget(WAIT)).await.unwrap();
    assert_eq!(thawed.kind, ActivationKind::Resume);
    assert_eq!(thawed.sandbox, p1.sandbox);
    assert_eq!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").len(), 2);
}

#[tokio::test]
async fn openkruise_claim_pause_resume_release() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let k = key("kruise");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Claim);
    let claim = &tb.list(KRUISE, "SandboxClaim", "default")[0];
    assert_eq!(claim["spec"]["templateName"], "pool");
    let (_, before, _) = kube_support::http(got.endpoint, "GET", "/state", None).await;

    b.pause(&got.sandbox).await.unwrap();
    let sbx = tb
        .list(KRUISE, "Sandbox", "default")
        .into_iter()
        .find(|s| s["metadata"]["name"] == got.sandbox.as_str())
        .unwrap();
    assert_eq!(sbx["spec"]["paused"], true);
    assert_eq!(sbx["status"]["phase"], "Paused");

    let endpoint = b
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    let (status, after, _) = kube_support::http(endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    assert_ne!(after["pid"], before["pid"]);

    b.release(&k, &got.sandbox).await.unwrap();
    assert!(tb.list(KRUISE, "SandboxClaim", "default").is_empty());
}

#[tokio::test]
async fn warm_pool_target_goes_through_scale() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    b.set_warm_pool_target(3).await.unwrap();
    let pool = &tb.list(AGENT_SANDBOX, "SandboxWarmPool", "default")[0];
    assert_eq!(pool["spec"]["replicas"], 3);
    wait_pods(&tb, 3).await;

    let kb = tb_openkruise_scale().await;
    assert_eq!(kb, 2);
}

/// The same through OpenKruise's SandboxSet.
async fn tb_openkruise_scale() -> i64 {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "set", 0).unwrap();
    let b = backend(&tb, &config("openkruise", "set", ""));
    b.set_warm_pool_target(2).await.unwrap();
    tb.list(KRUISE, "SandboxSet", "default")[0]["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn api_errors_are_retried_inside_the_budget_then_reported() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    // 500s and 429s on the create and the pause are absorbed by retries.
    tb.faults
        .fail_next_matching(3, 500, "POST", "sandboxclaims");
    let got = b.claim(&key("flaky"), budget(WAIT)).await.unwrap();
    assert_eq!(tb.faults.pending(), 0);
    tb.faults.fail_next_matching(2, 429, "PATCH", "/sandboxes/");
    tb.faults
        .fail_next_matching(2, 503, "GET", "sandboxclaims/");
    b.pause(&got.sandbox).await.unwrap();
    assert_eq!(tb.faults.pending(), 0);

    // An API server that keeps failing: a clear ControlPlane error, within the budget.
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

    // Every watch is cut and history compacted: resuming from the old resourceVersion
    // gets 410 Gone, so the watchers must relist. Meanwhile the next watch attempts fail.
    tb.faults.fail_next_matching(2, 500, "GET", "/sandboxes");
    tb.faults.drop_watches();
    tb.store.compact();
    other.pause(&got.sandbox).await.unwrap();

    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, BackendEvent::Paused { ref sandbox } if *sandbox == got.sandbox),
        "{ev:?}"
    );
    assert!(tb.store.expired_watches() >= 1, "no watch saw 410 Gone");
    // The relisted cache serves new claims and resumes.
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

/// A pause strategy that counts calls and delegates to the default spec suspend.
struct CountingPause {
    calls: std::sync::atomic::AtomicU32,
    inner: agent_activator::backend::kubernetes::pause::SpecSuspend,
}

#[async_trait::async_trait]
impl agent_activator::backend::kubernetes::pause::PauseStrategy for CountingPause {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn keeps(&self) -> &'static str {
        "whatever the test says"
    }

    async fn set_paused(
        &self,
        api: &agent_activator::backend::kubernetes::api::ApiSet,
        sandbox: &str,
        paused: bool,
        deadline: tokio::time::Instant,
    ) -> Result<(), BackendError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.set_paused(api, sandbox, paused, deadline).await
    }
}

#[tokio::test]
async fn the_pause_step_is_pluggable() {
    use agent_activator::backend::kubernetes::flavour::Flavour;
    use agent_activator::backend::kubernetes::pause::SpecSuspend;
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let strategy = std::sync::Arc::new(CountingPause {
        calls: Default::default(),
        inner: SpecSuspend::new(Flavour::AgentSandbox),
    });
    let b =
        backend(&tb, &config("agent-sandbox", "default", "")).with_pause_strategy(strategy.clone());
    assert_eq!(b.capabilities().pause_keeps, "whatever the test says");
    let got = b.claim(&key("plug"), budget(WAIT)).await.unwrap();
    b.pause(&got.sandbox).await.unwrap();
    b.resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    assert_eq!(strategy.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
