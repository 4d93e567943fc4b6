//! `customize.*`: which request headers may customise a new session's sandbox, and how.
//!
//! Everything here is an allowlist read at session creation only: a header maps to an
//! environment variable or a pod label through a value pattern, a per-session volume is
//! declared by the operator (never named by the client), and sidecar sets are defined here
//! and only *selected* by a header value. `crate::customize::Customizer` compiles it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `customize.*` (one per activator today; per pool when pools exist).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomizeConfig {
    /// Request headers that become environment variables of the session's sandbox.
    pub env: Vec<EnvRule>,
    /// Per-session volumes every session of this activator gets.
    pub volumes: Vec<VolumeRule>,
    /// Named sidecar/runtime sets, one selected per session by a header.
    pub sidecars: Option<SidecarRule>,
    /// Request headers that become labels on the session's pod (Kubernetes).
    pub labels: Vec<LabelRule>,
    /// Headers starting with this prefix (case-insensitive) are customisation requests:
    /// one that no rule allowlists is refused with 400 `invalid_customization` instead of
    /// being ignored. Unset: unknown headers are never looked at.
    pub header_prefix: Option<String>,
    /// Longest accepted header value, in bytes, before its pattern is tried.
    pub max_value_bytes: usize,
}

impl Default for CustomizeConfig {
    fn default() -> Self {
        CustomizeConfig {
            env: Vec::new(),
            volumes: Vec::new(),
            sidecars: None,
            labels: Vec::new(),
            header_prefix: None,
            max_value_bytes: 256,
        }
    }
}

impl CustomizeConfig {
    /// Whether any rule is configured (an empty section customises nothing).
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.volumes.is_empty()
            && self.sidecars.is_none()
            && self.labels.is_empty()
            && self.header_prefix.is_none()
    }
}

/// `customize.env[]`: header -> environment variable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRule {
    /// The request header read at session creation (e.g. `X-Sandbox-Env-Region`).
    pub header: String,
    /// The environment variable it sets (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    /// A regular expression the whole value must match (it is anchored for you).
    pub pattern: String,
    /// Kubernetes (agent-sandbox `env[].containerName`): the container that gets the
    /// variable; unset = the template's first container.
    #[serde(default)]
    pub container_name: Option<String>,
    /// Refuse a new session without this header (400 `invalid_customization`).
    #[serde(default)]
    pub required: bool,
}

/// `customize.volumes[]`: a volume that belongs to the session and outlives its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRule {
    /// The volume's name (DNS label); per session it becomes `<name>-<session hash>`.
    pub name: String,
    /// Where the sandbox sees it (absolute path).
    pub mount_path: String,
    /// Kubernetes: the requested size (`spec.resources.requests.storage`), e.g. `1Gi`.
    #[serde(default = "default_volume_size")]
    pub size: String,
    /// Kubernetes: the PersistentVolumeClaim's `storageClassName`; unset = the default.
    #[serde(default)]
    pub storage_class: Option<String>,
    /// OpenKruise `dynamicVolumesMount[].attributes`: provider-specific settings.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

fn default_volume_size() -> String {
    "1Gi".into()
}

/// `customize.sidecars`: a header selects one of the named sets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarRule {
    /// The request header whose value names a set (e.g. `X-Sandbox-Sidecars: browser`).
    pub header: String,
    /// The sets, by name.
    pub sets: BTreeMap<String, SidecarSet>,
}

/// One named sidecar set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarSet {
    /// OpenKruise `runtimes[].name` (e.g. `agent-runtime`, `csi`, `traffic-proxy`).
    pub runtimes: Vec<String>,
    /// agent-sandbox: the SandboxWarmPool whose template carries these sidecars (a
    /// template variant); the claim's `warmPoolRef.name`.
    pub warm_pool: Option<String>,
}

/// `customize.labels[]`: header -> pod label.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRule {
    pub header: String,
    /// The label key (a Kubernetes qualified name, e.g. `example.com/team`).
    pub label: String,
    /// A regular expression the whole value must match (anchored for you); the value must
    /// also be a valid label value (63 characters, alphanumerics, `-_.`).
    pub pattern: String,
    #[serde(default)]
    pub required: bool,
}
