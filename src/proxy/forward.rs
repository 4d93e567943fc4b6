//! Forwarding hygiene: hop-by-hop headers (RFC 9110 7.6.1), `X-Forwarded-*`, the Host
//! policy, configured header stripping, and the upstream URI.
//!
//! Host policy: an HTTP/1.1 upstream sees the client's `Host` unchanged (for an HTTP/2
//! client, its `:authority`). An HTTP/2 upstream gets `:authority` = the sandbox address
//! and no `host` header (RFC 9113 8.3.1 forbids a differing pair); the client's host is
//! in `X-Forwarded-Host` either way.

use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};
use http::header::{
    CONNECTION, EXPECT, FORWARDED, HOST, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};

use super::rules::EdgeRules;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP` (nginx convention), removed unless from a trusted proxy.
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Facts about the client connection that every request on it shares.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The peer IP, formatted once per connection for `X-Forwarded-For`.
    pub peer_ip: HeaderValue,
    /// Served over TLS (`X-Forwarded-Proto: https`, `Secure` cookies).
    pub tls: bool,
    /// The peer is in `proxy.trusted_proxies`: its forwarding headers are believed.
    pub trusted: bool,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool, trusted: bool) -> ClientConn {
        ClientConn {
            peer,
            peer_ip: HeaderValue::from_str(&peer.ip().to_canonical().to_string())
                .expect("an IP address is a valid header value"),
            tls,
            trusted,
        }
    }

    /// Whether the client reached us over HTTPS: our own TLS, or a trusted proxy's
    /// `X-Forwarded-Proto: https` (a TLS-terminating Gateway).
    pub fn https(&self, headers: &HeaderMap) -> bool {
        self.tls
            || (self.trusted
                && headers
                    .get(&X_FORWARDED_PROTO)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")))
    }
}

/// Is this an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade: ...`)?
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && has_token(headers, CONNECTION, "upgrade")
}

/// Does a comma-separated field value (`Connection`, `TE`) list `token`? Parameters after
/// `;` are not part of the token.
pub(super) fn list_has(list: &str, token: &str) -> bool {
    list.split(',').any(|t| {
        t.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(token)
    })
}

/// Does any `name` field list `token` (see [`list_has`])?
pub(super) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| list_has(s, token)))
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE` (except `TE: trailers`, which is kept), `Transfer-Encoding`,
/// `Upgrade`, `Proxy-Authenticate`, `Proxy-Authorization` (the list is
/// [`super::rules::is_hop_by_hop`]). `Trailer` is end-to-end (and hyper needs it to send HTTP/1.1
/// trailers), so it stays. With `keep_upgrade`, a WebSocket handshake keeps `Upgrade` and
/// gets `Connection: upgrade` back. Used as is for responses; requests go through
/// [`strip_request_hop_by_hop`].
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    strip_hop_by_hop_except(headers, keep_upgrade, |_| true);
}

/// [`strip_hop_by_hop`] for a request, before the proxy adds a field of its own (so a
/// `Connection` option cannot remove what the proxy inserts), and never removing what
/// [`EdgeRules::connection_may_remove`] protects (`Host`, the session header).
pub fn strip_request_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, rules: &EdgeRules) {
    strip_hop_by_hop_except(headers, keep_upgrade, |name| {
        rules.connection_may_remove(name)
    });
}

fn strip_hop_by_hop_except(
    headers: &mut HeaderMap,
    keep_upgrade: bool,
    may_remove: impl Fn(&[u8]) -> bool,
) {
    if headers.contains_key(CONNECTION) {
        let mut named = headers.get_all(CONNECTION).iter();
        let first = named.next().cloned();
        let rest: Vec<HeaderValue> = named.cloned().collect();
        headers.remove(CONNECTION);
        for value in first.iter().chain(rest.iter()) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',') {
                let token = token.trim();
                if token.is_empty() || (keep_upgrade && token.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
                if token.eq_ignore_ascii_case("te") || !may_remove(token.as_bytes()) {
                    // TE: still governed by the TE rule below.
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(TRANSFER_ENCODING);
    headers.remove(PROXY_AUTHENTICATE);
    headers.remove(PROXY_AUTHORIZATION);
    if let Some(te) = headers.get(TE) {
        let trailers = te.to_str().is_ok_and(|s| list_has(s, "trailers"));
        if trailers {
            headers.insert(TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(TE);
        }
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// Prepares request headers for the sandbox, after [`strip_request_hop_by_hop`]: `Expect`
/// (the proxy answers it), configured stripping, `X-Forwarded-*`, and the Host policy.
///
/// From a trusted proxy `X-Forwarded-For` is appended to and `X-Forwarded-Proto`/`-Host`
/// are kept when present; from anyone else they are replaced with this connection's own
/// values and `Forwarded`/`X-Real-IP` are removed, so a client cannot forge its origin.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    client_authority: Option<&Authority>,
    conn: &ClientConn,
    strip: &[HeaderName],
    upstream_h2: bool,
) {
    headers.remove(EXPECT);
    for name in strip {
        headers.remove(name);
    }
    // The host the client asked for: `Host` (HTTP/1.1) or `:authority` (HTTP/2). A `Host`
    // already in the map stays where it is for an HTTP/1.1 sandbox (edited in place).
    let (host, has_host) = match headers.get(HOST) {
        Some(h) => (Some(h.clone()), true),
        None => (
            client_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            false,
        ),
    };
    if !conn.trusted {
        headers.remove(FORWARDED);
        headers.remove(&X_REAL_IP);
        headers.insert(&X_FORWARDED_FOR, conn.peer_ip.clone());
    } else if headers.contains_key(&X_FORWARDED_FOR) {
        // Earlier hops, possibly over several header lines, then this client.
        let prior = headers.get_all(&X_FORWARDED_FOR);
        let len: usize = prior.iter().map(|v| v.len() + 2).sum();
        let mut buf = BytesMut::with_capacity(len + conn.peer_ip.len());
        for v in prior {
            buf.put_slice(v.as_bytes());
            buf.put_slice(b", ");
        }
        buf.put_slice(conn.peer_ip.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
            headers.insert(&X_FORWARDED_FOR, v);
        }
    } else {
        headers.insert(&X_FORWARDED_FOR, conn.peer_ip.clone());
    }
    if !conn.trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            &X_FORWARDED_PROTO,
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    if let Some(host) = host {
        if !conn.trusted || !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(&X_FORWARDED_HOST, host.clone());
        }
        if upstream_h2 {
            headers.remove(HOST);
        } else if !has_host {
            headers.insert(HOST, host);
        }
    }
}

/// `http://{endpoint}{path_and_query}` for the upstream request.
pub fn upstream_uri(authority: Authority, path_and_query: Option<PathAndQuery>) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// The `host:port` authority of a sandbox endpoint.
pub fn endpoint_authority(endpoint: SocketAddr) -> Authority {
    Authority::try_from(endpoint.to_string().as_str()).expect("a socket address is an authority")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Custom-Hop"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-custom-hop", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, vec!["trailer", "x-end-to-end"]);
    }

    #[test]
    fn keeps_te_trailers_only() {
        let mut h = headers(&[("te", "gzip, trailers;q=1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
        assert!(!h.contains_key("x-hop"));
        assert!(h.contains_key("sec-websocket-key"));
    }

    #[test]
    fn forwarded_headers_and_host_policy() {
        let conn = ClientConn::new("10.1.2.3:5555".parse().unwrap(), true, true);
        let strip = [HeaderName::from_static("x-session-id")];
        let mut h = headers(&[
            ("host", "app.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-session-id", "abc"),
            ("expect", "100-continue"),
        ]);
        prepare_request_headers(&mut h, None, &conn, &strip, false);
        assert_eq!(h[HOST], "app.example");
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "app.example");
        assert!(!h.contains_key("x-session-id"));
        assert!(!h.contains_key(EXPECT));

        // An HTTP/2 client has no Host: its :authority is used; an h2 upstream gets none.
        let authority: Authority = "h2.example:8443".parse().unwrap();
        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, Some(&authority), &conn, &[], false);
        assert_eq!(h[HOST], "h2.example:8443");
        let mut h = HeaderMap::new();
        prepare_request_headers(&mut h, Some(&authority), &conn, &[], true);
        assert!(!h.contains_key(HOST));
        assert_eq!(h[&X_FORWARDED_HOST], "h2.example:8443");
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
    }

    #[test]
    fn untrusted_peers_cannot_forge_their_origin() {
        let conn = ClientConn::new("203.0.113.5:5555".parse().unwrap(), false, false);
        let mut h = headers(&[
            ("host", "app.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("forwarded", "for=1.1.1.1"),
            ("x-real-ip", "1.1.1.1"),
        ]);
        assert!(!conn.https(&h));
        prepare_request_headers(&mut h, None, &conn, &[], false);
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.5");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "app.example");
        assert!(!h.contains_key(FORWARDED));
        assert!(!h.contains_key("x-real-ip"));

        // The same headers from a trusted Gateway that terminated TLS are kept.
        let gw = ClientConn::new("10.0.0.7:5555".parse().unwrap(), false, true);
        let mut h = headers(&[
            ("host", "app.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.example"),
        ]);
        assert!(gw.https(&h));
        prepare_request_headers(&mut h, None, &gw, &[], false);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "public.example");
    }

    #[test]
    fn builds_upstream_uri() {
        let a = endpoint_authority("127.0.0.1:9001".parse().unwrap());
        let uri = upstream_uri(a, Some(PathAndQuery::from_static("/x?y=1")));
        assert_eq!(uri.to_string(), "http://127.0.0.1:9001/x?y=1");
    }
}
