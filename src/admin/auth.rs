//! Admin authentication: a bearer token from a file, compared in constant time, with a
//! list of public paths (metrics, probes) that stay open.

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, StatusCode};
use subtle::ConstantTimeEq;

use super::AdminResponse;
use crate::config::{AdminConfig, read_token};
use crate::proxy::error::error_response;

/// Who may call the admin API: nobody checks (no token configured) or bearer token.
pub struct AdminAuth {
    /// The expected token; `None` = authentication off.
    token: Option<Box<[u8]>>,
    public_paths: Box<[String]>,
}

impl AdminAuth {
    /// Builds the check from `admin.*`; reads the token file again (it was validated).
    pub fn new(config: &AdminConfig) -> Result<AdminAuth, String> {
        let token = match &config.auth.bearer_token_file {
            Some(file) => Some(read_token(file)?.into_bytes().into_boxed_slice()),
            None => None,
        };
        Ok(AdminAuth {
            token,
            public_paths: config.public_paths.clone().into_boxed_slice(),
        })
    }

    /// No authentication: every path is open (loopback-only setups, tests).
    pub fn open() -> AdminAuth {
        AdminAuth {
            token: None,
            public_paths: Box::new([]),
        }
    }

    /// `None` when the request may proceed, else the 401 to send.
    pub fn check<B>(&self, req: &Request<B>) -> Option<AdminResponse> {
        let expected = self.token.as_deref()?;
        let path = req.uri().path();
        // `/` is the dashboard's static page: it holds no data, and it must load to ask
        // for the token every call it then makes carries.
        if path == "/" || self.public_paths.iter().any(|p| p == path) {
            return None;
        }
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        // `ct_eq` on slices of different lengths returns false without comparing bytes;
        // the length of the token is not a secret worth hiding (it is in the deploy docs).
        if presented.is_some_and(|t| bool::from(t.ct_eq(expected))) {
            return None;
        }
        let mut resp = error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this admin endpoint needs Authorization: Bearer <token>",
        );
        resp.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"agent-activator-admin\""),
        );
        Some(resp)
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: &str) -> AdminAuth {
        AdminAuth {
            token: Some(token.as_bytes().into()),
            public_paths: vec!["/metrics".to_owned()].into_boxed_slice(),
        }
    }

    fn req(path: &str, authz: Option<&str>) -> Request<()> {
        let mut b = Request::get(path);
        if let Some(a) = authz {
            b = b.header(AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn token_paths_and_schemes() {
        let a = auth("s3cret");
        assert!(a.check(&req("/metrics", None)).is_none());
        assert!(
            a.check(&req("/api/sessions", Some("Bearer s3cret")))
                .is_none()
        );
        assert!(
            a.check(&req("/api/sessions", Some("bearer s3cret")))
                .is_none()
        );
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Basic s3cret"),
            Some("Bearer "),
        ] {
            let resp = a.check(&req("/api/sessions", bad)).expect("refused");
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        // Only exact public paths are open.
        assert!(a.check(&req("/metrics/x", None)).is_some());
        assert!(
            AdminAuth::open()
                .check(&req("/api/sessions", None))
                .is_none()
        );
    }
}
