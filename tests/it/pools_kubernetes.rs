//! Two kubernetes pools behind one activator, against kube-testbed: each pool claims from
//! its own SandboxWarmPool under its own claim prefix through the replica's one kube
//! client, and a restarted activator recovers each session into its own pool.

use crate::kube_support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use agent_activator::config::Config;
use agent_activator::server;
use kube_support::*;

fn pools_yaml(kubeconfig: &std::path::Path) -> String {
    let pool = |name: &str, matcher: &str, prefix: &str| {
        format!(
            "  - name: {name}\n{matcher}    backend:\n      kind: kubernetes\n      kubernetes:\n        api: agent-sandbox\n        pool: {name}-pool\n        namespace: default\n        kubeconfig: \"{}\"\n        claim_prefix: {prefix}\n        write_session_id: true\n        activity_write_interval: 200ms\n        port_from_annotation: true\n",
            kubeconfig.display()
        )
    };
    format!(
        "activation:\n  timeout: 15s\nautoscaler:\n  enabled: false\npools:\n{}{}",
        pool(
            "python",
            "    match:\n      header: {name: X-Sandbox-Template, value: python}\n",
            "py-"
        ),
        pool(
            "browser",
            "    match:\n      path_prefix: /browser/\n",
            "br-"
        ),
    )
}

async fn request(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        WAIT,
        client.request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("response in time")
    .expect("request sent");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// The claim `prefix*` and the warm pool it draws from.
fn claims(tb: &kube_testbed::Testbed) -> Vec<(String, String)> {
    let mut out: Vec<_> = tb
        .list(AGENT_SANDBOX, "SandboxClaim", "default")
        .iter()
        .map(|c| {
            (
                c["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                c["spec"]["warmPoolRef"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn start(yaml: &str) -> server::RunningServer {
    let mut cfg = Config::from_yaml(yaml).expect("valid");
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin_listen = "127.0.0.1:0".parse().unwrap();
    server::start(cfg).await.expect("activator starts")
}

#[tokio::test]
async fn each_kubernetes_pool_claims_from_its_own_warm_pool_and_recovers_its_own() {
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "python-pool", 1).unwrap();
    tb.seed_agent_sandbox("default", "browser-pool", 1).unwrap();
    wait_pods(&tb, 2).await;
    let kubeconfig = std::env::temp_dir().join(format!(
        "aa-pools-kube-{}-{}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&kubeconfig, tb.kubeconfig("default")).unwrap();
    let yaml = pools_yaml(&kubeconfig);
    let srv = start(&yaml).await;

    let (status, py) = request(
        srv.proxy_addr(),
        "/counter",
        &[("x-session-id", "s1"), ("x-sandbox-template", "python")],
    )
    .await;
    assert_eq!(status, 200, "{py}");
    let (status, br) = request(
        srv.proxy_addr(),
        "/browser/counter",
        &[("x-session-id", "s2")],
    )
    .await;
    assert_eq!(status, 200, "{br}");
    let made = claims(&tb);
    assert_eq!(made.len(), 2, "{made:?}");
    let by_prefix = |p: &str| made.iter().find(|(n, _)| n.starts_with(p)).cloned();
    assert_eq!(
        by_prefix("py-").map(|c| c.1),
        Some("python-pool".to_owned()),
        "{made:?}"
    );
    assert_eq!(
        by_prefix("br-").map(|c| c.1),
        Some("browser-pool".to_owned()),
        "{made:?}"
    );
    let mismatch = request(
        srv.proxy_addr(),
        "/browser/counter",
        &[("x-session-id", "s1")],
    )
    .await;
    assert_eq!(mismatch.0, 409, "{}", mismatch.1);
    srv.shutdown().await;

    // A new activator process finds each session in its own pool again (by claim prefix),
    // and the session keeps its sandbox.
    let again = start(&yaml).await;
    let owner = |id: &str| again.pools().owner(&key(id)).map(|p| p.name.to_string());
    assert_eq!(owner("s1").as_deref(), Some("python"));
    assert_eq!(owner("s2").as_deref(), Some("browser"));
    let (status, py2) = request(again.proxy_addr(), "/counter", &[("x-session-id", "s1")]).await;
    assert_eq!(status, 200, "{py2}");
    assert_eq!(py2["pid"], py["pid"]);
    assert_eq!(py2["counter"], 2);
    again.shutdown().await;
    let _ = std::fs::remove_file(&kubeconfig);
}
