//! What a preview request presents (a preview token in a header or the query, the preview
//! cookie) and how the request is cleaned of it before it reaches the sandbox.
//!
//! Every read is bounded: one header value of at most [`MAX_TOKEN_LEN`] bytes, at most
//! [`MAX_COOKIE_PAIRS`] cookie pairs looked at, at most [`MAX_QUERY_PAIRS`] query pairs.

use http::header::{COOKIE, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::MAX_TOKEN_LEN;

/// The header a client may show its preview token in.
pub static PREVIEW_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-preview-token");
/// The query parameter a browser link carries the preview token in.
pub const PREVIEW_TOKEN_PARAM: &str = "preview_token";
/// The host-only cookie the token is exchanged for.
pub const PREVIEW_COOKIE: &str = "activator-preview";
/// Cookie pairs looked at, over every `Cookie` field.
const MAX_COOKIE_PAIRS: usize = 128;
/// Query pairs looked at.
const MAX_QUERY_PAIRS: usize = 128;

/// The credentials a preview request carries (values bounded by [`MAX_TOKEN_LEN`]; a
/// longer one is kept as an empty value, which never verifies).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Presented {
    /// `X-Preview-Token`.
    pub header_token: Option<String>,
    /// `?preview_token=`.
    pub query_token: Option<String>,
    /// The preview cookie.
    pub cookie: Option<String>,
}

impl Presented {
    /// Reads the credentials of a request.
    pub fn read(headers: &HeaderMap, query: Option<&str>) -> Presented {
        let bounded = |v: &[u8]| {
            if v.len() > MAX_TOKEN_LEN {
                String::new()
            } else {
                String::from_utf8_lossy(v).into_owned()
            }
        };
        let header_token = headers
            .get(&PREVIEW_TOKEN_HEADER)
            .map(|v| bounded(v.as_bytes()));
        let query_token = query.and_then(|q| {
            q.split('&')
                .take(MAX_QUERY_PAIRS)
                .find_map(|kv| kv.strip_prefix(PREVIEW_TOKEN_PARAM)?.strip_prefix('='))
                .map(|v| bounded(v.as_bytes()))
        });
        let cookie = cookie_pairs(headers)
            .take(MAX_COOKIE_PAIRS)
            .find(|(name, _)| *name == PREVIEW_COOKIE.as_bytes())
            .map(|(_, v)| bounded(v));
        Presented {
            header_token,
            query_token,
            cookie,
        }
    }
}

/// `name=value` pairs of every `Cookie` field (RFC 6265 5.4: `; `-separated).
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    headers.get_all(COOKIE).iter().flat_map(|v| {
        v.as_bytes().split(|b| *b == b';').filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
        })
    })
}

/// Removes the preview token header and the preview cookie (other cookies stay, in
/// order), so neither reaches the sandbox.
pub fn strip_credentials(headers: &mut HeaderMap) {
    headers.remove(&PREVIEW_TOKEN_HEADER);
    let has_ours = cookie_pairs(headers).any(|(name, _)| name == PREVIEW_COOKIE.as_bytes());
    if !has_ours {
        return;
    }
    let kept: Vec<Vec<u8>> = cookie_pairs(headers)
        .filter(|(name, _)| *name != PREVIEW_COOKIE.as_bytes())
        .map(|(n, v)| [n, b"=", v].concat())
        .collect();
    headers.remove(COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..]))
    {
        headers.insert(COOKIE, v);
    }
}

/// `query` without any `preview_token` pair (`None` when nothing is left).
pub fn query_without_token(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let name = kv.split_once('=').map_or(*kv, |(n, _)| n);
            name != PREVIEW_TOKEN_PARAM
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_source_and_strips_only_ours() {
        let mut h = HeaderMap::new();
        h.insert(&PREVIEW_TOKEN_HEADER, HeaderValue::from_static("tok"));
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; activator-preview=c.1.c.ff"),
        );
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        let p = Presented::read(&h, Some("x=1&preview_token=q.2&y"));
        assert_eq!(p.header_token.as_deref(), Some("tok"));
        assert_eq!(p.query_token.as_deref(), Some("q.2"));
        assert_eq!(p.cookie.as_deref(), Some("c.1.c.ff"));
        strip_credentials(&mut h);
        assert!(h.get(&PREVIEW_TOKEN_HEADER).is_none());
        let cookies: Vec<_> = h.get_all(COOKIE).iter().collect();
        assert_eq!(cookies, vec![HeaderValue::from_static("a=1; b=2")]);
        assert_eq!(
            query_without_token("x=1&preview_token=q.2&y").as_deref(),
            Some("x=1&y")
        );
        assert_eq!(query_without_token("preview_token=q"), None);
        assert_eq!(
            query_without_token("preview_tokens=q").as_deref(),
            Some("preview_tokens=q")
        );
    }

    #[test]
    fn oversized_values_are_read_as_empty() {
        let mut h = HeaderMap::new();
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        h.insert(&PREVIEW_TOKEN_HEADER, HeaderValue::from_str(&long).unwrap());
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("activator-preview={long}")).unwrap(),
        );
        let p = Presented::read(&h, Some(&format!("preview_token={long}")));
        assert_eq!(p.header_token.as_deref(), Some(""));
        assert_eq!(p.query_token.as_deref(), Some(""));
        assert_eq!(p.cookie.as_deref(), Some(""));
        strip_credentials(&mut h);
        assert!(h.get(COOKIE).is_none());
    }
}
