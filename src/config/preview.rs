//! `preview` and `hooks`: per pool, which of a sandbox's own ports may be opened through
//! preview URLs (`{port}-{preview-id}.{domain}`), and the HTTP calls made into a sandbox
//! before it is paused and after it is resumed.

use serde::Deserialize;

use super::{BackendKind, Config, ConfigError, Dur};

/// Most ports one pool may expose.
pub const MAX_PREVIEW_PORTS: usize = 32;
/// Longest preview domain: a preview host adds `{port}-{id}.` (at most 6 + 26 + 1).
pub const MAX_PREVIEW_DOMAIN: usize = 200;
/// Longest a preview may live.
pub const MAX_PREVIEW_TTL: Dur = Dur::secs(7 * 24 * 3600);
/// Most previews one session may hold at once.
pub const MAX_PREVIEWS_PER_SESSION: usize = 64;
/// Longest hook timeout: a hook delays a pause or the requests held for a resume.
pub const MAX_HOOK_TIMEOUT: Dur = Dur::secs(60);

/// `preview`: preview URLs for a sandbox's own ports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewConfig {
    /// The preview domain: requests for `{port}-{preview-id}.{domain}` (any listener
    /// port) are preview traffic. A wildcard DNS record and certificate cover it.
    pub domain: String,
    /// The sandbox ports that may be opened (the allowlist).
    pub ports: Vec<u16>,
    /// `token` (default): the client shows a signed preview token once; `public`: the
    /// URL alone opens the preview.
    #[serde(default)]
    pub access: PreviewAccess,
    /// How long a minted preview (its URL, token and cookie) lives.
    #[serde(default = "default_preview_ttl")]
    pub ttl: Dur,
    /// Previews one session may hold at once (expired ones do not count).
    #[serde(default = "default_max_per_session")]
    pub max_per_session: usize,
}

fn default_preview_ttl() -> Dur {
    Dur::secs(3600)
}

fn default_max_per_session() -> usize {
    8
}

/// `preview.access`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviewAccess {
    /// A signed, expiring preview token, exchanged for a host-only cookie.
    #[default]
    Token,
    /// Anyone who knows the URL.
    Public,
}

/// `hooks`: HTTP calls into the sandbox around a pause and a resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// Called before an idle or admin pause (flush state, close connections).
    pub before_pause: Option<HookConfig>,
    /// Called after a resume, before the held requests are released (fix clocks,
    /// reconnect).
    pub after_resume: Option<HookConfig>,
}

/// One hook: `POST {path}` on the sandbox's endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Origin-form path (and query) called with `POST`.
    pub path: String,
    /// The whole call (connect, request, response head) is bounded by it.
    #[serde(default = "default_hook_timeout")]
    pub timeout: Dur,
    /// What a failed call (no 2xx in time) does: `proceed` (default) pauses or releases
    /// the requests anyway; `abort` keeps the sandbox running (before_pause) or pauses it
    /// again and fails the held requests (after_resume).
    #[serde(default)]
    pub on_failure: OnHookFailure,
}

fn default_hook_timeout() -> Dur {
    Dur::secs(5)
}

/// `hooks.*.on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnHookFailure {
    #[default]
    Proceed,
    Abort,
}

impl PreviewConfig {
    /// Checks every key; errors name `{key}.…`.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        validate_domain(&self.domain)
            .map_err(|m| ConfigError::invalid(format!("{key}.domain"), m))?;
        if self.ports.is_empty() || self.ports.len() > MAX_PREVIEW_PORTS {
            return Err(ConfigError::invalid(
                format!("{key}.ports"),
                format!("list 1 to {MAX_PREVIEW_PORTS} sandbox ports"),
            ));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if *p == 0 {
                return Err(ConfigError::invalid(
                    format!("{key}.ports[{i}]"),
                    "0 is not a port",
                ));
            }
            if self.ports[..i].contains(p) {
                return Err(ConfigError::invalid(
                    format!("{key}.ports[{i}]"),
                    format!("{p} is listed twice"),
                ));
            }
        }
        if self.ttl.is_zero() || self.ttl > MAX_PREVIEW_TTL || self.ttl < Dur::secs(1) {
            return Err(ConfigError::invalid(
                format!("{key}.ttl"),
                format!("must be between 1s and {MAX_PREVIEW_TTL}"),
            ));
        }
        if self.max_per_session == 0 || self.max_per_session > MAX_PREVIEWS_PER_SESSION {
            return Err(ConfigError::invalid(
                format!("{key}.max_per_session"),
                format!("must be between 1 and {MAX_PREVIEWS_PER_SESSION}"),
            ));
        }
        Ok(())
    }
}

/// A lowercase DNS name of labels of `a-z`, `0-9`, `-` (a preview host's suffix).
fn validate_domain(domain: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.is_empty() || domain.len() > MAX_PREVIEW_DOMAIN || !domain.split('.').all(label_ok) {
        return Err(format!(
            "{domain:?} must be a lowercase DNS name (labels of a-z, 0-9, '-', at most \
             {MAX_PREVIEW_DOMAIN} characters), e.g. preview.example.com"
        ));
    }
    Ok(())
}

impl HooksConfig {
    /// Whether any hook is configured.
    pub fn is_empty(&self) -> bool {
        self.before_pause.is_none() && self.after_resume.is_none()
    }

    /// Checks both hooks; errors name `{key}.before_pause.…`. Hooks run around pauses,
    /// so a backend that cannot pause (`static`) cannot have them.
    pub fn validate(&self, key: &str, backend: BackendKind) -> Result<(), ConfigError> {
        if !self.is_empty() && backend == BackendKind::Static {
            return Err(ConfigError::invalid(
                key,
                "hooks run around pause and resume, which the static backend cannot do",
            ));
        }
        for (name, hook) in [
            ("before_pause", &self.before_pause),
            ("after_resume", &self.after_resume),
        ] {
            if let Some(h) = hook {
                h.validate(&format!("{key}.{name}"))?;
            }
        }
        Ok(())
    }
}

impl HookConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if !self.path.starts_with('/')
            || self.path.len() > 1024
            || self.path.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err(ConfigError::invalid(
                format!("{key}.path"),
                "must be an origin-form path such as /hooks/before-pause (at most 1024 bytes)",
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_HOOK_TIMEOUT {
            return Err(ConfigError::invalid(
                format!("{key}.timeout"),
                format!("must be more than 0 and at most {MAX_HOOK_TIMEOUT}"),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// `preview` and `hooks` as one pool sees them (top level, or `pools[i]`'s own).
    pub(super) fn validate_preview_hooks(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(p) = &self.preview {
            p.validate(&format!("{prefix}preview"))?;
        }
        self.hooks
            .validate(&format!("{prefix}hooks"), self.backend.kind)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(yaml: &str) -> String {
        Config::from_yaml(yaml).unwrap_err().to_string()
    }

    const STATIC: &str = "backend: {kind: static, endpoints: ['127.0.0.1:1']}\n";

    #[test]
    fn every_bad_preview_key_is_named() {
        for (preview, key) in [
            ("{domain: Preview.Example, ports: [1]}", "preview.domain:"),
            ("{domain: 'a..b', ports: [1]}", "preview.domain:"),
            ("{domain: p.example, ports: []}", "preview.ports:"),
            ("{domain: p.example, ports: [0]}", "preview.ports[0]:"),
            (
                "{domain: p.example, ports: [3000, 5173, 3000]}",
                "preview.ports[2]:",
            ),
            ("{domain: p.example, ports: [1], ttl: 0s}", "preview.ttl:"),
            ("{domain: p.example, ports: [1], ttl: 30d}", "preview.ttl:"),
            (
                "{domain: p.example, ports: [1], max_per_session: 0}",
                "preview.max_per_session:",
            ),
            (
                "{domain: p.example, ports: [1], access: open}",
                "preview.access",
            ),
            ("{domain: p.example, ports: [1], color: red}", "color"),
        ] {
            let e = err(&format!("{STATIC}preview: {preview}\n"));
            assert!(e.contains(key), "{preview}: {e}");
        }
        let ok = Config::from_yaml(&format!(
            "{STATIC}preview: {{domain: preview.example.com, ports: [3000, 5173]}}\n"
        ))
        .unwrap();
        let p = ok.preview.unwrap();
        assert_eq!(p.access, super::PreviewAccess::Token);
        assert_eq!(p.ttl.as_duration().as_secs(), 3600);
        assert_eq!(p.max_per_session, 8);
    }

    #[test]
    fn pool_preview_and_hooks_keys_carry_the_pool() {
        let e = err(
            "pools:\n- name: web\n  backend: {kind: static, endpoints: ['127.0.0.1:1']}\n  \
             preview: {domain: p.example, ports: [70000]}\n",
        );
        assert!(
            e.contains("pools[0].preview.ports") || e.contains("70000"),
            "{e}"
        );
        let e = err(
            "pools:\n- name: web\n  backend: {kind: static, endpoints: ['127.0.0.1:1']}\n  \
             preview: {domain: p.example, ports: [0]}\n",
        );
        assert!(e.starts_with("pools[0].preview.ports[0]:"), "{e}");
        let e = err(
            "pools:\n- name: web\n  backend: {kind: static, endpoints: ['127.0.0.1:1']}\n  \
             hooks: {before_pause: {path: /p}}\n",
        );
        assert!(e.starts_with("pools[0].hooks:"), "{e}");
        let e = err(
            "pools:\n- name: web\n  backend: {kind: process, command: ['x', '{port}']}\n  \
             hooks: {after_resume: {path: /r, timeout: 0s}}\n",
        );
        assert!(e.starts_with("pools[0].hooks.after_resume.timeout:"), "{e}");
    }
}
