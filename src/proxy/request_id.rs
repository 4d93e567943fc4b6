//! `X-Request-ID`: kept from a trusted proxy, else generated; sent to the sandbox and
//! back to the client, and on every failure's log line, so a client's report and the
//! log that holds the detail can be matched.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use super::forward::ClientConn;

/// `X-Request-ID`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request ID kept from a trusted proxy; longer or odd ones are replaced.
const MAX_KEPT_LEN: usize = 128;

/// The request's ID: a trusted proxy's `X-Request-ID` if it is short visible ASCII,
/// else 128 random bits in hex (an untrusted client cannot choose what the log shows).
pub fn request_id(conn: &ClientConn, headers: &HeaderMap) -> HeaderValue {
    if conn.trusted
        && let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= MAX_KEPT_LEN
        && v.as_bytes().iter().all(u8::is_ascii_graphic)
    {
        return v.clone();
    }
    generate()
}

fn generate() -> HeaderValue {
    let id: u128 = rand::random();
    let mut buf = [0u8; 32];
    hex::encode_to_slice(id.to_be_bytes(), &mut buf).expect("32 hex digits for 16 bytes");
    // One allocation, and clones (request to the sandbox, response to the client) share
    // it: `from_bytes` would copy into a Vec-backed `Bytes` whose first clone allocates
    // again to promote itself to shared (benches/proxy_allocs.rs, docs/benchmarks.md).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(trusted: bool) -> ClientConn {
        ClientConn::new("10.0.0.1:1".parse().unwrap(), false, trusted)
    }

    #[test]
    fn kept_only_from_trusted_proxies_and_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("gw-abc-123"));
        assert_eq!(request_id(&conn(true), &h), "gw-abc-123");
        let forged = request_id(&conn(false), &h);
        assert_ne!(forged, "gw-abc-123");
        assert_eq!(forged.len(), 32);
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&conn(true), &h).len(), 32);
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(200)).unwrap(),
        );
        assert_eq!(request_id(&conn(true), &h).len(), 32);
        assert_ne!(generate(), generate());
    }
}
