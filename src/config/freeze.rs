//! `backend.kubernetes.pause` and `backend.kubernetes.node_agent.*`: how a Kubernetes
//! sandbox is paused, and where the node agent that freezes pods in place is found.

use std::path::PathBuf;

use serde::Deserialize;

use super::Dur;

/// `backend.kubernetes.pause`: what an idle pause does to the sandbox's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseMode {
    /// Suspend through the Sandbox spec: the pod is deleted (memory and IP lost, files on
    /// volumes kept); resume is a cold pod start.
    #[default]
    Suspend,
    /// Freeze the pod's cgroup in place through the node agent on its node: memory, IP
    /// and files kept, no CPU; resume thaws in milliseconds.
    Freeze,
}

impl PauseMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Suspend => "suspend",
            PauseMode::Freeze => "freeze",
        }
    }
}

/// `backend.kubernetes.node_agent.*`: how the activator reaches the node agent
/// (`agent-activator node-agent`, deployed by `deploy/node-agent`) with `pause: freeze`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeAgentClientConfig {
    /// Namespace of the node-agent DaemonSet.
    pub namespace: String,
    /// Label selector of its pods; the one on a sandbox pod's node (`spec.nodeName`) is
    /// called.
    pub selector: String,
    /// Port of the agent's API (`node_agent.listen`).
    pub port: u16,
    /// File holding the projected ServiceAccount token minted for the agent's audience;
    /// re-read on every call (the kubelet rotates it).
    pub token_path: PathBuf,
    /// Bound on one agent lookup or call (a freeze waits for the kernel, bounded by the
    /// agent's `node_agent.freeze_timeout`: keep this longer).
    pub timeout: Dur,
    /// How long an agent's address is reused for its node before it is looked up again
    /// (a failed call looks it up at once).
    pub address_cache_ttl: Dur,
}

impl Default for NodeAgentClientConfig {
    fn default() -> Self {
        NodeAgentClientConfig {
            namespace: "agent-activator-system".into(),
            selector: "app.kubernetes.io/name=agent-activator-node-agent".into(),
            port: 9470,
            token_path: "/var/run/secrets/agent-activator/node-agent/token".into(),
            timeout: Dur::secs(10),
            address_cache_ttl: Dur::secs(30),
        }
    }
}
