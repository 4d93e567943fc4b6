//! `kubectl kustomize deploy/` as a user would apply it: every rendered object validates
//! (built-in kinds against the Kubernetes schemas, custom resources against the reduced CRD
//! schemas of deploy/crds/), and the rendered network policies let the activator reach its
//! sandboxes and only Prometheus and the activator's own replicas reach its admin port.
//!
//! kubectl (and kubernetes-validate) are prerequisites: `build.rs` marks these tests ignored
//! where one is missing, except under `CI=true`, where a missing tool fails them.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use agent_activator::config::Config;
use serde_yaml_ng::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The rendered base, as text.
fn render() -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy"))
        .output()
        .unwrap_or_else(|e| panic!("kubectl is required for this test: {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("rendered YAML is UTF-8")
}

fn objects(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML parses"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn one<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind}/{name} rendered");
    found[0]
}

/// Whether a label selector (matchLabels only; expressions are not used in deploy/) selects
/// an object carrying `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not evaluated here: {selector:?}"
    );
    let Some(Value::Mapping(want)) = selector.get("matchLabels") else {
        // `{}` selects everything.
        return selector.as_mapping().is_some_and(|m| m.is_empty());
    };
    want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn namespace_labels(ns: &str) -> Value {
    // The label the API server puts on every namespace.
    serde_yaml_ng::from_str(&format!("kubernetes.io/metadata.name: {ns}")).unwrap()
}

fn list(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

/// `(port, protocol)` of a NetworkPolicy port entry, named ports resolved by `names`.
fn port_of(p: &Value, names: &[(String, i64)]) -> (i64, String) {
    let proto = p["protocol"].as_str().unwrap_or("TCP").to_owned();
    let port = match &p["port"] {
        Value::Number(n) => n.as_i64().unwrap(),
        Value::String(s) => {
            names
                .iter()
                .find(|(n, _)| n == s)
                .unwrap_or_else(|| panic!("named port {s} not on the activator container"))
                .1
        }
        other => panic!("a rule without a port opens every port: {other:?}"),
    };
    (port, proto)
}

#[test]
#[cfg_attr(
    any(missing_kubectl, missing_kubernetes_validate),
    ignore = "kubectl or kubernetes-validate not installed; build.rs probe"
)]
fn every_rendered_object_validates() {
    let text = render();
    let count = objects(&text).len();
    assert!(count >= 14, "{count} objects rendered");
    let mut child = Command::new("python3")
        .arg(root().join("deploy/validate.py"))
        .args(["--rendered", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is required for this test: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "rendered deploy/ is invalid (exit 2: validator missing):\n{stdout}{stderr}"
    );
    assert!(
        stdout.starts_with(&format!("ok: {count} rendered objects valid")),
        "{stdout}"
    );
}

#[test]
#[cfg_attr(missing_kubectl, ignore = "kubectl not installed; build.rs probe")]
fn rendered_network_policies_admit_the_activator_and_guard_the_admin_port() {
    let objs = objects(&render());
    let deployment = one(&objs, "Deployment", "agent-activator");
    let namespace = deployment["metadata"]["namespace"]
        .as_str()
        .expect("rendered into a namespace")
        .to_owned();
    for o in &objs {
        if o["kind"] != "Namespace" {
            assert_eq!(
                o["metadata"]["namespace"].as_str(),
                Some(namespace.as_str()),
                "{:?}/{:?}",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let named_ports: Vec<(String, i64)> = list(&container["ports"])
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    let cm = one(&objs, "ConfigMap", "agent-activator");
    let config = Config::from_yaml(cm["data"]["activator.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let sandbox_port = i64::from(config.backend.kubernetes.port);
    let admin_port = i64::from(config.admin_listen.port());
    let proxy_port = i64::from(config.listen.port());

    // --- SandboxTemplate: the activator may reach podIP:backend.kubernetes.port ---
    let template = one(&objs, "SandboxTemplate", "agent-sandbox");
    let spec = &template["spec"];
    assert_eq!(spec["networkPolicyManagement"], "Managed");
    let policy = &spec["networkPolicy"];
    let ingress = list(&policy["ingress"]);
    assert!(!ingress.is_empty(), "an empty ingress list denies all");
    let activator_peer = |peer: &Value| {
        selects(&peer["namespaceSelector"], &namespace_labels(&namespace))
            && selects(&peer["podSelector"], pod_labels)
    };
    let admits_activator = ingress.iter().any(|rule| {
        list(&rule["from"]).iter().any(activator_peer)
            && list(&rule["ports"])
                .iter()
                .any(|p| port_of(p, &[]) == (sandbox_port, "TCP".into()))
    });
    assert!(
        admits_activator,
        "no ingress rule admits the activator pods of namespace {namespace} on \
         {sandbox_port}/TCP: {ingress:?}"
    );
    for rule in &ingress {
        assert!(
            !list(&rule["from"]).is_empty(),
            "a sandbox ingress rule open to every source: {rule:?}"
        );
    }
    // Egress spelled out (an empty list denies all), keeping upstream's private-range block
    // (agent-sandbox 2fd412d55eca extensions/controllers/sandboxtemplate_controller.go).
    let egress = list(&policy["egress"]);
    assert!(!egress.is_empty(), "an empty egress list denies all egress");
    let v4 = egress
        .iter()
        .flat_map(|r| list(&r["to"]))
        .find(|peer| peer["ipBlock"]["cidr"] == "0.0.0.0/0")
        .expect("public IPv4 egress");
    let except: Vec<String> = list(&v4["ipBlock"]["except"])
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        except,
        [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "169.254.0.0/16"
        ]
    );

    // --- NetworkPolicy on the activator: admin port for Prometheus and peers only ---
    let np = one(&objs, "NetworkPolicy", "agent-activator");
    assert!(selects(&np["spec"]["podSelector"], pod_labels));
    assert!(list(&np["spec"]["policyTypes"]).contains(&Value::from("Ingress")));
    let rules = list(&np["spec"]["ingress"]);
    let mut proxy_open = false;
    let (mut prometheus, mut peers) = (false, false);
    for rule in &rules {
        let ports: Vec<(i64, String)> = list(&rule["ports"])
            .iter()
            .map(|p| port_of(p, &named_ports))
            .collect();
        assert!(
            !ports.is_empty(),
            "a rule without ports opens them all: {rule:?}"
        );
        let from = list(&rule["from"]);
        if ports.contains(&(proxy_port, "TCP".into())) && from.is_empty() {
            proxy_open = true;
        }
        if !ports.iter().any(|(p, _)| *p == admin_port) {
            continue;
        }
        assert!(
            !from.is_empty(),
            "the admin port is open to every source: {rule:?}"
        );
        for peer in &from {
            let is_prometheus =
                selects(&peer["namespaceSelector"], &namespace_labels("monitoring"))
                    && peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus";
            // No namespaceSelector: the policy's own namespace.
            let is_peer = peer.get("namespaceSelector").is_none()
                && peer.get("ipBlock").is_none()
                && selects(&peer["podSelector"], pod_labels);
            assert!(
                is_prometheus || is_peer,
                "the admin port admits someone else: {peer:?}"
            );
            prometheus |= is_prometheus;
            peers |= is_peer;
        }
    }
    assert!(
        proxy_open,
        "the proxy port {proxy_port} takes traffic: {rules:?}"
    );
    assert!(prometheus, "Prometheus may scrape {admin_port}: {rules:?}");
    assert!(
        peers,
        "the autoscaler leader may collect peers' /api/stats on {admin_port}: {rules:?}"
    );
}
