//! deploy/: every manifest validates offline (built-in kinds against the Kubernetes
//! schemas, CRD-typed ones against deploy/crds/), the shipped activator config parses,
//! and the Dockerfile is multi-stage and non-root.

use std::path::Path;
use std::process::Command;

use agent_activator::config::{BackendKind, Config};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The validator is a prerequisite (`build.rs` marks the test ignored where it is missing,
/// except under `CI=true`): if the test runs, a missing validator fails it.
fn validator_missing(reason: &str) -> ! {
    panic!("the manifest validator is unavailable: {reason} (pip install kubernetes-validate)");
}

#[test]
#[cfg_attr(
    missing_kubernetes_validate,
    ignore = "kubernetes-validate not installed (pip install kubernetes-validate); build.rs probe"
)]
fn every_manifest_validates_offline() {
    let out = match Command::new("python3")
        .arg(root().join("deploy/validate.py"))
        .output()
    {
        Ok(o) => o,
        Err(e) => validator_missing(&format!("cannot run python3: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => assert!(stdout.contains("ok:"), "{stdout}{stderr}"),
        Some(2) => validator_missing(stderr.trim()),
        _ => panic!("deploy/ manifests are invalid:\n{stdout}{stderr}"),
    }
}

#[test]
fn the_shipped_config_is_a_valid_kubernetes_config() {
    let text = std::fs::read_to_string(root().join("deploy/configmap.yaml")).unwrap();
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let yaml = cm["data"]["activator.yaml"]
        .as_str()
        .expect("configmap has data.activator.yaml");
    let config = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.backend.kind, BackendKind::Kubernetes);
    // The probes and Service target these ports.
    assert_eq!(config.listen.port(), 8080);
    assert_eq!(config.admin_listen.port(), 9090);
    let deployment = std::fs::read_to_string(root().join("deploy/deployment.yaml")).unwrap();
    assert!(deployment.contains("/etc/agent-activator/activator.yaml"));
    // The admin port is reachable in the cluster: it needs the token, mounted from the
    // Secret at the configured path.
    let token = config
        .admin
        .auth
        .bearer_token_file
        .as_ref()
        .expect("admin auth is on");
    let d: serde_yaml_ng::Value = serde_yaml_ng::from_str(&deployment).unwrap();
    let pod = &d["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "admin-token")
        .expect("admin-token is mounted");
    assert_eq!(
        token.parent().unwrap().to_str().unwrap(),
        mount["mountPath"].as_str().unwrap()
    );
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "admin-token")
        .expect("admin-token volume");
    assert_eq!(volume["secret"]["secretName"], "agent-activator-admin");
    assert!(!config.admin.allow_unauthenticated);
    // SIGKILL comes after the drain delay and the drain window, not during them.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let needed = config.proxy.drain_delay.as_duration() + config.proxy.drain_timeout.as_duration();
    assert!(grace > needed.as_secs(), "grace {grace}s <= {needed:?}");
    assert!(!config.proxy.drain_delay.is_zero());
    // The autoscaler's peers are the headless Service over every replica's admin port.
    let peers: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/service-peers.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(peers["spec"]["clusterIP"], "None");
    let name = peers["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        config.autoscaler.peers,
        vec![format!("{name}:{}", config.admin_listen.port())]
    );
    let kustomization = std::fs::read_to_string(root().join("deploy/kustomization.yaml")).unwrap();
    assert!(kustomization.contains("- service-peers.yaml"));
}

#[test]
fn the_dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "{stages} stages");
    assert!(text.contains("--locked"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root"))
    );
}
