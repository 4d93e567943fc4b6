//! `customize.*`: which request headers may customise a new session's sandbox, and how.
//!
//! Everything here is an allowlist read at session creation only: a header maps to an
//! environment variable or a pod label through a value pattern, a per-session volume is
//! declared by the operator (never named by the client), and sidecar sets are defined here
//! and only *selected* by a header value. `crate::customize::Customizer` compiles it.

use std::collections::BTreeMap;

use http::HeaderName;
use regex::Regex;
use serde::Deserialize;

use super::ConfigError;
use super::node_agent::is_dns_label;

/// Hex characters of the session's SHA-256 in a per-session volume's name.
pub const VOLUME_HASH_CHARS: usize = 32;
/// Longest `customize.volumes[].name`, so `<name>-<hash>` stays a 63-character DNS label.
const MAX_VOLUME_NAME: usize = 63 - 1 - VOLUME_HASH_CHARS;

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

    /// Checks the section; errors name the key below `key` (e.g. `customize.env[1].pattern`).
    /// `crate::customize::Customizer::new` runs it before compiling.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let mut headers = Vec::new();
        for (i, r) in self.env.iter().enumerate() {
            let k = format!("{key}.env[{i}]");
            if !is_env_name(&r.name) {
                return Err(ConfigError::invalid(
                    format!("{k}.name"),
                    "must match [A-Za-z_][A-Za-z0-9_]*",
                ));
            }
            if r.name == "PORT" || r.name.starts_with("ACTIVATOR_") {
                return Err(ConfigError::invalid(
                    format!("{k}.name"),
                    "PORT and ACTIVATOR_* are set by the activator",
                ));
            }
            headers.push(header_name(format!("{k}.header"), &r.header)?);
            anchored_pattern(format!("{k}.pattern"), &r.pattern)?;
        }
        for (i, r) in self.labels.iter().enumerate() {
            let k = format!("{key}.labels[{i}]");
            if !is_label_key(&r.label) {
                return Err(ConfigError::invalid(
                    format!("{k}.label"),
                    "not a Kubernetes label key ([prefix/]name, name at most 63 characters)",
                ));
            }
            headers.push(header_name(format!("{k}.header"), &r.header)?);
            anchored_pattern(format!("{k}.pattern"), &r.pattern)?;
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let k = format!("{key}.volumes[{i}]");
            if !is_dns_label(&v.name) || v.name.len() > MAX_VOLUME_NAME {
                return Err(ConfigError::invalid(
                    format!("{k}.name"),
                    format!("must be a DNS label of at most {MAX_VOLUME_NAME} characters"),
                ));
            }
            if !v.mount_path.starts_with('/') || v.mount_path.split('/').any(|c| c == "..") {
                return Err(ConfigError::invalid(
                    format!("{k}.mount_path"),
                    "must be an absolute path without '..'",
                ));
            }
            if self.volumes[..i].iter().any(|o| o.name == v.name) {
                return Err(ConfigError::invalid(format!("{k}.name"), "used twice"));
            }
        }
        if let Some(s) = &self.sidecars {
            if s.sets.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.sidecars.sets"),
                    "at least one set is required",
                ));
            }
            headers.push(header_name(format!("{key}.sidecars.header"), &s.header)?);
        }
        for (i, h) in headers.iter().enumerate() {
            if headers[..i].contains(h) {
                return Err(ConfigError::invalid(
                    key,
                    format!("header {h} is used by two rules"),
                ));
            }
        }
        if self.max_value_bytes == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.max_value_bytes"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A rule's request header name (errors name `key`).
pub fn header_name(key: String, header: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(header.as_bytes())
        .map_err(|_| ConfigError::invalid(key, "not a valid header name"))
}

/// A rule's value pattern, anchored at both ends (errors name `key`).
pub fn anchored_pattern(key: String, pattern: &str) -> Result<Regex, ConfigError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| ConfigError::invalid(key, e.to_string()))
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

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label value: empty, or <= 63 of `[A-Za-z0-9_.-]` with alphanumerics at both ends.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// `[prefix/]name`: prefix a DNS subdomain (<= 253), name a non-empty label value.
fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    prefix_ok && !name.is_empty() && is_label_value(name)
}
