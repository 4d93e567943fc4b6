//! `Previews`: preview URLs for a sandbox's own ports (`{port}-{preview-id}.{domain}`).
//!
//! The admin API mints a preview for a session (`POST /api/sessions/{id}/previews`): an
//! opaque, DNS-label-safe ID (128 random bits, lowercase hex, never derived from the session
//! ID or its token), an expiry, and with `preview.access: token` a signed preview token that
//! is shown only in that answer. A request whose host is `{port}-{id}.{domain}` of a pool
//! with `preview` is routed by the proxy (`proxy/preview.rs`) to that port of the session's
//! sandbox ([`crate::backend::SandboxBackend::port_endpoint`]), leased like any request of
//! the session (activity, resume, hold). Previews live in this replica's memory, like the
//! session table, and die with the session: a preview remembers the session entry it was
//! minted for, so a released session (even one whose ID comes back) never gets it back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::config::{PreviewAccess, PreviewConfig};
use crate::lock::MutexExt;
use crate::session::{SessionKey, TokenSigner, now_unix};

pub mod access;
mod host;

pub use access::{PREVIEW_COOKIE, PREVIEW_TOKEN_HEADER, PREVIEW_TOKEN_PARAM, Presented};
pub use host::{HostMatch, PreviewId, parse_host};

/// Most previews this replica holds at once (every pool, every session); past it a mint
/// first drops expired ones, then is refused.
pub const MAX_PREVIEWS: usize = 100_000;
/// Longest preview token or cookie value read from a request (a minted one is ~110).
pub const MAX_TOKEN_LEN: usize = 256;
/// Characters of a preview ID (128 bits in hex).
pub const ID_LEN: usize = 32;

/// One minted preview.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    /// The opaque ID in the preview host.
    pub id: Box<str>,
    pub pool: Arc<str>,
    /// The session's short hash.
    pub session: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; the URL, token and cookie stop working then.
    pub expires_at: u64,
    #[serde(skip)]
    pub key: SessionKey,
    /// The session table entry it was minted for (`Activator::entry_id`).
    #[serde(skip)]
    pub entry: u64,
}

/// A pool's preview settings.
#[derive(Debug, Clone)]
pub struct PoolPreview {
    pub pool: Arc<str>,
    pub config: PreviewConfig,
}

/// Why a preview could not be minted (admin API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The session's pool has no `preview` section (409 `previews_disabled`).
    #[error("pool {0} has no preview section")]
    Disabled(Arc<str>),
    /// `preview.max_per_session` live previews already (409 `too_many_previews`).
    #[error("the session already has {0} previews (preview.max_per_session)")]
    PerSession(usize),
    /// [`MAX_PREVIEWS`] on this replica (503 `too_many_previews`).
    #[error("this replica holds {MAX_PREVIEWS} previews")]
    Full,
}

/// Why a preview request is refused: each a 4xx (or 502 when the sandbox's port cannot be
/// reached) with its own code. Messages name only what the client sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreviewError {
    /// Under a preview domain but not `{port}-{preview-id}` (400 `invalid_preview_host`).
    #[error("a preview host is {{port}}-{{preview-id}}.{{domain}}")]
    InvalidHost,
    /// No such preview on this replica (404 `unknown_preview`).
    #[error("no such preview")]
    Unknown,
    /// Past its expiry (410 `preview_expired`).
    #[error("the preview has expired")]
    Expired,
    /// The port is not in the pool's `preview.ports` (403 `preview_port_not_allowed`).
    #[error("port {0} is not exposed for previews")]
    PortNotAllowed(u16),
    /// `access: token` and neither a token nor the cookie (401 `preview_token_required`).
    #[error("this preview needs its preview token (X-Preview-Token or ?preview_token=)")]
    TokenRequired,
    /// A token or cookie that does not open this preview (401 `invalid_preview_token`).
    #[error("the preview token is not valid for this preview")]
    InvalidToken,
    /// The preview's session was released (410 `preview_session_released`).
    #[error("the preview's session was released")]
    SessionReleased,
    /// The backend cannot reach that port of the sandbox (502 `preview_port_unreachable`).
    #[error("the sandbox's port cannot be reached")]
    PortUnreachable,
}

impl PreviewError {
    /// The response status.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            PreviewError::InvalidHost => S::BAD_REQUEST,
            PreviewError::Unknown => S::NOT_FOUND,
            PreviewError::Expired | PreviewError::SessionReleased => S::GONE,
            PreviewError::PortNotAllowed(_) => S::FORBIDDEN,
            PreviewError::TokenRequired | PreviewError::InvalidToken => S::UNAUTHORIZED,
            PreviewError::PortUnreachable => S::BAD_GATEWAY,
        }
    }

    /// The stable code of the JSON error body (and the `result` label of
    /// `activator_preview_requests_total`).
    pub fn code(&self) -> &'static str {
        match self {
            PreviewError::InvalidHost => "invalid_preview_host",
            PreviewError::Unknown => "unknown_preview",
            PreviewError::Expired => "preview_expired",
            PreviewError::PortNotAllowed(_) => "preview_port_not_allowed",
            PreviewError::TokenRequired => "preview_token_required",
            PreviewError::InvalidToken => "invalid_preview_token",
            PreviewError::SessionReleased => "preview_session_released",
            PreviewError::PortUnreachable => "preview_port_unreachable",
        }
    }
}

/// A freshly minted preview: what `POST /api/sessions/{id}/previews` answers.
#[derive(Debug, Clone)]
pub struct Minted {
    pub preview: Arc<Preview>,
    /// `access: token`: the signed token, shown once.
    pub token: Option<String>,
    /// Per allowlisted port, its URL (`http://` or `https://` as the listener serves).
    pub urls: Vec<(u16, String)>,
}

/// Every pool's preview settings and every live preview of this replica.
pub struct Previews {
    pools: Box<[PoolPreview]>,
    by_id: Mutex<HashMap<Box<str>, Arc<Preview>>>,
    /// Signs preview tokens (kid `t`) and, with another key, cookies (kid `c`): a cookie
    /// is never accepted as a token nor the reverse. Keys are random per process (previews
    /// live in its memory anyway).
    tokens: TokenSigner,
    cookies: TokenSigner,
    /// `https` when the proxy listener serves TLS (the scheme of minted URLs).
    scheme: &'static str,
    /// `:port` of minted URLs (empty for the scheme's default port).
    port_suffix: String,
}

impl Previews {
    /// `None` when no pool has `preview`. `tls` and `listen_port` shape minted URLs.
    pub fn new(pools: Vec<PoolPreview>, tls: bool, listen_port: u16) -> Option<Arc<Previews>> {
        if pools.is_empty() {
            return None;
        }
        let signer = |kid: &str| {
            let secret: [u8; 32] = rand::random();
            TokenSigner::new(&[(kid, &secret)], 0, ID_LEN)
                .unwrap_or_else(|e| unreachable!("a fixed key id and 32-byte secret: {e}"))
        };
        let default_port = if tls { 443 } else { 80 };
        Some(Arc::new(Previews {
            pools: pools.into(),
            by_id: Mutex::new(HashMap::new()),
            tokens: signer("t"),
            cookies: signer("c"),
            scheme: if tls { "https" } else { "http" },
            port_suffix: if listen_port == default_port {
                String::new()
            } else {
                format!(":{listen_port}")
            },
        }))
    }

    /// The preview settings of `pool`.
    pub fn pool(&self, pool: &str) -> Option<&PoolPreview> {
        self.pools.iter().find(|p| &*p.pool == pool)
    }

    /// Is `host` (lowercase or not, port stripped) under a preview domain? The proxy asks
    /// this of every request while previews are configured: suffix compares only.
    /// Answers the first pool whose domain the host is under, and what the host names.
    pub fn match_host(&self, host: &str) -> Option<(&Arc<str>, HostMatch)> {
        self.pools
            .iter()
            .find_map(|p| parse_host(host, &p.config.domain).map(|m| (&p.pool, m)))
    }

    /// Mints a preview of `key` (entry `entry`) in `pool`, valid for the pool's
    /// `preview.ttl`.
    pub fn mint(&self, pool: &str, key: &SessionKey, entry: u64) -> Result<Minted, MintError> {
        let settings = self
            .pool(pool)
            .ok_or_else(|| MintError::Disabled(Arc::from(pool)))?;
        let now = now_unix();
        let expires_at = now.saturating_add(settings.config.ttl.as_duration().as_secs().max(1));
        let mut id = [0u8; ID_LEN];
        hex::encode_to_slice(rand::random::<[u8; ID_LEN / 2]>(), &mut id)
            .unwrap_or_else(|e| unreachable!("16 bytes fit 32 hex digits: {e}"));
        let id: Box<str> = String::from_utf8_lossy(&id).into();
        let preview = Arc::new(Preview {
            id: id.clone(),
            pool: settings.pool.clone(),
            session: key.short_hash(),
            created_at: now,
            expires_at,
            key: key.clone(),
            entry,
        });
        {
            let mut map = self.by_id.lock_recovered();
            let live = |p: &Preview| p.expires_at > now;
            let mine = map
                .values()
                .filter(|p| p.key == *key && p.entry == entry && live(p))
                .count();
            if mine >= settings.config.max_per_session {
                return Err(MintError::PerSession(settings.config.max_per_session));
            }
            if map.len() >= MAX_PREVIEWS {
                map.retain(|_, p| live(p));
                if map.len() >= MAX_PREVIEWS {
                    return Err(MintError::Full);
                }
            }
            // Drop this session's dead previews while here (bounded by the cap above).
            map.retain(|_, p| live(p) || p.key != *key);
            map.insert(id.clone(), preview.clone());
        }
        let token = (settings.config.access == PreviewAccess::Token).then(|| {
            let as_key = SessionKey::parse(&id, ID_LEN).unwrap_or_else(|_| key.clone());
            self.tokens.mint_at(&as_key, expires_at)
        });
        let urls = settings
            .config
            .ports
            .iter()
            .map(|port| (*port, self.url(*port, &id, &settings.config.domain)))
            .collect();
        Ok(Minted {
            preview,
            token,
            urls,
        })
    }

    fn url(&self, port: u16, id: &str, domain: &str) -> String {
        format!(
            "{}://{port}-{id}.{domain}{}/",
            self.scheme, self.port_suffix
        )
    }

    /// The live previews of `key` (entry `entry`), oldest first.
    pub fn list(&self, key: &SessionKey, entry: u64) -> Vec<Arc<Preview>> {
        let now = now_unix();
        let mut v: Vec<Arc<Preview>> = self
            .by_id
            .lock_recovered()
            .values()
            .filter(|p| p.key == *key && p.entry == entry && p.expires_at > now)
            .cloned()
            .collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// The URLs of `preview` per allowlisted port.
    pub fn urls(&self, preview: &Preview) -> Vec<(u16, String)> {
        match self.pool(&preview.pool) {
            Some(p) => p
                .config
                .ports
                .iter()
                .map(|port| (*port, self.url(*port, &preview.id, &p.config.domain)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// The preview `id` (live or expired), if this replica holds it.
    pub fn get(&self, id: &str) -> Option<Arc<Preview>> {
        self.by_id.lock_recovered().get(id).cloned()
    }

    /// Forgets `id` (revoked, expired, or its session was released). `true` if it was held.
    pub fn remove(&self, id: &str) -> bool {
        self.by_id.lock_recovered().remove(id).is_some()
    }

    /// Previews held now (live or not yet pruned).
    pub fn len(&self) -> usize {
        self.by_id.lock_recovered().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Does `token` (a preview token) open preview `id` now?
    pub fn token_opens(&self, token: &[u8], id: &str) -> bool {
        verify(&self.tokens, token, id)
    }

    /// Does `cookie` (the preview cookie's value) open preview `id` now?
    pub fn cookie_opens(&self, cookie: &[u8], id: &str) -> bool {
        verify(&self.cookies, cookie, id)
    }

    /// The cookie value that opens `preview` until it expires.
    pub fn cookie_value(&self, preview: &Preview) -> String {
        let as_key = SessionKey::parse(&preview.id, ID_LEN).unwrap_or_else(|_| preview.key.clone());
        self.cookies.mint_at(&as_key, preview.expires_at)
    }

    /// Seconds `preview` has left (the cookie's `Max-Age`).
    pub fn remaining(preview: &Preview) -> Duration {
        Duration::from_secs(preview.expires_at.saturating_sub(now_unix()))
    }
}

/// A signed value naming preview `id`, unexpired, within [`MAX_TOKEN_LEN`].
fn verify(signer: &TokenSigner, raw: &[u8], id: &str) -> bool {
    raw.len() <= MAX_TOKEN_LEN && signer.verify(raw).is_ok_and(|named| named.as_str() == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn previews(access: PreviewAccess) -> Arc<Previews> {
        let config = PreviewConfig {
            domain: "preview.example.com".into(),
            ports: vec![3000, 5173],
            access,
            ttl: Dur::secs(60),
            max_per_session: 2,
        };
        Previews::new(
            vec![PoolPreview {
                pool: "default".into(),
                config,
            }],
            false,
            8080,
        )
        .expect("configured")
    }

    fn key(s: &str) -> SessionKey {
        SessionKey::parse(s, 128).expect("valid")
    }

    #[test]
    fn minted_ids_are_opaque_labels_and_tokens_open_only_their_preview() {
        let p = previews(PreviewAccess::Token);
        let a = p.mint("default", &key("alice"), 1).expect("mint");
        let b = p.mint("default", &key("alice"), 1).expect("mint");
        let id = &a.preview.id;
        assert_eq!(id.len(), ID_LEN);
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(!id.contains("alice"));
        assert_eq!(
            a.urls,
            vec![
                (3000, format!("http://3000-{id}.preview.example.com:8080/")),
                (5173, format!("http://5173-{id}.preview.example.com:8080/")),
            ]
        );
        let token = a.token.expect("access: token mints a token");
        assert!(p.token_opens(token.as_bytes(), id));
        assert!(!p.token_opens(token.as_bytes(), &b.preview.id));
        // A token is not a cookie, nor the reverse.
        assert!(!p.cookie_opens(token.as_bytes(), id));
        let cookie = p.cookie_value(&a.preview);
        assert!(p.cookie_opens(cookie.as_bytes(), id));
        assert!(!p.token_opens(cookie.as_bytes(), id));
        let long = vec![b'a'; MAX_TOKEN_LEN + 1];
        assert!(!p.token_opens(&long, id));
    }

    #[test]
    fn per_session_bound_and_entry_scoping() {
        let p = previews(PreviewAccess::Public);
        let k = key("bob");
        let first = p.mint("default", &k, 7).expect("first");
        assert!(first.token.is_none(), "public previews have no token");
        p.mint("default", &k, 7).expect("second");
        assert_eq!(
            p.mint("default", &k, 7).unwrap_err(),
            MintError::PerSession(2)
        );
        // Another incarnation of the same ID sees none of them.
        assert!(p.list(&k, 8).is_empty());
        assert_eq!(p.list(&k, 7).len(), 2);
        assert!(p.remove(&first.preview.id));
        assert_eq!(p.list(&k, 7).len(), 1);
        assert!(matches!(
            p.mint("other", &k, 7),
            Err(MintError::Disabled(_))
        ));
    }
}
