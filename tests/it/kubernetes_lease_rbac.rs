//! The Roles' Lease rules against what leader election and the schedules' ticks call
//! (src/cluster/lease.rs: get, create, replace = update; src/cluster/ticks.rs: get, update),
//! through a real kube client against kube-testbed's audit: exactly those verbs (issue 21
//! item 7: `patch` was granted and never called), `get`/`update` only on the one Lease the
//! activator uses. `create` keeps no name: Kubernetes RBAC cannot restrict `create` by
//! resource name (kubernetes.io, "Using RBAC Authorization", Referring to resources).

use crate::kube_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use agent_activator::cluster::{Leadership, LeaseElector, LeaseTickStore, ReplicaId, TickStore};
use agent_activator::config::Config;
use chrono::{TimeZone, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_testbed::{Testbed, TestbedOptions};
use serde_json::Value;

/// Every Lease call the activator makes: two replicas race to create, renew, take over
/// after a silent leader, claim a schedule tick, release.
async fn lease_verbs_called(name: &str) -> BTreeSet<String> {
    let tb = Testbed::start(TestbedOptions::default())
        .await
        .expect("testbed starts");
    let api: Api<Lease> = Api::namespaced(kube_support::client(&tb), "default");
    let lease = Duration::from_millis(600);
    let a = LeaseElector::new(api.clone(), name, &ReplicaId::named("replica-a"), lease);
    let b = LeaseElector::new(api.clone(), name, &ReplicaId::named("replica-b"), lease);
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    assert!(ra.unwrap() ^ rb.unwrap(), "exactly one leads");
    let (leader, follower) = if a.is_leader() { (a, b) } else { (b, a) };
    assert!(leader.try_acquire_or_renew().await.unwrap());
    let ticks = LeaseTickStore::new(api, name);
    let tick = Utc.with_ymd_and_hms(2026, 3, 1, 6, 0, 0).unwrap();
    assert!(ticks.claim("nightly", tick).await.unwrap());
    // The leader goes silent: the follower takes over after a lease duration unchanged.
    let took_over = tokio::time::timeout(kube_support::WAIT, async {
        while !follower.try_acquire_or_renew().await.unwrap() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(took_over.is_ok(), "the follower takes over");
    follower.release().await.unwrap();
    tb.audit
        .snapshot()
        .into_keys()
        .filter(|(_, group, resource)| group == "coordination.k8s.io" && resource == "leases")
        .map(|(verb, _, _)| verb)
        .collect()
}

/// `(verb, resourceNames)` of every Lease rule in the Role `file`.
fn lease_rules(file: &str) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let role: Value = serde_yaml_ng::from_str(&text).unwrap();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        if strings(&rule["resources"]).iter().any(|r| r == "leases") {
            for verb in strings(&rule["verbs"]) {
                out.push((verb, strings(&rule["resourceNames"])));
            }
        }
    }
    out
}

#[tokio::test]
async fn both_roles_grant_leases_exactly_what_leader_election_calls_on_its_one_lease() {
    let name = Config::default().backend.kubernetes.lease_name;
    let called = lease_verbs_called(&name).await;
    assert_eq!(
        called,
        ["create", "get", "update"].map(String::from).into(),
        "leader election and ticks call these verbs"
    );
    for role in ["deploy/role.yaml", "deploy/openkruise/role.yaml"] {
        let rules = lease_rules(role);
        let granted: BTreeSet<String> = rules.iter().map(|(v, _)| v.clone()).collect();
        assert_eq!(granted, called, "{role}: Lease verbs granted vs called");
        for (verb, names) in &rules {
            let want: Vec<String> = if verb == "create" {
                Vec::new()
            } else {
                vec![name.clone()]
            };
            assert_eq!(names, &want, "{role}: resourceNames of Lease {verb}");
        }
    }
}
