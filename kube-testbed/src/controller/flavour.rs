//! The two sandbox APIs the testbed serves and where their resource types live.

use serde_json::Value;

use crate::store::{ResourceType, Store};

/// Annotation the testbed sets on a Sandbox: the port its "pod" process listens on, when
/// pods pick free ports ([`super::ControllerConfig::pod_port`] 0). Real clusters never
/// set it; the activator honours it only with `backend.kubernetes.port_from_annotation`.
pub const PORT_ANNOTATION: &str = "agent-activator.dev/port";

/// Which sandbox API a resource set belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// kubernetes-sigs/agent-sandbox (`agents.x-k8s.io`, `extensions.agents.x-k8s.io`).
    AgentSandbox,
    /// OpenKruise agents (`agents.kruise.io`).
    OpenKruise,
}

/// Store indexes of one flavour's resource types.
#[derive(Debug, Clone, Copy)]
pub struct Resources {
    pub sandboxes: usize,
    pub claims: usize,
    /// SandboxWarmPool / SandboxSet.
    pub pools: usize,
    /// agent-sandbox SandboxTemplate (OpenKruise SandboxSets carry their template inline).
    pub templates: Option<usize>,
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

    /// Where this flavour's types are registered in `store` (None if they are not).
    pub fn resources(self, store: &Store) -> Option<Resources> {
        let [s, c, p] = self.types();
        let find = |t: &ResourceType| store.find(&t.group, &t.version, &t.plural).map(|x| x.0);
        Some(Resources {
            sandboxes: find(&s)?,
            claims: find(&c)?,
            pools: find(&p)?,
            templates: match self {
                Flavour::AgentSandbox => {
                    store.find_kind("extensions.agents.x-k8s.io", "SandboxTemplate")
                }
                Flavour::OpenKruise => None,
            },
        })
    }
}

impl Flavour {
    /// The pod template of a Sandbox: agent-sandbox `spec.podTemplate`, OpenKruise
    /// `spec.template`.
    pub fn pod_template(self, sandbox: &Value) -> Option<Value> {
        let t = match self {
            Flavour::AgentSandbox => &sandbox["spec"]["podTemplate"],
            Flavour::OpenKruise => &sandbox["spec"]["template"],
        };
        (!t.is_null()).then(|| t.clone())
    }

    /// The labels the controller puts on a Sandbox's pod: agent-sandbox `2fd412d55eca`
    /// controllers/sandbox_controller.go:53 (`agents.x-k8s.io/sandbox-name-hash` =
    /// `NameHash(name)`), openkruise/agents `0b72c83ae0bc` pkg/utils/constant.go:45,55 and
    /// pkg/controller/sandbox/core/pod_control.go:334 (`agents.kruise.io/created-by:
    /// sandbox`).
    pub fn pod_labels(self, sandbox_name: &str) -> Vec<(&'static str, String)> {
        match self {
            Flavour::AgentSandbox => vec![(
                "agents.x-k8s.io/sandbox-name-hash",
                super::agent_sandbox::name_hash(sandbox_name),
            )],
            Flavour::OpenKruise => vec![("agents.kruise.io/created-by", "sandbox".into())],
        }
    }
}
