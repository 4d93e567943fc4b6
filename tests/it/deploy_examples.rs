//! deploy/examples/: PingSource, HPA via prometheus-adapter, KEDA ScaledObject, Grafana
//! dashboard. Every metric they name exists, they point at the objects deploy/ ships, the
//! PingSource's session header is one the activator reads, and built-in kinds validate
//! against the Kubernetes schemas (kubernetes-validate, as deploy/validate.py).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use agent_activator::config::{Config, SessionSource};
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn doc_of_kind(file: &str, kind: &str) -> Vec<Value> {
    docs(&root().join("deploy/examples").join(file))
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect()
}

/// Metric families registered in src/metrics.rs.
fn registered() -> BTreeSet<String> {
    let src = include_str!("../../src/metrics.rs");
    src.split('"')
        .filter(|s| {
            s.starts_with("activator_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

/// Every `activator_*` identifier in `text`, without histogram suffixes.
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("activator_") {
        let start = i + pos;
        let before_ok = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'-'
                || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if before_ok {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

#[test]
fn every_metric_the_examples_name_exists() {
    let known = registered();
    assert!(known.contains("activator_desired_sandboxes"), "{known:?}");
    for path in examples() {
        let text = std::fs::read_to_string(&path).unwrap();
        let names = mentioned(&text);
        for name in &names {
            assert!(
                known.contains(name),
                "{path:?} names {name}, which is not registered"
            );
        }
    }
}

#[test]
fn pingsource_reaches_the_activator_with_a_session_it_reads() {
    let service: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/service.yaml")).unwrap(),
    )
    .unwrap();
    let ping = &doc_of_kind("pingsource.yaml", "PingSource")[0];
    assert_eq!(ping["apiVersion"], "sources.knative.dev/v1");
    assert_eq!(
        ping["spec"]["sink"]["ref"]["name"],
        service["metadata"]["name"]
    );
    assert_eq!(ping["spec"]["sink"]["ref"]["kind"], "Service");
    let session = ping["spec"]["ceOverrides"]["extensions"]["session"]
        .as_str()
        .unwrap();
    assert!(agent_activator::session::validate(session.as_bytes(), 128).is_ok());
    // Binary-mode CloudEvents carry the extension as `Ce-Session`; the patched config reads it.
    let cm = &doc_of_kind("pingsource.yaml", "ConfigMap")[0];
    let config = Config::from_yaml(cm["data"]["activator.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config
            .session
            .sources
            .iter()
            .any(|s| matches!(s, SessionSource::Header(h) if h.eq_ignore_ascii_case("ce-session"))),
        "{:?}",
        config.session.sources
    );
}

#[test]
fn hpa_and_keda_scale_the_shipped_warm_pool() {
    let pool: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/sandboxwarmpool.yaml")).unwrap(),
    )
    .unwrap();
    let refs = doc_of_kind("hpa-prometheus-adapter.yaml", "HorizontalPodAutoscaler")
        .into_iter()
        .chain(doc_of_kind("keda-scaledobject.yaml", "ScaledObject"))
        .map(|d| d["spec"]["scaleTargetRef"].clone())
        .filter(|r| r["kind"] == "SandboxWarmPool")
        .collect::<Vec<_>>();
    assert_eq!(
        refs.len(),
        2,
        "one HPA and one ScaledObject target the warm pool"
    );
    for r in refs {
        assert_eq!(r["apiVersion"], pool["apiVersion"]);
        assert_eq!(r["name"], pool["metadata"]["name"]);
    }
    let keda = &doc_of_kind("keda-scaledobject.yaml", "ScaledObject")[0];
    let trigger = &keda["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    assert!(
        trigger["metadata"]["query"]
            .as_str()
            .unwrap()
            .contains("activator_warm_pool_target")
    );
}

#[test]
fn the_dashboard_has_every_panel() {
    let text =
        std::fs::read_to_string(root().join("deploy/examples/grafana-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Requests per second",
        "Concurrency",
        "Sessions by state",
        "Activation latency percentiles",
        "Queue depth",
        "Desired vs actual sandboxes",
    ] {
        assert!(titles.contains(&want), "{want} missing from {titles:?}");
    }
    for p in dash["panels"].as_array().unwrap() {
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
}

/// Built-in kinds (ConfigMap, HorizontalPodAutoscaler) against the Kubernetes schemas.
const VALIDATE: &str = r#"
import sys, yaml, kubernetes_validate
version = kubernetes_validate.latest_version()
bad = 0
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or "." in doc["apiVersion"].split("/")[0]:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except Exception as e:
            bad += 1
            print(f"{path}: {doc['kind']}: {getattr(e, 'message', e)}")
sys.exit(1 if bad else 0)
"#;

#[test]
#[cfg_attr(
    missing_kubernetes_validate,
    ignore = "kubernetes-validate not installed (pip install kubernetes-validate); build.rs probe"
)]
fn built_in_kinds_validate_against_kubernetes_schemas() {
    let has_validator = Command::new("python3")
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_validator,
        "kubernetes-validate is required (pip install kubernetes-validate)"
    );
    let yamls: Vec<PathBuf> = examples()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let out = Command::new("python3")
        .arg("-c")
        .arg(VALIDATE)
        .args(&yamls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
