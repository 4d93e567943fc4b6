//! `GET /api/events` over real sockets: events arrive in order with their sequence,
//! `Last-Event-ID` resumes from the ring, and a subscriber that stops reading is cut
//! without slowing the proxy.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use agent_activator::server::RunningServer;

use crate::support;

use support::{EchoUpstream, HttpClient, WAIT};

/// One parsed server-sent event.
#[derive(Debug)]
pub(crate) struct Sse {
    pub(crate) id: Option<u64>,
    pub(crate) event: Option<String>,
    pub(crate) data: Value,
}

/// Reads SSE messages from a streaming response body.
pub(crate) struct SseReader {
    body: Incoming,
    buf: String,
}

impl SseReader {
    fn new(resp: http::Response<Incoming>) -> SseReader {
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            resp.headers()
        );
        SseReader {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next message with a `data:` line (comments and `retry:` are skipped).
    pub(crate) async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("JSON data"));
                    }
                }
                if let Some(data) = data {
                    return Sse { id, event, data };
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an event within the wait bound")
                .expect("the stream is still open")
                .expect("a body frame");
            if let Ok(data) = frame.into_data() {
                self.buf
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }

    /// The next `n` transition events (messages with an `id:`).
    async fn take(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let m = self.next().await;
            if m.id.is_some() {
                out.push(m);
            }
        }
        out
    }
}

pub(crate) async fn subscribe(admin: &HttpClient, last_event_id: Option<&str>) -> SseReader {
    subscribe_to(admin, "/api/events", last_event_id).await
}

/// [`subscribe`] to `path` (e.g. `/api/events?pool=NAME`).
pub(crate) async fn subscribe_to(
    admin: &HttpClient,
    path: &str,
    last_event_id: Option<&str>,
) -> SseReader {
    let mut req = admin.request("GET", path);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    SseReader::new(
        admin
            .send_streaming(req.body(Full::new(Bytes::new())).unwrap())
            .await,
    )
}

async fn start(upstream: &EchoUpstream, extra: &str) -> RunningServer {
    let yaml = format!(
        "{}session:\n  max_sessions_per_sandbox: 100000\nautoscaler:\n  enabled: false\n{extra}",
        support::static_backend(&[upstream.addr])
    );
    support::start(&yaml).await
}

fn hash(id: &str) -> String {
    agent_activator::session::SessionKey::parse(id, 128)
        .unwrap()
        .short_hash()
}

fn kinds(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn transitions_arrive_in_order_with_increasing_ids_and_hashed_sessions() {
    let upstream = EchoUpstream::start().await;
    let server = start(&upstream, "").await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let mut sse = subscribe(&admin, None).await;

    let first = proxy.get("/", &[("x-session-id", "alice-1")]).await;
    assert_eq!(first.status, 200);
    let released = admin
        .send(
            admin
                .request("DELETE", "/api/sessions/alice-1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text());
    assert_eq!(
        proxy.get("/", &[("x-session-id", "alice-1")]).await.status,
        200
    );

    let events = sse.take(5).await;
    assert_eq!(
        kinds(&events),
        ["queued", "claimed", "released", "queued", "claimed"]
    );
    let ids: Vec<u64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    for e in &events {
        assert_eq!(e.data["seq"], e.id.unwrap());
        assert_eq!(e.data["session"], hash("alice-1"), "hash only: {}", e.data);
        assert!(!e.data.to_string().contains("alice-1"), "{}", e.data);
    }
    assert_eq!(events[0].data["reason"], "claim");
    let claimed = &events[1].data;
    assert_eq!(claimed["sandbox"], upstream.addr.to_string());
    assert_eq!(claimed["activation"], "claim");
    assert!(claimed["wait_ms"].as_f64().unwrap() >= 0.0, "{claimed}");
    assert_eq!(events[2].data["reason"], "admin");
    server.shutdown().await;
}

#[tokio::test]
async fn last_event_id_resumes_from_the_ring_and_reports_a_gap_past_it() {
    let upstream = EchoUpstream::start().await;
    let server = start(&upstream, "telemetry:\n  events:\n    buffer: 4\n").await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    // Three sessions: queued + claimed each, events 1..=6; the ring keeps 3..=6.
    for s in ["a", "b", "c"] {
        assert_eq!(proxy.get("/", &[("x-session-id", s)]).await.status, 200);
    }

    let mut resumed = subscribe(&admin, Some("4")).await;
    let got = resumed.take(2).await;
    assert_eq!(
        got.iter().map(|e| e.id.unwrap()).collect::<Vec<_>>(),
        [5, 6]
    );
    assert_eq!(kinds(&got), ["queued", "claimed"]);
    assert_eq!(got[1].data["session"], hash("c"));
    // Live events continue right after the replay, without a duplicate.
    assert_eq!(proxy.get("/", &[("x-session-id", "d")]).await.status, 200);
    let live = resumed.take(1).await;
    assert_eq!(
        (live[0].id, live[0].data["kind"].as_str()),
        (Some(7), Some("queued"))
    );

    // Resuming from an event the ring no longer holds says so before the replay.
    let mut late = subscribe(&admin, Some("1")).await;
    let gap = late.next().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(gap.id, None);
    let replay = late.take(1).await;
    assert_eq!(replay[0].id, Some(gap.data["resumed_at"].as_u64().unwrap()));

    // The query parameter works for clients that cannot set headers; junk is a 400.
    let by_query = admin
        .send_streaming(
            admin
                .request("GET", "/api/events?last_event_id=6")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    let first = SseReader::new(by_query).take(1).await;
    assert_eq!(first[0].id, Some(7));
    let bad = admin.get("/api/events", &[("last-event-id", "x7")]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_code(), "invalid_last_event_id");
    server.shutdown().await;
}

#[tokio::test]
async fn subscribers_beyond_the_cap_get_503() {
    let upstream = EchoUpstream::start().await;
    let server = start(&upstream, "telemetry:\n  events:\n    max_subscribers: 1\n").await;
    let admin = HttpClient::http1(server.admin_addr());
    let first = subscribe(&admin, None).await;
    let second = admin.get("/api/events", &[]).await;
    assert_eq!(second.status, 503);
    assert_eq!(second.error_code(), "too_many_subscribers");
    drop(first);
    // The slot comes back once the first stream's connection is gone.
    let mut ok = false;
    for _ in 0..200 {
        let third = admin
            .send_streaming(
                admin
                    .request("GET", "/api/events")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        if third.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "the slot of a closed stream is given back");
    server.shutdown().await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_stalled_subscriber_is_cut_and_the_proxy_never_waits_for_it() {
    const STALL: Duration = Duration::from_secs(3);
    let upstream = EchoUpstream::start().await;
    let server = start(
        &upstream,
        "telemetry:\n  events:\n    buffer: 64\n    stall_timeout: 3s\n",
    )
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());

    // A subscriber with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stalled = socket.connect(server.admin_addr()).await.unwrap();
    stalled
        .write_all(b"GET /api/events HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    support::wait_until("the subscriber is counted", || {
        server.metrics().event_subscribers.get() == 1
    })
    .await;

    // Traffic worth far more events than the ring, the channel and the socket buffers
    // hold. Had an emitter waited for the subscriber, a request would take a whole
    // stall timeout; each must be well below it.
    let started = tokio::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut requests = 0;
    while server.metrics().event_subscribers.get() == 1 {
        assert!(
            started.elapsed() < STALL + WAIT,
            "the stalled subscriber was never cut ({requests} requests)"
        );
        let t = tokio::time::Instant::now();
        let reply = proxy
            .get("/", &[("x-session-id", &format!("s-{requests}"))])
            .await;
        assert_eq!(reply.status, 200);
        slowest = slowest.max(t.elapsed());
        requests += 1;
    }
    assert!(
        slowest < STALL / 3,
        "a request took {slowest:?} while a subscriber stalled"
    );
    let text = admin.get("/metrics", &[]).await.text();
    let dropped = metric(
        &text,
        "activator_event_subscribers_dropped_total{reason=\"stalled\"}",
    ) + metric(
        &text,
        "activator_event_subscribers_dropped_total{reason=\"lagged\"}",
    );
    assert_eq!(dropped, 1.0, "{requests} requests");
    assert_eq!(metric(&text, "activator_event_subscribers "), 0.0);

    // The connection is closed: what was buffered drains, then EOF.
    let mut sink = vec![0u8; 64 * 1024];
    let eof = tokio::time::timeout(WAIT, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "the cut connection reaches EOF");
    server.shutdown().await;
}
