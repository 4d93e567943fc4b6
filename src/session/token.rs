//! `TokenSigner`: signed session tokens (`session.auth: hmac`), `<id>.<expiry>.<key id>.<mac>`.
//!
//! The MAC is HMAC-SHA256 over `<id>.<expiry>.<key id>`, hex-encoded (64 characters), so a
//! token only uses the session-ID charset and fits a header, a cookie, a path segment and a
//! query value unescaped. IDs may contain `.`, key IDs may not: a token is split from the
//! right. The first configured key signs; every key verifies (rotation: add the new key
//! second, roll it out, move it first, drop the old one after `ttl`). Comparison of MACs is
//! constant-time (`hmac`'s `verify_slice`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::key::validate;
use super::{InvalidSessionId, SessionKey};
use crate::config::{ConfigError, MAX_KEY_ID_LEN, SessionAuth, SessionConfig, check_key_id};

type HmacSha256 = Hmac<Sha256>;

/// Hex characters of a MAC.
const MAC_HEX_LEN: usize = 64;
/// Digits of the largest `u64`.
const MAX_EXPIRY_DIGITS: usize = 20;

/// Why a presented token was refused (401 `invalid_session_token`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No source carried a token and `on_missing` is `reject`.
    #[error("the request carries no session token")]
    Missing,
    /// Not `<id>.<expiry>.<key id>.<mac>` with a valid ID, a decimal expiry and a hex MAC.
    #[error("the session token is malformed")]
    Malformed,
    /// Signed with a key this activator does not hold (retired, or never issued here).
    #[error("the session token was signed with an unknown key")]
    UnknownKey,
    /// The MAC does not match: forged or altered.
    #[error("the session token's signature does not match")]
    BadSignature,
    /// Valid, but past its expiry.
    #[error("the session token has expired")]
    Expired,
}

/// One verification key.
struct SigningKey {
    id: Box<str>,
    /// HMAC state with the key already absorbed: cloning it skips the key schedule.
    mac: HmacSha256,
}

/// Mints and verifies session tokens.
pub struct TokenSigner {
    /// The first one signs.
    keys: Box<[SigningKey]>,
    ttl_secs: u64,
    max_id_len: usize,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| &*k.id).collect();
        f.debug_struct("TokenSigner")
            .field("key_ids", &ids)
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl TokenSigner {
    /// Builds the signer `session.auth` asks for: `None` for `none`; for `hmac`, reads every
    /// `secret_file` (errors name the key path).
    pub fn from_config(config: &SessionConfig) -> Result<Option<Arc<TokenSigner>>, ConfigError> {
        if config.auth == SessionAuth::None {
            return Ok(None);
        }
        let mut keys = Vec::with_capacity(config.hmac.keys.len());
        for (i, k) in config.hmac.keys.iter().enumerate() {
            let secret = k.read_secret(&format!("session.hmac.keys[{i}].secret_file"))?;
            keys.push((k.id.as_str(), secret));
        }
        let pairs: Vec<(&str, &[u8])> = keys.iter().map(|(id, s)| (*id, s.as_slice())).collect();
        let signer = TokenSigner::new(
            &pairs,
            config.hmac.ttl.as_duration().as_secs(),
            config.max_id_length,
        )
        .map_err(|m| ConfigError::invalid("session.hmac.keys", m))?;
        Ok(Some(Arc::new(signer)))
    }

    /// A signer over `(key id, secret)` pairs, the first signing. Key IDs are 1..=32
    /// characters of `[A-Za-z0-9_-]` and distinct.
    pub fn new(
        keys: &[(&str, &[u8])],
        ttl_secs: u64,
        max_id_len: usize,
    ) -> Result<TokenSigner, String> {
        if keys.is_empty() {
            return Err("auth: hmac needs at least one key".into());
        }
        let mut out: Vec<SigningKey> = Vec::with_capacity(keys.len());
        for (id, secret) in keys {
            check_key_id(id)?;
            if out.iter().any(|k| &*k.id == *id) {
                return Err(format!("key id {id:?} is used twice"));
            }
            let mac = HmacSha256::new_from_slice(secret)
                .map_err(|_| "an HMAC key of this length is refused".to_string())?;
            out.push(SigningKey {
                id: (*id).into(),
                mac,
            });
        }
        Ok(TokenSigner {
            keys: out.into(),
            ttl_secs,
            max_id_len,
        })
    }

    /// The token lifetime in seconds (`session.hmac.ttl`).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Longest token this signer can have minted: what a source may carry.
    pub fn max_token_len(&self) -> usize {
        self.max_id_len + MAX_EXPIRY_DIGITS + MAX_KEY_ID_LEN + MAC_HEX_LEN + 3
    }

    /// A token for `key`, valid for `ttl` from now, signed with the first key.
    pub fn mint(&self, key: &SessionKey) -> String {
        self.mint_at(key, now_unix().saturating_add(self.ttl_secs))
    }

    /// A token for `key` that expires at `expiry` (Unix seconds).
    pub fn mint_at(&self, key: &SessionKey, expiry: u64) -> String {
        let signing = &self.keys[0];
        let mut token = format!("{}.{expiry}.{}", key.as_str(), signing.id);
        let mut mac = signing.mac.clone();
        mac.update(token.as_bytes());
        token.push('.');
        token.push_str(&hex::encode(mac.finalize().into_bytes()));
        token
    }

    /// Verifies a presented token now and returns the session it names.
    pub fn verify(&self, raw: &[u8]) -> Result<SessionKey, TokenError> {
        self.verify_at(raw, now_unix())
    }

    /// Verifies `raw` as of `now` (Unix seconds). Never panics, whatever the bytes.
    pub fn verify_at(&self, raw: &[u8], now: u64) -> Result<SessionKey, TokenError> {
        if raw.len() > self.max_token_len() {
            return Err(TokenError::Malformed);
        }
        let (signed, mac_hex) = split_last(raw).ok_or(TokenError::Malformed)?;
        let (rest, kid) = split_last(signed).ok_or(TokenError::Malformed)?;
        let (id, expiry) = split_last(rest).ok_or(TokenError::Malformed)?;
        let mut tag = [0u8; 32];
        if mac_hex.len() != MAC_HEX_LEN || hex::decode_to_slice(mac_hex, &mut tag).is_err() {
            return Err(TokenError::Malformed);
        }
        let expiry = parse_expiry(expiry).ok_or(TokenError::Malformed)?;
        validate(id, self.max_id_len).map_err(|_: InvalidSessionId| TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.as_bytes() == kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut mac = key.mac.clone();
        mac.update(signed);
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        if expiry <= now {
            return Err(TokenError::Expired);
        }
        // `validate` accepted only ASCII ID bytes.
        let id = std::str::from_utf8(id).map_err(|_| TokenError::Malformed)?;
        SessionKey::parse(id, self.max_id_len).map_err(|_| TokenError::Malformed)
    }
}

/// `(before, after)` the last `.`.
fn split_last(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().rposition(|c| *c == b'.')?;
    Some((&b[..i], &b[i + 1..]))
}

fn parse_expiry(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > MAX_EXPIRY_DIGITS || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"0123456789abcdef0123456789abcdef";
    const B: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn key(id: &str) -> SessionKey {
        SessionKey::parse(id, 128).unwrap()
    }

    #[test]
    fn round_trip_with_dotted_id() {
        let s = TokenSigner::new(&[("k1", A)], 60, 128).unwrap();
        let t = s.mint_at(&key("a.b.c"), 1_000);
        assert!(t.starts_with("a.b.c.1000.k1."), "{t}");
        assert_eq!(t.len(), "a.b.c.1000.k1.".len() + 64);
        assert_eq!(s.verify_at(t.as_bytes(), 999).unwrap().as_str(), "a.b.c");
        assert_eq!(s.verify_at(t.as_bytes(), 1_000), Err(TokenError::Expired));
    }

    #[test]
    fn forged_altered_and_unknown() {
        let s = TokenSigner::new(&[("k1", A)], 60, 128).unwrap();
        let t = s.mint_at(&key("alice"), 2_000);
        // Another session's ID with alice's MAC.
        let forged = t.replacen("alice", "mallo", 1);
        assert_eq!(
            s.verify_at(forged.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        // A later expiry with the same MAC.
        let extended = t.replacen("2000", "9000", 1);
        assert_eq!(
            s.verify_at(extended.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        let other = TokenSigner::new(&[("k2", B)], 60, 128).unwrap();
        assert_eq!(
            other.verify_at(t.as_bytes(), 1),
            Err(TokenError::UnknownKey)
        );
        let same_id_other_secret = TokenSigner::new(&[("k1", B)], 60, 128).unwrap();
        assert_eq!(
            same_id_other_secret.verify_at(t.as_bytes(), 1),
            Err(TokenError::BadSignature)
        );
        for bad in ["", "alice", "alice.1.k1", "alice.x.k1.00", "a b.1.k1.00"] {
            assert_eq!(
                s.verify_at(bad.as_bytes(), 1),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn rotation_first_signs_all_verify() {
        let old = TokenSigner::new(&[("old", A)], 60, 128).unwrap();
        let both = TokenSigner::new(&[("new", B), ("old", A)], 60, 128).unwrap();
        let t_old = old.mint_at(&key("s"), 50);
        let t_new = both.mint_at(&key("s"), 50);
        assert!(t_new.contains(".new."));
        assert_eq!(both.verify_at(t_old.as_bytes(), 1).unwrap().as_str(), "s");
        assert_eq!(both.verify_at(t_new.as_bytes(), 1).unwrap().as_str(), "s");
        assert_eq!(
            old.verify_at(t_new.as_bytes(), 1),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn key_ids_are_checked() {
        assert!(TokenSigner::new(&[], 60, 128).is_err());
        assert!(TokenSigner::new(&[("a.b", A)], 60, 128).is_err());
        assert!(TokenSigner::new(&[("k", A), ("k", B)], 60, 128).is_err());
    }
}
