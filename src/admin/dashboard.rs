//! `GET /`: the live dashboard (one page embedded in the binary) and `GET /api/overview`,
//! the one JSON document it polls besides `/api/sessions`, `/api/sandboxes` and the event
//! stream.
//!
//! The page is static (no data in it), so it loads before any token is known; every call
//! it makes is relative (`api/...`), so it works under `kubectl port-forward` and behind a
//! path-rewriting proxy. Its Content-Security-Policy forbids any connection but to this
//! origin: nothing is fetched from elsewhere.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response};
use prometheus::core::Collector;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::body::AdminBody;
use super::{AdminResponse, AdminState};
use crate::activation::HeldFor;
use crate::backend::{ActivationKind, SandboxState};
use crate::config::{BackendKind, Config, KubernetesApi};

/// The page: HTML, CSS and JS in one file.
const PAGE: &str = include_str!("dashboard.html");

const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /`.
pub fn page() -> AdminResponse {
    let mut resp = Response::new(AdminBody::from(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// One histogram as the page draws it: upper bounds and per-bucket (not cumulative) counts.
#[derive(Serialize)]
struct Distribution {
    le: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

/// `GET /api/overview`: scaling signals, the autoscaler's decision, counts by state and the
/// activation-latency distribution, in one document.
pub fn overview(state: &AdminState, query: Option<&str>) -> AdminResponse {
    // One pool's view: `?pool=`, else the first pool (the only one without `pools:`).
    let pool = match super::selected_pools(state, query) {
        Ok(p) if super::api::query_param(query, "pool").is_some() => p[0],
        Ok(_) => state.pools.first(),
        Err(resp) => return *resp,
    };
    let m = &pool.metrics;
    let counts = pool.backend.sandbox_counts();
    let mut by_state = Map::new();
    for s in SandboxState::ALL {
        let n = counts.get(s);
        by_state.insert(s.as_str().to_owned(), json!(n));
    }
    let mut sessions = Map::new();
    for (s, n) in pool.activator.session_counts() {
        sessions.insert(s.to_owned(), json!(n));
    }
    let mut latency = Map::new();
    for kind in [
        ActivationKind::Claim,
        ActivationKind::Create,
        ActivationKind::Resume,
    ] {
        let h = m.activation_duration.with_label_values(&[kind.as_str()]);
        latency.insert(kind.as_str().to_owned(), json!(distribution(&h)));
    }
    // `activator_request_held_seconds`: how long requests were held, by what for.
    let mut held = Map::new();
    for h in HeldFor::ALL {
        let hist = m.request_held.with_label_values(&[h.as_str()]);
        held.insert(h.as_str().to_owned(), json!(distribution(&hist)));
    }
    let running: usize = SandboxState::ALL
        .into_iter()
        .filter(|s| *s != SandboxState::Stopping)
        .map(|s| counts.get(s))
        .sum();
    super::json(&json!({
        "pool": &*pool.name,
        "pools": state.pools.iter().map(|p| &*p.name).collect::<Vec<_>>(),
        "stats": pool.autoscaler.stats_json(),
        "autoscaler": {
            "enabled": pool.autoscaler.config().autoscaler.enabled,
            "apply": pool.autoscaler.config().autoscaler.apply,
            "warm_pool": warm_pool_source(pool.autoscaler.config(), state.pools.is_named()),
            "desired": m.desired_sandboxes.get(),
            "actual": running,
            "panic": m.panic_mode.get() == 1,
            "warm_pool_target": m.warm_pool_target.get(),
            "leader": m.autoscaler_leader.get() == 1,
        },
        "sandboxes": Value::Object(by_state),
        "sessions": Value::Object(sessions),
        "queued_requests": pool.activator.queued_requests(),
        "activation_latency": Value::Object(latency),
        "held": Value::Object(held),
        "backend": pool.backend.kind(),
        "draining": state.shutdown.is_draining(),
    }))
}

/// Where the pool's warm pool size comes from while nothing scales it: `{size, from}`, the
/// size `null` where the activator does not set it (a Kubernetes warm pool's replicas).
fn warm_pool_source(config: &Config, pools: bool) -> Value {
    let key = |k: &str| match pools {
        true => format!("pools[].backend.{k}"),
        false => format!("backend.{k}"),
    };
    let b = &config.backend;
    match b.kind {
        BackendKind::Static => json!({"size": b.endpoints.len(), "from": key("endpoints")}),
        BackendKind::Process => json!({"size": b.warm_pool, "from": key("warm_pool")}),
        BackendKind::Kubernetes => json!({
            "size": null,
            "from": format!(
                "the replicas of {} `{}` in the cluster",
                match b.kubernetes.api {
                    KubernetesApi::AgentSandbox => "SandboxWarmPool",
                    KubernetesApi::Openkruise => "SandboxSet",
                },
                b.kubernetes.pool
            ),
        }),
    }
}

fn distribution(h: &prometheus::Histogram) -> Distribution {
    let mut out = Distribution {
        le: Vec::new(),
        counts: Vec::new(),
        count: 0,
        sum: 0.0,
    };
    let Some(family) = h.collect().into_iter().next() else {
        return out;
    };
    let Some(metric) = family.get_metric().first() else {
        return out;
    };
    let hist = metric.get_histogram();
    out.count = hist.get_sample_count();
    out.sum = hist.get_sample_sum();
    let mut below = 0;
    for b in hist.get_bucket() {
        let cumulative = b.cumulative_count();
        out.le.push(b.upper_bound());
        out.counts.push(cumulative.saturating_sub(below));
        below = cumulative;
    }
    out
}
