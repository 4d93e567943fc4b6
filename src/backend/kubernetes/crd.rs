//! Typed CRDs of agent-sandbox and OpenKruise agents: only the fields the activator reads
//! or writes (unknown fields are ignored on read and never written back: all writes are
//! patches).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A `metav1.Condition` as these CRDs report it (only `type` and `status` are relied on).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// True when `conditions` holds `type: Ready, status: "True"` (authoritative; a stale
/// `Suspended` condition may linger after a resume and is ignored).
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// kubernetes-sigs/agent-sandbox: `agents.x-k8s.io/v1beta1` and
/// `extensions.agents.x-k8s.io/v1beta1`.
pub mod agent_sandbox {
    use super::*;
    use kube::CustomResource;

    /// `Sandbox.spec`: one pod plus volumes; `operatingMode` suspends it.
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "agents.x-k8s.io",
        version = "v1beta1",
        kind = "Sandbox",
        namespaced,
        status = "SandboxStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxSpec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pod_template: Option<Value>,
        /// `Running` (default) or `Suspended` (the pod is deleted; volumes stay).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub operating_mode: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_time: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_policy: Option<String>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxStatus {
        #[serde(default, rename = "podIPs")]
        pub pod_ips: Vec<String>,
        #[serde(
            default,
            rename = "serviceFQDN",
            skip_serializing_if = "Option::is_none"
        )]
        pub service_fqdn: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub node_name: Option<String>,
        #[serde(default)]
        pub conditions: Vec<Condition>,
    }

    /// `SandboxClaim.spec`: which warm pool to draw from.
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "extensions.agents.x-k8s.io",
        version = "v1beta1",
        kind = "SandboxClaim",
        namespaced,
        status = "SandboxClaimStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxClaimSpec {
        pub warm_pool_ref: NameRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub lifecycle: Option<Lifecycle>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct NameRef {
        pub name: String,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Lifecycle {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_time: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ttl_seconds_after_finished: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_policy: Option<String>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct SandboxClaimStatus {
        #[serde(default)]
        pub sandbox: Option<ClaimedSandbox>,
        #[serde(default)]
        pub conditions: Vec<Condition>,
    }

    /// `SandboxClaim.status.sandbox`.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub struct ClaimedSandbox {
        #[serde(default)]
        pub name: Option<String>,
        #[serde(default, rename = "podIPs")]
        pub pod_ips: Vec<String>,
    }

    /// `SandboxWarmPool.spec`: `replicas` ready sandboxes from a template (has `/scale`).
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "extensions.agents.x-k8s.io",
        version = "v1beta1",
        kind = "SandboxWarmPool",
        namespaced,
        status = "SandboxWarmPoolStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxWarmPoolSpec {
        pub replicas: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sandbox_template_ref: Option<NameRef>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxWarmPoolStatus {
        #[serde(default)]
        pub replicas: Option<i32>,
        #[serde(default)]
        pub ready_replicas: Option<i32>,
    }

    /// Label on an unclaimed warm-pool sandbox (removed when a claim adopts it).
    pub const WARM_POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";
    /// Annotation the controller sets on a claim naming its sandbox.
    pub const SANDBOX_NAME_ANNOTATION: &str = "agents.x-k8s.io/sandbox-name";
}

/// OpenKruise agents: `agents.kruise.io/v1alpha1`.
pub mod openkruise {
    use super::*;
    use kube::CustomResource;

    /// `Sandbox.spec`: `paused` stops it (the open-source path deletes the pod).
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "agents.kruise.io",
        version = "v1alpha1",
        kind = "Sandbox",
        namespaced,
        status = "SandboxStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxSpec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub paused: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pause_strategy: Option<Value>,
        /// Subset of `ip`, `memory`, `filesystem` to keep across a pause.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub persistent_contents: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub template: Option<Value>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxStatus {
        /// Pending, Running, Paused, Resuming, ...
        #[serde(default)]
        pub phase: Option<String>,
        #[serde(default)]
        pub pod_info: Option<PodInfo>,
        #[serde(default)]
        pub conditions: Vec<Condition>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PodInfo {
        #[serde(default, rename = "podIP")]
        pub pod_ip: Option<String>,
        #[serde(default)]
        pub node_name: Option<String>,
    }

    /// `SandboxClaim.spec`: which SandboxSet to take a sandbox from.
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "agents.kruise.io",
        version = "v1alpha1",
        kind = "SandboxClaim",
        namespaced,
        status = "SandboxClaimStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxClaimSpec {
        pub template_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub claim_timeout: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub create_on_no_stock: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub wait_ready_timeout: Option<String>,
    }

    /// `SandboxClaim.status`. `sandboxName` is where this activator expects the bound
    /// sandbox (field name unverified against upstream; the testbed writes it).
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxClaimStatus {
        #[serde(default)]
        pub phase: Option<String>,
        #[serde(default)]
        pub sandbox_name: Option<String>,
    }

    /// `SandboxSet.spec`: the warm pool (has `/scale`).
    #[derive(CustomResource, Debug, Clone, Default, Serialize, Deserialize)]
    #[kube(
        group = "agents.kruise.io",
        version = "v1alpha1",
        kind = "SandboxSet",
        namespaced,
        status = "SandboxSetStatus",
        schema = "disabled"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxSetSpec {
        pub replicas: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub template: Option<Value>,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxSetStatus {
        #[serde(default)]
        pub replicas: Option<i32>,
        #[serde(default)]
        pub ready_replicas: Option<i32>,
    }

    /// Label on an unclaimed SandboxSet member (the testbed's choice; unverified).
    pub const POOL_LABEL: &str = "agents.kruise.io/sandbox-set";
}
