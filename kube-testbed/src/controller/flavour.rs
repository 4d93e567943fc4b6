//! Where each API keeps the fields the simulated controller reads and writes.

use serde_json::{Value, json};

use crate::store::ResourceType;

/// Annotation the testbed sets on a Sandbox: the port its "pod" process listens on.
/// Real clusters never set it; the backend then dials `podIP:backend.kubernetes.port`.
pub const PORT_ANNOTATION: &str = "agent-activator.dev/port";

/// Which sandbox API a resource set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// kubernetes-sigs/agent-sandbox (`agents.x-k8s.io`, `extensions.agents.x-k8s.io`).
    AgentSandbox,
    /// OpenKruise agents (`agents.kruise.io`).
    OpenKruise,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::AgentSandbox, Flavour::OpenKruise];

    /// Sandbox, SandboxClaim, warm pool (SandboxWarmPool / SandboxSet).
    pub fn types(self) -> [ResourceType; 3] {
        match self {
            Flavour::AgentSandbox => [
                ResourceType::namespaced("agents.x-k8s.io", "v1beta1", "Sandbox", "sandboxes"),
                ResourceType::namespaced(
                    "extensions.agents.x-k8s.io",
                    "v1beta1",
                    "SandboxClaim",
                    "sandboxclaims",
                ),
                ResourceType::namespaced(
                    "extensions.agents.x-k8s.io",
                    "v1beta1",
                    "SandboxWarmPool",
                    "sandboxwarmpools",
                )
                .with_scale(),
            ],
            Flavour::OpenKruise => [
                ResourceType::namespaced("agents.kruise.io", "v1alpha1", "Sandbox", "sandboxes"),
                ResourceType::namespaced(
                    "agents.kruise.io",
                    "v1alpha1",
                    "SandboxClaim",
                    "sandboxclaims",
                ),
                ResourceType::namespaced(
                    "agents.kruise.io",
                    "v1alpha1",
                    "SandboxSet",
                    "sandboxsets",
                )
                .with_scale(),
            ],
        }
    }

    /// Label marking an unclaimed warm-pool sandbox; its value is the pool name.
    pub fn pool_label(self) -> &'static str {
        match self {
            Flavour::AgentSandbox => "agents.x-k8s.io/warm-pool-sandbox",
            Flavour::OpenKruise => "agents.kruise.io/sandbox-set",
        }
    }

    /// The pool a claim draws from.
    pub fn claim_pool(self, claim: &Value) -> Option<String> {
        let v = match self {
            Flavour::AgentSandbox => &claim["spec"]["warmPoolRef"]["name"],
            Flavour::OpenKruise => &claim["spec"]["templateName"],
        };
        v.as_str().map(str::to_owned)
    }

    /// Whether a claim may cold-create when its pool is empty.
    pub fn claim_may_create(self, claim: &Value) -> bool {
        match self {
            Flavour::AgentSandbox => true,
            Flavour::OpenKruise => claim["spec"]["createOnNoStock"].as_bool().unwrap_or(true),
        }
    }

    /// The sandbox bound to a claim, if any.
    pub fn claim_sandbox(self, claim: &Value) -> Option<String> {
        let v = match self {
            Flavour::AgentSandbox => &claim["status"]["sandbox"]["name"],
            Flavour::OpenKruise => &claim["status"]["sandboxName"],
        };
        v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
    }

    /// The claim's status once bound to `sandbox`, mirroring its readiness.
    pub fn claim_status(self, sandbox_name: &str, sandbox: Option<&Value>) -> Value {
        let ready = sandbox.is_some_and(|s| self.sandbox_ready(s));
        match self {
            Flavour::AgentSandbox => {
                let ips = sandbox
                    .map(|s| s["status"]["podIPs"].clone())
                    .filter(Value::is_array)
                    .unwrap_or_else(|| json!([]));
                json!({
                    "sandbox": {"name": sandbox_name, "podIPs": ips},
                    "conditions": [condition("Ready", ready, if ready { "SandboxReady" } else { "SandboxNotReady" })],
                })
            }
            Flavour::OpenKruise => json!({
                "phase": "Claimed",
                "sandboxName": sandbox_name,
            }),
        }
    }

    /// Whether the sandbox's spec asks for a running pod.
    pub fn wants_running(self, sandbox: &Value) -> bool {
        match self {
            Flavour::AgentSandbox => {
                sandbox["spec"]["operatingMode"]
                    .as_str()
                    .unwrap_or("Running")
                    != "Suspended"
            }
            Flavour::OpenKruise => !sandbox["spec"]["paused"].as_bool().unwrap_or(false),
        }
    }

    /// Whether the sandbox's status says it is ready.
    pub fn sandbox_ready(self, sandbox: &Value) -> bool {
        match self {
            Flavour::AgentSandbox => sandbox["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True"),
            Flavour::OpenKruise => sandbox["status"]["phase"] == "Running",
        }
    }

    /// Status of a sandbox whose pod is being started. `was_stopped`: resuming.
    pub fn status_starting(self, old: &Value, was_stopped: bool) -> Value {
        match self {
            Flavour::AgentSandbox => {
                let mut conds = vec![condition("Ready", false, "PodPending")];
                conds.extend(stale_suspended(old));
                json!({"conditions": conds, "podIPs": [], "replicas": 0})
            }
            Flavour::OpenKruise => {
                json!({"phase": if was_stopped { "Resuming" } else { "Pending" }})
            }
        }
    }

    /// Status of a sandbox whose pod runs (pod IP 127.0.0.1; the port is the annotation).
    pub fn status_running(self, old: &Value, name: &str, ns: &str) -> Value {
        match self {
            Flavour::AgentSandbox => {
                let mut conds = vec![condition("Ready", true, "PodReady")];
                // Like the real controller, a Suspended condition from before may linger:
                // clients must trust Ready.
                conds.extend(stale_suspended(old));
                json!({
                    "conditions": conds,
                    "podIPs": ["127.0.0.1"],
                    "serviceFQDN": format!("{name}.{ns}.svc.cluster.local"),
                    "nodeName": "kube-testbed",
                    "replicas": 1,
                })
            }
            Flavour::OpenKruise => json!({
                "phase": "Running",
                "podInfo": {"podIP": "127.0.0.1", "nodeName": "kube-testbed"},
                "conditions": [condition("Ready", true, "PodReady")],
            }),
        }
    }

    /// Status of a suspended / paused sandbox (its pod deleted).
    pub fn status_stopped(self) -> Value {
        match self {
            Flavour::AgentSandbox => json!({
                "conditions": [
                    condition("Ready", false, "SandboxSuspended"),
                    condition("Suspended", true, "OperatingModeSuspended"),
                ],
                "podIPs": [],
                "replicas": 0,
            }),
            Flavour::OpenKruise => json!({"phase": "Paused"}),
        }
    }

    /// Status of a pod that failed to start.
    pub fn status_failed(self, message: &str) -> Value {
        match self {
            Flavour::AgentSandbox => json!({
                "conditions": [{
                    "type": "Ready", "status": "False", "reason": "PodFailed",
                    "message": message, "lastTransitionTime": now(),
                }],
                "podIPs": [],
            }),
            Flavour::OpenKruise => json!({"phase": "Failed", "message": message}),
        }
    }

    /// The pod template a pool stamps sandboxes from, as a Sandbox `spec`.
    pub fn sandbox_spec(self, pool: &Value, template: Option<&Value>) -> Value {
        match self {
            Flavour::AgentSandbox => json!({
                "podTemplate": template
                    .map(|t| t["spec"]["podTemplate"].clone())
                    .unwrap_or_else(|| json!({"spec": {"containers": []}})),
                "operatingMode": "Running",
            }),
            Flavour::OpenKruise => json!({
                "template": pool["spec"]["template"].clone(),
                "paused": false,
            }),
        }
    }
}

fn stale_suspended(old: &Value) -> Option<Value> {
    old["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Suspended")
        .cloned()
}

fn condition(ty: &str, status: bool, reason: &str) -> Value {
    json!({
        "type": ty,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": "",
        "lastTransitionTime": now(),
    })
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
