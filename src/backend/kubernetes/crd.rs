//! Typed CRDs of agent-sandbox and OpenKruise agents: only the fields the activator reads
//! or writes (unknown fields are ignored on read and never written back: all writes are
//! patches). Field names follow kubernetes-sigs/agent-sandbox `2fd412d55eca`
//! (`api/v1beta1/sandbox_types.go`, `extensions/api/v1beta1/*_types.go`) and
//! openkruise/agents `0b72c83ae0bc` (`api/v1alpha1/*_types.go`, `labels.go`,
//! `annotations.go`); deploy/crds holds the same reduced schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A `metav1.Condition` as these CRDs report it.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The condition of type `ty`, if present.
pub fn condition<'a>(conditions: &'a [Condition], ty: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == ty)
}

/// True when `conditions` holds `type: ty, status: "True"`.
pub fn is_true(conditions: &[Condition], ty: &str) -> bool {
    condition(conditions, ty).is_some_and(|c| c.status == "True")
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
        /// Labels (and annotations) propagated to the Sandbox's pod.
        #[serde(default, skip_serializing_if = "PodMetadata::is_empty")]
        pub additional_pod_metadata: PodMetadata,
        /// Injected into the pod's containers; forces a cold start from the template
        /// (`extensions/controllers/sandboxclaim_controller.go` ~L2111 bypasses the pool).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub env: Vec<EnvVar>,
        /// PVCs created for the Sandbox (`<metadata.name>-<sandbox name>`); forces a cold
        /// start like `env`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub volume_claim_templates: Vec<PersistentVolumeClaimTemplate>,
    }

    /// `sandboxv1beta1.PodMetadata` (`api/v1beta1/sandbox_types.go`).
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct PodMetadata {
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub labels: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub annotations: BTreeMap<String, String>,
    }

    impl PodMetadata {
        pub fn is_empty(&self) -> bool {
            self.labels.is_empty() && self.annotations.is_empty()
        }
    }

    /// `extensions/api/v1beta1` `EnvVar`.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EnvVar {
        pub name: String,
        pub value: String,
        /// Unset: the template's first container.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub container_name: Option<String>,
    }

    /// `sandboxv1beta1.PersistentVolumeClaimTemplate`: `metadata` (an
    /// `EmbeddedObjectMetadata`: name, labels, annotations) and a core/v1 PVC spec.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct PersistentVolumeClaimTemplate {
        pub metadata: EmbeddedObjectMetadata,
        pub spec: Value,
    }

    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct EmbeddedObjectMetadata {
        pub name: String,
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

    /// `SandboxWarmPool.spec`: `replicas` (optional, default 1) ready sandboxes from a
    /// template (has `/scale`).
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub replicas: Option<i32>,
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

    /// Label on an unclaimed warm-pool sandbox (removed when a claim adopts it); its value
    /// is a hash of the pool name (`api/v1beta1/sandbox_types.go` `SandboxWarmPoolLabel`).
    pub const WARM_POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";
    /// The claim controller writes this annotation on the claim *before* it adopts the
    /// sandbox and clears it when adoption is lost: it is not a binding, and the activator
    /// never reads it (`extensions/api/v1beta1/sandboxclaim_types.go`).
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
        /// RFC 3339 time after which the Sandbox controller deletes the Sandbox.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_time: Option<String>,
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
        /// The generation this status was computed for (`calculateStatus`).
        #[serde(default)]
        pub observed_generation: Option<i64>,
        /// Kept after a pause: it then names the deleted pod (`ensureStopPaused` only sets
        /// the SandboxPaused condition).
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
        /// Copied to the claimed Sandbox's `spec.shutdownTime` when it is claimed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub shutdown_time: Option<String>,
        /// Claim deleted this long after Completed (default 60m; negative: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ttl_after_completed: Option<String>,
        /// Added to the claimed Sandbox's labels (and its template's).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub labels: BTreeMap<String, String>,
        /// Added to the claimed Sandbox's annotations.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub annotations: BTreeMap<String, String>,
        /// Passed to the sandbox's envd init endpoint after claiming (no cold start).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub env_vars: BTreeMap<String, String>,
        /// CSI volumes mounted into the claimed sandbox (no cold start).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub dynamic_volumes_mount: Vec<CsiMountConfig>,
        /// Runtime sidecars injected into the sandbox (`csi`, `agent-runtime`, ...).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub runtimes: Vec<RuntimeConfig>,
    }

    /// `CSIMountConfig` (`api/v1alpha1/mount_types.go`).
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct CsiMountConfig {
        pub pv_name: String,
        pub mount_path: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub attributes: BTreeMap<String, String>,
    }

    /// `RuntimeConfig` (`api/v1alpha1/sandbox_types.go`): a name only.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct RuntimeConfig {
        pub name: String,
    }

    /// `SandboxClaim.status`: a phase and a count, **no sandbox name**; the claimed
    /// Sandbox carries [`CLAIM_NAME_LABEL`] and [`OWNER_ANNOTATION`] instead.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct SandboxClaimStatus {
        /// Claiming or Completed (no other phase exists upstream).
        #[serde(default)]
        pub phase: Option<String>,
        #[serde(default)]
        pub observed_generation: Option<i64>,
        #[serde(default)]
        pub claimed_replicas: Option<i32>,
        #[serde(default)]
        pub conditions: Vec<Condition>,
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
        pub available_replicas: Option<i32>,
    }

    /// Pool membership label (value: the SandboxSet name), `api/v1alpha1/labels.go`.
    pub const POOL_LABEL: &str = "agents.kruise.io/sandbox-pool";
    /// `"true"` once claimed, `"false"` while in the pool.
    pub const CLAIMED_LABEL: &str = "agents.kruise.io/sandbox-claimed";
    /// On a claimed Sandbox: the name of the SandboxClaim that claimed it.
    pub const CLAIM_NAME_LABEL: &str = "agents.kruise.io/claim-name";
    /// On a claimed Sandbox: the UID of the claiming SandboxClaim
    /// (`api/v1alpha1/annotations.go` `AnnotationOwner`).
    pub const OWNER_ANNOTATION: &str = "agents.kruise.io/owner";
}
