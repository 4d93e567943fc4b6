//! The annotation vocabulary and what each key sets in the native configuration.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::{NativeTree, OVERLAY_ANNOTATION, field, go_duration};
use crate::config::ConfigError;

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

/// How an annotation's value is checked before it becomes a native value. Every bound is
/// upstream's (knative/serving 98e5ef90aa70, pkg/apis/autoscaling/register.go for the
/// constants, pkg/apis/autoscaling/annotation_validation.go for the checks).
#[derive(Clone, Copy)]
enum Kind {
    /// A whole number in `0..=i32::MAX` (`getIntGE0`: min-scale, max-scale).
    Count,
    /// A whole number in `1..=i32::MAX`: `validateInitialScale` refuses 0 ("initial-scale=0
    /// not allowed by cluster") unless the cluster's config-autoscaler sets
    /// `allow-zero-initial-scale`, which defaults to false (knative/serving `98e5ef90aa70`,
    /// `pkg/apis/autoscaling/annotation_validation.go` `validateInitialScale`;
    /// `pkg/autoscaler/config/config.go` `AllowZeroInitialScale: false`). A manifest here has
    /// no cluster: 0 is refused as a default cluster would, and the native
    /// `autoscaler.initial_scale: 0` is the opt-in.
    InitialScale,
    /// A whole number >= 2 (`validateMinMaxScale`: "activation-scale=%d must be greater
    /// than 1").
    ActivationScale,
    /// A number >= `TargetMin` = 0.01 (`validateFloats`).
    Target,
    /// A percentage in `[lo, hi]`, both inclusive (`validateFloats`).
    Percent(f64, f64),
    /// A Go duration in `[WindowMin, WindowMax]` = 6s..1h in whole seconds
    /// (`validateWindow`: `d.Truncate(time.Second) != d` is an error).
    Window,
    /// A Go duration in `[0, WindowMax]` = 0..1h in whole seconds
    /// (`validateScaleDownDelay`).
    Delay,
    /// A Go duration in `[0, WindowMax]` = 0..1h (`validateLastPodRetention`).
    Retention,
    /// `linear`, `weighted-exponential` or `weightedExponential` (`validateAlgorithm`;
    /// register.go `MetricAggregationAlgorithm*`), stored in its kebab-case spelling.
    Aggregation,
}

/// One `autoscaling.knative.dev/` annotation mapped onto `autoscaler.<native>`.
struct AutoscalerKey {
    /// The key after the prefix.
    name: &'static str,
    /// Upstream's legacy camelCase spelling (register.go, the `kmap.KeyPriority` lists),
    /// accepted as the same annotation.
    alias: Option<&'static str>,
    native: &'static str,
    kind: Kind,
}

const fn key(
    name: &'static str,
    alias: Option<&'static str>,
    native: &'static str,
    kind: Kind,
) -> AutoscalerKey {
    AutoscalerKey {
        name,
        alias,
        native,
        kind,
    }
}

/// Upstream's `WindowMax`, also the ceiling of the delay and retention annotations.
const WINDOW_MAX_SECS: i128 = 3600;
/// Upstream's `WindowMin`.
const WINDOW_MIN_SECS: i128 = 6;
const NANOS: i128 = 1_000_000_000;

/// Every mapped `autoscaling.knative.dev/*` annotation. `class`, `metric` and
/// `target-burst-capacity` are handled on their own in [`apply`].
const AUTOSCALER_KEYS: &[AutoscalerKey] = &[
    key("target", None, "target", Kind::Target),
    key(
        "target-utilization-percentage",
        Some("targetUtilizationPercentage"),
        "target_utilization_percentage",
        // "TargetUtilization is a percentage in the 1 <= TU <= 100 range."
        Kind::Percent(1.0, 100.0),
    ),
    key("min-scale", Some("minScale"), "min_scale", Kind::Count),
    key("max-scale", Some("maxScale"), "max_scale", Kind::Count),
    key(
        "initial-scale",
        Some("initialScale"),
        "initial_scale",
        Kind::InitialScale,
    ),
    key(
        "activation-scale",
        None,
        "activation_scale",
        Kind::ActivationScale,
    ),
    key(
        "scale-down-delay",
        Some("scaleDownDelay"),
        "scale_down_delay",
        Kind::Delay,
    ),
    key("window", None, "stable_window", Kind::Window),
    key(
        "panic-window-percentage",
        Some("panicWindowPercentage"),
        "panic_window_percentage",
        // PanicWindowPercentageMin = 1.0, PanicWindowPercentageMax = 100.0
        Kind::Percent(1.0, 100.0),
    ),
    key(
        "panic-threshold-percentage",
        Some("panicThresholdPercentage"),
        "panic_threshold_percentage",
        // PanicThresholdPercentageMin = 110.0, PanicThresholdPercentageMax = 1000.0
        Kind::Percent(110.0, 1000.0),
    ),
    key(
        "scale-to-zero-pod-retention-period",
        Some("scaleToZeroPodRetentionPeriod"),
        "scale_to_zero_grace",
        Kind::Retention,
    ),
    key(
        "metric-aggregation-algorithm",
        Some("metricAggregationAlgorithm"),
        "metric_aggregation",
        Kind::Aggregation,
    ),
];

/// The mapped key named `name` (canonical or alias).
fn autoscaler_key(name: &str) -> Option<&'static AutoscalerKey> {
    AUTOSCALER_KEYS
        .iter()
        .find(|k| k.name == name || k.alias == Some(name))
}

/// A Go duration within `[lo, hi]` seconds, in whole seconds when `whole_seconds`, as a
/// native duration string.
fn go_duration(
    annotation: &str,
    raw: &str,
    (lo, hi): (i128, i128),
    whole_seconds: bool,
) -> Result<Value, ConfigError> {
    let Some(nanos) = go_duration::parse_nanos(raw) else {
        return Err(ConfigError::invalid(
            annotation,
            format!("{raw:?} is not a Go duration such as 30s, 1m30s or 1.5h"),
        ));
    };
    if nanos < lo * NANOS || nanos > hi * NANOS {
        return Err(ConfigError::invalid(
            annotation,
            format!("{raw:?} is out of bounds: must be between {lo}s and {hi}s"),
        ));
    }
    if whole_seconds && nanos % NANOS != 0 {
        return Err(ConfigError::invalid(
            annotation,
            format!("{raw:?}: must be specified with at most second precision"),
        ));
    }
    let d = std::time::Duration::from_nanos(nanos as u64);
    Ok(Value::from(humantime::format_duration(d).to_string()))
}

fn parse(annotation: &str, raw: &str, kind: Kind) -> Result<Value, ConfigError> {
    let bad = |what: &str| ConfigError::invalid(annotation, format!("{raw:?} is not {what}"));
    // Upstream parses with strconv / time.ParseDuration, which reject surrounding spaces.
    match kind {
        Kind::Count => match raw.parse::<i64>() {
            Ok(v) if (0..=i64::from(i32::MAX)).contains(&v) => Ok(Value::from(v)),
            Ok(v) if v > 0 => Err(ConfigError::invalid(
                annotation,
                format!(
                    "{raw:?} is out of bounds: must be between 0 and {}",
                    i32::MAX
                ),
            )),
            _ => Err(bad("a whole number >= 0")),
        },
        Kind::InitialScale if raw == "0" => Err(ConfigError::invalid(
            annotation,
            "\"0\": initial-scale=0 not allowed by cluster (Knative's default \
             allow-zero-initial-scale: false); set autoscaler.initial_scale: 0 in the \
             activator's own configuration to start a service at zero",
        )),
        Kind::InitialScale => parse(annotation, raw, Kind::Count),
        Kind::ActivationScale => match raw.parse::<i32>() {
            Ok(v) if v >= 2 => Ok(Value::from(v)),
            Ok(_) => Err(ConfigError::invalid(
                annotation,
                format!("{raw:?}: activation-scale must be greater than 1"),
            )),
            Err(_) => Err(bad("a whole number")),
        },
        Kind::Target => match raw.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.01 => Ok(Value::from(v)),
            Ok(_) => Err(ConfigError::invalid(
                annotation,
                format!("target {raw} should be at least 0.01"),
            )),
            Err(_) => Err(bad("a number")),
        },
        Kind::Percent(lo, hi) => match raw.parse::<f64>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(Value::from(v)),
            Ok(_) => Err(ConfigError::invalid(
                annotation,
                format!("{raw:?} is out of bounds: must be between {lo} and {hi}"),
            )),
            Err(_) => Err(bad("a number")),
        },
        Kind::Window => go_duration(annotation, raw, (WINDOW_MIN_SECS, WINDOW_MAX_SECS), true),
        Kind::Delay => go_duration(annotation, raw, (0, WINDOW_MAX_SECS), true),
        Kind::Retention => go_duration(annotation, raw, (0, WINDOW_MAX_SECS), false),
        Kind::Aggregation => match raw {
            "linear" => Ok(Value::from("linear")),
            "weighted-exponential" | "weightedExponential" => {
                Ok(Value::from("weighted-exponential"))
            }
            _ => Err(bad("linear, weighted-exponential or weightedExponential")),
        },
    }
}

/// Upstream's cross-checks (`validateMinMaxScale`): max-scale (non-zero) not below
/// min-scale, and activation-scale between them. Each names the annotations involved.
fn check_scales(annotations: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let find = |name: &str| {
        let k = autoscaler_key(name)?;
        [Some(k.name), k.alias].into_iter().flatten().find_map(|n| {
            let full = format!("{AUTOSCALING}{n}");
            let v = annotations.get(&full)?.parse::<i64>().ok()?;
            Some((full, v))
        })
    };
    let min = find("min-scale");
    let max = find("max-scale").filter(|(_, v)| *v != 0);
    if let (Some((min_key, min)), Some((max_key, max))) = (&min, &max)
        && max < min
    {
        return Err(ConfigError::invalid(
            max_key.as_str(),
            format!("max-scale={max} is less than min-scale={min} ({min_key})"),
        ));
    }
    if let Some((act_key, act)) = find("activation-scale") {
        if let Some((_, min)) = &min
            && *min > act
        {
            return Err(ConfigError::invalid(
                act_key,
                format!("min-scale={min} is greater than activation-scale={act}"),
            ));
        }
        if let Some((_, max)) = &max
            && *max < act
        {
            return Err(ConfigError::invalid(
                act_key,
                format!("max-scale={max} is less than activation-scale={act}"),
            ));
        }
    }
    Ok(())
}

/// Maps every annotation onto `tree`. Unknown `autoscaling.knative.dev/*` keys are
/// errors; other prefixes (e.g. `serving.knative.dev/creator`) belong to the cluster and
/// are left alone. Returns whether the class wants decisions applied (`hpa` does not).
pub fn apply(
    annotations: &BTreeMap<String, String>,
    tree: &mut NativeTree,
) -> Result<bool, ConfigError> {
    check_scales(annotations)?;
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
                // always in the path, as with -1. The value is still checked as upstream
                // does (`validateFloats`: < 0 and != -1 is an error).
                "target-burst-capacity" | "targetBurstCapacity" => match raw.parse::<f64>() {
                    Ok(v) if v >= 0.0 || v == -1.0 => {}
                    _ => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("{raw:?} is not -1 or a number >= 0"),
                        ));
                    }
                },
                _ => {
                    let Some(k) = autoscaler_key(name) else {
                        return Err(ConfigError::invalid(
                            key,
                            "unknown autoscaling annotation (see docs/configuration.md)",
                        ));
                    };
                    tree.set(&["autoscaler", k.native], parse(key, raw, k.kind)?, key)?;
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
        } else if key != OVERLAY_ANNOTATION
            && key != super::POOL_MATCH_ANNOTATION
            && key.starts_with("agent-activator.dev/")
        {
            return Err(ConfigError::invalid(
                key,
                format!("unknown annotation; native settings go in {OVERLAY_ANNOTATION}"),
            ));
        }
    }
    Ok(apply)
}
