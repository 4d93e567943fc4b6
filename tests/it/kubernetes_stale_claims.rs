//! No session is left stuck by a stale claim, and nothing claimed is leaked (issue 21 item
//! 5), against kube-testbed, both flavours: a terminal claim of ours is replaced, not
//! adopted; release and abandon find the OpenKruise Sandbox by its claim-name label and
//! owner annotation whatever the cache has seen; `recover()` cleans claims that never
//! bound.

use crate::kube_support;

use std::time::Duration;

use agent_activator::backend::kubernetes::{
    KubernetesBackend, MANAGED_BY, MANAGED_BY_LABEL, SESSION_LABEL, SESSION_SHA_ANNOTATION,
};
use agent_activator::backend::{BackendError, ClaimBudget, ClaimSpec, SandboxBackend};
use agent_activator::customize::SpecEnv;
use kube_support::*;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Writes a claim for `session` exactly as the activator would have made it, with `spec`.
fn plant_claim(
    tb: &kube_testbed::Testbed,
    b: &KubernetesBackend,
    session: &str,
    group: &str,
    spec: Value,
) {
    let k = key(session);
    let sha = k.sha256_hex();
    let res = tb.resource(group, "SandboxClaim");
    tb.store
        .create(
            res,
            "default",
            json!({
                "metadata": {
                    "name": b.claim_name(&k),
                    "labels": {SESSION_LABEL: &sha[..32], MANAGED_BY_LABEL: MANAGED_BY},
                    "annotations": {SESSION_SHA_ANNOTATION: sha},
                },
                "spec": spec,
            }),
        )
        .unwrap();
}

fn short(d: Duration) -> ClaimBudget {
    let deadline = Instant::now() + d;
    ClaimBudget {
        admission_deadline: deadline,
        deadline,
    }
}

#[tokio::test]
async fn a_terminal_agent_sandbox_claim_is_replaced_not_adopted() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    // Expired with policy Retain: the controller keeps the claim, Ready=False/ClaimExpired,
    // and never binds it again.
    plant_claim(
        &tb,
        &b,
        "expired",
        AGENT_SANDBOX,
        json!({"warmPoolRef": {"name": "default"}, "lifecycle": {
            "shutdownTime": "2000-01-01T00:00:00Z", "shutdownPolicy": "Retain"}}),
    );
    let name = b.claim_name(&key("expired"));
    wait_until(&tb, "ClaimExpired", |tb| {
        object(tb, AGENT_SANDBOX, "SandboxClaim", &name)
            .is_some_and(|c| c["status"].to_string().contains("ClaimExpired"))
    })
    .await;
    let old_uid =
        object(&tb, AGENT_SANDBOX, "SandboxClaim", &name).unwrap()["metadata"]["uid"].clone();
    let got = b
        .claim(&key("expired"), short(Duration::from_secs(8)))
        .await
        .expect("a new claim replaces the terminal one");
    let claim = object(&tb, AGENT_SANDBOX, "SandboxClaim", &name).unwrap();
    assert_ne!(claim["metadata"]["uid"], old_uid);
    let (status, _, _) = http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_terminal_openkruise_claim_is_replaced_not_adopted() {
    let tb = testbed(Duration::from_millis(10)).await;
    let b = backend(&tb, &config("openkruise", "pool", ""));
    // Completed with nothing claimed (its SandboxSet was missing): terminal upstream.
    plant_claim(&tb, &b, "done", KRUISE, json!({"templateName": "pool"}));
    let name = b.claim_name(&key("done"));
    wait_until(&tb, "Completed", |tb| {
        object(tb, KRUISE, "SandboxClaim", &name)
            .is_some_and(|c| c["status"]["phase"] == "Completed")
    })
    .await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let got = b
        .claim(&key("done"), short(Duration::from_secs(8)))
        .await
        .expect("a new claim replaces the Completed one");
    let (status, _, _) = http(got.endpoint, "GET", "/state", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_sandbox_locked_after_the_activator_gave_up_is_deleted() {
    // Post-processing outlasts the session's budget: the activator gives up while the
    // Sandbox is locked but not counted; the cache never saw it bound.
    let tb = testbed_with(|o| {
        o.bind_delay = Duration::from_millis(10);
        o.post_process_delay = Duration::from_secs(3);
    })
    .await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("openkruise", "pool", ""));
    let spec = ClaimSpec {
        env: vec![SpecEnv {
            name: "A".into(),
            value: "b".into(),
            container_name: None,
        }],
        ..ClaimSpec::default()
    };
    let k = key("gaveup");
    let name = b.claim_name(&k);
    let err = b
        .claim_with(&k, &spec, short(Duration::from_millis(800)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::NoCapacity(_) | BackendError::Timeout(_)),
        "{err:?}"
    );
    wait_until(
        &tb,
        "no Sandbox left with the abandoned claim's name",
        |tb| {
            object(tb, KRUISE, "SandboxClaim", &name).is_none()
                && tb.list(KRUISE, "Sandbox", "default").iter().all(|s| {
                    s["metadata"]["labels"]["agents.kruise.io/claim-name"] != name.as_str()
                })
        },
    )
    .await;
}

#[tokio::test]
async fn release_deletes_the_openkruise_sandbox_even_if_this_replica_never_saw_it_bound() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("openkruise", "pool", "");
    let a = backend(&tb, &cfg);
    let k = key("elsewhere");
    let got = a.claim(&k, budget(WAIT)).await.unwrap();
    // Another replica releases it with a sandbox ID its cache does not bind to the claim
    // (e.g. it restarted and has not synced): the Sandbox still goes.
    let other = backend(&tb, &cfg);
    other
        .release(
            &k,
            &agent_activator::backend::SandboxId::new("not-in-cache"),
        )
        .await
        .unwrap();
    let sandbox = got.sandbox.as_str().to_owned();
    wait_until(&tb, "the claimed Sandbox is deleted", |tb| {
        object(tb, KRUISE, "Sandbox", &sandbox).is_none()
    })
    .await;
}

#[tokio::test]
async fn recover_cleans_claims_that_never_bound() {
    for (group, api, pool) in [
        (AGENT_SANDBOX, "agent-sandbox", "default"),
        (KRUISE, "openkruise", "pool"),
    ] {
        let tb = testbed(Duration::from_millis(10)).await;
        // Nothing can ever bind: no pool of that name.
        let b = backend(&tb, &config(api, pool, ""));
        let spec = if api == "openkruise" {
            json!({"templateName": "pool"})
        } else {
            json!({"warmPoolRef": {"name": "default"}})
        };
        plant_claim(&tb, &b, "orphan", group, spec);
        let name = b.claim_name(&key("orphan"));
        // The controller's verdict: WarmPoolNotFound / Completed SandboxSetNotFound.
        wait_until(&tb, "the controller's verdict", |tb| {
            object(tb, group, "SandboxClaim", &name)
                .is_some_and(|c| c["status"]["conditions"].is_array())
        })
        .await;
        let recovered = b.recover().await.unwrap();
        assert!(recovered.is_empty(), "{api}");
        wait_until(&tb, "the unbound claim is deleted", |tb| {
            object(tb, group, "SandboxClaim", &name).is_none()
        })
        .await;
    }
}
