//! `SessionExtractor`: reads the session ID from a request (header, cookie, path prefix,
//! query) in the configured order, validates it, or mints one when allowed.
//!
//! Built once from `session.*`; [`SessionExtractor::extract`] borrows the request and
//! allocates only the [`SessionKey`] itself (plus the rewritten path for `path_prefix`).

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use http::header::{COOKIE, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Uri};

use super::{InvalidSessionId, SessionKey, TokenError, TokenSigner};
use crate::config::{OnMissing, SessionConfig, SessionSource};

/// Where a request's session ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOrigin {
    Header,
    Cookie,
    PathPrefix,
    Query,
    /// None was sent and `on_missing: create` minted one.
    Minted,
}

impl SessionOrigin {
    /// The source's name as written in `session.sources`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionOrigin::Header => "header",
            SessionOrigin::Cookie => "cookie",
            SessionOrigin::PathPrefix => "path_prefix",
            SessionOrigin::Query => "query",
            SessionOrigin::Minted => "minted",
        }
    }
}

/// A request's session, as found by [`SessionExtractor::extract`].
#[derive(Debug, Clone)]
pub struct ExtractedSession {
    pub key: SessionKey,
    pub origin: SessionOrigin,
    /// When a configured path prefix is in the path: the path (and query) to forward,
    /// with `/s/{id}` removed (whichever source decided).
    pub rewritten: Option<PathAndQuery>,
}

/// Why a request has no usable session (400 or 401 for the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    /// No source carried an ID and `on_missing` is `reject` (400 `missing_session`).
    #[error("the request carries no session id ({0})")]
    Missing(Arc<str>),
    /// A source carried an ID that failed validation (400 `invalid_session`).
    #[error("invalid session id in the {origin}: {reason}")]
    Invalid {
        origin: &'static str,
        #[source]
        reason: InvalidSessionId,
    },
    /// `auth: hmac` and the token is missing, malformed, forged or expired (401
    /// `invalid_session_token`).
    #[error("{reason} (in the {origin})")]
    Token {
        origin: &'static str,
        #[source]
        reason: TokenError,
    },
    /// Two sources carried different sessions (400 `conflicting_session`).
    #[error("the {first} and the {second} name different sessions")]
    Conflicting {
        first: &'static str,
        second: &'static str,
    },
}

enum Source {
    Header(HeaderName),
    Cookie(Box<str>),
    PathPrefix(Box<str>),
    Query(Box<str>),
}

/// Reads session IDs from requests according to `session.*`.
pub struct SessionExtractor {
    sources: Box<[Source]>,
    on_missing: OnMissing,
    max_len: usize,
    cookie_name: Box<str>,
    secure_cookie: bool,
    /// `auth: hmac`: sources carry tokens, verified here.
    signer: Option<Arc<TokenSigner>>,
    /// Names the sources for the `missing_session` message.
    describe: Arc<str>,
}

impl SessionExtractor {
    /// Builds the extractor; `tls` adds `Secure` to minted cookies; `signer` (from
    /// [`TokenSigner::from_config`]) makes every source carry a signed token. The config
    /// must have passed `Config::validate` (header names are valid there).
    pub fn new(
        config: &SessionConfig,
        signer: Option<Arc<TokenSigner>>,
        tls: bool,
    ) -> SessionExtractor {
        let sources = config
            .sources
            .iter()
            .map(|s| match s {
                SessionSource::Header(h) => Source::Header(
                    HeaderName::from_bytes(h.as_bytes())
                        .unwrap_or_else(|_| HeaderName::from_static("x-session-id")),
                ),
                SessionSource::Cookie(c) => Source::Cookie(c.as_str().into()),
                SessionSource::PathPrefix(p) => Source::PathPrefix(p.as_str().into()),
                SessionSource::Query(q) => Source::Query(q.as_str().into()),
            })
            .collect();
        let describe: Arc<str> = Arc::from(
            format!(
                "looked in: {}",
                config
                    .sources
                    .iter()
                    .map(|s| match s {
                        SessionSource::Header(v) => format!("header {v}"),
                        SessionSource::Cookie(v) => format!("cookie {v}"),
                        SessionSource::PathPrefix(v) => format!("path prefix {v}"),
                        SessionSource::Query(v) => format!("query parameter {v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .as_str(),
        );
        SessionExtractor {
            sources,
            on_missing: config.on_missing,
            max_len: config.max_id_length,
            cookie_name: config.effective_cookie_name().into(),
            secure_cookie: tls,
            signer,
            describe,
        }
    }

    /// Finds, validates (or mints) the session of a request. The first source that is
    /// present decides; every other present source must name the same session (else
    /// `Conflicting`), and an invalid value in any present source is an error. A
    /// configured path prefix present in the path is removed from the forwarded path
    /// whichever source decided.
    pub fn extract(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<ExtractedSession, ExtractError> {
        self.extract_reusing(uri, headers, |_| None)
    }

    /// [`SessionExtractor::extract`], taking an ID's key from `known` when it has one
    /// equal to it (a connection's recent sessions), so the key is shared rather than
    /// allocated. The same validation runs either way.
    pub fn extract_reusing(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        known: impl Fn(&str) -> Option<SessionKey>,
    ) -> Result<ExtractedSession, ExtractError> {
        let mut decided: Option<(SessionKey, SessionOrigin, &[u8])> = None;
        let mut rewritten = None;
        for source in self.sources.iter() {
            let found = match source {
                Source::Header(name) => headers
                    .get(name)
                    .map(|v| (v.as_bytes(), SessionOrigin::Header)),
                Source::Cookie(name) => {
                    cookie_value(headers, name).map(|v| (v, SessionOrigin::Cookie))
                }
                Source::PathPrefix(prefix) => path_session(uri, prefix).map(|(id, rest)| {
                    if rewritten.is_none() {
                        rewritten = Some(rewrite_path(rest, uri.query()));
                    }
                    (id.as_bytes(), SessionOrigin::PathPrefix)
                }),
                Source::Query(name) => uri
                    .query()
                    .and_then(|q| query_value(q, name))
                    .map(|v| (v.as_bytes(), SessionOrigin::Query)),
            };
            let Some((raw, origin)) = found else {
                continue;
            };
            match &decided {
                None => decided = Some((self.identify(raw, origin, &known)?, origin, raw)),
                // The same bytes name the same session: no second verification.
                Some((_, _, first_raw)) if *first_raw == raw => {}
                Some((first, first_origin, _)) => {
                    let key = self.identify(raw, origin, &known)?;
                    if key != *first {
                        return Err(ExtractError::Conflicting {
                            first: first_origin.as_str(),
                            second: origin.as_str(),
                        });
                    }
                }
            }
        }
        if let Some((key, origin, _)) = decided {
            return Ok(ExtractedSession {
                key,
                origin,
                rewritten,
            });
        }
        match self.on_missing {
            OnMissing::Reject if self.signer.is_some() => Err(ExtractError::Token {
                origin: "request",
                reason: TokenError::Missing,
            }),
            OnMissing::Reject => Err(ExtractError::Missing(self.describe.clone())),
            OnMissing::Create => Ok(ExtractedSession {
                key: SessionKey::random(),
                origin: SessionOrigin::Minted,
                rewritten,
            }),
        }
    }

    /// The session a source's raw value names: a validated ID, or with `auth: hmac` the ID
    /// inside a verified token.
    fn identify(
        &self,
        raw: &[u8],
        origin: SessionOrigin,
        known: &impl Fn(&str) -> Option<SessionKey>,
    ) -> Result<SessionKey, ExtractError> {
        if let Some(signer) = &self.signer {
            return signer.verify(raw).map_err(|reason| ExtractError::Token {
                origin: origin.as_str(),
                reason,
            });
        }
        let invalid = |reason| ExtractError::Invalid {
            origin: origin.as_str(),
            reason,
        };
        let text = std::str::from_utf8(raw)
            .map_err(|e| invalid(InvalidSessionId::BadChar(char::from(raw[e.valid_up_to()]))))?;
        crate::session::key::validate(raw, self.max_len).map_err(invalid)?;
        Ok(known(text).unwrap_or_else(|| SessionKey::from_valid(text)))
    }

    /// What a client presents for `key`: its token with `auth: hmac`, else the ID itself.
    pub fn client_value(&self, key: &SessionKey) -> String {
        match &self.signer {
            Some(signer) => signer.mint(key),
            None => key.as_str().to_owned(),
        }
    }

    /// The `Set-Cookie` value that hands a minted session (`value` from
    /// [`SessionExtractor::client_value`]) to the client; with `auth: hmac` it expires
    /// with the token. `None` only if the value is not header-safe (never for values this
    /// extractor made; checked rather than assumed so no input can panic here).
    pub fn set_cookie(&self, value: &str) -> Option<HeaderValue> {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        let max_age = match &self.signer {
            Some(s) => format!("; Max-Age={}", s.ttl_secs()),
            None => String::new(),
        };
        let text = format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Lax{max_age}{secure}",
            self.cookie_name,
        );
        HeaderValue::from_str(&text).ok()
    }

    /// The cookie name minted sessions are stored under.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// The token signer (`auth: hmac`).
    pub fn signer(&self) -> Option<&Arc<TokenSigner>> {
        self.signer.as_ref()
    }
}

/// The value of cookie `name` across every `Cookie` header (HTTP/2 may split them).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if &pair[..eq] == name.as_bytes() {
                let v = &pair[eq + 1..];
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                return Some(v);
            }
        }
    }
    None
}

/// For `prefix` `/s/` and path `/s/abc/x/y`: `("abc", "/x/y")`; `/s/abc` gives `("abc", "")`.
fn path_session<'a>(uri: &'a Uri, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = uri.path().strip_prefix(prefix)?;
    Some(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    })
}

fn rewrite_path(rest: &str, query: Option<&str>) -> PathAndQuery {
    let path = if rest.is_empty() { "/" } else { rest };
    let mut buf = BytesMut::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    buf.put_slice(path.as_bytes());
    if let Some(q) = query {
        buf.put_u8(b'?');
        buf.put_slice(q.as_bytes());
    }
    PathAndQuery::from_maybe_shared(buf.freeze())
        .expect("a suffix of a valid path plus its query is a valid path-and-query")
}

/// The value of query parameter `name` (not percent-decoded: valid IDs need no escaping).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests;
