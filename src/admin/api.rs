//! `/api/sessions` and `/api/sandboxes`: inspect and steer sessions by their raw ID.

use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;
use serde_json::json;

use super::{AdminResponse, AdminState, json, selected_pools};
use crate::activation::{ActivationError, SessionCursor, SessionInfo};
use crate::backend::{BackendError, SandboxInfo};
use crate::proxy::error::{ProxyError, error_response};
use crate::session::SessionKey;

/// Longest page of `GET /api/sessions?limit=`.
const MAX_PAGE: usize = 1000;
/// Page length of `GET /api/sessions` without `limit`.
const DEFAULT_PAGE: usize = 100;

/// `GET /api/sessions?limit=&cursor=`: one page of sessions ordered by the SHA-256 of their
/// IDs, the table's total, and `next_cursor` (null on the last page) to pass as `cursor`
/// for the next. The walk over the table runs on a blocking thread, so a listing of
/// 500,000 sessions never holds up the workers that proxy requests. With several pools
/// (or `?pool=` for one) each pool's page is taken with the same cursor and limit and the
/// pages are merged by hash: a session lives in one pool, so the first `limit` of the
/// union are the page. Every row names its pool.
pub async fn sessions(state: &AdminState, query: Option<&str>) -> AdminResponse {
    let (after, limit) = match page(query) {
        Ok(p) => p,
        Err(msg) => return error_response(StatusCode::BAD_REQUEST, "invalid_query", &msg),
    };
    let pools: Vec<_> = match selected_pools(state, query) {
        Ok(p) => p
            .into_iter()
            .map(|p| (p.name.clone(), Arc::clone(&p.activator)))
            .collect(),
        Err(resp) => return *resp,
    };
    let walk = move || {
        let mut rows: Vec<(SessionCursor, PoolRow<SessionInfo>)> = Vec::new();
        let (mut total, mut more) = (0, false);
        for (pool, activator) in pools {
            let page = activator.sessions_page(after.as_ref(), limit);
            total += page.total;
            more |= page.next_cursor.is_some();
            rows.extend(page.cursors.into_iter().zip(page.sessions).map(|(c, row)| {
                let pool = pool.clone();
                (c, PoolRow { pool, row })
            }));
        }
        rows.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        if rows.len() > limit {
            rows.truncate(limit);
            more = true;
        }
        let next = if more {
            rows.last().map(|(c, _)| c.clone())
        } else {
            None
        };
        let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
        (rows, total, next)
    };
    let (rows, total, next) = match tokio::task::spawn_blocking(walk).await {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &format!("the listing failed: {e}"),
            );
        }
    };
    json(&json!({
        "sessions": rows,
        "total": total,
        "limit": limit,
        "next_cursor": next.as_ref().map(SessionCursor::as_str),
    }))
}

/// A row of a pool's table with the pool's name in front.
#[derive(Serialize)]
struct PoolRow<T: Serialize> {
    pool: Arc<str>,
    #[serde(flatten)]
    row: T,
}

/// The value of `name` in a query string.
pub(crate) fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// `cursor` and `limit` of a listing, or the message of its 400.
fn page(query: Option<&str>) -> Result<(Option<SessionCursor>, usize), String> {
    if query_param(query, "offset").is_some() {
        return Err(
            "offset is not supported: pass the previous page's next_cursor as cursor".into(),
        );
    }
    let limit = match query_param(query, "limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(l) if (1..=MAX_PAGE).contains(&l) => l,
            _ => {
                return Err(format!(
                    "limit must be an integer between 1 and {MAX_PAGE}, got {v:?}"
                ));
            }
        },
    };
    let cursor = match query_param(query, "cursor") {
        None | Some("") => None,
        Some(v) => match SessionCursor::parse(v) {
            Some(c) => Some(c),
            None => {
                return Err(
                    "cursor must be a next_cursor from a previous page (64 lowercase hex digits)"
                        .into(),
                );
            }
        },
    };
    Ok((cursor, limit))
}

/// `GET /api/sandboxes`; `?pool=` keeps one pool's. Every row names its pool.
pub fn sandboxes(state: &AdminState, query: Option<&str>) -> AdminResponse {
    let pools = match selected_pools(state, query) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let rows: Vec<PoolRow<SandboxInfo>> = pools
        .iter()
        .flat_map(|p| {
            p.backend.sandboxes().into_iter().map(|row| PoolRow {
                pool: p.name.clone(),
                row,
            })
        })
        .collect();
    json(&json!({ "sandboxes": rows }))
}

/// `GET /api/stats`: this replica's scaling signals; with `?pool=` one pool's (what a
/// leader's autoscaler for that pool collects), else every pool's summed.
pub fn stats(state: &AdminState, query: Option<&str>) -> AdminResponse {
    let pools = match selected_pools(state, query) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    let mut total = pools[0].autoscaler.snapshot();
    for p in &pools[1..] {
        total.add(&p.autoscaler.snapshot());
    }
    json(&total)
}

/// `GET /api/sessions/{id}`.
pub fn session(state: &AdminState, id: &str) -> AdminResponse {
    let key = match parse(state, id) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let found = state
        .pools
        .iter()
        .find_map(|p| p.activator.session(&key).map(|row| (p, row)));
    match found {
        Some((p, row)) => json(&PoolRow {
            pool: p.name.clone(),
            row,
        }),
        None => unknown(&key),
    }
}

/// An action on one session.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// `DELETE /api/sessions/{id}`: release now.
    Release,
    /// `POST /api/sessions/{id}/pause`.
    Pause,
    /// `POST /api/sessions/{id}/resume`.
    Resume,
}

impl Action {
    fn done(self) -> &'static str {
        match self {
            Action::Release => "released",
            Action::Pause => "paused",
            Action::Resume => "resumed",
        }
    }
}

/// Runs `action` on the session `id` (its raw ID, or with `?by=hash` the short hash the
/// listings show, which is what the dashboard knows).
pub async fn act(
    state: &AdminState,
    id: &str,
    query: Option<&str>,
    action: Action,
) -> AdminResponse {
    let key = match resolve(state, id, query).await {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let Some(pool) = state.pools.owner(&key) else {
        return unknown(&key);
    };
    let a = &pool.activator;
    let result = match action {
        Action::Release => a.release(&key).await,
        Action::Pause => a.pause(&key).await,
        Action::Resume => a.resume(&key).await,
    };
    outcome(state, &key, action.done(), result)
}

/// The key named in the path, by raw ID or (`?by=hash`) by short hash.
pub(super) async fn resolve(
    state: &AdminState,
    id: &str,
    query: Option<&str>,
) -> Result<SessionKey, Box<AdminResponse>> {
    match query_param(query, "by") {
        None | Some("id") => parse(state, id),
        Some("hash") => {
            // A scan of the table: off the proxy's workers like the listing.
            let activators: Vec<_> = state
                .pools
                .iter()
                .map(|p| Arc::clone(&p.activator))
                .collect();
            let hash = id.to_owned();
            let mut keys = tokio::task::spawn_blocking(move || {
                activators
                    .iter()
                    .flat_map(|a| a.keys_by_hash(&hash))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            match keys.len() {
                1 => Ok(keys.remove(0)),
                0 => Err(Box::new(error_response(
                    StatusCode::NOT_FOUND,
                    "unknown_session",
                    &format!("no session with hash {id}"),
                ))),
                n => Err(Box::new(error_response(
                    StatusCode::CONFLICT,
                    "ambiguous_hash",
                    &format!("{n} sessions share the hash {id}; use the raw ID"),
                ))),
            }
        }
        Some(other) => Err(Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            &format!("by must be id or hash, got {other:?}"),
        ))),
    }
}

/// The key named in the path, or the 400 to answer with (boxed: responses are large).
fn parse(state: &AdminState, id: &str) -> Result<SessionKey, Box<AdminResponse>> {
    SessionKey::parse(id, state.max_id_length).map_err(|e| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_session",
            &format!("invalid session id: {e}"),
        ))
    })
}

pub(super) fn unknown(key: &SessionKey) -> AdminResponse {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown_session",
        &format!("no session with hash {}", key.short_hash()),
    )
}

/// Maps the result of an admin action; pause conflicts are 409, unsupported actions 501.
fn outcome(
    state: &AdminState,
    key: &SessionKey,
    done: &str,
    result: Result<bool, ActivationError>,
) -> AdminResponse {
    let retry_after = &state.retry_after;
    match result {
        Ok(true) => json(&json!({ "session": key.short_hash(), done: true })),
        Ok(false) => unknown(key),
        Err(ActivationError::Backend(BackendError::Busy(sandbox))) => error_response(
            StatusCode::CONFLICT,
            "sandbox_busy",
            &format!("sandbox {sandbox} saw traffic elsewhere; not {done}"),
        ),
        Err(ActivationError::Hook(hook)) => error_response(
            StatusCode::CONFLICT,
            "hook_failed",
            &format!("the sandbox's {hook} hook failed (on_failure: abort); not {done}"),
        ),
        Err(ActivationError::Backend(BackendError::Unsupported(what))) => error_response(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            &format!("{what} is not supported by this backend"),
        ),
        Err(e) => ProxyError::from(e).into_response(retry_after),
    }
}

/// Largest `POST /api/sessions` body read.
const MINT_BODY_LIMIT: usize = 4096;
/// Bound on reading that body.
const MINT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `POST /api/sessions`: mints a token for the ID in `{"session": ID}`, or for a random
/// ID when the body is empty; answers `{"session": ID, "token": TOKEN, "expires_at": UNIX}`.
/// With `session.auth: none` the token is the ID itself (and `expires_at` is null). Creates
/// no session: the first request presenting the token does.
pub async fn mint(state: &AdminState, req: http::Request<hyper::body::Incoming>) -> AdminResponse {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), MINT_BODY_LIMIT);
    let body = match tokio::time::timeout(MINT_BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("the body must be at most {MINT_BODY_LIMIT} bytes"),
            );
        }
        Err(_) => {
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time",
            );
        }
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MintRequest {
        session: Option<String>,
    }
    let key = if body.trim_ascii().is_empty() {
        SessionKey::random()
    } else {
        let parsed: MintRequest = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    &format!("expected {{\"session\": ID}} or an empty body: {e}"),
                );
            }
        };
        match parsed.session {
            None => SessionKey::random(),
            Some(id) => match parse(state, &id) {
                Ok(k) => k,
                Err(resp) => return *resp,
            },
        }
    };
    let (token, expires_at) = match &state.signer {
        Some(signer) => {
            let expires = crate::session::now_unix().saturating_add(signer.ttl_secs());
            (signer.mint_at(&key, expires), Some(expires))
        }
        None => (key.as_str().to_owned(), None),
    };
    json(&json!({ "session": key.as_str(), "token": token, "expires_at": expires_at }))
}
