//! `SessionForwarding`: what the sandbox sees of a session, and what it may not set.
//!
//! Requests: `session.forward_header` carries the routed (plain) ID and replaces every
//! client copy, so a sandbox is never told a session other than the one it serves. With
//! `auth: hmac` the token never reaches the sandbox: header sources are removed, the session
//! cookie is cut out of `Cookie`, the session query parameter out of the query.
//! Responses: a sandbox's `Set-Cookie` for the activator's cookie (or any cookie source) is
//! dropped, so untrusted code cannot move its client into another session.

use bytes::{BufMut, BytesMut};
use http::header::{COOKIE, HeaderName, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue};

use super::SessionKey;
use crate::config::{SessionAuth, SessionConfig, SessionSource};

/// Request and response header rules for the session, built once from `session.*`.
pub struct SessionForwarding {
    forward_header: HeaderName,
    /// Cookie names the activator owns: the minting cookie and every cookie source.
    cookie_names: Box<[Box<str>]>,
    /// `auth: hmac`: token-carrying headers and query parameters to remove.
    token_headers: Box<[HeaderName]>,
    token_queries: Box<[Box<str>]>,
    hide_tokens: bool,
}

impl SessionForwarding {
    /// Builds the rules; the config must have passed `Config::validate`.
    pub fn new(config: &SessionConfig) -> SessionForwarding {
        let forward_header = HeaderName::from_bytes(config.forward_header.as_bytes())
            .unwrap_or_else(|_| HeaderName::from_static("x-session-id"));
        let mut cookie_names: Vec<Box<str>> = vec![config.effective_cookie_name().into()];
        let mut token_headers = Vec::new();
        let mut token_queries = Vec::new();
        for s in &config.sources {
            match s {
                SessionSource::Cookie(c) if !cookie_names.iter().any(|n| **n == **c) => {
                    cookie_names.push(c.as_str().into());
                }
                SessionSource::Header(h) => {
                    if let Ok(h) = HeaderName::from_bytes(h.as_bytes()) {
                        token_headers.push(h);
                    }
                }
                SessionSource::Query(q) => token_queries.push(q.as_str().into()),
                _ => {}
            }
        }
        SessionForwarding {
            forward_header,
            cookie_names: cookie_names.into(),
            token_headers: token_headers.into(),
            token_queries: token_queries.into(),
            hide_tokens: config.auth == SessionAuth::Hmac,
        }
    }

    /// The header the routed session ID is forwarded in.
    pub fn forward_header(&self) -> &HeaderName {
        &self.forward_header
    }

    /// Rewrites a request's headers for the sandbox serving `key`.
    pub fn prepare_request(&self, headers: &mut HeaderMap, key: &SessionKey) {
        if self.hide_tokens {
            for h in self.token_headers.iter() {
                headers.remove(h);
            }
            remove_cookies(headers, &self.cookie_names);
        }
        // The common case, the session came in this very header: keep the client's
        // single copy (no allocation per request). Otherwise `insert` replaces every
        // client copy.
        let mut sent = headers.get_all(&self.forward_header).iter();
        if sent
            .next()
            .is_some_and(|v| v.as_bytes() == key.as_str().as_bytes())
            && sent.next().is_none()
        {
            return;
        }
        if let Ok(v) = HeaderValue::from_str(key.as_str()) {
            headers.insert(self.forward_header.clone(), v);
        }
    }

    /// With `auth: hmac`, the path-and-query without the token's query parameter; `None`
    /// when there is nothing to remove.
    pub fn strip_query(&self, pq: Option<&PathAndQuery>) -> Option<PathAndQuery> {
        if !self.hide_tokens || self.token_queries.is_empty() {
            return None;
        }
        let pq = pq?;
        let query = pq.query()?;
        let keep = |pair: &&str| {
            let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !self.token_queries.iter().any(|q| **q == *name)
        };
        if query.split('&').all(|p| keep(&p)) {
            return None;
        }
        let mut buf = BytesMut::with_capacity(pq.as_str().len());
        buf.put_slice(pq.path().as_bytes());
        let mut first = true;
        for pair in query.split('&').filter(keep) {
            buf.put_u8(if first { b'?' } else { b'&' });
            first = false;
            buf.put_slice(pair.as_bytes());
        }
        PathAndQuery::from_maybe_shared(buf.freeze()).ok()
    }

    /// Drops the sandbox's `Set-Cookie` lines for cookies the activator owns.
    pub fn filter_response(&self, headers: &mut HeaderMap) {
        drop_set_cookies(headers, &self.cookie_names);
    }
}

/// Removes the pairs named in `names` from every `Cookie` header; a header left empty is
/// removed.
pub fn remove_cookies(headers: &mut HeaderMap, names: &[Box<str>]) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    let owned = |pair: &[u8]| {
        let name = pair
            .iter()
            .position(|b| *b == b'=')
            .map_or(pair, |i| &pair[..i])
            .trim_ascii();
        names.iter().any(|n| n.as_bytes() == name)
    };
    let any_owned = headers.get_all(COOKIE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b';')
            .any(|p| owned(p.trim_ascii()))
    });
    if !any_owned {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    headers.remove(COOKIE);
    for v in values {
        let kept: Vec<&[u8]> = v
            .as_bytes()
            .split(|b| *b == b';')
            .map(<[u8]>::trim_ascii)
            .filter(|p| !p.is_empty() && !owned(p))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let joined = kept.join(&b"; "[..]);
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            headers.append(COOKIE, v);
        }
    }
}

/// Removes `Set-Cookie` lines whose cookie name is in `names`.
pub fn drop_set_cookies(headers: &mut HeaderMap, names: &[Box<str>]) {
    let owned = |v: &HeaderValue| {
        let b = v.as_bytes();
        let end = b
            .iter()
            .position(|c| *c == b'=' || *c == b';')
            .unwrap_or(b.len());
        let name = b[..end].trim_ascii();
        names.iter().any(|n| n.as_bytes() == name)
    };
    if !headers.get_all(SET_COOKIE).iter().any(owned) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter(|v| !owned(v))
        .cloned()
        .collect();
    headers.remove(SET_COOKIE);
    for v in kept {
        headers.append(SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn fwd(yaml: &str) -> SessionForwarding {
        let c = Config::from_yaml(&format!(
            "backend: {{kind: static, endpoints: ['127.0.0.1:1']}}\n{yaml}"
        ))
        .unwrap();
        SessionForwarding::new(&c.session)
    }

    #[test]
    fn forward_header_replaces_client_copies() {
        let f = fwd("session: {sources: [{path_prefix: /s/}, {header: X-Session-ID}]}");
        let mut h = HeaderMap::new();
        h.append("x-session-id", HeaderValue::from_static("bob"));
        h.append("x-session-id", HeaderValue::from_static("carol"));
        f.prepare_request(&mut h, &SessionKey::parse("alice", 64).unwrap());
        let all: Vec<_> = h.get_all("x-session-id").iter().collect();
        assert_eq!(all, ["alice"]);
        // The fast case (the client's one copy is the routed ID) and its near misses.
        for sent in [
            &["alice"][..],
            &["alice", "alice"],
            &["alice", "bob"],
            &["alicex"],
            &[],
        ] {
            let mut h = HeaderMap::new();
            for v in sent {
                h.append("x-session-id", HeaderValue::from_static(v));
            }
            f.prepare_request(&mut h, &SessionKey::parse("alice", 64).unwrap());
            let all: Vec<_> = h.get_all("x-session-id").iter().collect();
            assert_eq!(all, ["alice"], "client sent {sent:?}");
        }
    }

    #[test]
    fn cookies_removed_only_with_hmac() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; sid=tok; b=2"));
        h.append("cookie", HeaderValue::from_static("sid=tok2"));
        remove_cookies(&mut h, &["sid".into()]);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; b=2"]);
    }

    #[test]
    fn set_cookie_for_owned_names_dropped() {
        let f = fwd("session: {sources: [{cookie: sid}], on_missing: create}");
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("sid=evil; Path=/"));
        h.append("set-cookie", HeaderValue::from_static("theme=dark"));
        h.append("set-cookie", HeaderValue::from_static(" sid =x"));
        f.filter_response(&mut h);
        let all: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(all, ["theme=dark"]);
    }
}
