//! What the Kubernetes backend asks of the API server, per flavour, against what deploy/
//! ships: every backend path is driven against kube-testbed, whose audit log records each
//! request as an RBAC verb and keeps every write body. The Role must grant exactly those
//! verbs (no more, no fewer), and every field the backend writes must exist in the reduced
//! CRD schemas of deploy/crds (which follow the upstream field names).

use crate::kube_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use agent_activator::backend::SandboxBackend;
use kube_support::*;
use serde_json::Value;

type Access = (String, String, String);

/// Claims, pauses, resumes, recovers, scales, refreshes the backstop, meets a claim
/// created by another replica, releases and shuts down: every API call the backend makes.
async fn exercise(api: &str, pool: &str) -> kube_testbed::Testbed {
    let tb = testbed(Duration::ZERO).await;
    match api {
        "agent-sandbox" => tb.seed_agent_sandbox("default", pool, 1).unwrap(),
        _ => tb.seed_openkruise("default", pool, 1).unwrap(),
    }
    wait_pods(&tb, 1).await;
    let cfg = config(api, pool, "");
    let (a, b) = (backend(&tb, &cfg), backend(&tb, &cfg));
    let k = key("rbac");
    let (ra, rb) = tokio::join!(a.claim(&k, budget(WAIT)), b.claim(&k, budget(WAIT)));
    let (got, _) = (ra.unwrap(), rb.unwrap());
    a.record_activity(&k, &got.sandbox);
    a.pause(&got.sandbox).await.unwrap();
    a.resume(&got.sandbox, tokio::time::Instant::now() + WAIT)
        .await
        .unwrap();
    a.recover().await.unwrap();
    a.set_warm_pool_target(2).await.unwrap();
    let mut short = cfg.clone();
    short.backend.kubernetes.shutdown_after = agent_activator::config::Dur::secs(3600);
    let c = backend(&tb, &short);
    c.record_activity(&k, &got.sandbox);
    c.refresh_backstops().await;
    // Let the digest publishers write at least once more (patch after create).
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.release(&k, &got.sandbox).await.unwrap();
    for x in [&a, &b, &c] {
        x.shutdown().await;
    }
    tb
}

/// `(verb, group, resource)` granted by the Role in `file`, leases excepted (the
/// autoscaler's leader election, not the backend).
fn role_grants(file: &str) -> BTreeSet<Access> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let role: Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    if r != "leases" {
                        out.insert((
                            v.as_str().unwrap().into(),
                            g.as_str().unwrap().into(),
                            r.as_str().unwrap().into(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn compare(tb: &kube_testbed::Testbed, role: &str) {
    let used: BTreeSet<Access> = tb.audit.snapshot().into_keys().collect();
    let granted = role_grants(role);
    let missing: Vec<_> = used.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "{role} lacks what the backend calls: {missing:?}"
    );
    assert!(
        unused.is_empty(),
        "{role} grants what the backend never calls: {unused:?}"
    );
}

#[tokio::test]
async fn the_agent_sandbox_role_grants_exactly_what_the_backend_calls() {
    let tb = exercise("agent-sandbox", "default").await;
    compare(&tb, "deploy/role.yaml");
    check_bodies(&tb, "deploy/crds/agent-sandbox.yaml");
}

#[tokio::test]
async fn the_openkruise_role_grants_exactly_what_the_backend_calls() {
    let tb = exercise("openkruise", "pool").await;
    compare(&tb, "deploy/openkruise/role.yaml");
    check_bodies(&tb, "deploy/crds/openkruise.yaml");
}

/// The openAPIV3Schema of each CRD in `file`, by `(group, plural)`.
fn schemas(file: &str) -> Vec<((String, String), Value)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            let crd: Value = serde::Deserialize::deserialize(d).unwrap();
            let key = (
                crd["spec"]["group"].as_str().unwrap().to_owned(),
                crd["spec"]["names"]["plural"].as_str().unwrap().to_owned(),
            );
            (
                key,
                crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

/// Key paths of `body` that `schema` does not declare (metadata is the API server's).
fn unknown_fields(schema: &Value, body: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(fields) = body else {
        if let (Value::Array(items), Some(item)) = (body, schema.get("items")) {
            for (i, v) in items.iter().enumerate() {
                unknown_fields(item, v, &format!("{path}[{i}]"), out);
            }
        }
        return;
    };
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    for (k, v) in fields {
        let here = format!("{path}.{k}");
        if path.is_empty() && k == "metadata" {
            continue;
        }
        match schema["properties"].get(k) {
            Some(s) => unknown_fields(s, v, &here, out),
            None if schema["additionalProperties"].is_object() => {
                unknown_fields(&schema["additionalProperties"], v, &here, out)
            }
            None => out.push(here),
        }
    }
}

fn check_bodies(tb: &kube_testbed::Testbed, crds: &str) {
    let schemas = schemas(crds);
    let mut checked = 0;
    let mut problems = Vec::new();
    for ((verb, group, resource), body) in tb.audit.bodies() {
        let plural = resource.split('/').next().unwrap().to_owned();
        let Some((_, schema)) = schemas
            .iter()
            .find(|(k, _)| *k == (group.clone(), plural.clone()))
        else {
            continue;
        };
        if resource.ends_with("/scale") {
            continue;
        }
        checked += 1;
        let mut bad = Vec::new();
        unknown_fields(schema, &body, "", &mut bad);
        if !bad.is_empty() {
            problems.push(format!("{verb} {group}/{resource}: {bad:?}"));
        }
    }
    assert!(
        checked >= 3,
        "too few custom-resource writes checked ({checked})"
    );
    assert!(
        problems.is_empty(),
        "the backend writes fields {crds} lacks:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_schema_check_catches_an_invented_field() {
    let schemas = schemas("deploy/crds/agent-sandbox.yaml");
    let claim = &schemas
        .iter()
        .find(|(k, _)| k.1 == "sandboxclaims")
        .unwrap()
        .1;
    let mut bad = Vec::new();
    let body = serde_json::json!({
        "metadata": {"name": "x"},
        "spec": {"warmPoolRef": {"name": "p"}, "ttlSecondsAfterCreated": 5,
                 "lifecycle": {"shutdownTime": "2026-01-01T00:00:00Z", "shutdownPolicy": "Delete"}},
    });
    unknown_fields(claim, &body, "", &mut bad);
    assert_eq!(bad, vec![".spec.ttlSecondsAfterCreated".to_owned()]);
}
