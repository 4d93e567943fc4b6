//! The container of `spec.template.spec` and the other manifest fields the backend uses.

use serde_yaml_ng::{Mapping, Value};

use super::{NativeTree, field};
use crate::config::ConfigError;

const CONTAINERS: &str = "spec.template.spec.containers";

fn strings(v: &Value, key: &str) -> Result<Vec<String>, ConfigError> {
    let Value::Sequence(items) = v else {
        return Err(ConfigError::invalid(key, "must be a list of strings"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.replace("$(PORT)", "{port}")),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(ConfigError::invalid(
                format!("{key}[{i}]"),
                "must be a string",
            )),
        })
        .collect()
}

/// Maps the container (command, args, env, port, readiness path), `timeoutSeconds`,
/// the Service's name and namespace onto `tree`.
pub fn apply(doc: &Value, tree: &mut NativeTree) -> Result<(), ConfigError> {
    let containers = match field(doc, &["spec", "template", "spec", "containers"]) {
        Some(Value::Sequence(c)) if c.len() == 1 => c,
        Some(Value::Sequence(c)) if c.len() > 1 => {
            return Err(ConfigError::invalid(
                CONTAINERS,
                "one container per sandbox is supported",
            ));
        }
        _ => {
            return Err(ConfigError::invalid(
                CONTAINERS,
                "a Knative Service needs exactly one container",
            ));
        }
    };
    let c = &containers[0];
    let at = |f: &str| format!("{CONTAINERS}[0].{f}");
    match c.get("image") {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => return Err(ConfigError::invalid(at("image"), "is required")),
    }

    // command + args become the process backend's argv; Kubernetes' $(PORT) is {port}.
    let mut argv = Vec::new();
    for f in ["command", "args"] {
        if let Some(v) = c.get(f) {
            argv.extend(strings(v, &at(f))?);
        }
    }
    if !argv.is_empty() {
        let argv = Value::Sequence(argv.into_iter().map(Value::from).collect());
        tree.set(&["backend", "command"], argv, &at("command"))?;
    }

    if let Some(env) = c.get("env") {
        let Value::Sequence(vars) = env else {
            return Err(ConfigError::invalid(at("env"), "must be a list"));
        };
        let mut map = Mapping::new();
        for (i, var) in vars.iter().enumerate() {
            let key = format!("{}[{i}]", at("env"));
            let name = var.get("name").and_then(Value::as_str);
            let value = match var.get("value") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                None if var.get("valueFrom").is_some() => {
                    return Err(ConfigError::invalid(
                        key,
                        "valueFrom is resolved by Kubernetes; use a literal value here",
                    ));
                }
                None => Some(String::new()),
                _ => None,
            };
            match (name, value) {
                (Some(n), Some(v)) if !n.is_empty() => {
                    map.insert(Value::from(n), Value::from(v));
                }
                _ => return Err(ConfigError::invalid(key, "needs a name and a string value")),
            }
        }
        tree.set(&["backend", "env"], Value::Mapping(map), &at("env"))?;
    }

    if let Some(port) = field(c, &["ports"])
        .and_then(|p| p.get(0))
        .and_then(|p| p.get("containerPort"))
    {
        let key = format!("{CONTAINERS}[0].ports[0].containerPort");
        match port.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) if p > 0 => {
                tree.set(&["backend", "kubernetes", "port"], Value::from(p), &key)?
            }
            _ => return Err(ConfigError::invalid(key, "must be a TCP port")),
        }
    }
    if let Some(path) = field(c, &["readinessProbe", "httpGet", "path"]) {
        let key = at("readinessProbe.httpGet.path");
        let path = path
            .as_str()
            .ok_or_else(|| ConfigError::invalid(key.clone(), "must be a string"))?;
        tree.set(&["backend", "ready_path"], Value::from(path), &key)?;
    }
    if let Some(t) = field(doc, &["spec", "template", "spec", "timeoutSeconds"]) {
        let key = "spec.template.spec.timeoutSeconds";
        match t.as_u64() {
            Some(s) if s > 0 => tree.set(
                &["proxy", "request_timeout"],
                Value::from(format!("{s}s")),
                key,
            )?,
            _ => {
                return Err(ConfigError::invalid(
                    key,
                    "must be a whole number of seconds > 0",
                ));
            }
        }
    }

    // Without an overlay saying otherwise, a Knative Service runs on Kubernetes, drawing
    // from the warm pool named after the Service, in the Service's namespace.
    if !tree.is_set(&["backend", "kind"]) {
        tree.set(
            &["backend", "kind"],
            Value::from("kubernetes"),
            "apiVersion",
        )?;
    }
    if let Some(name) = field(doc, &["metadata", "name"]).and_then(Value::as_str)
        && !tree.is_set(&["backend", "kubernetes", "pool"])
    {
        tree.set(
            &["backend", "kubernetes", "pool"],
            Value::from(name),
            "metadata.name",
        )?;
    }
    if let Some(ns) = field(doc, &["metadata", "namespace"]).and_then(Value::as_str)
        && !tree.is_set(&["backend", "kubernetes", "namespace"])
    {
        tree.set(
            &["backend", "kubernetes", "namespace"],
            Value::from(ns),
            "metadata.namespace",
        )?;
    }
    Ok(())
}
