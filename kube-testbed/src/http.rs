//! The REST front of the store: discovery, CRUD, patch, `/scale`, list and watch over HTTP/1.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};

use crate::faults::Faults;
use crate::selector::Selector;
use crate::store::{ApiError, ResourceType, Store, StoredEvent};

type Body = BoxBody<Bytes, Infallible>;

/// What every request handler needs.
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub faults: Arc<Faults>,
    pub audit: Arc<crate::audit::Audit>,
    pub tokens: Arc<crate::token_review::Tokens>,
    /// How often an idle watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

/// Accepts connections until `stop` flips to true.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut accept_stop = stop.clone();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("testbed accept: {e}");
                    continue;
                }
            },
            _ = accept_stop.wait_for(|s| *s) => return,
        };
        let shared = shared.clone();
        let mut conn_stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = conn_stop.wait_for(|s| *s) => {}
            }
        });
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn ok(body: &Value) -> Response<Body> {
    full(StatusCode::OK, body)
}

fn error(e: &ApiError) -> Response<Body> {
    let mut r = full(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    );
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("0"));
    }
    r
}

fn injected(code: u16) -> ApiError {
    let reason = match code {
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    ApiError::new(code, reason, format!("injected failure ({code})"))
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if let Some(code) = shared.faults.take(method.as_str(), &path) {
        return error(&injected(code));
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default();
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    shared.audit.record(method.as_str(), &path, watching);
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(&ApiError::new(400, "BadRequest", e.to_string())),
    };
    shared.audit.record_body(method.as_str(), &path, &body);
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match route(shared, &method, &segs, &query, &content_type, &body) {
        Ok(Routed::Json(v)) => ok(&v),
        Ok(Routed::Created(v)) => full(StatusCode::CREATED, &v),
        Ok(Routed::Watch(w)) => watch_response(shared, w),
        Err(e) => error(&e),
    }
}

enum Routed {
    Json(Value),
    Created(Value),
    Watch(WatchRequest),
}

struct WatchRequest {
    res: usize,
    ty: ResourceType,
    namespace: Option<String>,
    since: Option<u64>,
    labels: Selector,
    fields: Selector,
    bookmarks: bool,
    timeout: Duration,
}

/// Where a resource path points.
struct Target<'a> {
    res: usize,
    ty: ResourceType,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

fn route(
    shared: &Shared,
    method: &Method,
    segs: &[&str],
    query: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Result<Routed, ApiError> {
    let store = &shared.store;
    // Discovery.
    match segs {
        ["version"] => {
            return Ok(Routed::Json(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-testbed",
                "platform": "linux/amd64"
            })));
        }
        ["api"] => {
            return Ok(Routed::Json(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": []
            })));
        }
        ["apis"] => return Ok(Routed::Json(crate::discovery::group_list(&store.types()))),
        ["apis", group] => {
            return crate::discovery::group(&store.types(), group).map(Routed::Json);
        }
        ["api", "v1"] => {
            return Ok(Routed::Json(crate::discovery::resource_list(
                &store.types(),
                "",
                "v1",
            )));
        }
        ["apis", group, version] => {
            return Ok(Routed::Json(crate::discovery::resource_list(
                &store.types(),
                group,
                version,
            )));
        }
        _ => {}
    }
    if let (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) = (method, segs)
    {
        return shared
            .tokens
            .review(&parse_json(body)?)
            .map(Routed::Created);
    }
    let t = target(store, segs)?;
    let ns = t.namespace.unwrap_or("");
    let labels = Selector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|m| ApiError::new(400, "BadRequest", m))?;
    let fields = Selector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|m| ApiError::new(400, "BadRequest", m))?;
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (method, t.name, t.subresource) {
        (&Method::GET, None, None) if is_watch => {
            let since = match query.get("resourceVersion").map(String::as_str) {
                None | Some("") | Some("0") => None,
                Some(v) => Some(v.parse::<u64>().map_err(|_| {
                    ApiError::new(400, "BadRequest", format!("bad resourceVersion {v:?}"))
                })?),
            };
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(1800);
            Ok(Routed::Watch(WatchRequest {
                res: t.res,
                ty: t.ty,
                namespace: t.namespace.map(str::to_owned),
                since,
                labels,
                fields,
                bookmarks: matches!(
                    query.get("allowWatchBookmarks").map(String::as_str),
                    Some("true" | "1")
                ),
                timeout: Duration::from_secs(timeout),
            }))
        }
        (&Method::GET, None, None) => {
            let (items, rv) = store.list(t.res, t.namespace, &labels, &fields);
            Ok(Routed::Json(json!({
                "kind": format!("{}List", t.ty.kind),
                "apiVersion": t.ty.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            })))
        }
        (&Method::POST, None, None) => {
            let obj = parse_json(body)?;
            store.create(t.res, ns, obj).map(Routed::Created)
        }
        (&Method::GET, Some(name), None | Some("status")) => {
            store.get(t.res, ns, name).map(Routed::Json)
        }
        (&Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let obj = parse_json(body)?;
            store.replace(t.res, ns, name, obj, sub).map(Routed::Json)
        }
        (&Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let patch = parse_json(body)?;
            store
                .update_with(t.res, ns, name, sub, |old| {
                    apply_patch(old, content_type, &patch)
                })
                .map(Routed::Json)
        }
        (&Method::DELETE, Some(name), None) => store.delete(t.res, ns, name).map(Routed::Json),
        (m, Some(name), Some("scale")) if t.ty.scale => {
            crate::discovery::scale(store, t.res, ns, name, m, content_type, body).map(Routed::Json)
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on this path by the testbed"),
        )),
    }
}

/// Parses `/apis/{g}/{v}[/namespaces/{ns}]/{plural}[/{name}[/{sub}]]` (or `/api/v1/...`).
fn target<'a>(store: &Store, segs: &[&'a str]) -> Result<Target<'a>, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let (res, ty) = store.find(group, version, plural).ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version} {plural})"
            ),
        )
    })?;
    Ok(Target {
        res,
        ty,
        namespace,
        name,
        subresource,
    })
}

pub(crate) fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("the body is not JSON: {e}")))
}

/// Applies a merge patch (also used for strategic-merge and apply patches, an
/// approximation documented in the README) or a JSON patch.
pub(crate) fn apply_patch(
    old: &Value,
    content_type: &str,
    patch: &Value,
) -> Result<Value, ApiError> {
    let mut new = old.clone();
    // The stored version is not a precondition unless the patch names one.
    new["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    if content_type.starts_with("application/json-patch+json") {
        let ops: json_patch::Patch = serde_json::from_value(patch.clone())
            .map_err(|e| ApiError::new(400, "BadRequest", format!("bad JSON patch: {e}")))?;
        // `test` ops on /metadata/resourceVersion must see the stored value.
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        json_patch::patch(&mut new, &ops)
            .map_err(|e| ApiError::new(422, "Invalid", format!("JSON patch failed: {e}")))?;
        if new["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"] {
            new["metadata"]
                .as_object_mut()
                .map(|m| m.remove("resourceVersion"));
        }
    } else if content_type.starts_with("application/merge-patch+json")
        || content_type.starts_with("application/strategic-merge-patch+json")
        || content_type.starts_with("application/apply-patch")
    {
        json_patch::merge(&mut new, patch);
    } else {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the testbed does not support patch type {content_type:?}"),
        ));
    }
    Ok(new)
}

fn watch_response(shared: &Shared, w: WatchRequest) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = shared.store.watch(w.res, w.since);
    let drops = shared.faults.drop_signal();
    let bookmark = shared.bookmark_interval;
    tokio::spawn(async move {
        match start {
            Ok(start) => stream_events(w, start.backlog, start.live, drops, bookmark, tx).await,
            Err(e) => {
                let line = json!({"type": "ERROR", "object": e.to_status()});
                let _ = tx.send(Bytes::from(format!("{line}\n"))).await;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(stream).boxed())
        .expect("valid response")
}

async fn stream_events(
    w: WatchRequest,
    backlog: Vec<StoredEvent>,
    mut live: broadcast::Receiver<StoredEvent>,
    mut drops: watch::Receiver<u64>,
    bookmark_every: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    drops.borrow_and_update();
    let mut last_rv = w.since.unwrap_or(0);
    let matches = |e: &StoredEvent| {
        e.resource == w.res
            && w.namespace.as_deref().is_none_or(|ns| ns == e.namespace)
            && w.labels.matches_labels(&e.object)
            && w.fields.matches_fields(&e.object)
    };
    for e in backlog {
        last_rv = last_rv.max(e.rv);
        if matches(&e) && send_event(&tx, &e).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::Instant::now() + w.timeout;
    let mut tick = tokio::time::interval(bookmark_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = live.recv() => match r {
                Ok(e) => {
                    if e.rv <= last_rv {
                        continue;
                    }
                    last_rv = e.rv;
                    if matches(&e) && send_event(&tx, &e).await.is_err() {
                        return;
                    }
                }
                // A slow watcher is cut off, as the real server does; it re-watches.
                Err(_) => return,
            },
            _ = drops.changed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tick.tick(), if w.bookmarks && last_rv > 0 => {
                let line = json!({"type": "BOOKMARK", "object": {
                    "kind": w.ty.kind, "apiVersion": w.ty.api_version(),
                    "metadata": {"resourceVersion": last_rv.to_string()}
                }});
                if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

async fn send_event(tx: &mpsc::Sender<Bytes>, e: &StoredEvent) -> Result<(), ()> {
    let line = json!({"type": e.kind.as_str(), "object": &*e.object});
    tx.send(Bytes::from(format!("{line}\n")))
        .await
        .map_err(|_| ())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
