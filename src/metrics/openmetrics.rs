//! OpenMetrics exposition with exemplars: `GET /metrics` with `Accept:
//! application/openmetrics-text` gets the same families in OpenMetrics 1.0 form, and each
//! `activator_activation_duration_seconds` bucket carries the trace ID of the latest traced
//! request whose activation wait fell into it (Grafana links it to the trace).
//!
//! The `prometheus` crate has no exemplars, so the store is ours: one slot per (kind,
//! bucket), written only by traced requests that waited for an activation (never on the
//! fast path), read at scrape time.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::LATENCY_BUCKETS;
use crate::lock::MutexExt;

/// Activation kinds with exemplar slots, in label order.
const KINDS: [&str; 3] = ["claim", "create", "resume"];

struct Exemplar {
    trace_id: String,
    value: f64,
    /// Seconds since the Unix epoch.
    timestamp: f64,
}

/// The latest exemplar per activation kind and bucket.
pub struct ActivationExemplars {
    // A std mutex: a write is a few field stores, never across an await.
    slots: Mutex<Vec<Option<Exemplar>>>,
}

impl Default for ActivationExemplars {
    fn default() -> Self {
        let n = KINDS.len() * (LATENCY_BUCKETS.len() + 1);
        ActivationExemplars {
            slots: Mutex::new((0..n).map(|_| None).collect()),
        }
    }
}

fn bucket_of(value: f64) -> usize {
    LATENCY_BUCKETS
        .iter()
        .position(|le| value <= *le)
        .unwrap_or(LATENCY_BUCKETS.len())
}

fn le_label(bucket: usize) -> String {
    match LATENCY_BUCKETS.get(bucket) {
        Some(le) => format!("{le}"),
        None => "+Inf".into(),
    }
}

impl ActivationExemplars {
    /// A traced request waited `value` seconds for an activation of `kind`.
    pub fn record(&self, kind: &str, value: f64, trace_id: String) {
        let Some(k) = KINDS.iter().position(|x| *x == kind) else {
            return;
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let idx = k * (LATENCY_BUCKETS.len() + 1) + bucket_of(value);
        let mut slots = self.slots.lock_recovered();
        slots[idx] = Some(Exemplar {
            trace_id,
            value,
            timestamp,
        });
    }

    /// The exemplar suffix (` # {trace_id="..."} v ts`) for a bucket line, if any.
    fn suffix(&self, kind: &str, le: &str) -> Option<String> {
        let k = KINDS.iter().position(|x| *x == kind)?;
        let b = (0..=LATENCY_BUCKETS.len()).find(|b| le_label(*b) == le)?;
        let slots = self.slots.lock_recovered();
        let e = slots[k * (LATENCY_BUCKETS.len() + 1) + b].as_ref()?;
        Some(format!(
            " # {{trace_id=\"{}\"}} {} {:.3}",
            e.trace_id, e.value, e.timestamp
        ))
    }
}

/// Rewrites Prometheus text exposition into OpenMetrics 1.0: counter families are named
/// without `_total` in `# TYPE`/`# HELP`, `untyped` becomes `unknown`, activation-latency
/// buckets get their exemplars, and the document ends with `# EOF`.
pub fn to_openmetrics(text: &str, exemplars: &ActivationExemplars) -> String {
    let mut out = String::with_capacity(text.len() + 1024);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let kind = if kind == "untyped" { "unknown" } else { kind };
            let name = if kind == "counter" {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = name.strip_suffix("_total").unwrap_or(name);
            out.push_str(&format!("# HELP {name} {help}\n"));
        } else if line.starts_with("activator_activation_duration_seconds_bucket{") {
            out.push_str(line);
            if let Some(s) = bucket_labels(line).and_then(|(k, le)| exemplars.suffix(k, le)) {
                out.push_str(&s);
            }
            out.push('\n');
        } else if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

/// `kind` and `le` label values of a bucket line.
fn bucket_labels(line: &str) -> Option<(&str, &str)> {
    let labels = line.split_once('{')?.1.split_once('}')?.0;
    let mut kind = None;
    let mut le = None;
    for pair in labels.split(',') {
        let (k, v) = pair.split_once('=')?;
        let v = v.trim_matches('"');
        match k {
            "kind" => kind = Some(v),
            "le" => le = Some(v),
            _ => {}
        }
    }
    Some((kind?, le?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_families_and_attaches_exemplars_to_their_bucket() {
        let ex = ActivationExemplars::default();
        ex.record("resume", 0.003, "ab".repeat(16));
        let text = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
                    # TYPE activator_activation_duration_seconds histogram\n\
                    activator_activation_duration_seconds_bucket{kind=\"resume\",le=\"0.0025\"} 0\n\
                    activator_activation_duration_seconds_bucket{kind=\"resume\",le=\"0.005\"} 1\n\
                    activator_activation_duration_seconds_bucket{kind=\"claim\",le=\"0.005\"} 1\n";
        let om = to_openmetrics(text, &ex);
        let lines: Vec<&str> = om.lines().collect();
        assert_eq!(lines[0], "# HELP x Things.");
        assert_eq!(lines[1], "# TYPE x counter");
        assert_eq!(lines[2], "x_total 3");
        assert!(!lines[4].contains('#'), "{}", lines[4]);
        assert!(
            lines[5].starts_with(&format!(
                "activator_activation_duration_seconds_bucket{{kind=\"resume\",le=\"0.005\"}} 1 # {{trace_id=\"{}\"}} 0.003 ",
                "ab".repeat(16)
            )),
            "{}",
            lines[5]
        );
        assert!(!lines[6].contains('#'), "other kinds keep no exemplar");
        assert_eq!(*lines.last().unwrap(), "# EOF");
    }
}
