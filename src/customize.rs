//! Claim-time customisation: [`Customizer`] turns a new session's allowlisted request
//! headers into a [`ClaimSpec`], which the session keeps and every claim for it carries.
//!
//! Headers are read once, when the session is created; later requests' headers are ignored
//! (the fast path never looks at them, and a session's sandbox must not change under it).
//! The spec lives on the session's table entry, so a re-claim after a lost sandbox applies
//! the same settings. Values are matched against anchored patterns (the `regex` crate: linear
//! time, so a hostile value cannot make matching slow) and never echoed to the client.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use regex::Regex;

use crate::config::customize::{anchored_pattern, header_name, is_label_value};
use crate::config::{ConfigError, CustomizeConfig, SidecarSet, VolumeRule};
use crate::session::SessionKey;

pub use crate::config::customize::VOLUME_HASH_CHARS;

/// What a session asks of its sandbox, carried to [`crate::backend::SandboxBackend::claim`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimSpec {
    /// Environment variables, in rule order.
    pub env: Vec<SpecEnv>,
    /// The session's volumes (from `customize.volumes`, the same for every session).
    pub volumes: Vec<VolumeRule>,
    /// The selected sidecar set, if any.
    pub sidecars: Option<SpecSidecars>,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
}

/// One environment variable of a [`ClaimSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecEnv {
    pub name: String,
    pub value: String,
    /// agent-sandbox `env[].containerName`.
    pub container_name: Option<String>,
}

/// The sidecar set a session selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecSidecars {
    /// Its name in `customize.sidecars.sets`.
    pub name: String,
    pub set: SidecarSet,
}

impl ClaimSpec {
    /// Nothing customised: any warm sandbox will do.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.volumes.is_empty()
            && self.sidecars.is_none()
            && self.labels.is_empty()
    }

    /// Environment variables and volumes cannot be given to a sandbox that already runs: a
    /// claim with either starts a new one (agent-sandbox says the same of its claim's `env`
    /// and `volumeClaimTemplates`, extensions/api/v1beta1/sandboxclaim_types.go @2fd412d).
    pub fn forces_cold_start(&self) -> bool {
        !self.env.is_empty() || !self.volumes.is_empty()
    }

    /// The per-session name of `volume`: `<name>-<first 32 hex of SHA-256(session)>`, never
    /// the raw session ID (which may be a secret and is no valid object name).
    pub fn volume_name(volume: &VolumeRule, session: &SessionKey) -> String {
        format!(
            "{}-{}",
            volume.name,
            &session.sha256_hex()[..VOLUME_HASH_CHARS]
        )
    }
}

/// Why a new session's customisation was refused (400 `invalid_customization`). The
/// message names the header and never contains its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomizeError {
    #[error("header {0} is not an allowed customisation")]
    NotAllowed(String),
    #[error("header {0} does not match its allowed pattern")]
    Pattern(String),
    #[error("header {0} is required for a new session")]
    Missing(String),
    #[error("header {0} names no configured sidecar set")]
    UnknownSet(String),
    #[error("header {0} must be given once")]
    Repeated(String),
}

/// One compiled header rule.
struct Rule {
    header: HeaderName,
    /// `^(?:pattern)$`.
    pattern: Regex,
    /// The env variable or label key it sets.
    target: String,
    container_name: Option<String>,
    required: bool,
}

/// The compiled `customize` section.
pub struct Customizer {
    env: Vec<Rule>,
    labels: Vec<Rule>,
    volumes: Vec<VolumeRule>,
    sidecars: Option<(HeaderName, BTreeMap<String, SidecarSet>)>,
    /// Lowercase `header_prefix`.
    prefix: Option<String>,
    max_value_bytes: usize,
    /// The spec of a session that customised nothing, shared.
    plain: Arc<ClaimSpec>,
}

impl std::fmt::Debug for Customizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Customizer")
            .field("env", &self.env.len())
            .field("labels", &self.labels.len())
            .field("volumes", &self.volumes.len())
            .finish_non_exhaustive()
    }
}

impl Customizer {
    /// Compiles `config`; errors name the key below `key` (e.g. `customize.env[1].pattern`).
    pub fn new(config: &CustomizeConfig, key: &str) -> Result<Customizer, ConfigError> {
        config.validate(key)?;
        let mut env = Vec::new();
        for (i, r) in config.env.iter().enumerate() {
            let k = format!("{key}.env[{i}]");
            env.push(Rule {
                header: header_name(format!("{k}.header"), &r.header)?,
                pattern: anchored_pattern(format!("{k}.pattern"), &r.pattern)?,
                target: r.name.clone(),
                container_name: r.container_name.clone(),
                required: r.required,
            });
        }
        let mut labels = Vec::new();
        for (i, r) in config.labels.iter().enumerate() {
            let k = format!("{key}.labels[{i}]");
            labels.push(Rule {
                header: header_name(format!("{k}.header"), &r.header)?,
                pattern: anchored_pattern(format!("{k}.pattern"), &r.pattern)?,
                target: r.label.clone(),
                container_name: None,
                required: r.required,
            });
        }
        let sidecars = match &config.sidecars {
            Some(s) => Some((
                header_name(format!("{key}.sidecars.header"), &s.header)?,
                s.sets.clone(),
            )),
            None => None,
        };
        let plain = ClaimSpec {
            volumes: config.volumes.clone(),
            ..ClaimSpec::default()
        };
        Ok(Customizer {
            env,
            labels,
            volumes: config.volumes.clone(),
            sidecars,
            prefix: config
                .header_prefix
                .as_ref()
                .map(|p| p.to_ascii_lowercase()),
            max_value_bytes: config.max_value_bytes,
            plain: Arc::new(plain),
        })
    }

    /// The spec of a new session from its first request's headers.
    pub fn spec(&self, headers: &HeaderMap) -> Result<Arc<ClaimSpec>, CustomizeError> {
        if let Some(prefix) = &self.prefix {
            // HeaderName is lowercase already.
            for name in headers.keys() {
                if name.as_str().starts_with(prefix.as_str()) && !self.allows(name) {
                    return Err(CustomizeError::NotAllowed(safe_name(name)));
                }
            }
        }
        if self.env.is_empty() && self.labels.is_empty() && self.sidecars.is_none() {
            return Ok(self.plain.clone());
        }
        let mut spec = ClaimSpec {
            volumes: self.volumes.clone(),
            ..ClaimSpec::default()
        };
        for rule in &self.env {
            if let Some(value) = self.value(headers, rule)? {
                spec.env.push(SpecEnv {
                    name: rule.target.clone(),
                    value,
                    container_name: rule.container_name.clone(),
                });
            }
        }
        for rule in &self.labels {
            if let Some(value) = self.value(headers, rule)? {
                if !is_label_value(&value) {
                    return Err(CustomizeError::Pattern(safe_name(&rule.header)));
                }
                spec.labels.insert(rule.target.clone(), value);
            }
        }
        if let Some((header, sets)) = &self.sidecars
            && let Some(value) = single(headers, header)?
        {
            let (name, set) = value
                .to_str()
                .ok()
                .and_then(|v| sets.get_key_value(v))
                .ok_or_else(|| CustomizeError::UnknownSet(safe_name(header)))?;
            spec.sidecars = Some(SpecSidecars {
                name: name.clone(),
                set: set.clone(),
            });
        }
        if spec == *self.plain {
            return Ok(self.plain.clone());
        }
        Ok(Arc::new(spec))
    }

    /// The spec of a session created without request headers (recovered, admin, schedules).
    pub fn plain(&self) -> Arc<ClaimSpec> {
        self.plain.clone()
    }

    fn allows(&self, name: &HeaderName) -> bool {
        self.env
            .iter()
            .chain(&self.labels)
            .any(|r| r.header == name)
            || self.sidecars.as_ref().is_some_and(|(h, _)| h == name)
    }

    /// The value of `rule`'s header if present and matching; `None` if absent and optional.
    fn value(&self, headers: &HeaderMap, rule: &Rule) -> Result<Option<String>, CustomizeError> {
        let Some(raw) = single(headers, &rule.header)? else {
            return match rule.required {
                true => Err(CustomizeError::Missing(safe_name(&rule.header))),
                false => Ok(None),
            };
        };
        let refused = || CustomizeError::Pattern(safe_name(&rule.header));
        if raw.len() > self.max_value_bytes {
            return Err(refused());
        }
        let value = raw.to_str().map_err(|_| refused())?;
        if !rule.pattern.is_match(value) {
            return Err(refused());
        }
        Ok(Some(value.to_owned()))
    }
}

/// The header's one value; two values are refused rather than one picked silently.
fn single<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'a http::HeaderValue>, CustomizeError> {
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(CustomizeError::Repeated(safe_name(name)));
    }
    Ok(first)
}

/// A header name fit for an error message: header names are tokens (no control or quote
/// characters); capped so a huge name does not become a huge error body.
fn safe_name(name: &HeaderName) -> String {
    name.as_str().chars().take(64).collect()
}

#[cfg(test)]
mod tests;
