//! `GET /api/events`: the transition event stream as server-sent events.
//!
//! Each stream is a spawned pump: it replays what the subscriber missed
//! (`Last-Event-ID`), then forwards live events into a small channel the response body
//! reads. The emitter never waits for it (see `crate::events`). A subscriber that falls a
//! whole ring behind (`lagged`) or takes no data for `telemetry.events.stall_timeout` while
//! some waits (`stalled`) has its connection cut, so it holds no memory and no slot; it can
//! reconnect with `Last-Event-ID` and is told with an `event: gap` if the ring has moved on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, mpsc};

use super::body::AdminBody;
use super::{AdminResponse, AdminState};
use crate::config::EventsConfig;
use crate::events::{Event, Subscription};
use crate::metrics::Metrics;
use crate::proxy::error::error_response;
use crate::shutdown::{Phase, Shutdown};

/// Chunks buffered between the pump and the connection, on top of the socket's buffers.
const CHANNEL_CHUNKS: usize = 64;

/// Handed to each admin request (a request extension): notifying it closes the request's
/// connection. The event pump uses it to cut a subscriber that does not keep up.
#[derive(Clone)]
pub struct ConnectionCut(pub Arc<Notify>);

/// Settings and the open-stream count for `GET /api/events`.
pub struct EventStreams {
    max: usize,
    stall_timeout: Duration,
    keepalive: Duration,
    open: Arc<AtomicUsize>,
}

impl EventStreams {
    /// From `telemetry.events.*`.
    pub fn new(config: &EventsConfig) -> EventStreams {
        EventStreams {
            max: config.max_subscribers,
            stall_timeout: config.stall_timeout.as_duration(),
            keepalive: config.keepalive.as_duration(),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// `GET /api/events`: resumes after `Last-Event-ID` (header, or `?last_event_id=` for
/// clients that cannot set headers), else starts with new events only. `?pool=NAME`: only
/// that pool's events (404 `unknown_pool` for a name no pool has).
pub fn events<B>(state: &AdminState, req: &Request<B>) -> AdminResponse {
    let after = match last_event_id(req) {
        Ok(after) => after,
        Err(msg) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid_last_event_id", &msg);
        }
    };
    let query = req.uri().query();
    // Without `pools:` the one pool's events carry no pool name: nothing to filter.
    let pool = match super::selected_pools(state, query) {
        Ok(p) if state.pools.is_named() && super::api::query_param(query, "pool").is_some() => {
            Some(p[0].name.clone())
        }
        Ok(_) => None,
        Err(resp) => return *resp,
    };
    let streams = &state.event_streams;
    let max = streams.max;
    if streams
        .open
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_err()
    {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            &format!("{max} event streams are open (telemetry.events.max_subscribers)"),
        );
    }
    let slot = Slot {
        open: streams.open.clone(),
        metrics: state.metrics.clone(),
    };
    slot.metrics.event_subscribers.inc();
    let subscription = state.pools.first().activator.events().subscribe(after);
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let pump = Pump {
        tx,
        cut: req.extensions().get::<ConnectionCut>().cloned(),
        stall_timeout: streams.stall_timeout,
        keepalive: streams.keepalive,
        shutdown: state.shutdown.clone(),
        pool,
        _slot: slot,
    };
    tokio::spawn(pump.run(subscription));

    let mut resp = Response::new(AdminBody::stream(rx));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar front proxies: do not buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn last_event_id<B>(req: &Request<B>) -> Result<Option<u64>, String> {
    let from_header = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("").trim().to_owned());
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("last_event_id="))
            .map(str::to_owned)
    });
    match from_header.or(from_query) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("Last-Event-ID must be an event sequence number, got {v:?}")),
    }
}

/// Holds one of `telemetry.events.max_subscribers` slots while a stream is open.
struct Slot {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.event_subscribers.dec();
    }
}

/// Why a pump stopped.
enum Stop {
    /// The client went away or the server is closing.
    Done,
    /// The subscriber did not keep up: `lagged` or `stalled`.
    Dropped(&'static str),
}

struct Pump {
    tx: mpsc::Sender<Bytes>,
    cut: Option<ConnectionCut>,
    stall_timeout: Duration,
    keepalive: Duration,
    shutdown: Shutdown,
    /// `?pool=`: only this pool's events are sent.
    pool: Option<Arc<str>>,
    _slot: Slot,
}

impl Pump {
    async fn run(self, sub: Subscription) {
        let stop = self.forward(sub).await;
        if let Stop::Dropped(reason) = stop {
            tracing::info!(reason, "event stream subscriber dropped: not keeping up");
            self._slot
                .metrics
                .event_subscribers_dropped
                .with_label_values(&[reason])
                .inc();
            if let Some(cut) = &self.cut {
                cut.0.notify_one();
            }
        }
    }

    async fn forward(&self, sub: Subscription) -> Stop {
        let Subscription {
            backlog,
            gap,
            mut live,
        } = sub;
        // EventSource reconnects after this many milliseconds.
        if let Err(stop) = self.send(Bytes::from_static(b"retry: 2000\n\n")).await {
            return stop;
        }
        if gap {
            let oldest = backlog.first().map_or(0, |e| e.seq);
            let msg = format!("event: gap\ndata: {{\"resumed_at\":{oldest}}}\n\n");
            if let Err(stop) = self.send(Bytes::from(msg)).await {
                return stop;
            }
        }
        for event in backlog.iter().filter(|e| self.wants(e)) {
            if let Err(stop) = self.send(frame(event)).await {
                return stop;
            }
        }
        let mut keepalive = tokio::time::interval(self.keepalive);
        keepalive.tick().await;
        loop {
            let chunk = tokio::select! {
                received = live.recv() => match received {
                    Ok(event) if self.wants(&event) => frame(&event),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => return Stop::Dropped("lagged"),
                    Err(RecvError::Closed) => return Stop::Done,
                },
                _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
                _ = self.tx.closed() => return Stop::Done,
                _ = self.shutdown.reached(Phase::Closed) => return Stop::Done,
            };
            if let Err(stop) = self.send(chunk).await {
                return stop;
            }
        }
    }

    /// Whether the subscriber asked for `event` (`?pool=`).
    fn wants(&self, event: &Event) -> bool {
        self.pool.is_none() || event.pool == self.pool
    }

    async fn send(&self, chunk: Bytes) -> Result<(), Stop> {
        match tokio::time::timeout(self.stall_timeout, self.tx.send(chunk)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Done),
            Err(_) => Err(Stop::Dropped("stalled")),
        }
    }
}

/// One SSE message: `id:` the sequence, `data:` the JSON event (one line).
fn frame(event: &Event) -> Bytes {
    let json = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("id: {}\ndata: {json}\n\n", event.seq))
}
