//! Knative manifests -> native configuration.

use std::time::Duration;

use crate::config::{BackendKind, Config, IdlePolicy, ScalingMetric};

const RPS: &str = include_str!("../../config/knative-rps.yaml");
const AGENT: &str = include_str!("../../config/knative-agent.yaml");

/// A minimal Service with `annotations` (indented lines) on the template.
fn service(annotations: &str, container_extra: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: chat\n  namespace: agents\nspec:\n  template:\n    metadata:\n      annotations:\n{annotations}    spec:\n      containers:\n        - image: example/chat:1\n{container_extra}"
    )
}

/// A document's configuration as `crate::loader::from_yaml` reads it (which sits a floor
/// above this module): a Knative Service through this module, anything else natively.
fn from_yaml(yaml: &str) -> Result<Config, crate::config::ConfigError> {
    super::config_from_yaml(yaml).unwrap_or_else(|| Config::from_yaml(yaml))
}

fn err(yaml: &str) -> String {
    from_yaml(yaml).unwrap_err().to_string()
}

#[test]
fn rps_example_maps_onto_the_native_config() {
    let c = from_yaml(RPS).unwrap();
    let a = &c.autoscaler;
    assert_eq!(a.metric, ScalingMetric::Rps);
    assert_eq!(a.target, 10.0);
    assert_eq!((a.min_scale, a.max_scale), (1, 20));
    assert!(a.apply && a.enabled);
    assert_eq!(c.idle.policy, Some(IdlePolicy::Release));
    assert_eq!(c.backend.kind, BackendKind::Process);
    assert_eq!(
        c.backend.command,
        ["{self}", "demo-sandbox", "--port", "{port}"]
    );
    assert_eq!(c.backend.ready_path, "/healthz");
    assert_eq!(c.backend.kubernetes.port, 8080);
    assert_eq!(c.backend.kubernetes.pool, "summarizer");
    assert_eq!(c.session.max_sessions_per_sandbox, 100);
    assert_eq!(
        c.proxy.request_timeout.as_duration(),
        Duration::from_secs(300)
    );
}

#[test]
fn agent_example_maps_onto_the_native_config() {
    let c = from_yaml(AGENT).unwrap();
    assert_eq!(c.autoscaler.metric, ScalingMetric::Session);
    assert!(c.autoscaler.apply);
    assert_eq!(c.idle.policy, Some(IdlePolicy::Pause));
    assert_eq!(c.idle.timeout.as_duration(), Duration::from_secs(30));
    assert_eq!(c.backend.warm_pool, 3);
    assert_eq!(c.backend.kind, BackendKind::Process);
    assert_eq!(c.session.max_sessions_per_sandbox, 1);
}

#[test]
fn every_kpa_annotation_reaches_its_native_key() {
    let yaml = service(
        "        autoscaling.knative.dev/class: kpa.autoscaling.knative.dev\n\
        \x20       autoscaling.knative.dev/metric: concurrency\n\
        \x20       autoscaling.knative.dev/target: \"4.5\"\n\
        \x20       autoscaling.knative.dev/target-utilization-percentage: \"80\"\n\
        \x20       autoscaling.knative.dev/min-scale: \"2\"\n\
        \x20       autoscaling.knative.dev/max-scale: \"9\"\n\
        \x20       autoscaling.knative.dev/initial-scale: \"3\"\n\
        \x20       autoscaling.knative.dev/activation-scale: \"2\"\n\
        \x20       autoscaling.knative.dev/scale-down-delay: 1m30s\n\
        \x20       autoscaling.knative.dev/window: 40s\n\
        \x20       autoscaling.knative.dev/panic-window-percentage: \"20\"\n\
        \x20       autoscaling.knative.dev/panic-threshold-percentage: \"150\"\n\
        \x20       autoscaling.knative.dev/scale-to-zero-pod-retention-period: 10s\n\
        \x20       autoscaling.knative.dev/target-burst-capacity: \"-1\"\n\
        \x20       serving.knative.dev/creator: someone@example.com\n",
        "          ports: [{containerPort: 9000}]\n          env:\n            - {name: MODE, value: fast}\n",
    );
    let c = from_yaml(&yaml).unwrap();
    let a = &c.autoscaler;
    assert_eq!(a.metric, ScalingMetric::Concurrency);
    assert_eq!((a.target, a.target_utilization_percentage), (4.5, 80.0));
    assert_eq!((a.min_scale, a.max_scale, a.initial_scale), (2, 9, 3));
    assert_eq!(a.activation_scale, 2);
    assert_eq!(a.scale_down_delay.as_duration(), Duration::from_secs(90));
    assert_eq!(a.stable_window.as_duration(), Duration::from_secs(40));
    assert_eq!(
        (a.panic_window_percentage, a.panic_threshold_percentage),
        (20.0, 150.0)
    );
    assert_eq!(a.scale_to_zero_grace.as_duration(), Duration::from_secs(10));
    // No overlay: Kubernetes, pool named after the Service, in its namespace.
    assert_eq!(c.backend.kind, BackendKind::Kubernetes);
    assert_eq!(c.backend.kubernetes.pool, "chat");
    assert_eq!(c.backend.kubernetes.namespace.as_deref(), Some("agents"));
    assert_eq!(c.backend.kubernetes.port, 9000);
    assert_eq!(c.backend.env["MODE"], "fast");
}

#[test]
fn hpa_class_exports_without_applying() {
    let yaml = service(
        "        autoscaling.knative.dev/class: hpa.autoscaling.knative.dev\n",
        "",
    );
    assert!(!from_yaml(&yaml).unwrap().autoscaler.apply);
}

#[test]
fn invalid_values_name_the_annotation() {
    for (annotation, value, expect) in [
        ("autoscaling.knative.dev/min-scale", "lots", "whole number"),
        ("autoscaling.knative.dev/target", "0", "at least 0.01"),
        (
            "autoscaling.knative.dev/metric",
            "cpu",
            "rps, concurrency or session",
        ),
        (
            "autoscaling.knative.dev/class",
            "mine",
            "apa.autoscaling.knative.dev",
        ),
        ("autoscaling.knative.dev/window", "a while", "Go duration"),
        (
            "autoscaling.knative.dev/panic-threshold-percentage",
            "100",
            "between 110 and 1000",
        ),
        ("autoscaling.knative.dev/target-burst-capacity", "-5", "-1"),
        ("serving.knative.dev/warm-pool", "-1", "whole number"),
        (
            "serving.knative.dev/sandbox-idle-policy",
            "sleep",
            "pause, release or keep",
        ),
        ("serving.knative.dev/workload-type", "function", "sandbox"),
    ] {
        let e = err(&service(
            &format!("        {annotation}: \"{value}\"\n"),
            "",
        ));
        assert!(e.starts_with(&format!("{annotation}:")), "{e}");
        assert!(e.contains(expect), "{e}");
    }
}

#[test]
fn unknown_autoscaling_keys_are_errors() {
    let e = err(&service(
        "        autoscaling.knative.dev/min-scal: \"1\"\n",
        "",
    ));
    assert!(e.starts_with("autoscaling.knative.dev/min-scal:"), "{e}");
    let e = err(&service(
        "        agent-activator.dev/confg: \"x: 1\"\n",
        "",
    ));
    assert!(e.starts_with("agent-activator.dev/confg:"), "{e}");
}

#[test]
fn errors_found_by_validation_name_the_annotation() {
    let e = err(&service(
        "        autoscaling.knative.dev/min-scale: \"5\"\n        autoscaling.knative.dev/max-scale: \"2\"\n",
        "",
    ));
    assert_eq!(
        e,
        "autoscaling.knative.dev/max-scale: max-scale=2 is less than min-scale=5 \
         (autoscaling.knative.dev/min-scale)"
    );
}

/// Each bound of knative/serving 98e5ef90aa70 pkg/apis/autoscaling (register.go,
/// annotation_validation.go): the edge is accepted, one step beyond is refused, and the
/// error names the annotation as written (alias included).
#[test]
fn upstream_bounds_accept_the_edges_and_refuse_beyond() {
    let accepted = [
        ("window", "6s"),
        ("window", "1h"),
        ("window", "1.5m"),
        ("scale-down-delay", "0s"),
        ("scale-down-delay", "1h"),
        ("scaleDownDelay", "90s"),
        ("scale-to-zero-pod-retention-period", "1h"),
        ("scale-to-zero-pod-retention-period", "1500ms"),
        ("target", "0.01"),
        ("target-utilization-percentage", "1"),
        ("targetUtilizationPercentage", "100"),
        ("panic-window-percentage", "1"),
        ("panicWindowPercentage", "100"),
        ("panic-threshold-percentage", "110"),
        ("panicThresholdPercentage", "1000"),
        ("minScale", "0"),
        ("maxScale", "2147483647"),
        ("initialScale", "1"),
        ("activation-scale", "2"),
        ("targetBurstCapacity", "-1"),
        ("metric-aggregation-algorithm", "linear"),
        ("metricAggregationAlgorithm", "weightedExponential"),
    ];
    for (name, value) in accepted {
        let yaml = service(
            &format!("        autoscaling.knative.dev/{name}: \"{value}\"\n"),
            "",
        );
        if let Err(e) = from_yaml(&yaml) {
            panic!("{name}: {value:?} refused: {e}");
        }
    }
    let refused = [
        ("window", "5s", "between 6s and 3600s"),
        ("window", "1h1s", "between 6s and 3600s"),
        ("window", "6500ms", "second precision"),
        ("window", "60", "Go duration"),
        ("scale-down-delay", "-1s", "between 0s and 3600s"),
        ("scaleDownDelay", "61m", "between 0s and 3600s"),
        ("scale-down-delay", "1.5s", "second precision"),
        (
            "scaleToZeroPodRetentionPeriod",
            "2h",
            "between 0s and 3600s",
        ),
        ("target", "0.009", "at least 0.01"),
        ("target-utilization-percentage", "0.5", "between 1 and 100"),
        ("targetUtilizationPercentage", "101", "between 1 and 100"),
        ("panic-window-percentage", "0.9", "between 1 and 100"),
        ("panicThresholdPercentage", "109", "between 110 and 1000"),
        ("panic-threshold-percentage", "1001", "between 110 and 1000"),
        ("minScale", "-1", "whole number"),
        ("max-scale", "2147483648", "between 0 and 2147483647"),
        ("activation-scale", "1", "greater than 1"),
        ("initialScale", "0", "not allowed by cluster"),
        ("initial-scale", "-1", "whole number"),
        (
            "metric-aggregation-algorithm",
            "median",
            "weighted-exponential",
        ),
        ("targetBurstCapacity", "-2", "-1"),
    ];
    for (name, value, expect) in refused {
        let annotation = format!("autoscaling.knative.dev/{name}");
        let e = err(&service(
            &format!("        {annotation}: \"{value}\"\n"),
            "",
        ));
        assert!(
            e.starts_with(&format!("{annotation}: ")),
            "{name}={value}: {e}"
        );
        assert!(e.contains(expect), "{name}={value}: {e}");
    }
}

#[test]
fn aliases_map_like_their_canonical_keys_and_must_agree() {
    let c = from_yaml(&service(
        "        autoscaling.knative.dev/minScale: \"2\"\n        autoscaling.knative.dev/maxScale: \"7\"\n        autoscaling.knative.dev/scaleDownDelay: 1m30s\n        autoscaling.knative.dev/window: 1.5m\n        autoscaling.knative.dev/metricAggregationAlgorithm: weightedExponential\n",
        "",
    ))
    .unwrap();
    let a = &c.autoscaler;
    assert_eq!((a.min_scale, a.max_scale), (2, 7));
    assert_eq!(a.scale_down_delay.as_duration(), Duration::from_secs(90));
    assert_eq!(a.stable_window.as_duration(), Duration::from_secs(90));
    assert_eq!(
        a.metric_aggregation,
        crate::config::MetricAggregation::WeightedExponential
    );
    // Both spellings of one annotation with different values: refused, naming both.
    let e = err(&service(
        "        autoscaling.knative.dev/min-scale: \"1\"\n        autoscaling.knative.dev/minScale: \"2\"\n",
        "",
    ));
    assert!(e.contains("autoscaling.knative.dev/min-scale"), "{e}");
    assert!(e.contains("autoscaling.knative.dev/minScale"), "{e}");
    // activation-scale must lie between min-scale and max-scale.
    let e = err(&service(
        "        autoscaling.knative.dev/min-scale: \"3\"\n        autoscaling.knative.dev/activation-scale: \"2\"\n",
        "",
    ));
    assert_eq!(
        e,
        "autoscaling.knative.dev/activation-scale: min-scale=3 is greater than activation-scale=2"
    );
    let e = err(&service(
        "        autoscaling.knative.dev/maxScale: \"4\"\n        autoscaling.knative.dev/activation-scale: \"5\"\n",
        "",
    ));
    assert_eq!(
        e,
        "autoscaling.knative.dev/activation-scale: max-scale=4 is less than activation-scale=5"
    );
}

#[test]
fn overlay_conflicts_and_errors_are_named() {
    let e = err(&service(
        "        autoscaling.knative.dev/metric: rps\n        agent-activator.dev/config: |\n          autoscaler: {metric: session}\n",
        "",
    ));
    assert!(
        e.starts_with("autoscaling.knative.dev/metric: conflicts with"),
        "{e}"
    );
    assert!(e.contains("agent-activator.dev/config"), "{e}");
    // The same value twice is fine.
    from_yaml(&service(
        "        autoscaling.knative.dev/metric: rps\n        agent-activator.dev/config: |\n          autoscaler: {metric: rps}\n",
        "",
    ))
    .unwrap();
    let e = err(&service(
        "        agent-activator.dev/config: |\n          autoscaler: {tick_interval: 0s}\n",
        "",
    ));
    assert!(e.starts_with("autoscaler.tick_interval"), "{e}");
    let e = err(&service(
        "        agent-activator.dev/config: \"[1, 2]\"\n",
        "",
    ));
    assert!(e.starts_with("agent-activator.dev/config"), "{e}");
}

#[test]
fn annotations_on_service_and_template_must_agree() {
    let yaml = service("        autoscaling.knative.dev/metric: rps\n", "").replacen(
        "  name: chat\n",
        "  name: chat\n  annotations:\n    autoscaling.knative.dev/metric: session\n",
        1,
    );
    let e = err(&yaml);
    assert!(
        e.starts_with("autoscaling.knative.dev/metric: set to"),
        "{e}"
    );
}

#[test]
fn container_problems_name_the_field() {
    let no_image = service("        x: y\n", "")
        .replace("        - image: example/chat:1\n", "        - name: c\n");
    assert!(err(&no_image).starts_with("spec.template.spec.containers[0].image"));
    let two = service("        x: y\n", "        - image: example/sidecar:1\n");
    assert!(err(&two).starts_with("spec.template.spec.containers:"));
    let value_from = service(
        "        x: y\n",
        "          env:\n            - name: TOKEN\n              valueFrom: {secretKeyRef: {name: s, key: k}}\n",
    );
    assert!(err(&value_from).starts_with("spec.template.spec.containers[0].env[0]"));
    let bad_port = service(
        "        x: y\n",
        "          ports: [{containerPort: 70000}]\n",
    );
    assert!(err(&bad_port).starts_with("spec.template.spec.containers[0].ports[0].containerPort"));
}

#[test]
fn other_documents_stay_native() {
    let e = err("apiVersion: apps/v1\nkind: Deployment\n");
    assert!(e.contains("apiVersion"), "{e}");
}

#[test]
fn static_backend_overlay_exports_without_applying() {
    let yaml = service(
        "        agent-activator.dev/config: |\n          backend: {kind: static, endpoints: ['127.0.0.1:9001']}\n",
        "",
    );
    let c = from_yaml(&yaml).unwrap();
    assert!(!c.autoscaler.apply);
}
