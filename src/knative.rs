//! Knative vocabulary: a `serving.knative.dev/v1` Service manifest as the configuration.
//!
//! [`crate::loader::from_yaml`] hands a document with `apiVersion: serving.knative.dev/v1` and
//! `kind: Service` to [`config_from_manifest`]. It builds a native configuration tree from:
//! 1. the overlay annotation `agent-activator.dev/config` (native YAML, any key);
//! 2. every annotation on `metadata` and `spec.template.metadata` (see [`annotations`]);
//! 3. the one container of `spec.template.spec` (command/args/env/port/readiness path)
//!    and `timeoutSeconds`.
//!
//! A native key set by two sources with different values is an error naming both. The
//! tree then goes through the same deserialisation and `validate()` as a native file;
//! an error about a key that came from an annotation names the annotation.

use std::collections::BTreeMap;

use serde_yaml_ng::{Mapping, Value};

use crate::config::{Config, ConfigError, deserialize_with_path};

mod annotations;
mod container;
mod go_duration;
mod pools;

pub use pools::{POOL_MATCH_ANNOTATION, config_from_manifests};

/// The overlay annotation: native configuration YAML merged under the mapped keys.
pub const OVERLAY_ANNOTATION: &str = "agent-activator.dev/config";

/// Whether `doc` is a Knative Service manifest.
pub fn is_knative_service(doc: &Value) -> bool {
    doc.get("apiVersion").and_then(Value::as_str) == Some("serving.knative.dev/v1")
        && doc.get("kind").and_then(Value::as_str) == Some("Service")
}

/// The native configuration tree being built, remembering where each key came from.
pub struct NativeTree {
    root: Mapping,
    /// Native dotted key -> the annotation or manifest field that set it.
    origins: BTreeMap<String, String>,
}

impl NativeTree {
    fn new(root: Mapping) -> NativeTree {
        NativeTree {
            root,
            origins: BTreeMap::new(),
        }
    }

    /// Sets native `path` (e.g. `["autoscaler", "metric"]`) to `value` on behalf of
    /// `source`. A different value already there (from the overlay or another source) is
    /// an error naming both.
    pub fn set(&mut self, path: &[&str], value: Value, source: &str) -> Result<(), ConfigError> {
        let dotted = path.join(".");
        let (last, parents) = path.split_last().expect("a non-empty native key path");
        let mut node = &mut self.root;
        for p in parents {
            let child = node
                .entry(Value::from(*p))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            node = match child {
                Value::Mapping(m) => m,
                _ => {
                    return Err(ConfigError::invalid(
                        source,
                        format!("{OVERLAY_ANNOTATION} sets {p} to a non-mapping"),
                    ));
                }
            };
        }
        if let Some(existing) = node.get(*last)
            && existing != &value
        {
            let other = self
                .origins
                .get(&dotted)
                .cloned()
                .unwrap_or_else(|| format!("{OVERLAY_ANNOTATION} ({dotted})"));
            return Err(ConfigError::invalid(
                source,
                format!("conflicts with {other}: both set {dotted}"),
            ));
        }
        node.insert(Value::from(*last), value);
        self.origins.insert(dotted, source.to_owned());
        Ok(())
    }

    /// The value at native `path`, if the overlay or a source set it.
    pub fn get(&self, path: &[&str]) -> Option<&Value> {
        let (last, parents) = path.split_last()?;
        let mut node = &self.root;
        for p in parents {
            match node.get(*p) {
                Some(Value::Mapping(m)) => node = m,
                _ => return None,
            }
        }
        node.get(*last)
    }

    /// Whether the overlay or a source already set native `path`.
    pub fn is_set(&self, path: &[&str]) -> bool {
        self.get(path).is_some()
    }
}

/// The value at `path` below `doc`, if every step exists.
pub(crate) fn field<'a>(doc: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |v, p| v.get(*p))
}

/// The configuration of `text` if it is a Knative Service manifest; `None` for anything
/// else (then it is native YAML: `crate::loader::from_yaml` tells them apart).
pub fn config_from_yaml(text: &str) -> Option<Result<Config, ConfigError>> {
    let doc = serde_yaml_ng::from_str::<Value>(text).ok()?;
    is_knative_service(&doc).then(|| config_from_manifest(&doc))
}

/// Builds and validates the native configuration from a Knative Service manifest.
pub fn config_from_manifest(doc: &Value) -> Result<Config, ConfigError> {
    let tree = native_tree(doc)?;
    finish(&tree)
}

/// The native configuration tree of one manifest, not yet deserialised.
fn native_tree(doc: &Value) -> Result<NativeTree, ConfigError> {
    let annotations = annotations::collect(doc)?;
    let overlay = match annotations.get(OVERLAY_ANNOTATION) {
        None => Mapping::new(),
        Some(text) => match serde_yaml_ng::from_str::<Value>(text) {
            Ok(Value::Mapping(m)) => m,
            Ok(Value::Null) => Mapping::new(),
            Ok(_) => {
                return Err(ConfigError::invalid(
                    OVERLAY_ANNOTATION,
                    "must be a YAML mapping of native configuration keys",
                ));
            }
            Err(e) => return Err(ConfigError::invalid(OVERLAY_ANNOTATION, e.to_string())),
        },
    };
    let mut tree = NativeTree::new(overlay);
    let apply = annotations::apply(&annotations, &mut tree)?;
    container::apply(doc, &mut tree)?;
    // The platform's autoscaler acts on its decisions, except for an HPA class and for
    // the static backend (a fixed set of sandboxes).
    let is_static = tree.get(&["backend", "kind"]).and_then(Value::as_str) == Some("static");
    if !tree.is_set(&["autoscaler", "apply"]) && !is_static {
        let source = "autoscaling.knative.dev/class";
        tree.set(&["autoscaler", "apply"], Value::from(apply), source)?;
    }
    Ok(tree)
}

/// Deserialises and validates a tree, naming annotations in errors.
fn finish(tree: &NativeTree) -> Result<Config, ConfigError> {
    let value = Value::Mapping(tree.root.clone());
    let config: Config = deserialize_with_path(value).map_err(|e| tree.rename(e))?;
    config.validate().map_err(|e| tree.rename(e))?;
    Ok(config)
}

impl NativeTree {
    /// Renames an error about a native key to the annotation or field that set it.
    fn rename(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid { key, message } => match self.origins.get(&key) {
                Some(source) => ConfigError::invalid(source.clone(), format!("{key}: {message}")),
                None => ConfigError::Invalid { key, message },
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
