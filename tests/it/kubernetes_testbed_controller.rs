//! kube-testbed's simulated controllers, step by step, with real demo-sandbox pods: each
//! test pins one upstream behaviour the double reproduces (agent-sandbox `2fd412d55eca`,
//! OpenKruise `0b72c83ae0bc`; the source is cited in kube-testbed/src/controller/). These
//! are tests of the double, so the activator's own tests can trust it.

use crate::kube_support;

use std::time::Duration;

use kube_support::*;
use kube_testbed::controller::agent_sandbox::name_hash;
use kube_testbed::store::EventKind;
use serde_json::{Value, json};

const SANDBOX: &str = "agents.x-k8s.io";

fn cond<'a>(obj: &'a Value, ty: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

fn cond_is(obj: &Value, ty: &str, status: &str, reason: &str) -> bool {
    cond(obj, ty).is_some_and(|c| c["status"] == status && c["reason"] == reason)
}

#[tokio::test]
async fn agent_sandbox_adoption_writes_annotation_then_owner_then_status() {
    let tb = testbed_with(|o| o.step_delay = Duration::from_millis(150)).await;
    tb.seed_agent_sandbox("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let warm = tb.list(SANDBOX, "Sandbox", "default")[0].clone();
    let warm_name = warm["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(
        warm["metadata"]["labels"]["agents.x-k8s.io/warm-pool-sandbox"],
        name_hash("pool").as_str()
    );
    let mut events = tb.store.subscribe();
    let claims = tb.resource(AGENT_SANDBOX, "SandboxClaim");
    tb.store
        .create(
            claims,
            "default",
            json!({"metadata": {"name": "c1"}, "spec": {"warmPoolRef": {"name": "pool"}}}),
        )
        .unwrap();
    wait_until(&tb, "the claim is bound", |tb| {
        object(tb, AGENT_SANDBOX, "SandboxClaim", "c1")
            .is_some_and(|c| c["status"]["sandbox"]["name"] == warm_name.as_str())
    })
    .await;
    // Replay what happened, in resourceVersion order.
    let sbx_res = tb.resource(SANDBOX, "Sandbox");
    let mut steps = Vec::new();
    while let Ok(ev) = events.try_recv() {
        let o = &ev.object;
        if ev.resource == claims && ev.kind == EventKind::Modified {
            if o["status"]["sandbox"]["name"] == warm_name.as_str() && !steps.contains(&"status") {
                steps.push("status");
            } else if o["metadata"]["annotations"]["agents.x-k8s.io/sandbox-name"]
                == warm_name.as_str()
                && !steps.contains(&"annotation")
            {
                assert!(
                    o["status"]["sandbox"]["name"].is_null(),
                    "annotation and status in one write"
                );
                steps.push("annotation");
            }
        }
        if ev.resource == sbx_res
            && o["metadata"]["name"] == warm_name.as_str()
            && o["metadata"]["ownerReferences"][0]["kind"] == "SandboxClaim"
            && !steps.contains(&"owner")
        {
            assert!(
                o["metadata"]["labels"]
                    .get("agents.x-k8s.io/warm-pool-sandbox")
                    .is_none()
            );
            assert!(o["metadata"]["labels"]["agents.x-k8s.io/claim-uid"].is_string());
            steps.push("owner");
        }
    }
    assert_eq!(steps, ["annotation", "owner", "status"]);
}

#[tokio::test]
async fn agent_sandbox_suspend_sets_ready_false_at_once_and_suspended_when_the_pod_is_gone() {
    let tb = testbed_with(|o| o.terminate_delay = Duration::from_millis(400)).await;
    tb.seed_agent_sandbox("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let name = tb.pods()[0].sandbox.clone();
    let old_ip = tb.pods()[0].addr.ip().to_string();
    let res = tb.resource(SANDBOX, "Sandbox");
    tb.store
        .update_with(res, "default", &name, None, |o| {
            let mut n = o.clone();
            n["spec"]["operatingMode"] = json!("Suspended");
            Ok(n)
        })
        .unwrap();
    // First: Ready=False/SandboxSuspended, Suspended=False/PodTerminating, IP still there.
    wait_until(&tb, "suspending", |tb| {
        object(tb, SANDBOX, "Sandbox", &name).is_some_and(|s| {
            cond_is(&s, "Ready", "False", "SandboxSuspended")
                && cond_is(&s, "Suspended", "False", "PodTerminating")
        })
    })
    .await;
    let s = object(&tb, SANDBOX, "Sandbox", &name).unwrap();
    assert_eq!(s["status"]["podIPs"][0], old_ip.as_str(), "{s}");
    // Then: the pod is gone, Suspended=True/PodTerminated, no IPs, PodScheduled removed.
    wait_until(&tb, "suspended", |tb| {
        object(tb, SANDBOX, "Sandbox", &name)
            .is_some_and(|s| cond_is(&s, "Suspended", "True", "PodTerminated"))
    })
    .await;
    let s = object(&tb, SANDBOX, "Sandbox", &name).unwrap();
    assert!(s["status"].get("podIPs").is_none(), "{s}");
    assert!(cond(&s, "PodScheduled").is_none(), "{s}");

    // Resume: a new pod, a new IP; Ready=True for the new generation; Suspended=False.
    tb.store
        .update_with(res, "default", &name, None, |o| {
            let mut n = o.clone();
            n["spec"]["operatingMode"] = json!("Running");
            Ok(n)
        })
        .unwrap();
    wait_until(&tb, "resumed", |tb| {
        object(tb, SANDBOX, "Sandbox", &name)
            .is_some_and(|s| cond_is(&s, "Ready", "True", "DependenciesReady"))
    })
    .await;
    let s = object(&tb, SANDBOX, "Sandbox", &name).unwrap();
    assert_eq!(
        cond(&s, "Ready").unwrap()["observedGeneration"],
        s["metadata"]["generation"]
    );
    assert!(cond_is(&s, "Suspended", "False", "NotSuspended"), "{s}");
    assert_ne!(s["status"]["podIPs"][0], old_ip.as_str());
}

#[tokio::test]
async fn agent_sandbox_reports_unschedulable_and_finished_pods() {
    let tb = testbed(Duration::ZERO).await;
    let ctl = tb.controller.clone().unwrap();
    ctl.set_capacity(Some(0));
    tb.seed_agent_sandbox("default", "pool", 1).unwrap();
    wait_until(&tb, "Unschedulable", |tb| {
        tb.list(SANDBOX, "Sandbox", "default")
            .first()
            .is_some_and(|s| cond_is(s, "PodScheduled", "False", "Unschedulable"))
    })
    .await;
    let pool = object(&tb, AGENT_SANDBOX, "SandboxWarmPool", "pool").unwrap();
    assert_eq!(pool["status"]["readyReplicas"], 0);
    ctl.set_capacity(None);
    wait_pods(&tb, 1).await;
    wait_until(&tb, "the pool reports it ready", |tb| {
        object(tb, AGENT_SANDBOX, "SandboxWarmPool", "pool")
            .is_some_and(|p| p["status"]["readyReplicas"] == 1)
    })
    .await;
    // The container dies: Finished=True/PodFailed, Ready=False/PodFailed.
    let pod = tb.pods()[0].clone();
    std::process::Command::new("kill")
        .args(["-9", &pod.pid.unwrap().to_string()])
        .status()
        .unwrap();
    wait_until(&tb, "Finished", |tb| {
        object(tb, SANDBOX, "Sandbox", &pod.sandbox).is_some_and(|s| {
            cond_is(&s, "Finished", "True", "PodFailed")
                && cond_is(&s, "Ready", "False", "PodFailed")
        })
    })
    .await;
}

#[tokio::test]
async fn agent_sandbox_expired_claims_are_deleted_with_their_sandbox() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "pool", 0).unwrap();
    let claims = tb.resource(AGENT_SANDBOX, "SandboxClaim");
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    tb.store
        .create(
            claims,
            "default",
            json!({"metadata": {"name": "short"}, "spec": {"warmPoolRef": {"name": "pool"},
                   "lifecycle": {"shutdownTime": soon, "shutdownPolicy": "Delete"}}}),
        )
        .unwrap();
    wait_until(&tb, "cold-created Sandbox named after the claim", |tb| {
        object(tb, SANDBOX, "Sandbox", "short").is_some()
    })
    .await;
    wait_until(&tb, "claim and Sandbox gone after shutdownTime", |tb| {
        object(tb, AGENT_SANDBOX, "SandboxClaim", "short").is_none()
            && object(tb, SANDBOX, "Sandbox", "short").is_none()
    })
    .await;
}

#[tokio::test]
async fn openkruise_claims_label_the_sandbox_complete_and_expire_by_ttl_without_touching_it() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_openkruise("default", "set", 1).unwrap();
    wait_pods(&tb, 1).await;
    wait_until(&tb, "availableReplicas 1", |tb| {
        object(tb, KRUISE, "SandboxSet", "set")
            .is_some_and(|s| s["status"]["availableReplicas"] == 1)
    })
    .await;
    let member = tb.list(KRUISE, "Sandbox", "default")[0].clone();
    assert_eq!(
        member["metadata"]["labels"]["agents.kruise.io/sandbox-pool"],
        "set"
    );
    assert_eq!(
        member["metadata"]["labels"]["agents.kruise.io/sandbox-claimed"],
        "false"
    );
    assert_eq!(
        member["metadata"]["ownerReferences"][0]["kind"],
        "SandboxSet"
    );
    let claims = tb.resource(KRUISE, "SandboxClaim");
    tb.store
        .create(claims, "default", json!({"metadata": {"name": "k1"}, "spec": {"templateName": "set", "ttlAfterCompleted": "1s"}}))
        .unwrap();
    wait_until(&tb, "Completed", |tb| {
        object(tb, KRUISE, "SandboxClaim", "k1")
            .is_some_and(|c| c["status"]["phase"] == "Completed")
    })
    .await;
    let claim = object(&tb, KRUISE, "SandboxClaim", "k1").unwrap();
    assert_eq!(claim["status"]["claimedReplicas"], 1);
    assert!(
        !claim["status"]
            .to_string()
            .contains(member["metadata"]["name"].as_str().unwrap())
    );
    let name = member["metadata"]["name"].as_str().unwrap();
    let sbx = object(&tb, KRUISE, "Sandbox", name).unwrap();
    assert_eq!(
        sbx["metadata"]["labels"]["agents.kruise.io/claim-name"],
        "k1"
    );
    assert_eq!(
        sbx["metadata"]["labels"]["agents.kruise.io/sandbox-claimed"],
        "true"
    );
    assert_eq!(
        sbx["metadata"]["annotations"]["agents.kruise.io/owner"],
        claim["metadata"]["uid"]
    );
    assert_eq!(sbx["metadata"]["ownerReferences"], json!([]));
    // ttlAfterCompleted deletes the claim only; the claimed Sandbox keeps running.
    wait_until(&tb, "the claim is deleted by TTL", |tb| {
        object(tb, KRUISE, "SandboxClaim", "k1").is_none()
    })
    .await;
    assert!(object(&tb, KRUISE, "Sandbox", name).is_some());
    assert!(tb.pods().iter().any(|p| p.sandbox == name));
}

#[tokio::test]
async fn openkruise_pause_goes_paused_then_resuming_then_running() {
    let tb = testbed_with(|o| o.terminate_delay = Duration::from_millis(300)).await;
    tb.seed_openkruise("default", "set", 1).unwrap();
    wait_pods(&tb, 1).await;
    let name = tb.pods()[0].sandbox.clone();
    let res = tb.resource(KRUISE, "Sandbox");
    let set_paused = |p: bool| {
        tb.store
            .update_with(res, "default", &name, None, |o| {
                let mut n = o.clone();
                n["spec"]["paused"] = json!(p);
                Ok(n)
            })
            .unwrap();
    };
    set_paused(true);
    wait_until(
        &tb,
        "pausing: phase Paused, SandboxPaused False, IP kept",
        |tb| {
            object(tb, KRUISE, "Sandbox", &name).is_some_and(|s| {
                s["status"]["phase"] == "Paused"
                    && cond_is(&s, "SandboxPaused", "False", "Pending")
                    && s["status"]["podInfo"]["podIP"].is_string()
            })
        },
    )
    .await;
    // openkruise/agents 0b72c83ae0bc core/util.go ensureStopPaused: once the pod is gone
    // only the condition changes; podInfo still names the deleted pod.
    wait_until(&tb, "paused: SandboxPaused True, podInfo stale", |tb| {
        object(tb, KRUISE, "Sandbox", &name).is_some_and(|s| {
            cond_is(&s, "SandboxPaused", "True", "StopPauseSucceed")
                && s["status"]["podInfo"]["podIP"].is_string()
                && tb.pods().is_empty()
        })
    })
    .await;
    set_paused(false);
    wait_until(&tb, "running again, resumed", |tb| {
        object(tb, KRUISE, "Sandbox", &name).is_some_and(|s| {
            s["status"]["phase"] == "Running" && cond_is(&s, "SandboxResumed", "True", "ResumePod")
        })
    })
    .await;
}
