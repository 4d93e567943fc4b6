//! Behaviours the README and docs/ promise that no other test exercised: sandbox sharing
//! (`max_sessions_per_sandbox > 1`), the admin API over HTTP (health, readiness, resume, 409
//! `sandbox_busy`), a sandbox that answers non-HTTP (502 `upstream_protocol`), the connect
//! timeout against a sandbox that never accepts, HTTP/1.1 over TLS (ALPN fallback), `wss://`,
//! WebSocket with `upstream_protocol: http2`, `log.session_ids: full`, SIGINT shutdown.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use agent_activator::server::RunningServer;
use support::serve_process::{ServeProcess, access_lines};
use support::{EchoUpstream, HttpClient, Reply, WAIT, start, static_backend, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aa-doc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The activator over demo-sandbox processes, with `backend_extra` under `backend:`.
async fn process_server(dir: &std::path::Path, backend_extra: &str, rest: &str) -> RunningServer {
    start(&format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n{backend_extra}{rest}autoscaler:\n  enabled: false\n",
        dir.join("work").display()
    ))
    .await
}

async fn post(c: &HttpClient, path: &str, session: &str) -> Reply {
    c.send(
        c.request("POST", path)
            .header("x-session-id", session)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (status, code),
        "{}",
        r.text()
    );
}

// === sharing: max_sessions_per_sandbox > 1 ===

#[tokio::test]
async fn two_sessions_share_a_static_sandbox_and_the_third_waits_then_gets_503() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  max_sessions_per_sandbox: 2\n  admission_timeout: 300ms\n\
         activation: {{retry_after: 3s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    for s in ["share-a", "share-b"] {
        let r = c.get_session("/", s).await;
        assert_eq!(r.status, 200, "{s}: {}", r.text());
        assert_eq!(r.header("x-activator-activation"), Some("claim"));
    }
    let sandboxes = server.backend().sandboxes();
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(
        sandboxes[0].sessions.len(),
        2,
        "both sessions on the one sandbox"
    );

    let started = tokio::time::Instant::now();
    let third = c.get_session("/", "share-c").await;
    assert_error(&third, 503, "no_capacity");
    assert_eq!(third.header("retry-after"), Some("3"));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the third session waited for capacity (admission_timeout) before the 503"
    );

    // Capacity comes back when a session is released: the third is admitted.
    let admin = HttpClient::http1(server.admin_addr());
    let released = admin
        .send(
            admin
                .request("DELETE", "/api/sessions/share-a")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text());
    assert_eq!(c.get_session("/", "share-c").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn process_sandboxes_are_shared_up_to_the_limit() {
    let dir = scratch("share");
    let server = process_server(
        &dir,
        "  max_sandboxes: 1\n",
        "session:\n  max_sessions_per_sandbox: 2\n  admission_timeout: 300ms\n",
    )
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let a = post(&c, "/counter", "proc-a").await;
    let b = post(&c, "/counter", "proc-b").await;
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (200, 200),
        "{} {}",
        a.text(),
        b.text()
    );
    let port = |s: &str| {
        let c = c.clone();
        let s = s.to_owned();
        async move { c.get_session("/state", &s).await.json()["port"].clone() }
    };
    assert_eq!(
        port("proc-a").await,
        port("proc-b").await,
        "one sandbox for both"
    );
    assert_eq!(b.json()["counter"], 2, "the same process memory");
    let state = c.get_session("/state", "proc-b").await.json();
    let seen: Vec<&str> = state["sessions_seen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(seen, vec!["proc-a", "proc-b"]);
    assert_error(&post(&c, "/counter", "proc-c").await, 503, "no_capacity");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

// === the admin API over HTTP ===

#[tokio::test]
async fn admin_health_readiness_resume_and_busy_over_http() {
    let dir = scratch("admin");
    // The clients keep idle keep-alive connections: a short drain window bounds the end.
    let server = process_server(&dir, "", "proxy: {drain_timeout: 3s}\n").await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let health = admin.get("/healthz", &[]).await;
    assert_eq!(health.status, 200);
    assert_eq!(admin.get("/readyz", &[]).await.status, 200);

    assert_eq!(post(&c, "/counter", "admin-s").await.json()["counter"], 1);
    // A request in flight: pausing would freeze it mid-answer, so the admin gets 409.
    let slow = tokio::spawn({
        let c = c.clone();
        async move { c.get_session("/slow?ms=1500", "admin-s").await }
    });
    let metrics = server.metrics().clone();
    wait_until("the slow request in flight", || {
        metrics.requests_in_flight.get() == 1
    })
    .await;
    let action = |verb: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .send(
                    admin
                        .request("POST", &format!("/api/sessions/admin-s/{verb}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        }
    };
    assert_error(&action("pause").await, 409, "sandbox_busy");
    assert_eq!(slow.await.unwrap().status, 200);

    let paused = action("pause").await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    assert_eq!(paused.json()["paused"], true);
    let row = admin.get("/api/sessions/admin-s", &[]).await.json();
    assert_eq!(row["state"], "paused", "{row}");
    let resumed = action("resume").await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert_eq!(resumed.json()["resumed"], true);
    let row = admin.get("/api/sessions/admin-s", &[]).await.json();
    assert_eq!(row["state"], "active", "{row}");
    // Resumed by the admin, so the next request waits for nothing and memory is intact.
    let next = post(&c, "/counter", "admin-s").await;
    assert_eq!(next.header("x-activator-activation"), Some("none"));
    assert_eq!(next.json()["counter"], 2);

    // A request in flight holds the drain open while readiness and health are checked.
    let slow = tokio::spawn({
        let c = c.clone();
        async move { c.get_session("/slow?ms=1500", "admin-s").await }
    });
    wait_until("the slow request in flight", || {
        metrics.requests_in_flight.get() == 1
    })
    .await;
    let handle = server.shutdown_handle();
    let drain = tokio::spawn(server.shutdown());
    wait_until("draining", || handle.is_draining()).await;
    assert_error(&admin.get("/readyz", &[]).await, 503, "shutting_down");
    assert_eq!(
        admin.get("/healthz", &[]).await.status,
        200,
        "alive while draining"
    );
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the in-flight request finishes"
    );
    tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// === sandboxes that misbehave ===

/// A "sandbox" that answers every connection with bytes that are not HTTP.
async fn garbage_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6 not http\r\n\r\n").await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_sandbox_answering_non_http_is_502_upstream_protocol() {
    let server = start(&static_backend(&[garbage_upstream().await])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get_session("/", "garbage").await;
    assert_error(&r, 502, "upstream_protocol");
    assert!(
        !r.text().contains("SSH"),
        "no sandbox bytes in the error: {}",
        r.text()
    );
    let kind = server
        .metrics()
        .upstream_errors_total
        .with_label_values(&["protocol"])
        .get();
    assert_eq!(kind, 1);
    server.shutdown().await;
}

/// A listener whose accept queue is full and is never drained: further SYNs are dropped by
/// the kernel, so a connect neither succeeds nor is refused; it hangs until a timeout.
async fn unresponsive_sandbox() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => return (addr, listener, held),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn connect_timeout_bounds_a_sandbox_that_never_accepts() {
    let (addr, _listener, _held) = unresponsive_sandbox().await;
    let server = start(&format!(
        "{}proxy: {{connect_timeout: 300ms, request_timeout: 20s}}\n",
        static_backend(&[addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let started = tokio::time::Instant::now();
    let r = c.get_session("/", "unresponsive").await;
    assert_error(&r, 502, "upstream_connect");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(10),
        "connect_timeout (300ms) decided, not request_timeout (20s): {took:?}"
    );
    server.shutdown().await;
}

// === TLS and WebSocket variants ===

struct Tls {
    dir: std::path::PathBuf,
    roots: rustls::RootCertStore,
}

fn tls_files(name: &str) -> Tls {
    let dir = scratch(name);
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    Tls { dir, roots }
}

impl Tls {
    fn yaml(&self) -> String {
        format!(
            "tls: {{cert: '{}', key: '{}'}}\n",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display()
        )
    }

    /// A TLS connection to `addr` offering exactly `alpn`.
    async fn connect(
        &self,
        addr: SocketAddr,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn http1_over_tls_when_the_client_offers_no_h2() {
    let tls = tls_files("tls-h1");
    let up = EchoUpstream::start().await;
    let server = start(&format!("{}{}", static_backend(&[up.addr]), tls.yaml())).await;
    let stream = tls.connect(server.proxy_addr(), &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/over-tls")
        .header("host", "localhost")
        .header("x-session-id", "tls-h1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["path"], "/over-tls");
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");

    // No ALPN at all is HTTP/1.1 as well.
    let stream = tls.connect(server.proxy_addr(), &[]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/no-alpn")
        .header("host", "localhost")
        .header("x-session-id", "tls-h1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(tls.dir);
}

#[tokio::test]
async fn wss_relays_a_websocket_over_tls() {
    let tls = tls_files("wss");
    let up = EchoUpstream::start().await;
    let server = start(&format!("{}{}", static_backend(&[up.addr]), tls.yaml())).await;
    let stream = tls.connect(server.proxy_addr(), &[b"http/1.1"]).await;
    let mut req = format!("wss://localhost:{}/ws", server.proxy_addr().port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-session-id", "wss-session".parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .unwrap()
        .expect("wss handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("secure {i}"))).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), format!("secure {i}"));
    }
    ws.close(None).await.unwrap();
    // Finish the close handshake and hang up: a relay still open holds the server's
    // shutdown for the whole drain window (30 s), which this test is not about.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(tls.dir);
}

#[tokio::test]
async fn websocket_goes_over_http1_even_with_an_http2_upstream() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{upstream_protocol: http2}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    // Plain requests use HTTP/2 to the sandbox...
    let c = HttpClient::http1(server.proxy_addr());
    let plain = c.get_session("/h2", "ws-h2").await;
    assert_eq!(plain.json()["version"], "HTTP/2.0");
    // ...and the upgrade is sent as HTTP/1.1, the only way a WebSocket upgrade works.
    let mut req = format!("ws://{}/ws", server.proxy_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-session-id", "ws-h2".parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .expect("websocket handshake with an http2 upstream protocol");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over h1")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "over h1");
    ws.close(None).await.unwrap();
    // Finish the close handshake and hang up: a relay still open holds the server's
    // shutdown for the whole drain window (30 s), which this test is not about.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    server.shutdown().await;
}

// === the binary: full session IDs in the log, SIGINT ===

#[tokio::test]
async fn session_ids_full_logs_the_raw_id_and_sigint_exits_zero() {
    let up = EchoUpstream::start().await;
    let dir = scratch("sigint");
    let path = dir.join("activator.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n\
             log: {{format: json, level: info, session_ids: full}}\n{}",
            static_backend(&[up.addr])
        ),
    )
    .unwrap();
    let activator = ServeProcess::start(&path).await;
    let r = HttpClient::http1(activator.proxy)
        .get_session("/logged", "raw-session-id-42")
        .await;
    assert_eq!(r.status, 200);

    let (status, logged) = activator.stop(Signal::SIGINT).await;
    assert_eq!(status.code(), Some(0), "a drained SIGINT exits 0");
    let access = access_lines(&logged);
    assert_eq!(access.len(), 1, "{access:?}");
    assert_eq!(access[0]["session"], "raw-session-id-42");
    assert_eq!(access[0]["path"], "/logged");
    let _ = std::fs::remove_dir_all(dir);
}
