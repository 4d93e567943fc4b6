//! `session.*` trust and bounds keys (`auth`, `hmac`, `forward_header`, `max_sessions`,
//! `create_rate`) and the checks that keep every session string header-safe.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError, Dur, SessionSource};

/// `session.auth`: what a client must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionAuth {
    /// The raw session ID: whoever knows it reaches the session (a bearer secret).
    #[default]
    None,
    /// A token minted by the activator, `<id>.<expiry>.<key id>.<hmac-sha256>`.
    Hmac,
}

/// `session.hmac.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HmacConfig {
    /// Signing keys: the first signs new tokens, all verify (rotation).
    pub keys: Vec<HmacKeyConfig>,
    /// Lifetime of a minted token.
    pub ttl: Dur,
}

impl Default for HmacConfig {
    fn default() -> Self {
        HmacConfig {
            keys: Vec::new(),
            ttl: Dur::secs(24 * 3600),
        }
    }
}

/// One entry of `session.hmac.keys`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacKeyConfig {
    /// Written into every token it signs: 1..=32 characters of `[A-Za-z0-9_-]`.
    pub id: String,
    /// File holding the secret (at least 32 bytes; surrounding whitespace is ignored).
    pub secret_file: PathBuf,
}

/// Longest key ID (`session.hmac.keys[].id`).
pub const MAX_KEY_ID_LEN: usize = 32;
/// Fewest secret bytes a key file must hold (256 bits).
pub const MIN_SECRET_LEN: usize = 32;

impl HmacKeyConfig {
    /// Reads `secret_file`: trimmed, at least [`MIN_SECRET_LEN`] bytes (errors name `key`).
    pub fn read_secret(&self, key: &str) -> Result<Vec<u8>, ConfigError> {
        let raw = std::fs::read(&self.secret_file).map_err(|e| {
            ConfigError::invalid(
                key,
                format!("cannot read {}: {e}", self.secret_file.display()),
            )
        })?;
        let secret = raw.trim_ascii();
        if secret.len() < MIN_SECRET_LEN {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "holds {} bytes; at least {MIN_SECRET_LEN} are required \
                     (e.g. `head -c 32 /dev/urandom | base64`)",
                    secret.len()
                ),
            ));
        }
        Ok(secret.to_vec())
    }
}

/// Checks a `session.hmac.keys[].id`.
pub fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_KEY_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "key id {id:?} must be 1..={MAX_KEY_ID_LEN} characters of A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// `session.create_rate`: a token bucket per client IP (IPv6: per /64).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRate {
    /// Sustained new sessions per second.
    pub per_second: f64,
    /// New sessions allowed at once after a quiet period.
    pub burst: u32,
}

/// Headers the activator itself owns or that are hop-by-hop: never a forward header.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "cookie",
    "set-cookie",
    "connection",
    "content-length",
    "content-type",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

impl Config {
    /// Checks `session.*` strings that reach headers, and the trust and bound keys.
    pub(super) fn validate_session_security(&self) -> Result<(), ConfigError> {
        let s = &self.session;
        for (i, src) in s.sources.iter().enumerate() {
            match src {
                SessionSource::Cookie(name) => {
                    check_cookie_name(name).map_err(|m| {
                        ConfigError::invalid(format!("session.sources[{i}].cookie"), m)
                    })?;
                }
                SessionSource::PathPrefix(p) => {
                    if !p.bytes().all(is_path_byte) {
                        return Err(ConfigError::invalid(
                            format!("session.sources[{i}].path_prefix"),
                            "only unreserved path characters (A-Z a-z 0-9 - . _ ~ / and \
                             sub-delims) are allowed",
                        ));
                    }
                }
                SessionSource::Query(q) => {
                    if !q.bytes().all(is_path_byte) || q.contains(['&', '=', '/']) {
                        return Err(ConfigError::invalid(
                            format!("session.sources[{i}].query"),
                            "must be a plain parameter name (no & = / or control characters)",
                        ));
                    }
                }
                SessionSource::Header(_) => {}
            }
        }
        if let Some(name) = &s.cookie_name {
            check_cookie_name(name).map_err(|m| ConfigError::invalid("session.cookie_name", m))?;
        }
        match http::HeaderName::from_bytes(s.forward_header.as_bytes()) {
            Err(_) => {
                return Err(ConfigError::invalid(
                    "session.forward_header",
                    "not a valid header name",
                ));
            }
            Ok(h) if RESERVED_HEADERS.contains(&h.as_str()) => {
                return Err(ConfigError::invalid(
                    "session.forward_header",
                    format!("{h} is managed by the proxy; choose another header"),
                ));
            }
            Ok(_) => {}
        }
        if s.max_sessions == 0 {
            return Err(ConfigError::invalid(
                "session.max_sessions",
                "must be at least 1",
            ));
        }
        if let Some(r) = s.create_rate {
            if !(r.per_second.is_finite() && r.per_second > 0.0) {
                return Err(ConfigError::invalid(
                    "session.create_rate.per_second",
                    "must be a number > 0",
                ));
            }
            if r.burst == 0 {
                return Err(ConfigError::invalid(
                    "session.create_rate.burst",
                    "must be at least 1",
                ));
            }
        }
        if s.auth == super::SessionAuth::Hmac {
            if s.hmac.keys.is_empty() {
                return Err(ConfigError::invalid(
                    "session.hmac.keys",
                    "auth: hmac needs at least one {id, secret_file}",
                ));
            }
            for (i, k) in s.hmac.keys.iter().enumerate() {
                check_key_id(&k.id)
                    .map_err(|m| ConfigError::invalid(format!("session.hmac.keys[{i}].id"), m))?;
            }
            if s.hmac.ttl.is_zero() {
                return Err(ConfigError::invalid(
                    "session.hmac.ttl",
                    "must be greater than 0s",
                ));
            }
            // Reads the secret files: `check` fails on a missing or short one.
            for (i, k) in s.hmac.keys.iter().enumerate() {
                k.read_secret(&format!("session.hmac.keys[{i}].secret_file"))?;
            }
            for (i, k) in s.hmac.keys.iter().enumerate() {
                if s.hmac.keys[..i].iter().any(|o| o.id == k.id) {
                    return Err(ConfigError::invalid(
                        "session.hmac.keys",
                        format!("key id {:?} is used twice", k.id),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// RFC 6265 4.1.1 `cookie-name` (an RFC 7230 token): visible ASCII minus separators.
fn check_cookie_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_graphic()
                && !matches!(
                    b,
                    b'(' | b')'
                        | b'<'
                        | b'>'
                        | b'@'
                        | b','
                        | b';'
                        | b':'
                        | b'\\'
                        | b'"'
                        | b'/'
                        | b'['
                        | b']'
                        | b'?'
                        | b'='
                        | b'{'
                        | b'}'
                )
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a cookie name (visible ASCII without separators ()<>@,;:\\\"/[]?={{}})"
        ))
    }
}

/// RFC 3986 `pchar` without `%` (prefixes are compared unescaped) plus `/`.
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    const STATIC: &str = "backend: {kind: static, endpoints: ['127.0.0.1:1']}\n";

    fn err(session: &str) -> String {
        Config::from_yaml(&format!("{STATIC}session:\n{session}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn header_bound_strings_are_checked() {
        // A control character in the cookie name used to pass and then panic every
        // minting request.
        let e = err("  cookie_name: \"a\\u0001b\"\n  on_missing: create\n");
        assert!(e.starts_with("session.cookie_name:"), "{e}");
        let e = err("  cookie_name: \"a b\"\n");
        assert!(e.starts_with("session.cookie_name:"), "{e}");
        let e = err("  sources: [{cookie: \"sid;x\"}]\n");
        assert!(e.starts_with("session.sources[0].cookie:"), "{e}");
        let e = err("  sources: [{path_prefix: \"/s\\n/\"}]\n");
        assert!(e.starts_with("session.sources[0].path_prefix:"), "{e}");
        let e = err("  sources: [{query: \"a&b\"}]\n");
        assert!(e.starts_with("session.sources[0].query:"), "{e}");
        let e = err("  forward_header: \"X Bad\"\n");
        assert!(e.starts_with("session.forward_header:"), "{e}");
        let e = err("  forward_header: Cookie\n");
        assert!(e.starts_with("session.forward_header:"), "{e}");
    }

    #[test]
    fn bounds_and_defaults() {
        let c = Config::from_yaml(STATIC).unwrap();
        assert_eq!(c.session.max_sessions, 100_000);
        assert_eq!(c.session.forward_header, "X-Session-ID");
        assert!(c.session.create_rate.is_none());
        assert!(err("  max_sessions: 0\n").starts_with("session.max_sessions:"));
        let e = err("  create_rate: {per_second: 0, burst: 1}\n");
        assert!(e.starts_with("session.create_rate.per_second:"), "{e}");
        let e = err("  create_rate: {per_second: 1, burst: 0}\n");
        assert!(e.starts_with("session.create_rate.burst:"), "{e}");
    }

    #[test]
    fn hmac_keys_are_read_and_checked() {
        let e = err("  auth: hmac\n");
        assert!(e.starts_with("session.hmac.keys:"), "{e}");
        let e = err("  auth: hmac\n  hmac: {keys: [{id: \"a.b\", secret_file: /nonexistent}]}\n");
        assert!(e.starts_with("session.hmac.keys[0].id:"), "{e}");
        let e = err("  auth: hmac\n  hmac: {keys: [{id: k1, secret_file: /nonexistent/key}]}\n");
        assert!(
            e.starts_with("session.hmac.keys[0].secret_file: cannot read"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("aa-hmac-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let e = err(&format!(
            "  auth: hmac\n  hmac: {{keys: [{{id: k1, secret_file: '{}'}}]}}\n",
            short.display()
        ));
        assert!(e.contains("at least 32"), "{e}");
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef").unwrap();
        let e = err(&format!(
            "  auth: hmac\n  hmac: {{keys: [{{id: k1, secret_file: '{0}'}}, {{id: k1, secret_file: '{0}'}}]}}\n",
            good.display()
        ));
        assert!(e.contains("used twice"), "{e}");
        let ok = Config::from_yaml(&format!(
            "{STATIC}session:\n  auth: hmac\n  hmac: {{keys: [{{id: k1, secret_file: '{}'}}]}}\n",
            good.display()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }
}
