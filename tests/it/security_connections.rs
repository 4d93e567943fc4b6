//! Hostile clients against the connection phase, one probe per test, over real sockets:
//! every phase is timed out, every resource capped. Timeouts are set to a few hundred
//! milliseconds so each probe ends in about a second; every wait is bounded.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use support::{EchoUpstream, HttpClient, WAIT, metric_value, start, static_backend};

/// The short bounds every probe runs against.
const TIMEOUTS: &str = "client_header_timeout: 400ms, idle_timeout: 400ms, \
                        body_timeout: 400ms, tunnel_idle_timeout: 400ms";

async fn server_with(up: &EchoUpstream, proxy: &str) -> agent_activator::server::RunningServer {
    start(&format!(
        "{}proxy: {{{TIMEOUTS}{}{proxy}}}\n",
        static_backend(&[up.addr]),
        if proxy.is_empty() { "" } else { ", " }
    ))
    .await
}

/// Reads until the peer closes (EOF or reset); returns what arrived and when it closed.
/// Panics if the connection is still open after [`WAIT`].
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the activator closed the connection");
    (got, start.elapsed())
}

fn closed_by(server: &agent_activator::server::RunningServer, reason: &str) -> f64 {
    metric_value(
        &server.metrics().encode(),
        &format!("activator_client_connections_closed_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn silent_tcp_connection_is_closed_at_the_header_timeout() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let (got, after) = until_closed(&mut s).await;
    assert!(got.is_empty(), "nothing is sent to a silent client");
    assert!(
        after >= Duration::from_millis(300),
        "closed too early: {after:?}"
    );
    assert!(after < Duration::from_secs(3), "closed late: {after:?}");
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn single_byte_does_not_hold_the_protocol_sniff_open() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(b"P").await.unwrap();
    let (_, after) = until_closed(&mut s).await;
    assert!(after < Duration::from_secs(3), "closed late: {after:?}");
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn slow_header_trickle_is_cut_at_the_header_timeout() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // One header byte every 50 ms keeps the socket busy but never completes the head.
    let started = Instant::now();
    let trickle = async {
        for _ in 0..200 {
            if s.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, trickle)
        .await
        .expect("writes fail once the activator closes");
    let after = started.elapsed();
    assert!(
        after < Duration::from_secs(3),
        "a trickling head lived {after:?}"
    );
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn http1_keep_alive_idles_out_and_a_slow_second_head_is_cut() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{client_header_timeout: 400ms, idle_timeout: 1s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let request = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Session-ID: keep\r\n\r\n";

    // Idle after one response: closed by the idle timeout.
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let (got, after) = until_closed(&mut s).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
    assert!(after < Duration::from_secs(3), "closed late: {after:?}");
    assert_eq!(closed_by(&server, "idle_timeout"), 1.0);

    // A second head that starts but never ends: the header timeout applies from its
    // first byte, so a client cannot park a connection by sending half a head.
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"GET /b HTTP/1.1\r\n").await.unwrap();
    let (_, after) = until_closed(&mut s).await;
    assert!(
        after < Duration::from_millis(800),
        "the idle bound (1s) applied: {after:?}"
    );
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);
    assert_eq!(closed_by(&server, "idle_timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_h2c_is_closed_before_and_after_a_stream() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;

    // Preface and SETTINGS, then no stream ever: the first-head bound applies.
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (_, after) = until_closed(&mut s).await;
    assert!(after < Duration::from_secs(3), "idle h2c lived {after:?}");
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);

    // One stream, then nothing open: GOAWAY and close after the idle timeout.
    let tcp = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/h2", server.proxy_addr()))
        .header("x-session-id", "h2-idle")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the idle h2 connection is closed by the activator")
        .unwrap()
        .expect("closed gracefully (GOAWAY), not reset");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(closed_by(&server, "idle_timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn silent_tls_clients_are_closed_before_and_after_the_handshake() {
    let dir = std::env::temp_dir().join(format!("aa-sec-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}tls: {{cert: '{}', key: '{}'}}\nproxy: {{{TIMEOUTS}}}\n",
        static_backend(&[up.addr]),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    ))
    .await;

    // No ClientHello at all.
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let (_, after) = until_closed(&mut s).await;
    assert!(
        after < Duration::from_secs(3),
        "silent pre-handshake lived {after:?}"
    );
    assert_eq!(closed_by(&server, "header_timeout"), 1.0);

    // A completed handshake, then silence.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("the activator closed the silent TLS connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(closed_by(&server, "header_timeout"), 2.0);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A sandbox that reads the whole request body before it answers (as most apps do).
async fn body_reading_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let n = match req.into_body().collect().await {
                            Ok(b) => b.to_bytes().len(),
                            Err(_) => 0,
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(format!("read {n} bytes")),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn slow_body_gets_408() {
    let (addr, task) = body_reading_upstream().await;
    let server = start(&format!(
        "{}proxy: {{{TIMEOUTS}}}\n",
        static_backend(&[addr])
    ))
    .await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Session-ID: slow-body\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let (got, after) = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    assert!(after < Duration::from_secs(3), "{after:?}");
    server.shutdown().await;
    task.abort();
}

#[tokio::test]
async fn oversized_header_gets_431() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let big = "a".repeat(100 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Session-ID: big\r\nX-Big: {big}\r\n\r\n");
    // The activator may answer and close before the whole head is written.
    let _ = s.write_all(head.as_bytes()).await;
    let (got, _) = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Just under the limit passes.
    let c = HttpClient::http1(server.proxy_addr());
    let ok = c
        .get(
            "/ok",
            &[("x-session-id", "big"), ("x-big", &"a".repeat(60 * 1024))],
        )
        .await;
    assert_eq!(ok.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn body_cap_gets_413_declared_or_streamed() {
    let up = EchoUpstream::start().await;
    let server = server_with(&up, "max_body_bytes: 1000").await;
    let c = HttpClient::http1(server.proxy_addr());
    let req = c
        .request("POST", "/echo")
        .header("x-session-id", "cap")
        .body(Full::new(Bytes::from(vec![b'x'; 2000])))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), "body_too_large");
    assert_eq!(
        up.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no sandbox touched"
    );

    // Chunked, no declared length: cut when the count passes the cap.
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 600, "y".repeat(600));
    let head =
        "POST /echo HTTP/1.1\r\nHost: x\r\nX-Session-ID: cap\r\nTransfer-Encoding: chunked\r\n\r\n";
    s.write_all(format!("{head}{chunk}{chunk}").as_bytes())
        .await
        .unwrap();
    let (got, _) = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");

    // Under the cap passes.
    let req = c
        .request("POST", "/echo")
        .header("x-session-id", "cap")
        .body(Full::new(Bytes::from(vec![b'x'; 900])))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 900);
    server.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_the_next_and_counts_it() {
    let up = EchoUpstream::start().await;
    // Long header timeout: the held connections must stay open during the probe.
    let server = start(&format!(
        "{}proxy: {{max_connections: 2, client_header_timeout: 30s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let a = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let b = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let metrics = server.metrics().clone();
    support::wait_until("two connections counted", || {
        metrics.client_connections.get() == 2
    })
    .await;
    let mut third = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Session-ID: c\r\n\r\n")
        .await;
    let (got, after) = until_closed(&mut third).await;
    assert!(got.is_empty(), "a refused connection is not served");
    assert!(after < Duration::from_secs(1));
    assert_eq!(metrics.client_connections_refused_total.get(), 1);

    // A slot frees up when a connection closes.
    drop(a);
    support::wait_until("a slot freed", || metrics.client_connections.get() == 1).await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get_session("/again", "c").await.status, 200);
    drop(b);
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_tunnel_idle_closes_both_sides() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let up = EchoUpstream::start().await;
    let server = server_with(&up, "").await;
    let url = format!("ws://{}/ws", server.proxy_addr());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("x-session-id", "tunnel".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    // Traffic keeps it open past the idle timeout.
    for i in 0..4 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text(format!("m{i}")));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server.metrics().websockets_open.get(), 1);
    // Then silence: both sides are closed.
    let started = Instant::now();
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("closed by the activator");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let metrics = server.metrics().clone();
    support::wait_until("relay ended", || metrics.websockets_open.get() == 0).await;
    assert_eq!(closed_by(&server, "tunnel_idle_timeout"), 1.0);
    support::wait_until("upstream side closed", || {
        up.open.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    server.shutdown().await;
}
