//! Session pinning through the real proxy with the static backend and real upstreams:
//! exclusivity under a race for endpoints, admission wait then 503, idle release.

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use agent_activator::lock::MutexExt;
use support::{HttpClient, WAIT};

/// What one upstream saw: sessions in order of first appearance of each run, requests in
/// flight per session, and any moment two sessions overlapped.
#[derive(Default)]
struct Seen {
    runs: Vec<String>,
    in_flight: HashMap<String, usize>,
    overlaps: Vec<String>,
}

/// An upstream that records the `X-Session-ID` of every request it serves.
struct RecordingUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decrements the session's in-flight count when the handler returns.
struct Serving {
    seen: Arc<Mutex<Seen>>,
    session: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut s = self.seen.lock_recovered();
        if let Some(n) = s.in_flight.get_mut(&self.session) {
            *n -= 1;
        }
    }
}

impl RecordingUpstream {
    async fn start() -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| serve(seen.clone(), addr, req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        RecordingUpstream { addr, seen, task }
    }
}

async fn serve(
    seen: Arc<Mutex<Seen>>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let session = req
        .headers()
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let _serving = {
        let mut s = seen.lock_recovered();
        let others: Vec<String> = s
            .in_flight
            .iter()
            .filter(|(k, n)| **n > 0 && **k != session)
            .map(|(k, _)| k.clone())
            .collect();
        if !others.is_empty() {
            s.overlaps
                .push(format!("{session} while {others:?} in flight"));
        }
        if s.runs.last() != Some(&session) {
            s.runs.push(session.clone());
        }
        *s.in_flight.entry(session.clone()).or_default() += 1;
        Serving {
            seen: seen.clone(),
            session: session.clone(),
        }
    };
    if req.uri().query() == Some("slow") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Response::new(Full::new(Bytes::from(
        addr.port().to_string(),
    ))))
}

fn yaml(endpoints: &[SocketAddr], extra: &str) -> String {
    format!(
        "{}session:\n  max_sessions_per_sandbox: 1\n{extra}",
        support::static_backend(endpoints)
    )
}

/// Samples the backend's sandbox list until `stop`, failing on any moment where a sandbox
/// holds two sessions. The static backend lists its slots under one lock, so each sample is
/// an atomic snapshot. (The session table's listing is not: it reads entries one by one, so
/// A can be read `active`, be released, and its sandbox be claimed by B before B is read,
/// which looked like sharing without being it. What the sandboxes really saw is checked by
/// the recording upstreams: no request of one session while another's is in flight.)
fn watch_table(
    server: &agent_activator::server::RunningServer,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<usize> {
    let backend = server.backend().clone();
    tokio::spawn(async move {
        let mut samples = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            for sandbox in backend.sandboxes() {
                assert!(
                    sandbox.sessions.len() <= 1,
                    "two sessions share a sandbox: {:?}",
                    sandbox.sessions
                );
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_sessions_race_for_ten_endpoints_never_sharing() {
    let upstreams = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(RecordingUpstream::start().await);
        }
        v
    };
    let addrs: Vec<SocketAddr> = upstreams.iter().map(|u| u.addr).collect();
    // Sessions end by an admin release, so nothing here depends on timing.
    let server = support::start(&yaml(
        &addrs,
        "  admission_timeout: 60s\nidle:\n  timeout: 1h\nactivation:\n  timeout: 5s\n",
    ))
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_table(&server, stop.clone());
    let (proxy, admin) = (server.proxy_addr(), server.admin_addr());
    let mut sessions = Vec::new();
    for i in 0..100 {
        sessions.push(tokio::spawn(async move {
            // One client (connection pool) per session, as separate agents would have.
            let client = HttpClient::http1(proxy);
            let id = format!("race-{i:03}");
            // A burst of concurrent requests, then a couple in sequence: all pinned.
            let burst: Vec<_> = (0..3)
                .map(|_| {
                    let client = client.clone();
                    let id = id.clone();
                    tokio::spawn(async move { client.get_session("/?slow", &id).await })
                })
                .collect();
            let mut ports = Vec::new();
            for b in burst {
                let r = b.await.unwrap();
                assert_eq!(r.status, 200, "{id}: {}", r.text());
                ports.push(r.text());
            }
            for _ in 0..2 {
                let r = client.get_session("/", &id).await;
                assert_eq!(r.status, 200, "{id}: {}", r.text());
                assert_eq!(r.header("x-activator-activation"), Some("none"));
                ports.push(r.text());
            }
            assert!(
                ports.iter().all(|p| *p == ports[0]),
                "{id} moved: {ports:?}"
            );
            let released = HttpClient::http1(admin)
                .send(
                    HttpClient::http1(admin)
                        .request("DELETE", &format!("/api/sessions/{id}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await;
            assert!(released.status.is_success(), "{id}: {}", released.text());
        }));
    }
    // Each wait inside is bounded; this bounds the whole race.
    tokio::time::timeout(Duration::from_secs(120), async {
        for s in sessions {
            s.await.unwrap();
        }
    })
    .await
    .expect("every session served");
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert!(watcher.await.unwrap() > 0);
    let mut total = 0;
    for u in &upstreams {
        let s = u.seen.lock_recovered();
        assert!(s.overlaps.is_empty(), "{}: {:?}", u.addr, s.overlaps);
        // Sessions never come back, so each appears in one contiguous run per upstream.
        let mut distinct = s.runs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            s.runs.len(),
            "{}: interleaved {:?}",
            u.addr,
            s.runs
        );
        total += s.runs.len();
    }
    assert_eq!(total, 100, "each session served by exactly one upstream");
    let claims = server
        .metrics()
        .activations_total
        .with_label_values(&["claim", "ok"])
        .get();
    assert_eq!(claims, 100, "one claim per session");
    server.shutdown().await;
}

#[tokio::test]
async fn admission_waits_then_503_with_retry_after() {
    let upstream = RecordingUpstream::start().await;
    let server = support::start(&yaml(
        &[upstream.addr],
        "  admission_timeout: 300ms\nidle:\n  timeout: 1h\nactivation:\n  timeout: 5s\n  retry_after: 2s\n",
    ))
    .await;
    let client = HttpClient::http1(server.proxy_addr());
    assert_eq!(client.get_session("/", "holder").await.status, 200);
    let started = tokio::time::Instant::now();
    let refused = client.get_session("/", "latecomer").await;
    let waited = started.elapsed();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_code(), "no_capacity");
    assert_eq!(refused.header("retry-after"), Some("2"));
    assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    assert!(waited < WAIT);
    assert_eq!(upstream.seen.lock_recovered().runs, vec!["holder"]);
    let admission = server.metrics().admission_wait.get_sample_count();
    assert_eq!(admission, 2);
    assert_eq!(server.activator().waiting_sessions(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_release_frees_the_endpoint_for_a_new_session() {
    let upstream = RecordingUpstream::start().await;
    let server = support::start(&yaml(
        &[upstream.addr],
        "  admission_timeout: 5s\nidle:\n  policy: release\n  timeout: 200ms\n  sweep_interval: 20ms\n",
    ))
    .await;
    let client = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(client.get_session("/", "first").await.status, 200);
    // Waits for "first" to go idle and be released, then takes the endpoint.
    let second = client.get_session("/", "second").await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.text(), upstream.addr.port().to_string());
    assert_eq!(upstream.seen.lock_recovered().runs, vec!["first", "second"]);
    let listed = admin.get("/api/sessions", &[]).await.json();
    let hash = |id: &str| {
        agent_activator::session::SessionKey::parse(id, 128)
            .unwrap()
            .short_hash()
    };
    let rows: Vec<&str> = listed["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("no sessions array: {listed}"))
        .iter()
        .map(|s| s["session"].as_str().unwrap())
        .collect();
    // Exactly the live session: the released one is gone.
    assert_eq!(rows, vec![hash("second").as_str()], "{listed}");
    let released = server
        .metrics()
        .releases_total
        .with_label_values(&["idle"])
        .get();
    assert_eq!(released, 1);
    server.shutdown().await;
}
