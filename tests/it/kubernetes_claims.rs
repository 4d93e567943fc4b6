//! The Kubernetes backend's claims against kube-testbed: OpenKruise (binding by label,
//! release deletes the Sandbox, no TTL cut), claims it refuses to adopt, the leak
//! backstop on both flavours, and the pluggable pause step.

use crate::kube_support;

use std::time::Duration;

use agent_activator::backend::kubernetes::{KubernetesBackend, SESSION_LABEL};
use agent_activator::backend::{ActivationKind, BackendError, BackendEvent, SandboxBackend};
use kube_support::*;
use serde_json::json;

fn expiry(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("no time: {v}")))
        .unwrap()
        .with_timezone(&chrono::Utc)
}

fn secs_from_now(t: chrono::DateTime<chrono::Utc>) -> i64 {
    (t - chrono::Utc::now()).num_seconds()
}

#[tokio::test]
async fn openkruise_binds_by_label_pauses_resumes_and_release_deletes_the_sandbox() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let k = key("kruise");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Claim);
    let claim = object(&tb, KRUISE, "SandboxClaim", &b.claim_name(&k)).unwrap();
    assert_eq!(claim["spec"]["templateName"], "pool");
    // A live session's claim is never deleted by TTL, and it carries the backstop.
    assert_eq!(claim["spec"]["ttlAfterCompleted"], "-1s");
    assert!(secs_from_now(expiry(&claim["spec"]["shutdownTime"])) > 3600);
    // The binding came from the Sandbox's label and owner: the claim never names it.
    let sbx = object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).unwrap();
    assert_eq!(
        sbx["metadata"]["labels"]["agents.kruise.io/claim-name"],
        b.claim_name(&k).as_str()
    );
    assert_eq!(
        sbx["metadata"]["annotations"]["agents.kruise.io/owner"],
        claim["metadata"]["uid"]
    );
    assert!(
        !claim["status"].to_string().contains(got.sandbox.as_str()),
        "{claim}"
    );
    let (_, before, _) = kube_support::http(got.endpoint, "GET", "/state", None).await;

    b.pause(&got.sandbox).await.unwrap();
    let sbx = object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).unwrap();
    assert_eq!(sbx["spec"]["paused"], true);
    // Paused once the pod is gone; `podInfo` still names it (upstream ensureStopPaused
    // only sets SandboxPaused=True): the activator does not read it as serving.
    assert_eq!(sbx["status"]["phase"], "Paused", "{sbx}");
    assert!(sbx["status"]["podInfo"]["podIP"].is_string(), "{sbx}");

    let endpoint = b
        .resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    let (status, after, _) = kube_support::http(endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
    assert_ne!(after["pid"], before["pid"]);

    // Release deletes the Sandbox itself (a claimed Sandbox has no owner to collect it)
    // and the claim.
    b.release(&k, &got.sandbox).await.unwrap();
    assert!(object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).is_none());
    assert!(tb.list(KRUISE, "SandboxClaim", "default").is_empty());
}

#[tokio::test]
async fn openkruise_cold_creates_without_stock_and_a_deleted_claim_does_not_lose_the_session() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "pool", 0).unwrap();
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let k = key("kruise-cold");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    let (status, _, _) = kube_support::http(got.endpoint, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let sbx = object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).unwrap();
    assert_eq!(
        sbx["metadata"]["labels"]["agents.kruise.io/sandbox-claimed"],
        "true"
    );
    // The claim's shutdownTime went onto the Sandbox (the OpenKruise claim copies it).
    assert!(secs_from_now(expiry(&sbx["spec"]["shutdownTime"])) > 3600);
}

#[tokio::test]
async fn a_foreign_claim_with_the_sessions_name_is_refused_not_adopted() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let k = key("squatted");
    let claims = tb.resource(AGENT_SANDBOX, "SandboxClaim");
    // Someone with create rights in the namespace pre-creates the session's claim: once
    // without our labels, once with our managed-by label but another session's hash.
    tb.store
        .create(
            claims,
            "default",
            json!({
                "metadata": {"name": b.claim_name(&k), "labels": {SESSION_LABEL: &k.sha256_hex()[..32]}},
                "spec": {"warmPoolRef": {"name": "default"}},
            }),
        )
        .unwrap();
    let err = b.claim(&k, budget(WAIT)).await.unwrap_err();
    assert!(
        matches!(err, BackendError::Conflict(ref c) if *c == b.claim_name(&k)),
        "{err:?}"
    );
    let k2 = key("squatted-too");
    let other = key("someone-else").sha256_hex();
    tb.store
        .create(
            claims,
            "default",
            json!({
                "metadata": {
                    "name": b.claim_name(&k2),
                    "labels": {SESSION_LABEL: &k2.sha256_hex()[..32], "app.kubernetes.io/managed-by": "agent-activator"},
                    "annotations": {"agent-activator.dev/session-sha256": other},
                },
                "spec": {"warmPoolRef": {"name": "default"}},
            }),
        )
        .unwrap();
    let err = b.claim(&k2, budget(WAIT)).await.unwrap_err();
    assert!(matches!(err, BackendError::Conflict(_)), "{err:?}");
    // Neither claim was changed or deleted by the activator (a create may have been
    // tried and refused with AlreadyExists; nothing else was written).
    let after = tb.list(AGENT_SANDBOX, "SandboxClaim", "default");
    assert_eq!(after.len(), 2);
    for c in &after {
        assert_eq!(c["metadata"]["generation"], 1, "{c}");
        assert!(
            c["metadata"]["annotations"]
                .get("agent-activator.dev/pausing")
                .is_none()
        );
    }
    let writes: Vec<_> = tb
        .audit
        .snapshot()
        .into_keys()
        .filter(|(v, _, r)| {
            r == "sandboxclaims" && matches!(v.as_str(), "patch" | "update" | "delete")
        })
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test]
async fn a_claim_created_concurrently_by_another_replica_is_adopted() {
    let tb = testbed(Duration::from_millis(50)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("agent-sandbox", "default", "");
    let (a, b) = (backend(&tb, &cfg), backend(&tb, &cfg));
    let k = key("both");
    // Both caches are empty: one create wins, the other gets AlreadyExists and adopts.
    let (ra, rb) = tokio::join!(a.claim(&k, budget(WAIT)), b.claim(&k, budget(WAIT)));
    assert_eq!(ra.unwrap().sandbox, rb.unwrap().sandbox);
}

/// A config whose claims expire `after` past the last traffic.
fn backstop_config(api: &str, pool: &str, after: u64) -> agent_activator::config::Config {
    let mut c = config(api, pool, "");
    c.backend.kubernetes.shutdown_after = agent_activator::config::Dur::secs(after);
    c
}

#[tokio::test]
async fn the_leak_backstop_moves_with_traffic_and_ends_abandoned_agent_sandbox_claims() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &backstop_config("agent-sandbox", "default", 6));
    let k = key("backstopped");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    let name = b.claim_name(&k);
    let first = expiry(
        &object(&tb, AGENT_SANDBOX, "SandboxClaim", &name).unwrap()["spec"]["lifecycle"]["shutdownTime"],
    );
    assert!((4..=6).contains(&secs_from_now(first)), "{first}");

    // Traffic after more than half the horizon: one push to a full horizon from now.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    b.record_activity(&k, &got.sandbox);
    b.refresh_backstops().await;
    let moved = expiry(
        &object(&tb, AGENT_SANDBOX, "SandboxClaim", &name).unwrap()["spec"]["lifecycle"]["shutdownTime"],
    );
    assert!(moved > first, "{first} -> {moved}");
    assert!((4..=6).contains(&secs_from_now(moved)), "{moved}");

    // No more traffic (the activator could be dead): the controller ends the claim, and
    // the Sandbox goes with it.
    let mut events = b.subscribe();
    let ev = next_event(&mut events).await;
    assert!(
        matches!(ev, BackendEvent::Lost { ref sandbox, .. } if *sandbox == got.sandbox),
        "{ev:?}"
    );
    wait_until(&tb, "the expired claim's Sandbox is collected", |tb| {
        object(tb, "agents.x-k8s.io", "Sandbox", got.sandbox.as_str()).is_none()
    })
    .await;
}

#[tokio::test]
async fn the_openkruise_backstop_is_moved_on_the_sandbox() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &backstop_config("openkruise", "pool", 6));
    let k = key("kruise-backstop");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    let first = expiry(
        &object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).unwrap()["spec"]["shutdownTime"],
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    b.record_activity(&k, &got.sandbox);
    b.refresh_backstops().await;
    let moved = expiry(
        &object(&tb, KRUISE, "Sandbox", got.sandbox.as_str()).unwrap()["spec"]["shutdownTime"],
    );
    assert!(moved > first, "{first} -> {moved}");
    // Abandoned: the Sandbox is deleted at its shutdownTime.
    wait_until(&tb, "the abandoned Sandbox is deleted", |tb| {
        object(tb, KRUISE, "Sandbox", got.sandbox.as_str()).is_none()
    })
    .await;
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

    async fn pause(
        &self,
        cx: &agent_activator::backend::kubernetes::pause::PauseContext,
        sandbox: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), BackendError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.pause(cx, sandbox, deadline).await
    }

    async fn resume(
        &self,
        cx: &agent_activator::backend::kubernetes::pause::PauseContext,
        sandbox: &str,
        deadline: tokio::time::Instant,
    ) -> Result<std::net::SocketAddr, BackendError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.resume(cx, sandbox, deadline).await
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
    let b: KubernetesBackend =
        backend(&tb, &config("agent-sandbox", "default", "")).with_pause_strategy(strategy.clone());
    assert_eq!(b.capabilities().pause_keeps, "whatever the test says");
    let got = b.claim(&key("plug"), budget(WAIT)).await.unwrap();
    b.pause(&got.sandbox).await.unwrap();
    b.resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    assert_eq!(strategy.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
