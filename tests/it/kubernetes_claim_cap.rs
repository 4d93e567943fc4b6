//! `backend.kubernetes.max_claims` over the real kube client and kube-testbed: a new
//! session past the cap answers 503 `no_capacity` with `Retry-After` and creates no claim;
//! releasing a session frees its place for the next one.

use crate::kube_support;

use std::time::Duration;

use agent_activator::server;
use kube_support::*;

fn claims(tb: &kube_testbed::Testbed) -> Vec<String> {
    tb.list(AGENT_SANDBOX, "SandboxClaim", "default")
        .into_iter()
        .filter(|c| c["metadata"]["deletionTimestamp"].is_null())
        .map(|c| {
            c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_claim_cap_answers_503_no_capacity_and_frees_on_release() {
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "default", 3).unwrap();
    wait_pods(&tb, 3).await;
    let path = std::env::temp_dir().join(format!(
        "aa-kube-cap-{}-{}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&path, tb.kubeconfig("default")).unwrap();
    let mut cfg = config("agent-sandbox", "default", "");
    cfg.backend.kubernetes.kubeconfig = Some(path.clone());
    cfg.backend.kubernetes.max_claims = 2;
    let srv = server::start(cfg).await.expect("activator starts");
    let proxy = srv.proxy_addr();

    for s in ["cap-1", "cap-2"] {
        let (status, body, _) = http(proxy, "POST", "/counter", Some(s)).await;
        assert_eq!(status, 200, "{s}: {body}");
    }
    assert_eq!(claims(&tb).len(), 2);

    // The third session is over the cap: refused at once, and no claim is made for it.
    let (status, body, headers) = http(proxy, "POST", "/counter", Some("cap-3")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_capacity", "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        !body.to_string().contains("max_claims"),
        "the client is not told internals: {body}"
    );
    assert_eq!(claims(&tb).len(), 2, "no claim for the refused session");

    // Releasing one session frees its place once its claim is gone from the watch cache.
    assert!(srv.activator().release(&key("cap-1")).await.unwrap());
    wait_until(&tb, "the released claim is deleted", |tb| {
        claims(tb).len() == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body, _) = http(proxy, "POST", "/counter", Some("cap-3")).await;
        if status == 200 {
            break;
        }
        assert_eq!(body["error"]["code"], "no_capacity", "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never given to cap-3"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(claims(&tb).len(), 2);
    srv.shutdown().await;
    let _ = std::fs::remove_file(path);
}
