//! `Customizer`: compiling the section and turning headers into a `ClaimSpec`.

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::config::CustomizeConfig;

fn config(yaml: &str) -> CustomizeConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn customizer() -> Customizer {
    Customizer::new(
        &config(
            r#"
env:
  - {header: X-Sandbox-Env-Region, name: REGION, pattern: "[a-z]{2}-[a-z]+", container_name: agent}
  - {header: X-Sandbox-Env-Team, name: TEAM, pattern: "[a-z]+", required: true}
labels:
  - {header: X-Sandbox-Label-Tier, label: example.com/tier, pattern: "gold|silver"}
volumes:
  - {name: workspace, mount_path: /workspace}
sidecars:
  header: X-Sandbox-Sidecars
  sets:
    browser: {runtimes: [agent-runtime], warm_pool: browser-pool}
header_prefix: x-sandbox-
"#,
        ),
        "customize",
    )
    .unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn allowlisted_headers_become_the_spec() {
    let spec = customizer()
        .spec(&headers(&[
            ("x-sandbox-env-region", "eu-west"),
            ("x-sandbox-env-team", "infra"),
            ("x-sandbox-label-tier", "gold"),
            ("x-sandbox-sidecars", "browser"),
            ("x-unrelated", "anything"),
        ]))
        .unwrap();
    assert_eq!(
        spec.env,
        vec![
            SpecEnv {
                name: "REGION".into(),
                value: "eu-west".into(),
                container_name: Some("agent".into())
            },
            SpecEnv {
                name: "TEAM".into(),
                value: "infra".into(),
                container_name: None
            },
        ]
    );
    assert_eq!(
        spec.labels.get("example.com/tier").map(String::as_str),
        Some("gold")
    );
    assert_eq!(spec.volumes.len(), 1);
    let sidecars = spec.sidecars.as_ref().unwrap();
    assert_eq!(sidecars.name, "browser");
    assert_eq!(sidecars.set.runtimes, vec!["agent-runtime".to_owned()]);
    assert!(spec.forces_cold_start());
}

#[test]
fn refusals_name_the_header_and_never_the_value() {
    let c = customizer();
    let base = [("x-sandbox-env-team", "infra")];
    let cases: Vec<(Vec<(&'static str, &str)>, CustomizeError)> = vec![
        (
            vec![("x-sandbox-env-region", "EU-WEST;rm -rf")],
            CustomizeError::Pattern("x-sandbox-env-region".into()),
        ),
        (
            vec![("x-sandbox-env-secret", "s3cr3t")],
            CustomizeError::NotAllowed("x-sandbox-env-secret".into()),
        ),
        (
            vec![("x-sandbox-sidecars", "gpu")],
            CustomizeError::UnknownSet("x-sandbox-sidecars".into()),
        ),
        (
            vec![
                ("x-sandbox-label-tier", "gold"),
                ("x-sandbox-label-tier", "gold"),
            ],
            CustomizeError::Repeated("x-sandbox-label-tier".into()),
        ),
    ];
    for (extra, want) in cases {
        let mut pairs = base.to_vec();
        pairs.extend(extra.iter().cloned());
        let err = c.spec(&headers(&pairs)).unwrap_err();
        assert_eq!(err, want);
        for (_, v) in &extra {
            assert!(!err.to_string().contains(v), "{err} echoes {v}");
        }
    }
    assert_eq!(
        c.spec(&HeaderMap::new()).unwrap_err(),
        CustomizeError::Missing("x-sandbox-env-team".into())
    );
    // Anchored: a matching prefix is not enough.
    let err = c
        .spec(&headers(&[("x-sandbox-env-team", "infra1")]))
        .unwrap_err();
    assert_eq!(err, CustomizeError::Pattern("x-sandbox-env-team".into()));
}

#[test]
fn an_empty_section_shares_one_plain_spec() {
    let c = Customizer::new(&CustomizeConfig::default(), "customize").unwrap();
    let a = c.spec(&headers(&[("x-sandbox-env-any", "1")])).unwrap();
    assert!(a.is_empty());
    assert!(Arc::ptr_eq(&a, &c.plain()));
}

#[test]
fn bad_rules_are_config_errors_naming_the_key() {
    let cases = [
        (
            "env: [{header: X-A, name: 1BAD, pattern: x}]",
            "customize.env[0].name",
        ),
        (
            "env: [{header: X-A, name: PORT, pattern: x}]",
            "customize.env[0].name",
        ),
        (
            "env: [{header: X-A, name: A, pattern: '('}]",
            "customize.env[0].pattern",
        ),
        (
            "env: [{header: 'X A', name: A, pattern: x}]",
            "customize.env[0].header",
        ),
        (
            "labels: [{header: X-A, label: 'bad key!', pattern: x}]",
            "customize.labels[0].label",
        ),
        (
            "volumes: [{name: Work_Space, mount_path: /w}]",
            "customize.volumes[0].name",
        ),
        (
            "volumes: [{name: w, mount_path: relative}]",
            "customize.volumes[0].mount_path",
        ),
        (
            "sidecars: {header: X-S, sets: {}}",
            "customize.sidecars.sets",
        ),
        (
            "env: [{header: X-A, name: A, pattern: x}]\nlabels: [{header: x-a, label: a, pattern: x}]",
            "customize",
        ),
    ];
    for (yaml, key) in cases {
        match Customizer::new(&config(yaml), "customize") {
            Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{yaml}"),
            other => panic!("{yaml}: expected an error at {key}, got {other:?}"),
        }
    }
}

#[test]
fn volume_names_come_from_the_session_hash() {
    let key = SessionKey::parse("user-42", 128).unwrap();
    let rule = config("volumes: [{name: workspace, mount_path: /w}]").volumes[0].clone();
    let name = ClaimSpec::volume_name(&rule, &key);
    assert_eq!(name, format!("workspace-{}", &key.sha256_hex()[..32]));
    assert!(!name.contains("user-42"));
    assert!(name.len() <= 63);
}
