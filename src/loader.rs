//! Where a configuration comes from: a native YAML file, a Knative Service manifest, or
//! several manifests assembled into one configuration of pools.
//!
//! Above both `config` (which holds data and its own checks) and `knative` (which maps a
//! manifest onto that data), so neither has to know the other's file formats.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// Reads, parses and validates a YAML file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_yaml(&text)
}

/// Loads one file, or several Knative Service manifests as one pool each
/// (see [`crate::knative::config_from_manifests`]).
pub fn load_all(paths: &[PathBuf]) -> Result<Config, ConfigError> {
    match paths {
        [one] => load(one),
        _ => {
            let mut docs = Vec::with_capacity(paths.len());
            for path in paths {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let doc = serde_yaml_ng::from_str(&text)
                    .map_err(|e| ConfigError::invalid(path.display().to_string(), e.to_string()))?;
                docs.push((path.display().to_string(), doc));
            }
            crate::knative::config_from_manifests(&docs)
        }
    }
}

/// Parses and validates YAML text; errors name the key path. A `serving.knative.dev/v1`
/// Service manifest is accepted too (see [`crate::knative`]).
pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
    crate::knative::config_from_yaml(text).unwrap_or_else(|| Config::from_yaml(text))
}
