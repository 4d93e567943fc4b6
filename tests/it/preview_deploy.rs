//! deploy/ and preview URLs (issue 23): the sandboxes' NetworkPolicy (the SandboxTemplate's
//! `networkPolicy`, applied by agent-sandbox) admits from the activator exactly the port it
//! proxies to plus the shipped config's `preview.ports`, and the sandbox serves them.

use std::collections::BTreeSet;
use std::path::Path;

use agent_activator::config::Config;

fn read(path: &str) -> serde_yaml_ng::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    serde_yaml_ng::from_str(&std::fs::read_to_string(root.join(path)).unwrap()).unwrap()
}

#[test]
fn the_sandbox_network_policy_admits_exactly_the_serving_and_preview_ports() {
    let cm = read("deploy/configmap.yaml");
    let config = Config::from_yaml(cm["data"]["activator.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let preview = config
        .preview
        .as_ref()
        .expect("the shipped config has preview");
    let mut wanted: BTreeSet<u64> = preview.ports.iter().map(|p| u64::from(*p)).collect();
    wanted.insert(u64::from(config.backend.kubernetes.port));

    let tpl = read("deploy/sandboxtemplate.yaml");
    let ingress = tpl["spec"]["networkPolicy"]["ingress"]
        .as_sequence()
        .unwrap();
    assert_eq!(ingress.len(), 1, "one rule: from the activator");
    let from = &ingress[0]["from"][0];
    assert_eq!(
        from["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "agent-activator"
    );
    let admitted: BTreeSet<u64> = ingress[0]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["protocol"], "TCP");
            p["port"].as_u64().expect("numeric ports")
        })
        .collect();
    assert_eq!(
        admitted, wanted,
        "exactly the serving port and preview.ports"
    );
    let container = &tpl["spec"]["podTemplate"]["spec"]["containers"][0];
    let served: BTreeSet<u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(served, wanted, "the sandbox declares what it serves");
}

/// Kubernetes (kube-testbed): a preview port of a claimed sandbox is its pod's IP with that
/// port, like the serving port (pods listen on their own 127.x.y.z there).
#[tokio::test]
async fn kubernetes_preview_ports_are_the_pod_ip_and_that_port() {
    use crate::kube_support::{backend, budget, config, key, testbed_with, wait_pods};
    use agent_activator::backend::SandboxBackend;
    let tb = testbed_with(|o| o.pod_port = 18080).await;
    tb.seed_agent_sandbox("default", "default", 2).unwrap();
    wait_pods(&tb, 2).await;
    let mut cfg = config("agent-sandbox", "default", "");
    cfg.backend.kubernetes.port_from_annotation = false;
    cfg.backend.kubernetes.port = 18080;
    let b = backend(&tb, &cfg);
    let got = b
        .claim(&key("viewer"), budget(crate::support::WAIT))
        .await
        .unwrap();
    let pod = tb
        .pods()
        .into_iter()
        .find(|p| p.sandbox == got.sandbox.as_str())
        .unwrap();
    let preview = b.port_endpoint(&got.sandbox, 5173).expect("a running pod");
    assert_eq!(preview.ip(), pod.addr.ip());
    assert_eq!(preview.port(), 5173);
    let other = tb
        .pods()
        .into_iter()
        .find(|p| p.sandbox != got.sandbox.as_str())
        .unwrap();
    assert_ne!(preview.ip(), other.addr.ip(), "never another sandbox's pod");
    let gone = agent_activator::backend::SandboxId::new("no-such-sandbox");
    assert_eq!(b.port_endpoint(&gone, 5173), None);
}
