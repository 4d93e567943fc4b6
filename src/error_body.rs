//! The one JSON error body every client-facing error carries: `{"error":{"code","message"}}`.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

/// A JSON error response: `{"error":{"code":code,"message":message}}`.
pub fn error_response<B: From<Bytes>>(
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<B> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut resp = Response::new(B::from(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
