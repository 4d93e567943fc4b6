//! kube-testbed's REST protocol through the real kube client: discovery, Leases (what the
//! autoscaler's leader election uses), optimistic concurrency, patches, `/scale`, watches
//! with bookmarks and 410 Gone, error injection.

use crate::kube_support;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::ApiResource;
use kube_support::*;
use kube_testbed::{Testbed, TestbedOptions};

async fn api_only() -> Testbed {
    Testbed::start(TestbedOptions {
        bookmark_interval: std::time::Duration::from_millis(50),
        ..TestbedOptions::default()
    })
    .await
    .unwrap()
}

fn status_code(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn discovery_lists_the_registered_groups() {
    let tb = api_only().await;
    let discovery = kube::Discovery::new(client(&tb)).run().await.unwrap();
    let mut found = Vec::new();
    for group in discovery.groups() {
        for (ar, _caps) in group.recommended_resources() {
            found.push(format!("{}/{}", ar.group, ar.kind));
        }
    }
    for want in [
        "extensions.agents.x-k8s.io/SandboxClaim",
        "extensions.agents.x-k8s.io/SandboxWarmPool",
        "agents.x-k8s.io/Sandbox",
        "agents.kruise.io/SandboxSet",
        "coordination.k8s.io/Lease",
    ] {
        assert!(
            found.iter().any(|f| f == want),
            "{want} missing from {found:?}"
        );
    }
}

#[tokio::test]
async fn leases_get_optimistic_concurrency_and_patches() {
    let tb = api_only().await;
    let leases: Api<Lease> = Api::namespaced(client(&tb), "default");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let again = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert_eq!(status_code(&again), Some((409, "AlreadyExists".into())));

    // Two writers from the same version: the second loses with 409 Conflict.
    let mut first = created.clone();
    first.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("leader", &PostParams::default(), &first)
        .await
        .unwrap();
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let err = leases
        .replace("leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err), Some((409, "Conflict".into())));

    // JSON patch with a failing test op is refused; a matching one applies.
    let bad = json_patch::Patch(
        serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": "c"},
            {"op": "replace", "path": "/spec/holderIdentity", "value": "d"},
        ]))
        .unwrap(),
    );
    assert!(
        leases
            .patch("leader", &PatchParams::default(), &Patch::<()>::Json(bad))
            .await
            .is_err()
    );
    let good = json_patch::Patch(
        serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": "b"},
            {"op": "replace", "path": "/spec/holderIdentity", "value": "d"},
        ]))
        .unwrap(),
    );
    let patched = leases
        .patch("leader", &PatchParams::default(), &Patch::<()>::Json(good))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("d"));

    leases
        .delete("leader", &DeleteParams::default())
        .await
        .unwrap();
    let gone = leases.get("leader").await.unwrap_err();
    assert_eq!(status_code(&gone).map(|c| c.0), Some(404));
}

#[tokio::test]
async fn scale_subresource_reads_and_writes_spec_replicas() {
    let tb = api_only().await;
    tb.seed_agent_sandbox("default", "pool", 2).unwrap();
    let ar = ApiResource {
        group: "extensions.agents.x-k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "extensions.agents.x-k8s.io/v1beta1".into(),
        kind: "SandboxWarmPool".into(),
        plural: "sandboxwarmpools".into(),
    };
    let pools: Api<DynamicObject> = Api::namespaced_with(client(&tb), "default", &ar);
    assert_eq!(
        pools
            .get_scale("pool")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(2)
    );
    let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": 5}}));
    let scale = pools
        .patch_scale("pool", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(5));
    let pool = pools.get("pool").await.unwrap();
    assert_eq!(pool.data["spec"]["replicas"], 5);
    // A scale written against an old resourceVersion loses.
    let stale = Patch::Merge(serde_json::json!({
        "metadata": {"resourceVersion": "1"}, "spec": {"replicas": 7}
    }));
    let err = pools
        .patch_scale("pool", &PatchParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(status_code(&err).map(|c| c.0), Some(409));
    let missing = pools.get_scale("nope").await.unwrap_err();
    assert_eq!(status_code(&missing).map(|c| c.0), Some(404));
}

#[tokio::test]
async fn watches_stream_events_bookmarks_and_410_gone() {
    let tb = api_only().await;
    let leases: Api<Lease> = Api::namespaced(client(&tb), "default");
    let list = leases.list(&Default::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = leases
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("w".into()),
            ..Default::default()
        },
        spec: None,
    };
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    while !(saw_added && saw_bookmark) {
        let ev = tokio::time::timeout(WAIT, stream.try_next())
            .await
            .expect("watch event in time")
            .unwrap()
            .expect("stream open");
        match ev {
            WatchEvent::Added(l) => saw_added = l.metadata.name.as_deref() == Some("w"),
            WatchEvent::Bookmark(_) => saw_bookmark = saw_added,
            other => panic!("unexpected {other:?}"),
        }
    }
    // After compaction the old version is gone: the server answers 410 in the stream.
    tb.store.compact();
    let mut old = leases
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, old.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn injected_failures_hit_the_next_requests_only() {
    let tb = api_only().await;
    let leases: Api<Lease> = Api::namespaced(client(&tb), "default");
    tb.faults.fail_next(2, 500);
    for _ in 0..2 {
        let err = leases.list(&Default::default()).await.unwrap_err();
        assert_eq!(status_code(&err).map(|c| c.0), Some(500));
    }
    // 429 (like 503 and 504) is retried by the kube client itself: the caller sees success
    // and the injected failure is used up.
    tb.faults.fail_next_matching(1, 429, "GET", "/leases");
    assert!(leases.list(&Default::default()).await.is_ok());
    assert_eq!(tb.faults.pending(), 0);
    assert!(leases.list(&Default::default()).await.is_ok());
}
