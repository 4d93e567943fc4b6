//! The demo sandbox: a small stateful HTTP server that proves pinning, isolation and
//! freeze/resume (run as `agent-activator demo-sandbox --port N`).
//!
//! It keeps in-memory state (a counter, a request history, every session ID it has seen,
//! a background tick counter) and reports a random per-process `instance` ID (and its PID),
//! so tests and people can see that one session always lands on one process and that state
//! survives a freeze. Identify sandboxes by `instance`, not `pid`: inside a PID namespace
//! (`backend.isolation: namespaces`) every sandbox sees itself as the same small PID.
//!
//! Routes:
//! - `GET /healthz`: `ok`.
//! - `GET /state`: JSON `{instance, pid, port, counter, ticks, requests, sessions_seen, history, uptime_seconds}`.
//! - `POST /counter`: increments the counter, returns `{"counter": N, "instance": I, "pid": P}`.
//! - `GET /sse?n=N&interval_ms=M`: a server-sent-events token stream of N events.
//! - `GET /ws`: WebSocket echo.
//! - `GET /slow?ms=N`: answers after N milliseconds.
//! - `POST /echo`: streams the request body back.
//! - `POST /hooks/{name}`: records `name` (the activator's pause/resume hooks; `/state`
//!   lists them in `hooks`) and answers 200, or `?status=N` (an aborting hook's test).
//! - anything else: JSON `{method, path, query, session, instance, pid, port}` (`port`: the
//!   listener that answered).
//!
//! With `--dev-port N` it also serves the same routes on port N, where `GET /` is a small
//! "dev server" page whose script opens a WebSocket back to its own host (as a dev
//! server's hot reload does) and shows what it echoes: what a preview URL opens.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock::MutexExt;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// How many history entries are kept (oldest dropped first).
const HISTORY_LEN: usize = 100;
/// Longest `/slow` and `/sse` run accepted, so a bad query cannot pin a task forever.
const MAX_WAIT_MS: u64 = 600_000;
/// Most SSE events one request may ask for.
const MAX_SSE_EVENTS: u64 = 100_000;

type DemoBody = BoxBody<Bytes, hyper::Error>;

/// Options of `agent-activator demo-sandbox`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// TCP port on 127.0.0.1; 0 picks a free one (printed on stdout).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Period of the background tick counter (0 disables it); it stops while frozen.
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Also serve on this port (same host; 0 picks a free one, printed on stdout as
    /// `dev server on ADDR`), with a dev-server page at `/`.
    #[arg(long)]
    pub dev_port: Option<u16>,
}

/// The sandbox's in-memory state.
struct DemoState {
    port: u16,
    /// 16 random hex characters, fixed for the life of the process.
    instance: String,
    pid: u32,
    started: Instant,
    counter: AtomicU64,
    ticks: AtomicU64,
    requests: AtomicU64,
    /// Guarded by a std Mutex: held only to insert or copy, never across an await.
    sessions_seen: Mutex<BTreeSet<String>>,
    history: Mutex<VecDeque<String>>,
    /// Hook names received (`POST /hooks/{name}`), oldest first, at most `HISTORY_LEN`.
    hooks: Mutex<VecDeque<String>>,
}

/// Binds, prints `listening on ADDR` on stdout, and serves until the process ends.
pub async fn run(opts: DemoOptions) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(opts.host, opts.port)).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(DemoState {
        port: addr.port(),
        instance: format!("{:016x}", rand::random::<u64>()),
        pid: std::process::id(),
        started: Instant::now(),
        counter: AtomicU64::new(0),
        ticks: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        sessions_seen: Mutex::new(BTreeSet::new()),
        history: Mutex::new(VecDeque::with_capacity(HISTORY_LEN)),
        hooks: Mutex::new(VecDeque::new()),
    });
    if opts.tick_ms > 0 {
        let st = state.clone();
        let period = Duration::from_millis(opts.tick_ms);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(period);
            loop {
                iv.tick().await;
                st.ticks.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let dev = match opts.dev_port {
        Some(port) => Some(TcpListener::bind(SocketAddr::new(opts.host, port)).await?),
        None => None,
    };
    let mut out = tokio::io::stdout();
    out.write_all(format!("listening on {addr}\n").as_bytes())
        .await?;
    if let Some(dev) = &dev {
        let dev_addr = dev.local_addr()?;
        out.write_all(format!("dev server on {dev_addr}\n").as_bytes())
            .await?;
    }
    out.flush().await?;
    if let Some(dev) = dev {
        tokio::spawn(serve(dev, state.clone(), true));
    }
    serve(listener, state, false).await
}

/// Accepts and serves connections on `listener` until the process ends; `dev`: the
/// dev-server port.
async fn serve(listener: TcpListener, state: Arc<DemoState>, dev: bool) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("demo-sandbox: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(st.clone(), req, port, dev));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    st: Arc<DemoState>,
    req: Request<Incoming>,
    port: u16,
    dev: bool,
) -> Result<Response<DemoBody>, Infallible> {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let session = req
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(s) = &session {
        st.sessions_seen.lock_recovered().insert(s.clone());
    }
    {
        let mut h = st.history.lock_recovered();
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(format!("{} {}", req.method(), req.uri().path()));
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    // Shown back so tests (and curious users) see the trace context the activator passed.
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") if dev => dev_page(port),
        (&Method::POST, p) if p.starts_with("/hooks/") => hook(&st, &p["/hooks/".len()..], &query),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/state") => state_json(&st),
        (&Method::POST, "/counter") => {
            let n = st.counter.fetch_add(1, Ordering::SeqCst) + 1;
            json_response(
                StatusCode::OK,
                &json!({ "counter": n, "instance": st.instance, "pid": st.pid }),
            )
        }
        (&Method::GET, "/sse") => sse(&query),
        (&Method::GET, "/ws") => websocket(req),
        (&Method::GET, "/slow") => {
            let ms = query_u64(&query, "ms").unwrap_or(1000).min(MAX_WAIT_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json_response(
                StatusCode::OK,
                &json!({ "slept_ms": ms, "instance": st.instance, "pid": st.pid }),
            )
        }
        (&Method::POST, "/echo") => {
            let mut resp = Response::new(req.into_body().boxed());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        (m, p) => json_response(
            StatusCode::OK,
            &json!({
                "method": m.as_str(),
                "path": p,
                "query": query,
                "session": session,
                "instance": st.instance,
                "pid": st.pid,
                "port": port,
                "traceparent": traceparent,
            }),
        ),
    };
    Ok(resp)
}

/// `POST /hooks/{name}`: records the hook; answers `?status=` (default 200).
fn hook(st: &DemoState, name: &str, query: &str) -> Response<DemoBody> {
    let name: String = name.chars().take(64).collect();
    {
        let mut h = st.hooks.lock_recovered();
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(name.clone());
    }
    let status = query_u64(query, "status")
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    json_response(status, &json!({ "hook": name, "instance": st.instance }))
}

/// The dev server's page: it opens a WebSocket to its own host (hot reload's shape) and
/// shows the echo of a greeting, so a browser proves the preview carries both.
fn dev_page(port: u16) -> Response<DemoBody> {
    let html = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>dev server {port}</title></head>
<body><h1>dev server on port {port}</h1>
<p id="ws">websocket: connecting</p>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => ws.send("hello from " + location.host);
ws.onmessage = (e) => {{ document.getElementById("ws").textContent = "websocket: " + e.data; }};
ws.onerror = () => {{ document.getElementById("ws").textContent = "websocket: error"; }};
</script></body></html>
"#
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)).map_err(|e| match e {}).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn state_json(st: &DemoState) -> Response<DemoBody> {
    let sessions: Vec<String> = st.sessions_seen.lock_recovered().iter().cloned().collect();
    let history: Vec<String> = st.history.lock_recovered().iter().cloned().collect();
    json_response(
        StatusCode::OK,
        &json!({
            "instance": st.instance,
            "pid": st.pid,
            "port": st.port,
            "counter": st.counter.load(Ordering::SeqCst),
            "ticks": st.ticks.load(Ordering::Relaxed),
            "requests": st.requests.load(Ordering::Relaxed),
            "sessions_seen": sessions,
            "history": history,
            "hooks": st.hooks.lock_recovered().iter().cloned().collect::<Vec<_>>(),
            "uptime_seconds": st.started.elapsed().as_secs_f64(),
        }),
    )
}

/// `n` events `data: token-i`, one every `interval_ms`, then `event: done`.
fn sse(query: &str) -> Response<DemoBody> {
    let n = query_u64(query, "n").unwrap_or(10).min(MAX_SSE_EVENTS);
    let interval = Duration::from_millis(
        query_u64(query, "interval_ms")
            .unwrap_or(50)
            .min(MAX_WAIT_MS),
    );
    let events = futures_util::stream::unfold(0u64, move |i| async move {
        if i > n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let chunk = if i == n {
            Bytes::from_static(b"event: done\ndata: end\n\n")
        } else {
            Bytes::from(format!("data: token-{i}\n\n"))
        };
        Some((Ok::<_, hyper::Error>(Frame::data(chunk)), i + 1))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(events)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    resp
}

/// Accepts a WebSocket upgrade and echoes every text/binary message.
fn websocket(mut req: Request<Incoming>) -> Response<DemoBody> {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !is_upgrade {
        return text(StatusCode::BAD_REQUEST, "expected Upgrade: websocket\n");
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header::HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    resp
}

fn query_u64(query: &str, name: &str) -> Option<u64> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn empty() -> DemoBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, body: &'static str) -> Response<DemoBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<DemoBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(value.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::query_u64;

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64("n=5&interval_ms=10", "n"), Some(5));
        assert_eq!(query_u64("n=5&interval_ms=10", "interval_ms"), Some(10));
        assert_eq!(query_u64("n=x", "n"), None);
        assert_eq!(query_u64("", "n"), None);
    }
}
