//! `node_agent.*`: the node agent's own configuration section, with its validation.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ConfigError, Dur};

/// Default audience of the projected ServiceAccount token clients present. A token minted
/// for this audience is useless against the API server and any other service.
pub const DEFAULT_AUDIENCE: &str = "agent-activator-node-agent";

/// `node_agent.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeAgentConfig {
    /// Address of the freeze/thaw API.
    pub listen: SocketAddr,
    /// Address of `/metrics` (and `/healthz`), kept apart from the API.
    pub metrics_listen: SocketAddr,
    /// Name of the node this agent runs on; unset = the `NODE_NAME` environment variable
    /// (the DaemonSet sets it from `spec.nodeName` through the downward API).
    pub node_name: Option<String>,
    /// Where the kubelet's cgroup tree is: a cgroup v2 mount (or a v2 directory holding
    /// `kubepods.slice` / `kubepods`), or a v1 root that holds `freezer/`.
    pub cgroup_root: PathBuf,
    /// The kubelet's cgroup driver: `auto` (find whichever layout exists), `systemd` or
    /// `cgroupfs`.
    pub cgroup_driver: CgroupDriver,
    /// Namespaces whose pods may be frozen. Required: the agent refuses every other pod.
    pub namespaces: Vec<String>,
    /// Usernames TokenReview must report for a client to be served, e.g.
    /// `system:serviceaccount:agents:agent-activator`. Required.
    pub allowed_clients: Vec<String>,
    /// Audience the client's projected token must be minted for.
    pub audience: String,
    /// Path to a kubeconfig; unset = in-cluster config, then `KUBECONFIG`/`~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Bound on one freeze: from the write to `cgroup.freeze` to the kernel reporting frozen.
    /// The pod is thawed again and 504 `freeze_timeout` returned after it.
    pub freeze_timeout: Dur,
    /// Bound on one API-server call (TokenReview, pod lookup).
    pub api_timeout: Dur,
    /// How long a successful TokenReview is reused for the same token.
    pub token_cache_ttl: Dur,
    /// How long a verified pod (namespace, name, UID, node, labels) is reused.
    pub pod_cache_ttl: Dur,
    /// Requests handled at once; more get 503 `overloaded`.
    pub max_concurrent_requests: usize,
}

impl Default for NodeAgentConfig {
    fn default() -> Self {
        NodeAgentConfig {
            listen: "127.0.0.1:9470".parse().expect("literal address"),
            metrics_listen: "127.0.0.1:9471".parse().expect("literal address"),
            node_name: None,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_driver: CgroupDriver::Auto,
            namespaces: Vec::new(),
            allowed_clients: Vec::new(),
            audience: DEFAULT_AUDIENCE.into(),
            kubeconfig: None,
            freeze_timeout: Dur::secs(5),
            api_timeout: Dur::secs(5),
            token_cache_ttl: Dur::secs(60),
            pod_cache_ttl: Dur::secs(10),
            max_concurrent_requests: 256,
        }
    }
}

/// The kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupDriver {
    Auto,
    Systemd,
    Cgroupfs,
}

impl NodeAgentConfig {
    /// Checks values that parse but make no sense; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.namespaces.is_empty() {
            return Err(ConfigError::invalid(
                "node_agent.namespaces",
                "list the namespaces whose sandbox pods may be frozen (at least one)",
            ));
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                return Err(ConfigError::invalid(
                    format!("node_agent.namespaces[{i}]"),
                    "not a valid namespace name",
                ));
            }
        }
        if self.allowed_clients.is_empty() {
            return Err(ConfigError::invalid(
                "node_agent.allowed_clients",
                "list the usernames allowed to call the agent, e.g. \
                 system:serviceaccount:NAMESPACE:agent-activator",
            ));
        }
        for (i, c) in self.allowed_clients.iter().enumerate() {
            if c.trim().is_empty() || c.trim() != c {
                return Err(ConfigError::invalid(
                    format!("node_agent.allowed_clients[{i}]"),
                    "must be a non-empty username without surrounding spaces",
                ));
            }
        }
        if self.audience.trim().is_empty() {
            return Err(ConfigError::invalid(
                "node_agent.audience",
                "must not be empty",
            ));
        }
        if let Some(n) = &self.node_name
            && n.trim().is_empty()
        {
            return Err(ConfigError::invalid(
                "node_agent.node_name",
                "must not be empty (leave it unset to read NODE_NAME)",
            ));
        }
        if !self.cgroup_root.is_absolute() {
            return Err(ConfigError::invalid(
                "node_agent.cgroup_root",
                "must be an absolute path",
            ));
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "node_agent.metrics_listen",
                "must differ from node_agent.listen",
            ));
        }
        for (key, d) in [
            ("node_agent.freeze_timeout", self.freeze_timeout),
            ("node_agent.api_timeout", self.api_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than zero"));
            }
        }
        if self.max_concurrent_requests == 0 {
            return Err(ConfigError::invalid(
                "node_agent.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// `node_name`, else `NODE_NAME`; an error names both.
    pub fn effective_node_name(&self) -> Result<String, ConfigError> {
        match &self.node_name {
            Some(n) => Ok(n.clone()),
            None => std::env::var("NODE_NAME")
                .ok()
                .filter(|n| !n.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "node_agent.node_name",
                        "unset and NODE_NAME is not in the environment",
                    )
                }),
        }
    }
}

/// An RFC 1123 label, the shape of a namespace name.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeAgentConfig {
        NodeAgentConfig {
            namespaces: vec!["agents".into()],
            allowed_clients: vec!["system:serviceaccount:agents:agent-activator".into()],
            ..NodeAgentConfig::default()
        }
    }

    #[test]
    fn required_lists_are_named() {
        let mut c = valid();
        assert!(c.validate().is_ok());
        c.namespaces.clear();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_agent.namespaces:")
        );
        let mut c = valid();
        c.allowed_clients.clear();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("node_agent.allowed_clients:"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = valid();
        c.namespaces.push("Bad_NS".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_agent.namespaces[1]:")
        );
        let mut c = valid();
        c.cgroup_root = "relative".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_agent.cgroup_root:")
        );
        let mut c = valid();
        c.metrics_listen = c.listen;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_agent.metrics_listen:")
        );
        let mut c = valid();
        c.freeze_timeout = Dur::secs(0);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("node_agent.freeze_timeout:")
        );
    }
}
