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

/// IDs cut from one thread's slab of random hex before it is refilled.
const IDS_PER_SLAB: usize = 64;
/// Hex digits per ID (128 bits).
const ID_LEN: usize = 32;

/// 128 fresh random bits in hex. IDs are cut from a per-thread slab of random hex digits
/// (one allocation per [`IDS_PER_SLAB`] IDs), so a request allocates nothing for its ID;
/// each ID shares the slab by reference count, and the clones (the request to the
/// sandbox, the response to the client, the access log) share it too.
fn generate() -> HeaderValue {
    thread_local! {
        static SLAB: std::cell::RefCell<(bytes::Bytes, usize)> =
            const { std::cell::RefCell::new((bytes::Bytes::new(), 0)) };
    }
    SLAB.with_borrow_mut(|(slab, next)| {
        if *next + ID_LEN > slab.len() {
            *slab = fresh_slab();
            *next = 0;
        }
        let id = slab.slice(*next..*next + ID_LEN);
        *next += ID_LEN;
        HeaderValue::from_maybe_shared(id).expect("hex digits are a valid header value")
    })
}

/// [`IDS_PER_SLAB`] IDs' worth of random hex digits, in a `Bytes` that slices without
/// allocating (`from_owner`: reference-counted from the start, never promoted).
fn fresh_slab() -> bytes::Bytes {
    let mut random = [0u8; IDS_PER_SLAB * ID_LEN / 2];
    rand::fill(&mut random[..]);
    let mut hex = vec![0u8; IDS_PER_SLAB * ID_LEN];
    hex::encode_to_slice(random, &mut hex).expect("two hex digits per byte");
    bytes::Bytes::from_owner(hex)
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

    #[test]
    fn generated_ids_are_distinct_hex_across_slabs() {
        let ids: Vec<HeaderValue> = (0..IDS_PER_SLAB * 3 + 5).map(|_| generate()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|v| {
            v.len() == ID_LEN
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
    }
}
