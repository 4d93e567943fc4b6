//! The admin listener: `/metrics`, `/healthz`, `/readyz`, the JSON API under `/api/`, the
//! event stream (`/api/events`) and the dashboard (`/`).
//!
//! Separate from the proxy port so it can be firewalled and keeps answering (metrics,
//! readiness 503) while the proxy drains. Routing is one `match` in [`route`]: a new
//! endpoint is one arm there plus its handler.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use nix::sys::socket::{setsockopt, sockopt};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::backend::SandboxState;
use crate::metrics::Metrics;
use crate::pool::{Pool, Pools};
use crate::proxy::error::error_response;
use crate::shutdown::{Phase, Shutdown};
use crate::stats::TrafficStats;

mod api;
mod auth;
mod body;
mod dashboard;
mod previews;
mod stream;

use api::Action;
pub use auth::AdminAuth;
pub use body::AdminBody;
pub use stream::{ConnectionCut, EventStreams};

/// `SO_SNDBUF` of admin connections (the kernel doubles it for bookkeeping).
const ADMIN_SEND_BUFFER: usize = 64 * 1024;

/// An admin response.
pub type AdminResponse = Response<AdminBody>;

/// What admin handlers can see.
pub struct AdminState {
    /// Every pool: its sessions, sandboxes, signals and metrics.
    pub pools: Arc<Pools>,
    /// The server-wide registry (with `pools:` the pools' registries are merged into it).
    pub metrics: Arc<Metrics>,
    pub stats: Arc<TrafficStats>,
    pub shutdown: Shutdown,
    /// `session.max_id_length`, to validate IDs in paths.
    pub max_id_length: usize,
    /// `session.auth: hmac`'s signer, for `POST /api/sessions` (minting tokens).
    pub signer: Option<Arc<crate::session::TokenSigner>>,
    /// `Retry-After` for 503 answers (`activation.retry_after`).
    pub retry_after: HeaderValue,
    /// `GET /api/events` settings and open streams.
    pub event_streams: EventStreams,
    /// `admin.auth`: checked before routing.
    pub auth: AdminAuth,
    /// Preview URLs (`None` when no pool has `preview`).
    pub previews: Option<Arc<crate::preview::Previews>>,
}

/// Dispatches one admin request.
pub async fn route(state: &AdminState, req: Request<Incoming>) -> AdminResponse {
    // The one route that reads a body: it takes the request, so it is matched first.
    if req.method() == Method::POST && req.uri().path().trim_end_matches('/') == "/api/sessions" {
        return api::mint(state, req).await;
    }
    let path = req.uri().path().trim_end_matches('/');
    let query = req.uri().query();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, []) => dashboard::page(),
        (&Method::GET, ["api", "overview"]) => dashboard::overview(state, query),
        (&Method::GET, ["metrics"]) => metrics(state, wants_openmetrics(&req)),
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["readyz"]) => readyz(state),
        (&Method::GET, ["api", "sessions"]) => api::sessions(state, query).await,
        (&Method::GET, ["api", "sessions", id]) => api::session(state, id),
        (&Method::DELETE, ["api", "sessions", id]) => {
            api::act(state, id, query, Action::Release).await
        }
        (&Method::POST, ["api", "sessions", id, "pause"]) => {
            api::act(state, id, query, Action::Pause).await
        }
        (&Method::POST, ["api", "sessions", id, "resume"]) => {
            api::act(state, id, query, Action::Resume).await
        }
        (&Method::POST, ["api", "sessions", id, "previews"]) => {
            previews::mint(state, id, query).await
        }
        (&Method::GET, ["api", "sessions", id, "previews"]) => {
            previews::list(state, id, query).await
        }
        (&Method::DELETE, ["api", "sessions", id, "previews", preview]) => {
            previews::revoke(state, id, preview, query).await
        }
        (&Method::GET, ["api", "sandboxes"]) => api::sandboxes(state, query),
        (&Method::GET, ["api", "stats"]) => api::stats(state, query),
        (&Method::GET, ["api", "events"]) => stream::events(state, &req),
        (
            _,
            ["metrics" | "healthz" | "readyz"]
            | [
                "api",
                "sessions" | "sandboxes" | "stats" | "events" | "overview",
                ..,
            ],
        ) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{} is not allowed on {path}", req.method()),
        ),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint at {path}"),
        ),
    }
}

/// The scraper asked for OpenMetrics (Prometheus does when exemplar storage is on).
fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers().get_all(http::header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.contains("application/openmetrics-text"))
    })
}

/// Refreshes the table-derived gauges, then renders every metric (OpenMetrics, with
/// exemplars, when asked for).
fn metrics(state: &AdminState, openmetrics: bool) -> AdminResponse {
    for pool in state.pools.iter() {
        refresh_gauges(pool);
    }
    let m = &state.metrics;
    let (body, content_type) = if openmetrics {
        (
            m.encode_openmetrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (m.encode(), "text/plain; version=0.0.4; charset=utf-8")
    };
    let mut resp = Response::new(AdminBody::from(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Sets a pool's table-derived gauges (`activator_sessions`, `activator_sandboxes`,
/// `activator_warm_pool_ready`) from its table and backend.
fn refresh_gauges(pool: &Pool) {
    let m = &pool.metrics;
    m.sessions.reset();
    for (s, n) in pool.activator.session_counts() {
        m.sessions.with_label_values(&[s]).set(n);
    }
    let counts = pool.backend.sandbox_counts();
    for s in SandboxState::ALL {
        let n = counts.get(s);
        m.sandboxes
            .with_label_values(&[s.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        if s == SandboxState::Warm {
            m.warm_pool_ready.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// The pools a `?pool=` query names (all without one), or the 404 to answer with.
pub(crate) fn selected_pools<'a>(
    state: &'a AdminState,
    query: Option<&str>,
) -> Result<Vec<&'a Arc<Pool>>, Box<AdminResponse>> {
    match api::query_param(query, "pool") {
        None => Ok(state.pools.iter().collect()),
        Some(name) => match state.pools.get(name) {
            Some(p) => Ok(vec![p]),
            None => Err(Box::new(error_response(
                StatusCode::NOT_FOUND,
                "unknown_pool",
                &format!("no pool named {name:?}"),
            ))),
        },
    }
}

fn readyz(state: &AdminState) -> AdminResponse {
    if state.shutdown.is_draining() {
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the activator is draining",
        )
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut resp = Response::new(AdminBody::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A 200 JSON response.
pub fn json<T: Serialize>(value: &T) -> AdminResponse {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(AdminBody::from(Bytes::from(body)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot encode the response: {e}"),
        ),
    }
}

/// Serves the admin API until the shutdown reaches `Closed` (it keeps answering while
/// the proxy drains, so readiness reports 503 and metrics stay scrapeable).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let shutdown = state.shutdown.clone();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.reached(Phase::Closed) => break,
        };
        // A bounded send buffer (kernel autotuning would grow it to megabytes): an event
        // subscriber that stops reading pins at most this much kernel memory, and its
        // stall shows within ~100 KiB of events rather than thousands of them.
        if let Err(e) = setsockopt(&stream, sockopt::SndBuf, &ADMIN_SEND_BUFFER) {
            tracing::debug!(error = %e, "cannot bound the admin connection's send buffer");
        }
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let closed = state.shutdown.clone();
            // Lets a handler close this connection (an event subscriber that fell behind).
            let cut = ConnectionCut(Arc::new(tokio::sync::Notify::new()));
            let cut_here = cut.0.clone();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let state = state.clone();
                req.extensions_mut().insert(cut.clone());
                async move {
                    if let Some(refused) = state.auth.check(&req) {
                        return Ok::<_, Infallible>(refused);
                    }
                    Ok::<_, Infallible>(route(&state, req).await)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = closed.reached(Phase::Closed) => {}
                _ = cut_here.notified() => {}
            }
        });
    }
}
