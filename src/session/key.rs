//! `SessionKey`: a validated session ID and its short hash for logs, labels and names.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Why a session ID was refused (400 `invalid_session`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSessionId {
    #[error("session id is empty")]
    Empty,
    #[error("session id is {len} bytes long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("session id contains {0:?}; only A-Z a-z 0-9 . _ ~ - are allowed")]
    BadChar(char),
}

/// A session ID that passed validation: 1..=max bytes of `[A-Za-z0-9._~-]`.
///
/// Cheap to clone (`Arc<str>`). The raw ID is only shown through [`SessionKey::as_str`];
/// `Display`/`Debug` print the short hash so an ID never leaks into logs by accident.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(Arc<str>);

impl SessionKey {
    /// Validates `raw` against the charset and `max_len`.
    pub fn parse(raw: &str, max_len: usize) -> Result<SessionKey, InvalidSessionId> {
        validate(raw.as_bytes(), max_len)?;
        Ok(SessionKey(Arc::from(raw)))
    }

    /// A key for `raw` that [`validate`] accepted.
    pub(crate) fn from_valid(raw: &str) -> SessionKey {
        SessionKey(Arc::from(raw))
    }

    /// Mints a random 128-bit ID (32 lowercase hex characters).
    pub fn random() -> SessionKey {
        let bytes: [u8; 16] = rand::random();
        SessionKey(Arc::from(hex::encode(bytes)))
    }

    /// The raw session ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Full lowercase hex SHA-256 of the ID: stable across replicas and restarts.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// The first 12 hex characters of the SHA-256: what logs and the admin API show.
    pub fn short_hash(&self) -> String {
        let mut h = self.sha256_hex();
        h.truncate(12);
        h
    }
}

/// Checks length and charset without allocating.
pub fn validate(raw: &[u8], max_len: usize) -> Result<(), InvalidSessionId> {
    if raw.is_empty() {
        return Err(InvalidSessionId::Empty);
    }
    if raw.len() > max_len {
        return Err(InvalidSessionId::TooLong {
            len: raw.len(),
            max: max_len,
        });
    }
    match raw.iter().find(|b| !is_id_byte(**b)) {
        Some(b) => Err(InvalidSessionId::BadChar(char::from(*b))),
        None => Ok(()),
    }
}

#[inline]
fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({})", self.short_hash())
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short_hash())
    }
}

impl std::borrow::Borrow<str> for SessionKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_charset() {
        assert!(SessionKey::parse("abc-DEF_123.~", 128).is_ok());
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(SessionKey::parse("", 8), Err(InvalidSessionId::Empty));
        assert_eq!(
            SessionKey::parse("123456789", 8),
            Err(InvalidSessionId::TooLong { len: 9, max: 8 })
        );
        assert_eq!(
            SessionKey::parse("a/b", 8),
            Err(InvalidSessionId::BadChar('/'))
        );
        assert_eq!(
            SessionKey::parse("a b", 8),
            Err(InvalidSessionId::BadChar(' '))
        );
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = SessionKey::random();
        let b = SessionKey::random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(SessionKey::parse(a.as_str(), 128).is_ok());
    }

    #[test]
    fn display_hides_the_raw_id() {
        let k = SessionKey::parse("secret-session", 128).unwrap();
        assert!(!format!("{k} {k:?}").contains("secret"));
        assert_eq!(k.short_hash().len(), 12);
    }
}
