//! Claim-time customisation against kube-testbed, both flavours: the claim carries exactly
//! the upstream fields (agent-sandbox `extensions/api/v1beta1/sandboxclaim_types.go`
//! @2fd412d: `env`, `volumeClaimTemplates`, `additionalPodMetadata`; OpenKruise
//! `api/v1alpha1/sandboxclaim_types.go` @0b72c83: `envVars`, `labels`,
//! `dynamicVolumesMount`, `runtimes`) and nothing else; an agent-sandbox claim with env or
//! volumes is cold-started (`X-Activator-Activation: create`, counted), a plain one is not.

use crate::kube_support;

use std::collections::BTreeSet;
use std::time::Duration;

use agent_activator::backend::{ActivationKind, SandboxBackend};
use agent_activator::customize::Customizer;
use agent_activator::server;
use http::{HeaderMap, HeaderValue};
use kube_support::*;
use serde_json::{Value, json};

const CUSTOMIZE: &str = r#"customize:
  env:
    - {header: X-Sandbox-Env-Region, name: REGION, pattern: "[a-z]{2}-[a-z]+", container_name: sandbox}
  labels:
    - {header: X-Sandbox-Team, label: sandbox.users.io/team, pattern: "[a-z]+"}
  volumes:
    - {name: workspace, mount_path: /workspace, size: 2Gi, storage_class: fast}
  sidecars:
    header: X-Sandbox-Sidecars
    sets:
      browser: {runtimes: [agent-runtime, csi], warm_pool: browser}
"#;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

async fn activator(tb: &kube_testbed::Testbed, extra: &str) -> server::RunningServer {
    let path = std::env::temp_dir().join(format!(
        "aa-kube-cust-{}-{}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&path, tb.kubeconfig("default")).unwrap();
    let mut cfg = config("agent-sandbox", "default", extra);
    cfg.backend.kubernetes.kubeconfig = Some(path);
    server::start(cfg).await.expect("activator starts")
}

/// `GET /state` for `session` through the proxy: status and the raw response.
async fn get(addr: std::net::SocketAddr, session: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut all = vec![("x-session-id", session)];
    all.extend_from_slice(extra);
    raw_get(addr, "/state", &all).await
}

/// One raw HTTP/1.1 GET (`connection: close`): status and the whole response text.
async fn raw_get(addr: std::net::SocketAddr, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

fn header_of<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn agent_sandbox_claim_carries_exactly_env_volumes_and_labels_and_cold_starts() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    // As deploy/sandboxtemplate.yaml: upstream's default refuses claims with env or volumes.
    tb.set_template_policies("default", "default", "Allowed", "Allowed")
        .unwrap();
    wait_pods(&tb, 1).await;
    let extra = CUSTOMIZE.replace("  sidecars:\n    header: X-Sandbox-Sidecars\n    sets:\n      browser: {runtimes: [agent-runtime, csi], warm_pool: browser}\n", "");
    let server = activator(&tb, &extra).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));

    let (status, resp) = get(
        server.proxy_addr(),
        "cust-asb",
        &[
            ("x-sandbox-env-region", "eu-west"),
            ("x-sandbox-team", "infra"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(header_of(&resp, "x-activator-activation"), Some("create"));
    let claim = object(
        &tb,
        AGENT_SANDBOX,
        "SandboxClaim",
        &b.claim_name(&key("cust-asb")),
    )
    .unwrap();
    let spec = &claim["spec"];
    assert_eq!(
        keys(spec),
        set(&[
            "warmPoolRef",
            "lifecycle",
            "env",
            "volumeClaimTemplates",
            "additionalPodMetadata"
        ]),
        "{spec}"
    );
    assert_eq!(spec["warmPoolRef"], json!({"name": "default"}));
    assert_eq!(
        spec["env"],
        json!([{"name": "REGION", "value": "eu-west", "containerName": "sandbox"}])
    );
    assert_eq!(
        spec["volumeClaimTemplates"],
        json!([{
            "metadata": {"name": "workspace"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "2Gi"}},
                "storageClassName": "fast",
            },
        }])
    );
    assert_eq!(
        spec["additionalPodMetadata"],
        json!({"labels": {"sandbox.users.io/team": "infra"}})
    );
    // Cold-created from the template, named after the claim, with the env and the PVC
    // template; the warm sandbox is still in the pool.
    let name = claim["status"]["sandbox"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(name, b.claim_name(&key("cust-asb")));
    let sbx = object(&tb, "agents.x-k8s.io", "Sandbox", &name).unwrap();
    let container = &sbx["spec"]["podTemplate"]["spec"]["containers"][0];
    assert_eq!(
        container["env"],
        json!([{"name": "REGION", "value": "eu-west"}])
    );
    assert_eq!(
        sbx["spec"]["volumeClaimTemplates"],
        spec["volumeClaimTemplates"]
    );

    // A session without headers: no env, no labels; the volumes are every session's, so
    // it is cold-started too.
    let (status, resp) = get(server.proxy_addr(), "plain-asb", &[]).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(header_of(&resp, "x-activator-activation"), Some("create"));
    let plain = object(
        &tb,
        AGENT_SANDBOX,
        "SandboxClaim",
        &b.claim_name(&key("plain-asb")),
    )
    .unwrap();
    assert_eq!(
        keys(&plain["spec"]),
        set(&["warmPoolRef", "lifecycle", "volumeClaimTemplates"]),
        "{plain}"
    );

    let (_, metrics) = raw_get(server.admin_addr(), "/metrics", &[]).await;
    assert!(
        metrics.contains("activator_customized_claims_total{cold=\"true\"} 2"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_plain_agent_sandbox_claim_has_no_customisation_fields_and_takes_a_warm_sandbox() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let b = backend(&tb, &config("agent-sandbox", "default", ""));
    let k = key("plain");
    let got = b.claim(&k, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Claim);
    let claim = object(&tb, AGENT_SANDBOX, "SandboxClaim", &b.claim_name(&k)).unwrap();
    assert_eq!(
        keys(&claim["spec"]),
        set(&["warmPoolRef", "lifecycle"]),
        "{claim}"
    );
}

#[tokio::test]
async fn a_sidecar_set_claims_from_its_template_variant_pool() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_agent_sandbox("default", "default", 0).unwrap();
    tb.seed_agent_sandbox("default", "browser", 1).unwrap();
    tb.set_template_policies("default", "browser", "Allowed", "Allowed")
        .unwrap();
    wait_pods(&tb, 1).await;
    let cfg = config("agent-sandbox", "default", CUSTOMIZE);
    let b = backend(&tb, &cfg);
    let customizer = Customizer::new(&cfg.customize, "customize").unwrap();
    // Only the sidecar header: the volumes still force a cold start from `browser`.
    let spec = customizer
        .spec(&headers(&[("x-sandbox-sidecars", "browser")]))
        .unwrap();
    let k = key("with-browser");
    let got = b.claim_with(&k, &spec, budget(WAIT)).await.unwrap();
    assert_eq!(got.kind, ActivationKind::Create);
    let claim = object(&tb, AGENT_SANDBOX, "SandboxClaim", &b.claim_name(&k)).unwrap();
    assert_eq!(claim["spec"]["warmPoolRef"], json!({"name": "browser"}));
    assert_eq!(
        keys(&claim["spec"]),
        set(&["warmPoolRef", "lifecycle", "volumeClaimTemplates"]),
        "{claim}"
    );
    let sbx = object(&tb, "agents.x-k8s.io", "Sandbox", got.sandbox.as_str()).unwrap();
    assert_eq!(
        sbx["metadata"]["annotations"]["agents.x-k8s.io/sandbox-template-ref"],
        "browser"
    );
}

#[tokio::test]
async fn openkruise_claim_carries_exactly_env_vars_labels_volumes_and_runtimes() {
    let tb = testbed(Duration::from_millis(10)).await;
    tb.seed_openkruise("default", "pool", 1).unwrap();
    wait_pods(&tb, 1).await;
    let extra = CUSTOMIZE.replace(", warm_pool: browser", "");
    let cfg = config("openkruise", "pool", &extra);
    let b = backend(&tb, &cfg);
    let customizer = Customizer::new(&cfg.customize, "customize").unwrap();
    let spec = customizer
        .spec(&headers(&[
            ("x-sandbox-env-region", "us-east"),
            ("x-sandbox-team", "ml"),
            ("x-sandbox-sidecars", "browser"),
        ]))
        .unwrap();
    let k = key("kruise-custom");
    let got = b.claim_with(&k, &spec, budget(WAIT)).await.unwrap();
    // OpenKruise mounts dynamic volumes and passes envVars to a warm sandbox: no cold start.
    assert_eq!(got.kind, ActivationKind::Claim);
    let claim = object(&tb, KRUISE, "SandboxClaim", &b.claim_name(&k)).unwrap();
    let s = &claim["spec"];
    assert_eq!(
        keys(s),
        set(&[
            "templateName",
            "createOnNoStock",
            "waitReadyTimeout",
            "claimTimeout",
            "shutdownTime",
            "ttlAfterCompleted",
            "labels",
            "envVars",
            "dynamicVolumesMount",
            "runtimes",
        ]),
        "{s}"
    );
    assert_eq!(s["envVars"], json!({"REGION": "us-east"}));
    assert_eq!(s["labels"], json!({"sandbox.users.io/team": "ml"}));
    assert_eq!(
        s["runtimes"],
        json!([{"name": "agent-runtime"}, {"name": "csi"}])
    );
    let hash = &k.sha256_hex()[..32];
    assert_eq!(
        s["dynamicVolumesMount"],
        json!([{"pvName": format!("workspace-{hash}"), "mountPath": "/workspace"}])
    );
}
