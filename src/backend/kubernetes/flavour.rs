//! `Flavour`: one activator, two sandbox APIs. Typed views over `DynamicObject`s and the
//! bodies of the few writes the activator makes.

use std::net::IpAddr;

use kube::api::{ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::crd::{agent_sandbox as asb, is_ready, openkruise as okr};
use crate::config::KubernetesApi;

/// Annotation that overrides `backend.kubernetes.port` for one sandbox. Only the test
/// double (kube-testbed) sets it, because its "pods" share 127.0.0.1.
pub const PORT_ANNOTATION: &str = "agent-activator.dev/port";

/// Which sandbox API the cluster speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    AgentSandbox,
    OpenKruise,
}

/// What the activator needs to know about one Sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxView {
    /// Ready with a pod IP.
    pub ready: bool,
    pub pod_ip: Option<IpAddr>,
    /// The spec asks for suspension (`operatingMode: Suspended` / `paused: true`).
    pub spec_paused: bool,
    /// [`PORT_ANNOTATION`], when set.
    pub port_override: Option<u16>,
    /// Still an unclaimed warm-pool member.
    pub warm: bool,
    /// Being deleted.
    pub deleting: bool,
}

impl SandboxView {
    /// Ready to take traffic and not asked to suspend.
    pub fn serving(&self) -> Option<IpAddr> {
        if self.ready && !self.spec_paused {
            self.pod_ip
        } else {
            None
        }
    }
}

impl Flavour {
    pub fn from_config(api: KubernetesApi) -> Flavour {
        match api {
            KubernetesApi::AgentSandbox => Flavour::AgentSandbox,
            KubernetesApi::Openkruise => Flavour::OpenKruise,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::AgentSandbox => "agent-sandbox",
            Flavour::OpenKruise => "openkruise",
        }
    }

    pub fn sandbox_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::Sandbox>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::Sandbox>(&()),
        }
    }

    pub fn claim_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::SandboxClaim>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::SandboxClaim>(&()),
        }
    }

    /// SandboxWarmPool / SandboxSet.
    pub fn pool_resource(self) -> ApiResource {
        match self {
            Flavour::AgentSandbox => ApiResource::erase::<asb::SandboxWarmPool>(&()),
            Flavour::OpenKruise => ApiResource::erase::<okr::SandboxSet>(&()),
        }
    }

    /// The body of a new claim on `pool`.
    pub fn claim_spec(self, pool: &str) -> Value {
        let spec = match self {
            Flavour::AgentSandbox => serde_json::to_value(asb::SandboxClaimSpec {
                warm_pool_ref: asb::NameRef { name: pool.into() },
                lifecycle: None,
            }),
            Flavour::OpenKruise => serde_json::to_value(okr::SandboxClaimSpec {
                template_name: pool.into(),
                create_on_no_stock: Some(true),
                ..okr::SandboxClaimSpec::default()
            }),
        };
        spec.expect("claim specs serialize")
    }

    /// The Sandbox a claim is bound to, once the controller bound it.
    pub fn claim_sandbox(self, claim: &DynamicObject) -> Option<String> {
        let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
        let name = match self {
            Flavour::AgentSandbox => {
                let s: asb::SandboxClaimStatus = serde_json::from_value(status).unwrap_or_default();
                s.sandbox.and_then(|s| s.name).or_else(|| {
                    claim
                        .metadata
                        .annotations
                        .as_ref()?
                        .get(asb::SANDBOX_NAME_ANNOTATION)
                        .cloned()
                })
            }
            Flavour::OpenKruise => {
                let s: okr::SandboxClaimStatus = serde_json::from_value(status).unwrap_or_default();
                s.sandbox_name
            }
        };
        name.filter(|n| !n.is_empty())
    }

    /// The typed view of a Sandbox.
    pub fn sandbox_view(self, obj: &DynamicObject) -> SandboxView {
        let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
        let status = obj.data.get("status").cloned().unwrap_or(Value::Null);
        let labels = obj.metadata.labels.as_ref();
        let (ready, ip, spec_paused, warm) = match self {
            Flavour::AgentSandbox => {
                let spec: asb::SandboxSpec = serde_json::from_value(spec).unwrap_or_default();
                let st: asb::SandboxStatus = serde_json::from_value(status).unwrap_or_default();
                (
                    is_ready(&st.conditions),
                    st.pod_ips.first().cloned(),
                    spec.operating_mode.as_deref() == Some("Suspended"),
                    labels.is_some_and(|l| l.contains_key(asb::WARM_POOL_LABEL)),
                )
            }
            Flavour::OpenKruise => {
                let spec: okr::SandboxSpec = serde_json::from_value(spec).unwrap_or_default();
                let st: okr::SandboxStatus = serde_json::from_value(status).unwrap_or_default();
                (
                    st.phase.as_deref() == Some("Running"),
                    st.pod_info.and_then(|p| p.pod_ip),
                    spec.paused.unwrap_or(false),
                    labels.is_some_and(|l| l.contains_key(okr::POOL_LABEL)),
                )
            }
        };
        let pod_ip = ip.and_then(|ip| ip.parse::<IpAddr>().ok());
        SandboxView {
            ready: ready && pod_ip.is_some(),
            pod_ip,
            spec_paused,
            port_override: obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PORT_ANNOTATION))
                .and_then(|p| p.parse().ok()),
            warm,
            deleting: obj.metadata.deletion_timestamp.is_some(),
        }
    }

    /// The spec change that suspends (`true`) or resumes (`false`) a sandbox.
    pub fn pause_spec(self, paused: bool) -> Value {
        match self {
            Flavour::AgentSandbox => {
                json!({"operatingMode": if paused { "Suspended" } else { "Running" }})
            }
            Flavour::OpenKruise => json!({"paused": paused}),
        }
    }

    /// What a suspend keeps, in words (admin API and docs).
    pub fn pause_keeps(self) -> &'static str {
        match self {
            Flavour::AgentSandbox => "files on persistent volumes; memory and the pod IP are lost",
            Flavour::OpenKruise => {
                "files on persistent volumes; memory and the pod IP are lost (the open-source \
                 path deletes the pod; spec.persistentContents needs a vendor runtime)"
            }
        }
    }
}
