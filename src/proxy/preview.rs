//! Preview requests: `{port}-{preview-id}.{domain}` routed to that port of the preview's
//! session's sandbox (see [`crate::preview`]).
//!
//! Checks, in order, each its own refusal: the host's form (400), the preview (404, 410
//! expired), the port allowlist (403), access (`token`: a token shown in the query is
//! exchanged for the cookie by a redirect that drops it from the URL; one shown in
//! `X-Preview-Token` or the cookie opens the request; 401 otherwise), the session (410 once
//! released). Then the request is leased like any of the session's (it counts as activity,
//! resumes a paused sandbox, waits in the same queue), cleaned of the token and cookie, and
//! dispatched to `SandboxBackend::port_endpoint` (502 when there is none).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, HOST, LOCATION, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};

use super::completion::Completion;
use super::error::ProxyError;
use super::{ClientBody, ClientConn, ProxyBody, Target};
use crate::backend::SandboxId;
use crate::config::PreviewAccess;
use crate::preview::access::{query_without_token, strip_credentials};
use crate::preview::{HostMatch, PREVIEW_COOKIE, Presented, Preview, PreviewError, Previews};
use crate::session::now_unix;

/// A request host under a preview domain: the pool whose domain it is and what it names.
pub(super) type Matched = (Arc<Previews>, Arc<str>, HostMatch);

/// Is the request for a preview host? Reads the URI authority (HTTP/2) or `Host`.
pub(super) fn matched(previews: &Arc<Previews>, uri: &Uri, headers: &HeaderMap) -> Option<Matched> {
    let host = match uri.host() {
        Some(h) => h,
        None => strip_port(headers.get(HOST)?.to_str().ok()?),
    };
    let (pool, m) = previews.match_host(host)?;
    if m == HostMatch::Malformed {
        tracing::debug!(host, "malformed preview host");
    }
    Some((previews.clone(), pool.clone(), m))
}

/// `example.com:8080` -> `example.com` (preview hosts are names, never IPv6 literals).
fn strip_port(host: &str) -> &str {
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

impl super::Proxy {
    /// Serves one preview request (see the module docs).
    pub(super) async fn forward_preview(
        &self,
        mut req: Request<ClientBody>,
        (previews, pool_name, matched): Matched,
        conn: &ClientConn,
        completion: &mut Completion,
        https: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(pool) = self.pools.get(&pool_name) else {
            return Err(PreviewError::Unknown.into());
        };
        if self.pools.is_named() {
            completion.set_pool_stats(&pool.stats);
        }
        let counter = &pool.metrics.preview_requests_total;
        let result = async {
            let (port, id) = match matched {
                HostMatch::Preview { port, id } => (port, id),
                HostMatch::Malformed => return Err(PreviewError::InvalidHost),
            };
            let preview = previews.get(id.as_str()).ok_or(PreviewError::Unknown)?;
            if preview.pool != pool_name {
                return Err(PreviewError::Unknown);
            }
            // Kept until a mint prunes it: it answers 410 meanwhile.
            if preview.expires_at <= now_unix() {
                return Err(PreviewError::Expired);
            }
            let settings = previews.pool(&pool_name).ok_or(PreviewError::Unknown)?;
            if !settings.config.ports.contains(&port) {
                return Err(PreviewError::PortNotAllowed(port));
            }
            let access = match settings.config.access {
                PreviewAccess::Public => Access::Open,
                PreviewAccess::Token => {
                    check_access(&previews, &preview, req.headers(), req.uri().query())?
                }
            };
            Ok((port, preview, access))
        }
        .await;
        let (port, preview, access) = match result {
            Ok(r) => r,
            Err(e) => {
                counter.with_label_values(&[e.code()]).inc();
                return Err(e.into());
            }
        };
        if access == Access::Exchange {
            counter.with_label_values(&["exchanged"]).inc();
            return Ok(exchange(&previews, &preview, req.uri(), https));
        }
        strip_credentials(req.headers_mut());
        let key = &preview.key;
        completion.set_session(key, None);
        let activator = &pool.activator;
        // Kept (until it expires) so that it keeps answering 410, not 404.
        let released = || {
            counter
                .with_label_values(&[PreviewError::SessionReleased.code()])
                .inc();
            ProxyError::from(PreviewError::SessionReleased)
        };
        if activator.entry_id(key) != Some(preview.entry) {
            return Err(released());
        }
        let lease = match activator.try_acquire_ready(key) {
            Some(lease) => lease,
            None => activator.acquire(key).await?,
        };
        // Released while this request waited: its lease is of a new incarnation.
        if activator.entry_id(key) != Some(preview.entry) {
            return Err(released());
        }
        let Some(endpoint) = pool.backend.port_endpoint(&lease.sandbox, port) else {
            let e = PreviewError::PortUnreachable;
            counter.with_label_values(&[e.code()]).inc();
            tracing::warn!(sandbox = %lease.sandbox, port, backend = pool.backend.kind(), "the backend cannot reach this preview port");
            return Err(e.into());
        };
        counter.with_label_values(&["forwarded"]).inc();
        let path = req.uri().path_and_query().and_then(without_token);
        let target = Target {
            key,
            path,
            endpoint,
            pool_key: SandboxId::new(format!("{}#{port}", lease.sandbox)),
        };
        let mut resp = self
            .dispatch(req, lease, target, conn, completion, None)
            .await?;
        if access == Access::SetCookie {
            resp.headers_mut()
                .append(SET_COOKIE, cookie(&previews, &preview, https));
        }
        Ok(resp)
    }
}

/// What an `access: token` preview request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Public, or the cookie is valid.
    Open,
    /// A valid token in `X-Preview-Token`: forwarded, and the cookie is set.
    SetCookie,
    /// A valid token in the query: answered by the exchange redirect.
    Exchange,
}

/// Checks the credentials of a request for `preview` (`access: token`). A token in the
/// query wins (a fresh link), then the header, then the cookie.
fn check_access(
    previews: &Previews,
    preview: &Preview,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Access, PreviewError> {
    let presented = Presented::read(headers, query);
    let opens = |t: &str| previews.token_opens(t.as_bytes(), &preview.id);
    if let Some(t) = &presented.query_token {
        return if opens(t) {
            Ok(Access::Exchange)
        } else {
            Err(PreviewError::InvalidToken)
        };
    }
    if let Some(t) = &presented.header_token {
        return if opens(t) {
            Ok(Access::SetCookie)
        } else {
            Err(PreviewError::InvalidToken)
        };
    }
    match &presented.cookie {
        Some(c) if previews.cookie_opens(c.as_bytes(), &preview.id) => Ok(Access::Open),
        Some(_) => Err(PreviewError::InvalidToken),
        None => Err(PreviewError::TokenRequired),
    }
}

/// The exchange: `303 See Other` to the same path without `preview_token`, setting the
/// cookie. Nothing reaches the sandbox; the token leaves the URL bar and the history, and
/// `Referrer-Policy: no-referrer` keeps it out of any `Referer`.
fn exchange(previews: &Previews, preview: &Preview, uri: &Uri, https: bool) -> Response<ProxyBody> {
    let location = uri
        .path_and_query()
        .and_then(without_token)
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let mut resp = Response::new(ProxyBody::from(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(LOCATION, v);
    }
    h.insert(SET_COOKIE, cookie(previews, preview, https));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The host-only (no `Domain`), `HttpOnly` preview cookie, living as long as the preview.
fn cookie(previews: &Previews, preview: &Preview, https: bool) -> HeaderValue {
    let max_age = Previews::remaining(preview).as_secs();
    let secure = if https { "; Secure" } else { "" };
    let v = format!(
        "{PREVIEW_COOKIE}={}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
        previews.cookie_value(preview)
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("activator-preview="))
}

/// `pq` without a `preview_token` query pair, or `None` when it has none.
fn without_token(pq: &PathAndQuery) -> Option<PathAndQuery> {
    let query = pq.query()?;
    if !query
        .split('&')
        .any(|kv| kv.split_once('=').map_or(kv, |(n, _)| n) == crate::preview::PREVIEW_TOKEN_PARAM)
    {
        return None;
    }
    let rebuilt = match query_without_token(query) {
        Some(q) => format!("{}?{q}", pq.path()),
        None => pq.path().to_owned(),
    };
    rebuilt.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_leaves_the_path_and_nothing_else_does() {
        let pq = |s: &str| s.parse::<PathAndQuery>().unwrap();
        assert_eq!(without_token(&pq("/a?x=1")), None);
        assert_eq!(without_token(&pq("/a")), None);
        assert_eq!(
            without_token(&pq("/a?preview_token=t&x=1"))
                .unwrap()
                .as_str(),
            "/a?x=1"
        );
        assert_eq!(
            without_token(&pq("/a/b?preview_token=t")).unwrap().as_str(),
            "/a/b"
        );
        assert_eq!(
            strip_port("5173-x.preview.localhost:8080"),
            "5173-x.preview.localhost"
        );
    }
}
