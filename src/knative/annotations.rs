//! The annotation vocabulary and what each key sets in the native configuration.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::{NativeTree, OVERLAY_ANNOTATION, field};
use crate::config::{ConfigError, Dur};

const AUTOSCALING: &str = "autoscaling.knative.dev/";
const SERVING: &str = "serving.knative.dev/";

/// Annotations of `metadata` and `spec.template.metadata`, merged. The same key with two
/// different values is an error.
pub fn collect(doc: &Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (place, path) in [
        ("metadata.annotations", &["metadata", "annotations"][..]),
        (
            "spec.template.metadata.annotations",
            &["spec", "template", "metadata", "annotations"][..],
        ),
    ] {
        let Some(v) = field(doc, path) else { continue };
        let Value::Mapping(m) = v else {
            return Err(ConfigError::invalid(place, "must be a mapping"));
        };
        for (k, v) in m {
            let key = k
                .as_str()
                .ok_or_else(|| ConfigError::invalid(place, "annotation keys are strings"))?;
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::invalid(
                        key,
                        "annotation values are strings (quote numbers: \"3\")",
                    ));
                }
            };
            if let Some(prev) = out.get(key)
                && prev != &value
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("set to {prev:?} and to {value:?} in {place}"),
                ));
            }
            out.insert(key.to_owned(), value);
        }
    }
    Ok(out)
}

/// How an annotation's value is parsed before it becomes a native value.
#[derive(Clone, Copy)]
enum Kind {
    /// A whole number >= 0.
    Count,
    /// A number > 0.
    Positive,
    /// A percentage in `(lo, hi]`.
    Percent(f64, f64),
    /// A duration (`30s`, `1m30s`, `0`).
    Duration,
}

/// `autoscaling.knative.dev/<key>` -> native `autoscaler.<field>` with its value kind.
/// Camel-case keys are Knative's legacy spellings.
const AUTOSCALER_KEYS: &[(&str, &str, Kind)] = &[
    ("target", "target", Kind::Positive),
    (
        "target-utilization-percentage",
        "target_utilization_percentage",
        Kind::Percent(0.0, 100.0),
    ),
    ("min-scale", "min_scale", Kind::Count),
    ("minScale", "min_scale", Kind::Count),
    ("max-scale", "max_scale", Kind::Count),
    ("maxScale", "max_scale", Kind::Count),
    ("initial-scale", "initial_scale", Kind::Count),
    ("initialScale", "initial_scale", Kind::Count),
    ("activation-scale", "activation_scale", Kind::Count),
    ("scale-down-delay", "scale_down_delay", Kind::Duration),
    ("window", "stable_window", Kind::Duration),
    (
        "panic-window-percentage",
        "panic_window_percentage",
        Kind::Percent(0.0, 100.0),
    ),
    (
        "panic-threshold-percentage",
        "panic_threshold_percentage",
        Kind::Percent(109.999, 1000.0),
    ),
    (
        "scale-to-zero-pod-retention-period",
        "scale_to_zero_grace",
        Kind::Duration,
    ),
];

fn parse(annotation: &str, raw: &str, kind: Kind) -> Result<Value, ConfigError> {
    let bad = |what: &str| ConfigError::invalid(annotation, format!("{raw:?} is not {what}"));
    let raw = raw.trim();
    match kind {
        Kind::Count => raw
            .parse::<u32>()
            .map(Value::from)
            .map_err(|_| bad("a whole number >= 0")),
        Kind::Positive => match raw.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Value::from(v)),
            _ => Err(bad("a number > 0")),
        },
        Kind::Percent(lo, hi) => match raw.parse::<f64>() {
            Ok(v) if v > lo && v <= hi => Ok(Value::from(v)),
            _ => Err(bad(&format!("a percentage in ({}, {hi}]", lo.round()))),
        },
        Kind::Duration => raw
            .parse::<Dur>()
            .map(|_| Value::from(raw))
            .map_err(|_| bad("a duration such as 30s or 1m30s")),
    }
}

/// Maps every annotation onto `tree`. Unknown `autoscaling.knative.dev/*` keys are
/// errors; other prefixes (e.g. `serving.knative.dev/creator`) belong to the cluster and
/// are left alone. Returns whether the class wants decisions applied (`hpa` does not).
pub fn apply(
    annotations: &BTreeMap<String, String>,
    tree: &mut NativeTree,
) -> Result<bool, ConfigError> {
    // A Knative Service is scaled by its autoscaler unless the class hands it to an HPA.
    let mut apply = true;
    for (key, raw) in annotations {
        if let Some(name) = key.strip_prefix(AUTOSCALING) {
            match name {
                "class" => match raw.as_str() {
                    "apa.autoscaling.knative.dev" | "kpa.autoscaling.knative.dev" => {}
                    "hpa.autoscaling.knative.dev" => apply = false,
                    _ => {
                        return Err(ConfigError::invalid(
                            key,
                            format!(
                                "{raw:?} is not apa.autoscaling.knative.dev, \
                                 kpa.autoscaling.knative.dev or hpa.autoscaling.knative.dev"
                            ),
                        ));
                    }
                },
                "metric" => {
                    let metric = match raw.as_str() {
                        "rps" | "concurrency" | "session" => raw.as_str(),
                        _ => {
                            return Err(ConfigError::invalid(
                                key,
                                format!("{raw:?} is not rps, concurrency or session"),
                            ));
                        }
                    };
                    tree.set(&["autoscaler", "metric"], Value::from(metric), key)?;
                }
                // Knative uses it to keep its activator in the path; agent-activator is
                // always in the path, as with -1. The value is still checked.
                "target-burst-capacity" => match raw.trim().parse::<f64>() {
                    Ok(v) if v >= 0.0 || v == -1.0 => {}
                    _ => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("{raw:?} is not -1 or a number >= 0"),
                        ));
                    }
                },
                _ => {
                    let Some((_, native, kind)) =
                        AUTOSCALER_KEYS.iter().find(|(k, _, _)| *k == name)
                    else {
                        return Err(ConfigError::invalid(
                            key,
                            "unknown autoscaling annotation (see docs/configuration.md)",
                        ));
                    };
                    tree.set(&["autoscaler", native], parse(key, raw, *kind)?, key)?;
                }
            }
        } else if let Some(name) = key.strip_prefix(SERVING) {
            match name {
                "workload-type" if raw != "sandbox" => {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{raw:?}: agent-activator serves sandbox workloads only"),
                    ));
                }
                "workload-type" => {}
                "sandbox-idle-policy" => {
                    let policy = match raw.as_str() {
                        "pause" | "release" | "keep" => raw.as_str(),
                        _ => {
                            return Err(ConfigError::invalid(
                                key,
                                format!("{raw:?} is not pause, release or keep"),
                            ));
                        }
                    };
                    tree.set(&["idle", "policy"], Value::from(policy), key)?;
                }
                "warm-pool" => {
                    tree.set(
                        &["backend", "warm_pool"],
                        parse(key, raw, Kind::Count)?,
                        key,
                    )?;
                }
                _ => {}
            }
        } else if key != OVERLAY_ANNOTATION && key.starts_with("agent-activator.dev/") {
            return Err(ConfigError::invalid(
                key,
                format!("unknown annotation; native settings go in {OVERLAY_ANNOTATION}"),
            ));
        }
    }
    Ok(apply)
}
