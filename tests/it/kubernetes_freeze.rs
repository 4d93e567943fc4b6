//! `backend.kubernetes.pause: freeze` end to end: client -> activator proxy -> kube backend
//! -> real node agent process -> kubelet-style pod cgroups in the real cgroup filesystem,
//! holding the kube-testbed's demo-sandbox pod processes. A paused session's pod is frozen
//! in place (same pid, same address, the kernel says frozen); the next request thaws it and
//! finds its memory; other replicas and a restarted activator see the frozen state; a pod
//! with a liveness probe is refused at claim time.

use crate::freeze_rig;
use crate::kube_support;

use std::time::Duration;

use serde_json::{Value, json};

use agent_activator::server::{self, RunningServer};
use freeze_rig::*;
use kube_support::*;
use kube_testbed::kubelet_cgroups::Driver;
use kube_testbed::{PodInfo, Testbed};

fn kernel_frozen(pod: &PodInfo) -> bool {
    let cg = pod.cgroup.as_ref().expect("pod cgroup");
    std::fs::read_to_string(cg.join("cgroup.events"))
        .unwrap()
        .lines()
        .any(|l| l == "frozen 1")
}

fn frozen_annotation(sandbox: &Value) -> Option<String> {
    sandbox["metadata"]["annotations"][FROZEN]
        .as_str()
        .map(str::to_owned)
}

fn ready(sandbox: &Value) -> Option<String> {
    sandbox["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn state(srv: &RunningServer, session: &str) -> &'static str {
    srv.activator()
        .session(&key(session))
        .map(|s| s.state)
        .unwrap_or("unknown")
}

async fn counter(srv: &RunningServer, session: &str) -> (u64, Value, http::HeaderMap) {
    let (status, body, headers) = http(srv.proxy_addr(), "POST", "/counter", Some(session)).await;
    assert_eq!(status, 200, "{body}");
    (
        body["counter"].as_u64().unwrap(),
        body["pid"].clone(),
        headers,
    )
}

/// Waits (bounded by [`WAIT`]) until `cond` holds, polling every 20 ms.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn an_idle_session_is_frozen_in_place_and_the_next_requests_thaw_it_with_its_memory() {
    let rig = rig("idle", Driver::Systemd, |tb| {
        tb.seed_agent_sandbox(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    let idle = "idle:\n  timeout: 1s\n  sweep_interval: 100ms\n";
    let srv = rig.activator("agent-sandbox", "a", idle).await;

    let (n, pid, headers) = counter(&srv, "s1").await;
    assert_eq!(
        (n, headers["x-activator-activation"].to_str().unwrap()),
        (1, "claim")
    );
    let name = srv
        .activator()
        .session(&key("s1"))
        .unwrap()
        .sandbox
        .unwrap();
    let name = name.as_str().to_owned();
    let before = rig.pod(&name);
    let pod_uid = before.uid.clone().expect("the pod has a Pod object");

    // Idle for 1 s: paused by the freeze strategy. The Sandbox records the frozen pod, the
    // kernel says frozen, the process and its address are the same.
    eventually("the session is paused", || state(&srv, "s1") == "paused").await;
    let sbx = rig.sandbox("agents.x-k8s.io", &name);
    assert_eq!(frozen_annotation(&sbx).as_deref(), Some(pod_uid.as_str()));
    assert_eq!(sbx["spec"]["operatingMode"], Value::Null, "not suspended");
    let frozen = rig.pod(&name);
    assert!(kernel_frozen(&frozen));
    assert_eq!((frozen.pid, frozen.addr), (before.pid, before.addr));
    // The frozen pod fails its readiness (the testbed reports Ready=False as the kubelet
    // would): expected, the session stays paused, not lost.
    wait_until(&rig.tb, "the frozen pod turns unready", |tb| {
        object(tb, "agents.x-k8s.io", "Sandbox", &name)
            .and_then(|s| ready(&s))
            .as_deref()
            == Some("False")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&srv, "s1"), "paused");

    // Six requests arrive together: one thaw, each served once by the same process, whose
    // counter continues from 1.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let proxy = srv.proxy_addr();
        tasks.push(tokio::spawn(async move {
            http(proxy, "POST", "/counter", Some("s1")).await
        }));
    }
    let mut counters = Vec::new();
    let mut resumed = 0;
    for t in tasks {
        let (status, body, headers) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["pid"], pid, "served by the same process");
        counters.push(body["counter"].as_u64().unwrap());
        resumed += usize::from(headers["x-activator-activation"] == "resume");
    }
    counters.sort();
    assert_eq!(counters, vec![2, 3, 4, 5, 6, 7]);
    assert!(resumed >= 1);
    let m = srv.metrics();
    assert_eq!(
        m.activations_total
            .with_label_values(&["resume", "ok"])
            .get(),
        1
    );
    let thawed = rig.pod(&name);
    assert!(!kernel_frozen(&thawed));
    assert_eq!((thawed.pid, thawed.addr), (before.pid, before.addr));
    assert_eq!(
        frozen_annotation(&rig.sandbox("agents.x-k8s.io", &name)),
        None
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn other_replicas_and_a_restarted_activator_see_the_frozen_state() {
    let rig = rig("replicas", Driver::Cgroupfs, |tb| {
        tb.seed_agent_sandbox(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    let a = rig.activator("agent-sandbox", "a", "").await;
    let b = rig.activator("agent-sandbox", "b", "").await;
    let (n, pid, _) = counter(&a, "shared").await;
    assert_eq!(n, 1);
    assert_eq!(counter(&b, "shared").await.0, 2);
    let name = a
        .activator()
        .session(&key("shared"))
        .unwrap()
        .sandbox
        .unwrap();
    let name = name.as_str().to_owned();

    // A freezes; B learns it from the Sandbox and counts the session paused.
    assert!(a.activator().pause(&key("shared")).await.unwrap());
    assert!(kernel_frozen(&rig.pod(&name)));
    eventually("B sees the session paused", || {
        state(&b, "shared") == "paused"
    })
    .await;

    // B's next request thaws it: same process, memory intact.
    let (n, pid_b, headers) = counter(&b, "shared").await;
    assert_eq!((n, &pid_b), (3, &pid));
    assert_eq!(headers["x-activator-activation"], "resume");
    assert!(!kernel_frozen(&rig.pod(&name)));
    // A sees it running again and serves it without a resume of its own.
    eventually("A sees the session running", || {
        state(&a, "shared") == "active"
    })
    .await;
    let (n, _, headers) = counter(&a, "shared").await;
    assert_eq!(
        (n, headers["x-activator-activation"].to_str().unwrap()),
        (4, "none")
    );

    // Frozen again, then every replica goes away; a new one recovers the binding as
    // paused from the claim and the Sandbox's annotation, and thaws it on demand.
    assert!(b.activator().pause(&key("shared")).await.unwrap());
    a.shutdown().await;
    b.shutdown().await;
    assert!(kernel_frozen(&rig.pod(&name)));
    let c = rig.activator("agent-sandbox", "c", "").await;
    assert_eq!(state(&c, "shared"), "paused");
    let (n, pid_c, headers) = counter(&c, "shared").await;
    assert_eq!((n, &pid_c), (5, &pid));
    assert_eq!(headers["x-activator-activation"], "resume");
    assert_eq!(
        frozen_annotation(&rig.sandbox("agents.x-k8s.io", &name)),
        None
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn openkruise_sandboxes_freeze_and_thaw_the_same_way() {
    let rig = rig("kruise", Driver::Systemd, |tb| {
        tb.seed_openkruise(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    let srv = rig.activator("openkruise", "a", "").await;
    let (_, pid, _) = counter(&srv, "k1").await;
    let name = srv
        .activator()
        .session(&key("k1"))
        .unwrap()
        .sandbox
        .unwrap();
    let name = name.as_str().to_owned();
    assert!(srv.activator().pause(&key("k1")).await.unwrap());
    let sbx = rig.sandbox(KRUISE, &name);
    assert_eq!(
        frozen_annotation(&sbx),
        rig.pod(&name).uid,
        "the annotation names the frozen pod"
    );
    assert_eq!(
        sbx["spec"]["paused"],
        Value::Null,
        "not paused through the spec"
    );
    assert!(kernel_frozen(&rig.pod(&name)));
    let (n, pid2, headers) = counter(&srv, "k1").await;
    assert_eq!((n, &pid2), (2, &pid));
    assert_eq!(headers["x-activator-activation"], "resume");
    assert!(!kernel_frozen(&rig.pod(&name)));
    srv.shutdown().await;
}

/// A SandboxTemplate + SandboxWarmPool whose container has a liveness probe.
fn seed_probed_pool(tb: &Testbed) {
    let tpl = tb.resource(AGENT_SANDBOX, "SandboxTemplate");
    tb.store
        .create(
            tpl,
            NS,
            json!({
                "metadata": {"name": "default"},
                "spec": {"podTemplate": {"spec": {"containers": [{
                    "name": "sandbox", "image": "agent-activator:dev",
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                }]}}},
            }),
        )
        .unwrap();
    let wp = tb.resource(AGENT_SANDBOX, "SandboxWarmPool");
    tb.store
        .create(
            wp,
            NS,
            json!({
                "metadata": {"name": "default"},
                "spec": {"replicas": 1, "sandboxTemplateRef": {"name": "default"}},
            }),
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn a_pod_with_a_liveness_probe_is_refused_at_claim_unless_allowed() {
    let rig = rig("probes", Driver::Systemd, seed_probed_pool).await;
    wait_pods(&rig.tb, 1).await;
    let srv = rig.activator("agent-sandbox", "a", "").await;
    let (status, body, _) = http(srv.proxy_addr(), "POST", "/counter", Some("p1")).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "sandbox_start_failed");
    // The refused claim is released: no claim of the session is left behind.
    wait_until(&rig.tb, "the refused claim is deleted", |tb| {
        tb.list(AGENT_SANDBOX, "SandboxClaim", NS).is_empty()
    })
    .await;
    srv.shutdown().await;

    let mut cfg = rig.config("agent-sandbox", "b", "");
    cfg.backend.kubernetes.freeze_with_probes = true;
    let srv = server::start(cfg).await.expect("activator starts");
    wait_pods(&rig.tb, 1).await;
    let (status, body, _) = http(srv.proxy_addr(), "POST", "/counter", Some("p2")).await;
    assert_eq!(status, 200, "{body}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn deep_after_suspends_a_frozen_sandbox_through_its_spec() {
    let rig = rig("deep", Driver::Systemd, |tb| {
        tb.seed_agent_sandbox(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    let idle = "idle:\n  timeout: 500ms\n  sweep_interval: 100ms\n  deep_after: 1500ms\n";
    let srv = rig.activator("agent-sandbox", "a", idle).await;
    let (n, pid, _) = counter(&srv, "deep").await;
    assert_eq!(n, 1);
    let name = srv
        .activator()
        .session(&key("deep"))
        .unwrap()
        .sandbox
        .unwrap();
    let name = name.as_str().to_owned();

    // Tier one: frozen in place.
    eventually("the pod is frozen", || {
        frozen_annotation(&rig.sandbox("agents.x-k8s.io", &name)).is_some()
    })
    .await;
    assert!(kernel_frozen(&rig.pod(&name)));
    // Tier two: suspended through the spec, the mark gone, the pod (and its memory) gone.
    wait_until(&rig.tb, "the Sandbox is suspended", |tb| {
        object(tb, "agents.x-k8s.io", "Sandbox", &name).is_some_and(|s| {
            s["spec"]["operatingMode"] == "Suspended" && frozen_annotation(&s).is_none()
        })
    })
    .await;
    wait_until(&rig.tb, "the pod is gone", |tb| {
        tb.pods().iter().all(|p| p.sandbox != name)
    })
    .await;
    eventually("the deep tier ends, paused", || {
        state(&srv, "deep") == "paused"
    })
    .await;
    assert_eq!(
        srv.metrics()
            .deep_pauses_total
            .with_label_values(&["suspended"])
            .get(),
        1
    );

    // The next request resumes it cold: a new pod, memory from zero, same session.
    let (n, new_pid, headers) = counter(&srv, "deep").await;
    assert_eq!(n, 1);
    assert_ne!(new_pid, pid);
    assert_eq!(headers["x-activator-activation"], "resume");
    srv.shutdown().await;
}
