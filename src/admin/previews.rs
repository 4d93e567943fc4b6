//! `/api/sessions/{id}/previews`: mint, list and revoke a session's preview URLs.

use std::collections::BTreeMap;

use http::StatusCode;
use serde_json::json;

use super::api::{resolve, unknown};
use super::{AdminResponse, AdminState, json};
use crate::pool::Pool;
use crate::preview::{MintError, PREVIEW_TOKEN_PARAM, Preview, Previews};
use crate::proxy::error::error_response;
use crate::session::SessionKey;

/// The session named in the path, its pool, its table entry and the previews; or the
/// answer (404 unknown session, 409 when no pool has previews).
async fn target<'s>(
    state: &'s AdminState,
    id: &str,
    query: Option<&str>,
) -> Result<(SessionKey, &'s Pool, u64, &'s Previews), Box<AdminResponse>> {
    let key = resolve(state, id, query).await?;
    let Some(pool) = state.pools.owner(&key) else {
        return Err(Box::new(unknown(&key)));
    };
    let Some(entry) = pool.activator.entry_id(&key) else {
        return Err(Box::new(unknown(&key)));
    };
    let Some(previews) = state.previews.as_deref() else {
        return Err(Box::new(disabled(&pool.name)));
    };
    Ok((key, pool, entry, previews))
}

fn disabled(pool: &str) -> AdminResponse {
    error_response(
        StatusCode::CONFLICT,
        "previews_disabled",
        &format!("pool {pool} has no preview section"),
    )
}

/// `{port: url}` of a preview.
fn urls(previews: &Previews, preview: &Preview) -> BTreeMap<String, String> {
    previews
        .urls(preview)
        .into_iter()
        .map(|(port, url)| (port.to_string(), url))
        .collect()
}

/// `POST /api/sessions/{id}/previews` -> 201 `{preview, pool, session, urls, expires_at}`,
/// with `access: token` also `token` (shown only here) and `links` (each URL with
/// `?preview_token=`, to open in a browser once).
pub async fn mint(state: &AdminState, id: &str, query: Option<&str>) -> AdminResponse {
    let (key, pool, entry, previews) = match target(state, id, query).await {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let minted = match previews.mint(&pool.name, &key, entry) {
        Ok(m) => m,
        Err(MintError::Disabled(p)) => return disabled(&p),
        Err(e @ MintError::PerSession(_)) => {
            return error_response(StatusCode::CONFLICT, "too_many_previews", &e.to_string());
        }
        Err(e @ MintError::Full) => {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_previews",
                &e.to_string(),
            );
        }
    };
    let p = &minted.preview;
    tracing::info!(session = %p.session, pool = %p.pool, preview = %p.id, expires_at = p.expires_at, "preview minted");
    let urls = urls(previews, p);
    let links = minted.token.as_ref().map(|t| {
        urls.iter()
            .map(|(port, url)| (port.clone(), format!("{url}?{PREVIEW_TOKEN_PARAM}={t}")))
            .collect::<BTreeMap<_, _>>()
    });
    let mut resp = json(&json!({
        "preview": p.id,
        "pool": p.pool,
        "session": p.session,
        "urls": urls,
        "expires_at": p.expires_at,
        "token": minted.token,
        "links": links,
    }));
    *resp.status_mut() = StatusCode::CREATED;
    resp
}

/// `GET /api/sessions/{id}/previews` -> `{"previews": [...]}`: the live ones, oldest
/// first, without tokens.
pub async fn list(state: &AdminState, id: &str, query: Option<&str>) -> AdminResponse {
    let (key, _pool, entry, previews) = match target(state, id, query).await {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let rows: Vec<_> = previews
        .list(&key, entry)
        .iter()
        .map(|p| {
            json!({
                "preview": p.id,
                "pool": p.pool,
                "session": p.session,
                "urls": urls(previews, p),
                "created_at": p.created_at,
                "expires_at": p.expires_at,
            })
        })
        .collect();
    json(&json!({ "previews": rows }))
}

/// `DELETE /api/sessions/{id}/previews/{preview}` -> `{"revoked": true}`: its URL, token
/// and cookies stop working at once.
pub async fn revoke(
    state: &AdminState,
    id: &str,
    preview: &str,
    query: Option<&str>,
) -> AdminResponse {
    let (key, _pool, entry, previews) = match target(state, id, query).await {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let owned = previews
        .get(preview)
        .is_some_and(|p| p.key == key && p.entry == entry);
    if !owned || !previews.remove(preview) {
        return error_response(
            StatusCode::NOT_FOUND,
            "unknown_preview",
            "the session has no such preview",
        );
    }
    tracing::info!(session = %key.short_hash(), preview, "preview revoked");
    json(&json!({ "preview": preview, "revoked": true }))
}
