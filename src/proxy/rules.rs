//! The request-edge rules, one table for every path: which fields are hop-by-hop, which may
//! not travel as trailers, which names are look-alikes of fields the proxy routes, frames
//! or sets, and how CONNECT, `Host`/`:authority` and the session header are judged.
//!
//! Pure functions over field names and values as bytes (case-insensitive, as received), so
//! the HTTP/1.1 fast path applies them while it scans a raw head, and the hyper path and
//! HTTP/2 apply the same ones to a `HeaderMap` ([`EdgeRules::check_request`]). A scan is
//! [`EdgeRules::field`] once per field line, then [`EdgeRules::finish`] once per request;
//! neither allocates.

use http::header::{CONTENT_LENGTH, COOKIE, HOST};
use http::{HeaderMap, HeaderValue, Method, Version};

use crate::config::{Config, UnderscoreHeaders};

/// Why a request is refused at the edge, before any session is looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeViolation {
    /// `CONNECT` (405): the activator is a gateway to sandboxes, not a forward proxy; a
    /// 2xx to CONNECT would turn the sandbox connection into a tunnel (RFC 9112 6.3).
    #[error("CONNECT is not supported: the activator is not a forward proxy")]
    Connect,
    /// A name with `_` that reads as a field the proxy routes, frames or sets once `_`
    /// becomes `-` (CGI-style servers map both to the same `HTTP_*` variable).
    #[error("a header name with '_' reads as {0}; send it with '-' or not at all")]
    Lookalike(&'static str),
    /// The same look-alike rule for a configured name (session header, strip list).
    #[error(
        "a header name with '_' reads as the configured header {0}; send it with '-' or not at all"
    )]
    LookalikeConfigured(Box<str>),
    /// The session header more than once (the sandbox and the router could read different
    /// copies).
    #[error("the session header {0} appears more than once")]
    DuplicateSession(Box<str>),
    /// More than one `Host` field.
    #[error("more than one Host header")]
    DuplicateHost,
    /// HTTP/1.1 without `Host` (RFC 9112 3.2), HTTP/2 with neither `:authority` nor `host`.
    #[error("the request names no host (Host or :authority)")]
    MissingHost,
    /// `Host` differs from the request target's authority (absolute-form) or from
    /// HTTP/2's `:authority` (RFC 9113 8.3.1).
    #[error("Host and the request target's authority (:authority) differ")]
    ConflictingHost,
    /// `Host` is not a `host[:port]` (RFC 9110 7.2).
    #[error("the Host header is not a valid host")]
    InvalidHost,
}

impl EdgeViolation {
    /// The stable error code (status: 405 for CONNECT, else 400).
    pub fn code(&self) -> &'static str {
        match self {
            EdgeViolation::Connect => "method_not_allowed",
            EdgeViolation::Lookalike(_) | EdgeViolation::LookalikeConfigured(_) => {
                "lookalike_header"
            }
            EdgeViolation::DuplicateSession(_) => "duplicate_session_header",
            EdgeViolation::DuplicateHost
            | EdgeViolation::MissingHost
            | EdgeViolation::ConflictingHost
            | EdgeViolation::InvalidHost => "invalid_host",
        }
    }
}

/// What to do with one request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldVerdict {
    /// Forward it (subject to the hop-by-hop rules).
    Keep,
    /// Leave it out (a name with `_` under `proxy.underscore_headers: drop`).
    Drop,
}

/// What a request's field scan has seen so far; one per request, on the stack. Refusals
/// are recorded, not returned, so the verdict does not depend on the order the fields
/// are visited in (wire order on the fast path, grouped by name in a `HeaderMap`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    hosts: u8,
    /// Bit i: session header i was seen.
    sessions: u32,
    /// Some name had `_` and was dropped.
    dropped: bool,
    /// The first look-alike name: an index into [`LOOKALIKES`], or (high bit set) into
    /// the configured names.
    lookalike: Option<u8>,
    /// A session header (its index) seen twice.
    duplicate: Option<u8>,
}

/// Marks an index of [`Seen::lookalike`] as one of the configured names.
const CONFIGURED: u8 = 0x80;

impl Seen {
    /// How many `Host` lines the scan met.
    pub fn hosts(&self) -> u8 {
        self.hosts
    }

    /// Whether a field was given [`FieldVerdict::Drop`].
    pub fn dropped(&self) -> bool {
        self.dropped
    }
}

/// Fixed fields whose `_` look-alikes are refused: routing (`Host`), framing
/// (`Content-Length`, `Transfer-Encoding`), hop-by-hop (`Connection`, `Upgrade`, `TE`,
/// `Keep-Alive`, `Proxy-*`), and the fields the proxy sets for the sandbox to trust
/// (`X-Forwarded-*`, `X-Real-IP`, `X-Request-ID`). Names without `-` cannot have a
/// look-alike and are not listed.
const LOOKALIKES: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

/// The request-edge rules built from the config (session header names, strip list,
/// `proxy.underscore_headers`).
#[derive(Debug, Clone)]
pub struct EdgeRules {
    /// Session source headers, lower-case (at most 32 are tracked for duplicates).
    sessions: Box<[Box<str>]>,
    /// Configured names whose look-alikes are refused: session sources,
    /// `session.forward_header`, `proxy.strip_headers`; lower-case, only those with `-`.
    configured: Box<[Box<str>]>,
    underscores: UnderscoreHeaders,
}

impl EdgeRules {
    /// Builds the rules from a validated config.
    pub fn new(config: &Config) -> EdgeRules {
        let sessions: Vec<Box<str>> = config
            .session
            .sources
            .iter()
            .filter_map(|s| match s {
                crate::config::SessionSource::Header(h) => Some(h.to_ascii_lowercase().into()),
                _ => None,
            })
            .collect();
        let mut configured: Vec<Box<str>> = Vec::new();
        let candidates = sessions
            .iter()
            .map(|s| s.to_string())
            .chain(std::iter::once(
                config.session.forward_header.to_ascii_lowercase(),
            ))
            .chain(
                config
                    .proxy
                    .strip_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase()),
            );
        for name in candidates {
            if name.contains('-') && !configured.iter().any(|c| **c == *name) {
                configured.push(name.into());
            }
        }
        EdgeRules {
            sessions: sessions.into(),
            configured: configured.into(),
            underscores: config.proxy.underscore_headers,
        }
    }

    /// Judges one request field by its name, recording in `seen` what
    /// [`EdgeRules::finish`] refuses. Cheap on the common path: a length compare per
    /// session header, one `_` scan.
    pub fn field(&self, name: &[u8], seen: &mut Seen) -> FieldVerdict {
        if name.eq_ignore_ascii_case(b"host") {
            seen.hosts = seen.hosts.saturating_add(1);
            return FieldVerdict::Keep;
        }
        for (i, session) in self.sessions.iter().enumerate().take(32) {
            if name.eq_ignore_ascii_case(session.as_bytes()) {
                let bit = 1u32 << i;
                if seen.sessions & bit != 0 {
                    seen.duplicate.get_or_insert(i as u8);
                }
                seen.sessions |= bit;
                return FieldVerdict::Keep;
            }
        }
        if !name.contains(&b'_') {
            return FieldVerdict::Keep;
        }
        if self.underscores == UnderscoreHeaders::Drop {
            seen.dropped = true;
            return FieldVerdict::Drop;
        }
        if seen.lookalike.is_none() {
            seen.lookalike = LOOKALIKES
                .iter()
                .position(|f| reads_as(name, f.as_bytes()))
                .map(|i| i as u8)
                .or_else(|| {
                    self.configured
                        .iter()
                        .take(usize::from(CONFIGURED - 1))
                        .position(|f| reads_as(name, f.as_bytes()))
                        .map(|i| i as u8 | CONFIGURED)
                });
        }
        FieldVerdict::Keep
    }

    /// Judges the request as a whole once its fields are scanned: the method, then
    /// `Host` against the version and the target's authority (absolute-form over
    /// HTTP/1.x, `:authority` over HTTP/2). `host`: the value of the one `Host` field.
    pub fn finish(
        &self,
        method: &Method,
        version: Version,
        authority: Option<&[u8]>,
        host: Option<&[u8]>,
        seen: &Seen,
    ) -> Result<(), EdgeViolation> {
        check_method(method)?;
        if let Some(i) = seen.lookalike {
            return Err(if i & CONFIGURED == 0 {
                EdgeViolation::Lookalike(LOOKALIKES[usize::from(i)])
            } else {
                EdgeViolation::LookalikeConfigured(
                    self.configured[usize::from(i & !CONFIGURED)].clone(),
                )
            });
        }
        if let Some(i) = seen.duplicate {
            return Err(EdgeViolation::DuplicateSession(
                self.sessions[usize::from(i)].clone(),
            ));
        }
        if seen.hosts > 1 {
            return Err(EdgeViolation::DuplicateHost);
        }
        if let Some(host) = host
            && !valid_host(host)
        {
            return Err(EdgeViolation::InvalidHost);
        }
        let missing = match version {
            Version::HTTP_11 => host.is_none(),
            v if v >= Version::HTTP_2 => host.is_none() && authority.is_none(),
            _ => false,
        };
        if missing {
            return Err(EdgeViolation::MissingHost);
        }
        match (authority, host) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => Err(EdgeViolation::ConflictingHost),
            _ => Ok(()),
        }
    }

    /// Applies the whole table to a parsed request (the hyper path, HTTP/2): every field
    /// through [`EdgeRules::field`], fields given `Drop` removed, then
    /// [`EdgeRules::finish`]. HTTP/2 `cookie` fields are joined first (see
    /// [`join_cookies`]).
    pub fn check_request(
        &self,
        method: &Method,
        version: Version,
        authority: Option<&[u8]>,
        headers: &mut HeaderMap,
    ) -> Result<(), EdgeViolation> {
        check_method(method)?;
        let mut seen = Seen::default();
        for name in headers.iter().map(|(n, _)| n) {
            self.field(name.as_str().as_bytes(), &mut seen);
        }
        if seen.dropped {
            let names: Vec<_> = headers
                .keys()
                .filter(|n| {
                    self.field(n.as_str().as_bytes(), &mut Seen::default()) == FieldVerdict::Drop
                })
                .cloned()
                .collect();
            for name in names {
                headers.remove(name);
            }
        }
        if version >= Version::HTTP_2 {
            join_cookies(headers);
        }
        let host = headers.get(HOST).map(HeaderValue::as_bytes);
        self.finish(method, version, authority, host, &seen)
    }

    /// May a `Connection` option remove the request field `name`? Never `Host`,
    /// `Content-Length` or a session header: a connection option naming a field meant for
    /// every recipient is invalid (RFC 9110 7.6.1), and obeying it would let a client
    /// take away what the proxy routes on.
    pub fn connection_may_remove(&self, name: &[u8]) -> bool {
        !(name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"content-length")
            || self
                .sessions
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s.as_bytes())))
    }
}

fn check_method(method: &Method) -> Result<(), EdgeViolation> {
    if *method == Method::CONNECT {
        return Err(EdgeViolation::Connect);
    }
    Ok(())
}

/// Does `name` (with `_`) read as `field` (lower-case, with `-`) once every `_` is `-`?
fn reads_as(name: &[u8], field: &[u8]) -> bool {
    name.len() == field.len()
        && name.iter().zip(field).all(|(&n, &f)| {
            let n = if n == b'_' {
                b'-'
            } else {
                n.to_ascii_lowercase()
            };
            n == f
        })
}

/// Is `value` a `host[:port]` (RFC 9110 7.2 / RFC 3986 3.2.2: reg-name or IP literal)?
/// Refused: empty, whitespace, `@` (userinfo), `/`, `?`, `#`, `\`, controls, non-ASCII,
/// and a port that is not digits.
pub fn valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return false;
    }
    let (host, port) = if value[0] == b'[' {
        match value.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &value[1..end];
                if literal.is_empty()
                    || !literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
                {
                    return false;
                }
                match &value[end + 1..] {
                    [] => (&value[..0], None),
                    [b':', port @ ..] => (&value[..0], Some(port)),
                    _ => return false,
                }
            }
            None => return false,
        }
    } else {
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    let host_ok = host.iter().all(|&b| {
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
                    | b'%'
            )
    });
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok && (value[0] == b'[' || !host.is_empty())
}

/// Is `name` hop-by-hop on its own (RFC 9110 7.6.1): removed on every forward whatever
/// `Connection` says? `TE` is listed (only `TE: trailers` is kept, by the caller);
/// `Trailer` is end-to-end.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: &[&[u8]] = &[
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// May `name` travel as a trailer field? RFC 9110 6.5.1: never a field that frames the
/// message, routes it, modifies the request, authenticates, controls the response or
/// processes the content, since a recipient that merges trailers into the header section
/// would act on it after the fact. The list is Go net/http's `badTrailer` (transfer.go)
/// plus cookies, the conditionals and the response-control fields the RFC names.
pub fn forbidden_in_trailers(name: &[u8]) -> bool {
    const FORBIDDEN: &[&[u8]] = &[
        b"age",
        b"authorization",
        b"cache-control",
        b"connection",
        b"content-encoding",
        b"content-length",
        b"content-range",
        b"content-type",
        b"cookie",
        b"date",
        b"expect",
        b"expires",
        b"host",
        b"if-match",
        b"if-modified-since",
        b"if-none-match",
        b"if-range",
        b"if-unmodified-since",
        b"keep-alive",
        b"location",
        b"max-forwards",
        b"pragma",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"range",
        b"retry-after",
        b"set-cookie",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"vary",
        b"warning",
        b"www-authenticate",
    ];
    FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f))
}

/// Removes the fields [`forbidden_in_trailers`] from a trailer section (both ways).
/// Allocates only when there is one to remove.
pub fn drop_forbidden_trailers(trailers: &mut HeaderMap) {
    if !trailers
        .keys()
        .any(|n| forbidden_in_trailers(n.as_str().as_bytes()))
    {
        return;
    }
    let names: Vec<_> = trailers
        .keys()
        .filter(|n| forbidden_in_trailers(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in names {
        trailers.remove(name);
    }
}

/// May a response with `status` carry `Content-Length`? Not a 1xx or 204 (RFC 9110 8.6:
/// MUST NOT) and not a 304 (it would describe a body that is not there; hyper's server
/// drops it as well). A response to HEAD keeps it: it says what GET would send.
pub fn response_keeps_content_length(status: http::StatusCode) -> bool {
    !(status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED)
}

/// Removes `Content-Length` from a response that may not carry it (see
/// [`response_keeps_content_length`]).
pub fn fix_response_length(status: http::StatusCode, headers: &mut HeaderMap) {
    if !response_keeps_content_length(status) {
        headers.remove(CONTENT_LENGTH);
    }
}

/// May the upstream connection carry another request after this exchange? Not after a
/// 101 (the connection now speaks another protocol) nor after a 2xx to CONNECT (it is a
/// tunnel from the blank line on, RFC 9112 6.3 rule 2), whatever the framing says.
pub fn reusable_after(method: &Method, status: http::StatusCode) -> bool {
    !(status == http::StatusCode::SWITCHING_PROTOCOLS
        || (*method == Method::CONNECT && status.is_success()))
}

/// Joins several `cookie` fields into one, `; `-separated (RFC 9113 8.2.3: HTTP/2 may split
/// the cookie into crumbs; they MUST be joined before reaching an HTTP/1.1 context, and
/// many HTTP/1.1 servers read only the first line). Allocates only with two or more.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

#[cfg(test)]
mod tests;
