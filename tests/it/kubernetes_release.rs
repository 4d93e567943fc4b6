//! Release of a frozen sandbox (issue 21 item 6), end to end with the real node agent and
//! kubelet-style pod cgroups: the pod is thawed (the agent reports it running, the frozen
//! mark is removed) before its Sandbox is deleted, so it handles SIGTERM at once instead of
//! waiting out the grace period frozen (cgroup v2) or hanging in Terminating (v1).

use crate::freeze_rig;
use crate::kube_support;

use freeze_rig::*;
use kube_support::*;
use kube_testbed::kubelet_cgroups::Driver;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_cgroup_v2,
    ignore = "no writable cgroup v2 hierarchy on this host (build.rs probe)"
)]
async fn a_frozen_pod_is_thawed_before_its_sandbox_is_deleted() {
    let rig = rig("release", Driver::Systemd, |tb| {
        tb.seed_agent_sandbox(NS, "default", 1).unwrap()
    })
    .await;
    wait_pods(&rig.tb, 1).await;
    let srv = rig.activator("agent-sandbox", "a", "").await;
    let (status, body, _) = http(srv.proxy_addr(), "GET", "/state", Some("r1")).await;
    assert_eq!(status, 200, "{body}");
    let name = srv
        .activator()
        .session(&key("r1"))
        .unwrap()
        .sandbox
        .unwrap()
        .as_str()
        .to_owned();
    assert!(srv.activator().pause(&key("r1")).await.unwrap());
    assert!(
        rig.sandbox("agents.x-k8s.io", &name)["metadata"]["annotations"][FROZEN].is_string(),
        "frozen"
    );
    rig.tb.audit.clear();
    assert!(srv.activator().release(&key("r1")).await.unwrap());
    // The frozen mark is removed only after the agent reported the pod thawed; that write
    // came before the deletion.
    let thawed = rig.tb.audit.bodies().iter().any(|((verb, _, res), body)| {
        verb == "patch"
            && res == "sandboxes"
            && body["metadata"]["annotations"][FROZEN].is_null()
            && body["metadata"]["annotations"]
                .as_object()
                .is_some_and(|a| a.contains_key(FROZEN))
    });
    assert!(
        thawed,
        "no thaw before release: {:?}",
        rig.tb.audit.bodies()
    );
    wait_until(&rig.tb, "the sandbox is gone", |tb| {
        object(tb, "agents.x-k8s.io", "Sandbox", &name).is_none()
    })
    .await;
    srv.shutdown().await;
}
