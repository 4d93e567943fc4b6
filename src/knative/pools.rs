//! Several Knative Service manifests as several pools (`serve --config a.yaml --config
//! b.yaml`): each Service becomes the pool named by its `metadata.name`, selected by the
//! `agent-activator.dev/pool-match` annotation (absent: the default pool).
//!
//! Each manifest maps exactly as a single one does (see the parent module); its
//! `backend`, `autoscaler` and `idle` become the pool's. Every other (server-wide) native
//! key, such as `listen`, `session` or `proxy.request_timeout` from `timeoutSeconds`,
//! comes from the first manifest; a later manifest that sets one differently is an error
//! rather than a setting silently ignored.

use serde_yaml_ng::Value;

use super::{NativeTree, field, finish, is_knative_service, native_tree};
use crate::config::{
    Config, ConfigError, PoolAutoscaler, PoolConfig, PoolIdle, PoolMatch, validate_name,
};

/// The annotation holding a pool's `match` as YAML, e.g.
/// `{header: {name: X-Sandbox-Template, value: python}}` or `{path_prefix: /browser/}`.
pub const POOL_MATCH_ANNOTATION: &str = "agent-activator.dev/pool-match";

/// Native keys a manifest sets for its own pool; every other key is server-wide.
const POOL_KEYS: &[&str] = &["backend", "autoscaler", "idle", "customize"];

/// One configuration with a pool per manifest; `docs` are `(file name, manifest)`.
/// Errors name the file.
pub fn config_from_manifests(docs: &[(String, Value)]) -> Result<Config, ConfigError> {
    let mut first: Option<(NativeTree, Config)> = None;
    let mut pools = Vec::with_capacity(docs.len());
    for (file, doc) in docs {
        let named = |e: ConfigError| in_file(file, e);
        if !is_knative_service(doc) {
            return Err(ConfigError::invalid(
                file.clone(),
                "with several --config files each must be a serving.knative.dev/v1 Service \
                 (one per pool)",
            ));
        }
        let tree = native_tree(doc).map_err(named)?;
        let config = finish(&tree).map_err(named)?;
        if let Some((first_tree, _)) = &first {
            same_server_settings(first_tree, &tree).map_err(named)?;
        }
        let mut pool = pool_of(doc, &config).map_err(named)?;
        // Claims are recovered by prefix: each pool needs its own (check still refuses
        // two that select each other's, e.g. `py-` and `py-gpu-`).
        if docs.len() > 1 && !tree.is_set(&["backend", "kubernetes", "claim_prefix"]) {
            let stem = &pool.name[..pool.name.len().min(29)];
            pool.backend.kubernetes.claim_prefix = format!("{}-", stem.trim_end_matches('-'));
        }
        pools.push(pool);
        if first.is_none() {
            first = Some((tree, config));
        }
    }
    let Some((_, mut config)) = first else {
        return Err(ConfigError::invalid(
            "--config",
            "at least one file is required",
        ));
    };
    config.pools = pools;
    config.validate()?;
    Ok(config)
}

/// The pool a manifest describes.
fn pool_of(doc: &Value, config: &Config) -> Result<PoolConfig, ConfigError> {
    let name = field(doc, &["metadata", "name"])
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::invalid("metadata.name", "is required (it names the pool)"))?;
    validate_name(name).map_err(|m| ConfigError::invalid("metadata.name", m))?;
    let matcher = super::annotations::collect(doc)?
        .get(POOL_MATCH_ANNOTATION)
        .map(|text| {
            serde_yaml_ng::from_str::<PoolMatch>(text)
                .map_err(|e| ConfigError::invalid(POOL_MATCH_ANNOTATION, e.to_string()))
        })
        .transpose()?;
    Ok(PoolConfig {
        name: name.to_owned(),
        matcher,
        backend: config.backend.clone(),
        autoscaler: PoolAutoscaler::from_full(&config.autoscaler),
        idle: PoolIdle::from_full(&config.idle),
        customize: Some(config.customize.clone()),
        preview: config.preview.clone(),
        hooks: Some(config.hooks.clone()),
    })
}

/// A later manifest may only repeat the first one's server-wide keys.
fn same_server_settings(first: &NativeTree, later: &NativeTree) -> Result<(), ConfigError> {
    for (key, value) in &later.root {
        let Some(k) = key.as_str() else { continue };
        if POOL_KEYS.contains(&k) {
            continue;
        }
        if first.root.get(k) != Some(value) {
            let source = later
                .origins
                .iter()
                .find(|(native, _)| native.split('.').next() == Some(k))
                .map_or(super::OVERLAY_ANNOTATION, |(_, s)| s.as_str());
            return Err(ConfigError::invalid(
                source,
                format!(
                    "sets the server-wide {k} differently from the first manifest; \
                     server-wide settings come from the first --config"
                ),
            ));
        }
    }
    Ok(())
}

fn in_file(file: &str, e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message } => {
            ConfigError::invalid(format!("{file}: {key}"), message)
        }
        other => other,
    }
}
