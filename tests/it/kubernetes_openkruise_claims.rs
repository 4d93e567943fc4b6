//! OpenKruise claims as its claim controller makes them (issue 21 items 3-4), against
//! kube-testbed: the Sandbox is locked (claim-name label, owner annotation) before
//! post-processing (runtime init with `envVars`, CSI mounts) runs, and only a claim the
//! controller has *counted* is bound; the claim's `waitReadyTimeout` and `claimTimeout` come
//! from the activator's budgets; and the Sandbox controller's own rules the activator
//! relies on (pause of Running sandboxes only, `podInfo` left stale after a pause, Failed
//! sandboxes not deleted at `shutdownTime`).

use crate::kube_support;

use std::time::Duration;

use agent_activator::backend::{BackendError, ClaimSpec, SandboxBackend};
use agent_activator::customize::SpecEnv;
use kube_support::*;
use serde_json::json;
use tokio::time::Instant;

fn env_spec() -> ClaimSpec {
    ClaimSpec {
        env: vec![SpecEnv {
            name: "REGION".into(),
            value: "eu-west".into(),
            container_name: None,
        }],
        ..ClaimSpec::default()
    }
}

fn claimed_replicas(tb: &kube_testbed::Testbed, claim: &str) -> i64 {
    object(tb, KRUISE, "SandboxClaim", claim)
        .and_then(|c| c["status"]["claimedReplicas"].as_i64())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_session_is_served_only_once_the_controller_counted_its_claim() {
    let tb = testbed_with(|o| {
        o.bind_delay = Duration::from_millis(10);
        o.post_process_delay = Duration::from_millis(1500);
    })
    .await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let k = key("counted");
    let started = Instant::now();
    let got = b.claim_with(&k, &env_spec(), budget(WAIT)).await.unwrap();
    // The lock came first; the binding only with the count, after post-processing.
    assert_eq!(
        claimed_replicas(&tb, &b.claim_name(&k)),
        1,
        "bound before the controller counted the claim"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let (status, _, _) = http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_failed_post_process_never_serves_and_its_sandbox_is_not_left_behind() {
    let tb = testbed_with(|o| {
        o.bind_delay = Duration::from_millis(10);
        o.post_process_delay = Duration::from_millis(200);
    })
    .await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let ctrl = tb.controller.clone().unwrap();
    ctrl.fail_post_processing(true);
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let k = key("postfail");
    let deadline = Instant::now() + Duration::from_secs(3);
    let budget = agent_activator::backend::ClaimBudget {
        admission_deadline: deadline,
        deadline,
    };
    let err = b.claim_with(&k, &env_spec(), budget).await.unwrap_err();
    assert!(matches!(err, BackendError::NoCapacity(_)), "{err:?}");
    // Nothing claimed for the session survives: no Sandbox labelled with its claim.
    let name = b.claim_name(&k);
    wait_until(&tb, "no Sandbox of the abandoned claim", |tb| {
        tb.list(KRUISE, "Sandbox", "default")
            .iter()
            .all(|s| s["metadata"]["labels"]["agents.kruise.io/claim-name"] != name.as_str())
            && object(tb, KRUISE, "SandboxClaim", &name).is_none()
    })
    .await;
    // Post-processing works again: the same session is served.
    ctrl.fail_post_processing(false);
    b.claim_with(&k, &env_spec(), kube_support::budget(WAIT))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_claims_timeouts_follow_the_activators_budgets() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("openkruise", "pool", "session:\n  admission_timeout: 20s\n");
    let b = backend(&tb, &cfg);
    let k = key("budgets");
    b.claim(&k, budget(WAIT)).await.unwrap();
    let claim = object(&tb, KRUISE, "SandboxClaim", &b.claim_name(&k)).unwrap();
    // activation.timeout (15s in these tests) bounds a cold start; the whole claim gets
    // admission + activation. Upstream's defaults (30s, 1m) would cut a slow cold start
    // underneath the activator's own budget.
    assert_eq!(claim["spec"]["waitReadyTimeout"], "15s", "{claim}");
    assert_eq!(claim["spec"]["claimTimeout"], "35s", "{claim}");
}

#[tokio::test]
async fn openkruise_pauses_running_sandboxes_only_and_leaves_pod_info_stale() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "pool", 0).unwrap();
    let ctrl = tb.controller.clone().unwrap();
    // A Sandbox whose pod cannot start yet: Pending; pausing it does nothing until Running.
    ctrl.set_capacity(Some(0));
    let sbx = tb.resource(KRUISE, "Sandbox");
    tb.store
        .create(
            sbx,
            "default",
            json!({"metadata": {"name": "p1"}, "spec": {"paused": true,
                "template": {"spec": {"containers": [{"name": "c"}]}}}}),
        )
        .unwrap();
    wait_until(&tb, "p1 Pending", |tb| {
        object(tb, KRUISE, "Sandbox", "p1").is_some_and(|s| s["status"]["phase"] == "Pending")
    })
    .await;
    ctrl.set_capacity(None);
    // It runs first, then pauses.
    wait_until(&tb, "p1 Paused after Running", |tb| {
        object(tb, KRUISE, "Sandbox", "p1").is_some_and(|s| {
            s["status"]["phase"] == "Paused"
                && s["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["type"] == "SandboxPaused" && c["status"] == "True")
        })
    })
    .await;
    let s = object(&tb, KRUISE, "Sandbox", "p1").unwrap();
    // ensureStopPaused only sets the condition: podInfo still names the old pod.
    assert!(s["status"]["podInfo"]["podIP"].is_string(), "{s}");
    assert!(tb.pods().is_empty());
}

#[tokio::test]
async fn failed_sandboxes_are_not_deleted_at_their_shutdown_time() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let pod = tb.pods()[0].clone();
    // The pod dies: phase Failed.
    let _ = std::process::Command::new("kill")
        .args(["-9", &pod.pid.unwrap().to_string()])
        .status();
    wait_until(&tb, "Failed", |tb| {
        object(tb, KRUISE, "Sandbox", &pod.sandbox)
            .is_some_and(|s| s["status"]["phase"] == "Failed")
    })
    .await;
    let sbx = tb.resource(KRUISE, "Sandbox");
    tb.store
        .update_with(sbx, "default", &pod.sandbox, None, |o| {
            let mut n = o.clone();
            n["spec"]["shutdownTime"] = json!("2000-01-01T00:00:00Z");
            Ok(n)
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        object(&tb, KRUISE, "Sandbox", &pod.sandbox).is_some(),
        "a Failed Sandbox was deleted at its shutdownTime"
    );
}
