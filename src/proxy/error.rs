//! The one place failures become responses: status, stable `code`, JSON body, `Retry-After`.
//!
//! Every client-visible error body is `{"error":{"code":"...","message":"..."}}` with a
//! fixed message per code: backend, process and Kubernetes API error text (a sandbox's
//! stderr, an apiserver message, an internal address) never reaches the client. The
//! detail goes to the log line, which carries the request's `X-Request-ID`, also sent
//! to the client, so the two can be matched.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};

use super::body::RequestBodyError;
use super::rules::EdgeViolation;
use crate::activation::ActivationError;
use crate::backend::BackendError;
use crate::customize::CustomizeError;
use crate::pool::PoolError;
use crate::preview::PreviewError;
use crate::session::{AdmissionError, ExtractError};

pub use crate::error_body::error_response;

/// Why a request was not (fully) proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Refused at the edge: CONNECT (405 `method_not_allowed`), a look-alike or duplicate
    /// field, an ambiguous Host (400; see [`EdgeViolation::code`]).
    #[error(transparent)]
    Edge(#[from] EdgeViolation),
    /// No usable session ID (400).
    #[error(transparent)]
    Session(#[from] ExtractError),
    /// A new session was refused: table cap (503) or per-client creation rate (429).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// No pool takes the request (404 `no_pool`) or it selects another pool than its
    /// session's (409 `pool_mismatch`).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A preview request refused (4xx, or 502 for an unreachable port; see
    /// [`PreviewError::status`]).
    #[error(transparent)]
    Preview(#[from] PreviewError),
    /// No sandbox could be made ready (502/503/504, see [`ProxyError::status`]).
    #[error(transparent)]
    Activation(#[from] ActivationError),
    /// TCP connect to the sandbox failed or timed out (502 `upstream_connect`).
    #[error("cannot connect to the sandbox at {endpoint}")]
    UpstreamConnect {
        endpoint: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The sandbox closed or reset the connection before a response head (502).
    #[error("the sandbox at {endpoint} closed the connection before responding")]
    UpstreamReset {
        endpoint: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The sandbox answered in a way that cannot be relayed (502 `upstream_protocol`).
    #[error("{0}")]
    UpstreamProtocol(&'static str),
    /// No response head within `proxy.request_timeout` (504 `upstream_timeout`).
    #[error("the sandbox at {endpoint} sent no response within {timeout:?}")]
    UpstreamTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
    /// A new session's customisation headers were refused (400 `invalid_customization`).
    #[error(transparent)]
    Customize(#[from] CustomizeError),
    /// The request declares a body over `proxy.max_body_bytes` (413 `body_too_large`).
    #[error("the request body is declared larger than {0} bytes")]
    BodyTooLarge(u64),
    /// Forwarding stopped because of the client's body: too slow (408 `body_timeout`),
    /// too large (413 `body_too_large`) or broken off (400 `bad_request_body`).
    #[error("forwarding the request body failed ({kind:?})")]
    RequestBody {
        kind: BodyFault,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What went wrong with a request body (see [`RequestBodyError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    Timeout,
    TooLarge,
    Client,
}

impl ProxyError {
    /// An upstream failure caused by the client's request body is the client's fault:
    /// finds a [`RequestBodyError`] in the source chain and says so.
    pub fn blame_request_body(self) -> ProxyError {
        let (ProxyError::UpstreamReset { source, .. } | ProxyError::UpstreamConnect { source, .. }) =
            &self
        else {
            return self;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        let mut kind = None;
        while let Some(e) = cause {
            if let Some(b) = e.downcast_ref::<RequestBodyError>() {
                kind = Some(match b {
                    RequestBodyError::Timeout(_) => BodyFault::Timeout,
                    RequestBodyError::TooLarge(_) => BodyFault::TooLarge,
                    RequestBodyError::Client(_) => BodyFault::Client,
                });
                break;
            }
            cause = e.source();
        }
        match (kind, self) {
            (
                Some(kind),
                ProxyError::UpstreamReset { source, .. }
                | ProxyError::UpstreamConnect { source, .. },
            ) => ProxyError::RequestBody { kind, source },
            (_, other) => other,
        }
    }
}

/// How one failure is presented to the client.
struct Presentation {
    status: StatusCode,
    code: &'static str,
    retry: bool,
}

const fn present(status: StatusCode, code: &'static str, retry: bool) -> Presentation {
    Presentation {
        status,
        code,
        retry,
    }
}

impl ProxyError {
    fn presentation(&self) -> Presentation {
        use StatusCode as S;
        match self {
            ProxyError::Edge(EdgeViolation::Connect) => {
                present(S::METHOD_NOT_ALLOWED, "method_not_allowed", false)
            }
            ProxyError::Edge(e) => present(S::BAD_REQUEST, e.code(), false),
            ProxyError::Session(ExtractError::Missing(_)) => {
                present(S::BAD_REQUEST, "missing_session", false)
            }
            ProxyError::Session(ExtractError::Invalid { .. }) => {
                present(S::BAD_REQUEST, "invalid_session", false)
            }
            ProxyError::Session(ExtractError::Token { .. }) => {
                present(S::UNAUTHORIZED, "invalid_session_token", false)
            }
            ProxyError::Session(ExtractError::Conflicting { .. }) => {
                present(S::BAD_REQUEST, "conflicting_session", false)
            }
            ProxyError::Admission(AdmissionError::SessionLimit(_)) => {
                present(S::SERVICE_UNAVAILABLE, "session_limit", true)
            }
            ProxyError::Admission(AdmissionError::RateLimited { .. }) => {
                present(S::TOO_MANY_REQUESTS, "rate_limited", true)
            }
            ProxyError::Pool(PoolError::NoPool) => present(S::NOT_FOUND, "no_pool", false),
            ProxyError::Pool(PoolError::Mismatch { .. }) => {
                present(S::CONFLICT, "pool_mismatch", false)
            }
            ProxyError::Activation(e) => match e {
                ActivationError::QueueFull(_) => {
                    present(S::SERVICE_UNAVAILABLE, "queue_full", true)
                }
                ActivationError::ShuttingDown => {
                    present(S::SERVICE_UNAVAILABLE, "shutting_down", true)
                }
                ActivationError::Timeout(_) => {
                    present(S::GATEWAY_TIMEOUT, "activation_timeout", false)
                }
                ActivationError::SandboxLost => present(S::BAD_GATEWAY, "sandbox_lost", false),
                ActivationError::Hook(_) => present(S::BAD_GATEWAY, "hook_failed", false),
                ActivationError::Backend(b) => backend_presentation(b),
            },
            ProxyError::Customize(_) => present(S::BAD_REQUEST, "invalid_customization", false),
            ProxyError::Preview(e) => present(e.status(), e.code(), false),
            ProxyError::UpstreamConnect { .. } => {
                present(S::BAD_GATEWAY, "upstream_connect", false)
            }
            ProxyError::UpstreamReset { .. } => present(S::BAD_GATEWAY, "upstream_reset", false),
            ProxyError::UpstreamProtocol(_) => present(S::BAD_GATEWAY, "upstream_protocol", false),
            ProxyError::UpstreamTimeout { .. } => {
                present(S::GATEWAY_TIMEOUT, "upstream_timeout", false)
            }
            ProxyError::BodyTooLarge(_)
            | ProxyError::RequestBody {
                kind: BodyFault::TooLarge,
                ..
            } => present(S::PAYLOAD_TOO_LARGE, "body_too_large", false),
            ProxyError::RequestBody {
                kind: BodyFault::Timeout,
                ..
            } => present(S::REQUEST_TIMEOUT, "body_timeout", false),
            ProxyError::RequestBody {
                kind: BodyFault::Client,
                ..
            } => present(S::BAD_REQUEST, "bad_request_body", false),
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.presentation().status
    }

    /// The stable machine-readable code in the JSON body.
    pub fn code(&self) -> &'static str {
        self.presentation().code
    }

    /// The message shown to clients: a session error explains the client's own input;
    /// every other failure gets the fixed message of its code, never the error's text.
    pub fn client_message(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ProxyError::Session(e) => e.to_string().into(),
            // The client's own request: what to fix (names a field, never a value).
            ProxyError::Edge(e) => e.to_string().into(),
            // Pool names are the operator's public vocabulary (the client selects by them).
            ProxyError::Pool(e) => e.to_string().into(),
            // Names the header, never its value.
            ProxyError::Customize(e) => e.to_string().into(),
            // Names only what the client sent (a port, its own host or token).
            ProxyError::Preview(e) => e.to_string().into(),
            other => client_message(other.code()).into(),
        }
    }

    /// The response for this failure; `retry_after` is sent with every 503 (a 429 carries
    /// the time until the client's next token instead).
    pub fn into_response<B: From<Bytes>>(self, retry_after: &HeaderValue) -> Response<B> {
        let p = self.presentation();
        let mut resp = error_response(p.status, p.code, &self.client_message());
        if let ProxyError::Admission(AdmissionError::RateLimited { retry_after }) = &self {
            // Rounded up: a client that waits exactly this long finds a token.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        } else if p.retry {
            resp.headers_mut().insert(RETRY_AFTER, retry_after.clone());
        }
        if p.status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110 15.5.6: a 405 lists what is allowed; every method but CONNECT is
            // forwarded to the sandbox.
            resp.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
            );
        }
        if p.status == StatusCode::UNAUTHORIZED && !matches!(self, ProxyError::Preview(_)) {
            // RFC 9110 15.5.2: a 401 names the scheme; the token travels wherever the
            // session sources say, not in Authorization, hence a private scheme name.
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Session-Token"),
            );
        }
        resp
    }
}

fn backend_presentation(e: &BackendError) -> Presentation {
    use StatusCode as S;
    match e {
        BackendError::NoCapacity(_) => present(S::SERVICE_UNAVAILABLE, "no_capacity", true),
        BackendError::Timeout(_) => present(S::GATEWAY_TIMEOUT, "activation_timeout", false),
        BackendError::Lost(_) => present(S::BAD_GATEWAY, "sandbox_lost", false),
        BackendError::Busy(_) => present(S::SERVICE_UNAVAILABLE, "sandbox_busy", true),
        BackendError::Unsupported(_) => present(S::NOT_IMPLEMENTED, "unsupported", false),
        BackendError::StartFailed(_) => present(S::BAD_GATEWAY, "sandbox_start_failed", false),
        BackendError::ControlPlane(_) => present(S::SERVICE_UNAVAILABLE, "control_plane", true),
        BackendError::Conflict(_) => present(S::SERVICE_UNAVAILABLE, "claim_conflict", false),
        BackendError::Rejected(_) => present(S::BAD_GATEWAY, "claim_rejected", false),
    }
}

/// The fixed client-facing message of each code. Session errors say what to fix (the
/// client's own input); everything about sandboxes and the control plane says only what
/// happened, the log has why.
fn client_message(code: &str) -> &'static str {
    match code {
        "missing_session" => "the request carries no session ID",
        "invalid_customization" => "a sandbox customisation header was refused",
        "invalid_session" => "the session ID is not valid",
        "session_limit" => "the activator serves as many sessions as it may; retry later",
        "rate_limited" => "too many new sessions from this client; retry later",
        "queue_full" => "too many requests are waiting for this session's sandbox; retry later",
        "shutting_down" => "the activator is shutting down; retry",
        "activation_timeout" => "the session's sandbox did not become ready in time",
        "sandbox_lost" => "the session's sandbox is gone",
        "hook_failed" => "the session's sandbox failed its pause/resume hook",
        "no_capacity" => "no sandbox is available; retry later",
        "sandbox_busy" => "the session's sandbox is busy; retry later",
        "unsupported" => "this operation is not supported by the backend",
        "sandbox_start_failed" => "the session's sandbox failed to start",
        "control_plane" => "the sandbox control plane is unavailable; retry later",
        "claim_rejected" => "the sandbox control plane refused the session's sandbox",
        "upstream_connect" => "cannot connect to the session's sandbox",
        "upstream_reset" => "the session's sandbox closed the connection before responding",
        "upstream_protocol" => "the session's sandbox sent a response that cannot be relayed",
        "upstream_timeout" => "the session's sandbox did not respond in time",
        "body_too_large" => "the request body is too large",
        "body_timeout" => "the request body was not received in time",
        "bad_request_body" => "the request body could not be read",
        _ => "the request failed",
    }
}

/// Status and code for a backend failure outside the request path (admin API).
pub fn backend_status(e: &BackendError) -> (StatusCode, &'static str) {
    let p = backend_presentation(e);
    (p.status, p.code)
}

/// The `Retry-After` value for `activation.retry_after` (whole seconds, at least 1).
pub fn retry_after_value(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    async fn body_json(resp: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn activation_errors_map_to_statuses() {
        let ra = retry_after_value(Duration::from_secs(2));
        let cases: Vec<(ActivationError, u16, &str, bool)> = vec![
            (
                ActivationError::QueueFull("session"),
                503,
                "queue_full",
                true,
            ),
            (ActivationError::ShuttingDown, 503, "shutting_down", true),
            (
                ActivationError::Timeout(Duration::from_secs(1)),
                504,
                "activation_timeout",
                false,
            ),
            (ActivationError::SandboxLost, 502, "sandbox_lost", false),
            (
                BackendError::NoCapacity("full".into()).into(),
                503,
                "no_capacity",
                true,
            ),
            (
                BackendError::ControlPlane("down".into()).into(),
                503,
                "control_plane",
                true,
            ),
            (
                BackendError::Timeout(Duration::from_secs(1)).into(),
                504,
                "activation_timeout",
                false,
            ),
            (
                BackendError::StartFailed("exit 1".into()).into(),
                502,
                "sandbox_start_failed",
                false,
            ),
        ];
        for (err, status, code, retry) in cases {
            let resp: Response<Full<Bytes>> = ProxyError::from(err).into_response(&ra);
            assert_eq!(resp.status().as_u16(), status, "{code}");
            assert_eq!(resp.headers().contains_key(RETRY_AFTER), retry, "{code}");
            if retry {
                assert_eq!(resp.headers()[RETRY_AFTER], "2");
            }
            let json = body_json(resp).await;
            assert_eq!(json["error"]["code"], code);
            assert!(json["error"]["message"].as_str().unwrap().len() > 3);
        }
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        assert_eq!(retry_after_value(Duration::from_millis(200)), "1");
    }
}
