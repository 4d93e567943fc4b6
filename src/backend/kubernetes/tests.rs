//! Validation of the `backend.kubernetes.*` keys.

use crate::config::Config;

fn kube_yaml(extra: &str) -> String {
    format!("backend:\n  kind: kubernetes\n  kubernetes:\n    pool: p\n{extra}")
}

#[test]
fn activity_interval_must_be_below_idle_timeout() {
    let yaml = kube_yaml("    activity_write_interval: 5m\nidle:\n  timeout: 5m\n");
    let err = Config::from_yaml(&yaml).unwrap_err().to_string();
    assert!(
        err.contains("backend.kubernetes.activity_write_interval"),
        "{err}"
    );
    assert!(Config::from_yaml(&kube_yaml("    activity_write_interval: 4m\n")).is_ok());
}

#[test]
fn claim_prefix_must_fit_a_dns_label() {
    for bad in ["Sess-", "-x", "a_b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
        let err = Config::from_yaml(&kube_yaml(&format!("    claim_prefix: '{bad}'\n")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("backend.kubernetes.claim_prefix"),
            "{bad}: {err}"
        );
    }
}
