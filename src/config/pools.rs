//! `pools`: several kinds of sandbox behind one gateway, each with its own selector
//! (`match`), sandbox source (`backend`) and per-kind scaling and idle knobs.
//!
//! A file without `pools:` is one pool named `default` built from the top-level
//! `backend`, `autoscaler` and `idle` sections, exactly as before pools existed.

use serde::Deserialize;

use super::{
    BackendConfig, BackendKind, Config, ConfigError, Dur, IdlePolicy, MetricAggregation,
    ScalingMetric,
};

/// The pool name a file without `pools:` serves under.
pub const DEFAULT_POOL: &str = "default";

/// One entry of `pools`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// DNS-label-like name (`a-z`, `0-9`, `-`, at most 63): the `pool` metric label, the
    /// `pool` field of `/api/*` rows and `?pool=` filters.
    pub name: String,
    /// How a new session selects this pool; absent = the default pool (the first such).
    #[serde(rename = "match", default)]
    pub matcher: Option<PoolMatch>,
    /// Where this pool's sandboxes come from (every `backend.*` key).
    #[serde(default)]
    pub backend: BackendConfig,
    /// Keys set here replace the top-level `autoscaler.*` ones for this pool.
    #[serde(default)]
    pub autoscaler: PoolAutoscaler,
    /// Keys set here replace the top-level `idle.*` ones for this pool.
    #[serde(default)]
    pub idle: PoolIdle,
    /// This pool's claim-time customisation allowlist; replaces the top-level `customize`
    /// (each kind of sandbox takes its own settings). Unset: the top-level one.
    #[serde(default)]
    pub customize: Option<super::CustomizeConfig>,
    /// This pool's preview URLs; replaces the top-level `preview`. Unset: the top-level one.
    #[serde(default)]
    pub preview: Option<super::PreviewConfig>,
    /// This pool's pause/resume hooks; replaces the top-level `hooks`. Unset: the
    /// top-level ones.
    #[serde(default)]
    pub hooks: Option<super::HooksConfig>,
}

/// `pools[].match`: exactly one of `header: {name, value}`, `path_prefix`, `host`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PoolMatchRepr")]
pub enum PoolMatch {
    /// The request carries header `name` with exactly `value`.
    Header { name: String, value: String },
    /// The forwarded path (after a session path prefix is removed) starts with it.
    PathPrefix(String),
    /// The request's host (`Host` or `:authority`, port ignored), case-insensitive.
    Host(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolMatchRepr {
    header: Option<HeaderMatch>,
    path_prefix: Option<String>,
    host: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatch {
    name: String,
    value: String,
}

impl TryFrom<PoolMatchRepr> for PoolMatch {
    type Error = String;

    fn try_from(r: PoolMatchRepr) -> Result<PoolMatch, String> {
        let mut found = Vec::with_capacity(1);
        if let Some(h) = r.header {
            found.push(PoolMatch::Header {
                name: h.name,
                value: h.value,
            });
        }
        if let Some(p) = r.path_prefix {
            found.push(PoolMatch::PathPrefix(p));
        }
        if let Some(h) = r.host {
            found.push(PoolMatch::Host(h));
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            _ => Err("write exactly one of header, path_prefix, host".into()),
        }
    }
}

impl PoolMatch {
    /// Would a request this one matches always be taken by `earlier` first?
    fn shadowed_by(&self, earlier: &PoolMatch) -> bool {
        match (earlier, self) {
            (
                PoolMatch::Header { name: a, value: va },
                PoolMatch::Header { name: b, value: vb },
            ) => a.eq_ignore_ascii_case(b) && va == vb,
            (PoolMatch::PathPrefix(a), PoolMatch::PathPrefix(b)) => b.starts_with(a.as_str()),
            (PoolMatch::Host(a), PoolMatch::Host(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        }
    }

    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match self {
            PoolMatch::Header { name, value } => {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(ConfigError::invalid(
                        format!("{key}.header.name"),
                        "not a valid header name",
                    ));
                }
                if value.is_empty() || http::HeaderValue::from_str(value).is_err() {
                    return Err(ConfigError::invalid(
                        format!("{key}.header.value"),
                        "must be a non-empty header value",
                    ));
                }
            }
            PoolMatch::PathPrefix(p) if !p.starts_with('/') || !p.ends_with('/') || p == "/" => {
                return Err(ConfigError::invalid(
                    format!("{key}.path_prefix"),
                    "must start and end with '/' and not be '/' alone, e.g. /browser/",
                ));
            }
            PoolMatch::Host(h) if h.is_empty() || h.parse::<http::uri::Authority>().is_err() => {
                return Err(ConfigError::invalid(
                    format!("{key}.host"),
                    "must be a host name such as python.sandboxes.example",
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// `pools[].autoscaler`: the knobs that differ per kind of sandbox. Unset keys keep the
/// top-level `autoscaler.*` value (see docs/configuration.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolAutoscaler {
    pub enabled: Option<bool>,
    pub apply: Option<bool>,
    pub metric: Option<ScalingMetric>,
    pub target: Option<f64>,
    pub target_utilization_percentage: Option<f64>,
    pub stable_window: Option<Dur>,
    pub metric_aggregation: Option<MetricAggregation>,
    pub panic_window_percentage: Option<f64>,
    pub panic_threshold_percentage: Option<f64>,
    pub max_scale_up_rate: Option<f64>,
    pub max_scale_down_rate: Option<f64>,
    pub min_scale: Option<u32>,
    pub max_scale: Option<u32>,
    pub initial_scale: Option<u32>,
    pub scale_down_delay: Option<Dur>,
    pub scale_to_zero_grace: Option<Dur>,
    pub activation_scale: Option<u32>,
}

/// `pools[].idle`: unset keys keep the top-level `idle.*` value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolIdle {
    pub timeout: Option<Dur>,
    pub policy: Option<IdlePolicy>,
    pub session_ttl: Option<Dur>,
}

/// Copies each `Some` field of `$from` over the same field of `$to`.
macro_rules! override_fields {
    ($to:expr, $from:expr, [$($f:ident),* $(,)?]) => {
        $( if let Some(v) = $from.$f.clone() { $to.$f = v; } )*
    };
}

impl PoolAutoscaler {
    /// Every key of `a`, as overrides (a Knative Service's whole section).
    pub fn from_full(a: &super::AutoscalerConfig) -> PoolAutoscaler {
        PoolAutoscaler {
            enabled: Some(a.enabled),
            apply: Some(a.apply),
            metric: Some(a.metric),
            target: Some(a.target),
            target_utilization_percentage: Some(a.target_utilization_percentage),
            stable_window: Some(a.stable_window),
            metric_aggregation: Some(a.metric_aggregation),
            panic_window_percentage: Some(a.panic_window_percentage),
            panic_threshold_percentage: Some(a.panic_threshold_percentage),
            max_scale_up_rate: Some(a.max_scale_up_rate),
            max_scale_down_rate: Some(a.max_scale_down_rate),
            min_scale: Some(a.min_scale),
            max_scale: Some(a.max_scale),
            initial_scale: Some(a.initial_scale),
            scale_down_delay: Some(a.scale_down_delay),
            scale_to_zero_grace: Some(a.scale_to_zero_grace),
            activation_scale: Some(a.activation_scale),
        }
    }

    fn is_empty(&self) -> bool {
        none_set(&[
            self.enabled.is_some(),
            self.apply.is_some(),
            self.metric.is_some(),
            self.target.is_some(),
            self.target_utilization_percentage.is_some(),
            self.stable_window.is_some(),
            self.metric_aggregation.is_some(),
            self.panic_window_percentage.is_some(),
            self.panic_threshold_percentage.is_some(),
            self.max_scale_up_rate.is_some(),
            self.max_scale_down_rate.is_some(),
            self.min_scale.is_some(),
            self.max_scale.is_some(),
            self.initial_scale.is_some(),
            self.scale_down_delay.is_some(),
            self.scale_to_zero_grace.is_some(),
            self.activation_scale.is_some(),
        ])
    }
}

/// No key of an override section is set.
fn none_set(set: &[bool]) -> bool {
    !set.iter().any(|s| *s)
}

impl PoolIdle {
    /// Every key of `i`, as overrides.
    pub fn from_full(i: &super::IdleConfig) -> PoolIdle {
        PoolIdle {
            timeout: Some(i.timeout),
            policy: i.policy,
            session_ttl: Some(i.session_ttl),
        }
    }

    fn is_empty(&self) -> bool {
        none_set(&[
            self.timeout.is_some(),
            self.policy.is_some(),
            self.session_ttl.is_some(),
        ])
    }
}

/// A pool as the server builds it: its name, selector and the whole configuration its
/// activator, backend and autoscaler read (top level with the pool's sections applied).
#[derive(Debug, Clone)]
pub struct EffectivePool {
    pub name: String,
    pub matcher: Option<PoolMatch>,
    pub config: Config,
}

// === impl Config ===

impl Config {
    /// Whether `pools:` is in use (several pools, names as metric labels).
    pub fn has_pools(&self) -> bool {
        !self.pools.is_empty()
    }

    /// The pools to build, in `pools:` order; one pool `default` without `pools:`.
    pub fn effective_pools(&self) -> Vec<EffectivePool> {
        if self.pools.is_empty() {
            return vec![EffectivePool {
                name: DEFAULT_POOL.into(),
                matcher: None,
                config: self.clone(),
            }];
        }
        self.pools
            .iter()
            .map(|p| EffectivePool {
                name: p.name.clone(),
                matcher: p.matcher.clone(),
                config: self.for_pool(p),
            })
            .collect()
    }

    /// The top-level configuration with `pool`'s backend, autoscaler and idle applied.
    fn for_pool(&self, pool: &PoolConfig) -> Config {
        let mut c = self.clone();
        c.pools = Vec::new();
        c.backend = pool.backend.clone();
        let a = &pool.autoscaler;
        override_fields!(
            c.autoscaler,
            a,
            [
                enabled,
                apply,
                metric,
                target,
                target_utilization_percentage,
                stable_window,
                metric_aggregation,
                panic_window_percentage,
                panic_threshold_percentage,
                max_scale_up_rate,
                max_scale_down_rate,
                min_scale,
                max_scale,
                initial_scale,
                scale_down_delay,
                scale_to_zero_grace,
                activation_scale,
            ]
        );
        override_fields!(c.idle, pool.idle, [timeout, session_ttl]);
        if let Some(customize) = &pool.customize {
            c.customize = customize.clone();
        }
        if let Some(preview) = &pool.preview {
            c.preview = Some(preview.clone());
        }
        if let Some(hooks) = &pool.hooks {
            c.hooks = hooks.clone();
        }
        if pool.idle.policy.is_some() {
            c.idle.policy = pool.idle.policy;
        }
        c
    }

    /// Checks `pools`: names, matches, and each pool's backend, autoscaler and idle
    /// settings, with errors naming `pools[i].…`.
    pub(super) fn validate_pools(&self) -> Result<(), ConfigError> {
        let mut defaults = 0;
        for (i, pool) in self.pools.iter().enumerate() {
            let key = format!("pools[{i}]");
            validate_name(&pool.name)
                .map_err(|m| ConfigError::invalid(format!("{key}.name"), m))?;
            for (j, earlier) in self.pools[..i].iter().enumerate() {
                if earlier.name == pool.name {
                    return Err(ConfigError::invalid(
                        format!("{key}.name"),
                        format!("{:?} is also the name of pools[{j}]", pool.name),
                    ));
                }
                if let (Some(m), Some(e)) = (&pool.matcher, &earlier.matcher)
                    && m.shadowed_by(e)
                {
                    return Err(ConfigError::invalid(
                        format!("{key}.match"),
                        format!(
                            "ambiguous: every request it matches is taken by pools[{j}] \
                             ({:?}) first",
                            earlier.name
                        ),
                    ));
                }
            }
            match &pool.matcher {
                Some(m) => m.validate(&format!("{key}.match"))?,
                None => {
                    defaults += 1;
                    if defaults > 1 {
                        return Err(ConfigError::invalid(
                            format!("{key}.match"),
                            "only one pool may omit match (the default pool)",
                        ));
                    }
                }
            }
            let effective = self.for_pool(pool);
            if let Some(customize) = &pool.customize {
                customize.validate(&format!("{key}.customize"))?;
            }
            let rename = |e: ConfigError| prefix_key(e, &key, pool);
            effective.validate_backend().map_err(rename)?;
            effective.validate_autoscaler().map_err(rename)?;
            effective.validate_idle().map_err(rename)?;
            if let Some(p) = &effective.preview {
                let preview_key = if pool.preview.is_some() {
                    format!("{key}.preview")
                } else {
                    "preview".to_owned()
                };
                p.validate(&preview_key)?;
            }
            let hooks_key = if pool.hooks.is_some() {
                format!("{key}.hooks")
            } else {
                "hooks".to_owned()
            };
            effective
                .hooks
                .validate(&hooks_key, effective.backend.kind)?;
        }
        self.validate_shared_cluster()
    }

    /// Kubernetes pools share the one kube client and replica identity
    /// ([`crate::cluster::Cluster`]): one kubeconfig and namespace, and claim prefixes
    /// that cannot select each other's claims (a restart recovers claims by prefix).
    fn validate_shared_cluster(&self) -> Result<(), ConfigError> {
        let kube: Vec<(usize, &PoolConfig)> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| p.backend.kind == BackendKind::Kubernetes)
            .collect();
        let Some((_, first)) = kube.first() else {
            return Ok(());
        };
        let k0 = &first.backend.kubernetes;
        for (n, (i, pool)) in kube.iter().enumerate() {
            let k = &pool.backend.kubernetes;
            if k.namespace != k0.namespace || k.kubeconfig != k0.kubeconfig {
                return Err(ConfigError::invalid(
                    format!("pools[{i}].backend.kubernetes.namespace"),
                    "kubernetes pools share one cluster client: namespace and kubeconfig \
                     must be the same in every kubernetes pool",
                ));
            }
            for (j, other) in kube[..n].iter() {
                let o = &other.backend.kubernetes.claim_prefix;
                if k.claim_prefix.starts_with(o.as_str()) || o.starts_with(&k.claim_prefix) {
                    return Err(ConfigError::invalid(
                        format!("pools[{i}].backend.kubernetes.claim_prefix"),
                        format!(
                            "{:?} and pools[{j}]'s {o:?} would select each other's claims; \
                             give each kubernetes pool its own prefix",
                            k.claim_prefix
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Renames `backend.*` (always) and `autoscaler.*` / `idle.*` (when the pool sets that
/// section) keys to `pools[i].…`; other keys are top-level ones and keep their name.
fn prefix_key(e: ConfigError, key: &str, pool: &PoolConfig) -> ConfigError {
    match e {
        ConfigError::Invalid { key: k, message } => {
            let own = k.starts_with("backend.")
                || (k.starts_with("customize") && pool.customize.is_some())
                || (k.starts_with("autoscaler.") && !pool.autoscaler.is_empty())
                || (k.starts_with("idle.") && !pool.idle.is_empty());
            let k = if own { format!("{key}.{k}") } else { k };
            ConfigError::Invalid { key: k, message }
        }
        other => other,
    }
}

/// A DNS label: 1-63 of `a-z`, `0-9`, `-`, starting and ending alphanumeric.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-63 characters of a-z, 0-9 and '-', starting and ending \
             with a letter or digit"
        ))
    }
}
