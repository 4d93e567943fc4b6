//! Protocols through the proxy over real sockets: HTTP/1.1, h2c, HTTP/2 over TLS,
//! WebSocket, SSE, large bodies, trailers, `Expect: 100-continue`, forwarding hygiene.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::{EchoUpstream, HttpClient, WAIT, start, static_backend};

#[tokio::test]
async fn http1_forwarding_hygiene_and_pinning() {
    let ups = support::echo_upstreams(2).await;
    let server = start(&format!(
        // Loopback is a trusted proxy here, so its X-Forwarded-For is appended to (from
        // an untrusted peer it is replaced: tests/it/security_requests.rs).
        "{}proxy: {{strip_headers: [X-Internal-Route], trusted_proxies: [127.0.0.1]}}\n",
        static_backend(&[ups[0].addr, ups[1].addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let req = c
        .request("GET", "/hello?x=1")
        .header("host", "app.example")
        .header("x-session-id", "alpha")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9v")
        .header("te", "trailers")
        .header("x-internal-route", "r1")
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("claim"));
    let j = r.json();
    let h = &j["headers"];
    assert_eq!(j["path"], "/hello?x=1");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(h["host"], "app.example");
    assert_eq!(h["x-forwarded-host"], "app.example");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["x-session-id"], "alpha");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "x-internal-route",
    ] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }
    // No token of the client's Connection header reaches the sandbox (hyper's HTTP/1.1
    // client adds no Connection header of its own to a keep-alive request).
    assert!(h.get("connection").is_none(), "connection forwarded: {h}");
    let first_port = j["port"].clone();

    // The same session stays on its sandbox; another session gets the other one.
    let again = c.get_session("/", "alpha").await;
    assert_eq!(again.json()["port"], first_port);
    assert_eq!(again.header("x-activator-activation"), Some("none"));
    let other = c.get_session("/", "beta").await;
    assert_ne!(other.json()["port"], first_port);
    server.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::h2c(server.proxy_addr());
    let r = c.get_session("/over-h2?q=1", "h2-session").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["path"], "/over-h2?q=1");
    // The sandbox speaks HTTP/1.1 (`upstream_protocol: http1`) and sees the :authority
    // as Host.
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["headers"]["host"], server.proxy_addr().to_string());
    server.shutdown().await;
}

#[tokio::test]
async fn h2_upstream_protocol() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{upstream_protocol: http2}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c
        .get(
            "/h2-up",
            &[("x-session-id", "s"), ("host", "public.example")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["version"], "HTTP/2.0");
    assert!(
        j["headers"].get("host").is_none(),
        "no duplicate host over h2"
    );
    assert_eq!(j["headers"]["x-forwarded-host"], "public.example");
    server.shutdown().await;
}

#[tokio::test]
async fn http2_over_tls_with_alpn() {
    let dir = std::env::temp_dir().join(format!("aa-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}tls: {{cert: '{}', key: '{}'}}\nsession: {{on_missing: create}}\n",
        static_backend(&[up.addr]),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    ))
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!(
            "https://localhost:{}/secure",
            server.proxy_addr().port()
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn websocket_relay_outlives_request_timeout() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{request_timeout: 300ms}}\nsession: {{sources: [{{path_prefix: /s/}}]}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let url = format!("ws://{}/s/ws-session/ws", server.proxy_addr());
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["x-activator-activation"], "claim");
    assert_eq!(server.metrics().websockets_open.get(), 1);
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), format!("ping {i}"));
        // Three pauses of 200 ms: the stream lives past the 300 ms request timeout.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        server.metrics().requests_in_flight.get(),
        1,
        "counted while open"
    );
    ws.close(None).await.unwrap();
    // Complete the closing handshake, then the client goes away.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    support::wait_until("the relay to end after close", || {
        server.metrics().websockets_open.get() == 0
    })
    .await;
    assert_eq!(
        server
            .metrics()
            .requests_total
            .with_label_values(&["101"])
            .get(),
        1
    );
    server.shutdown().await;
}

/// A sandbox whose server-sent events are produced only when the test says so: each event
/// must reach the client while the sandbox holds the stream open and produces nothing more,
/// so a proxy that buffers (waiting for more bytes or the end) fails with a timeout, with no
/// timing margin for a busy machine to break.
async fn driven_sse_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::Sender<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<usize>(1);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let rx = rx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let Some(mut rx) = head
                    .starts_with(b"GET /sse ")
                    .then_some(())
                    .and(rx.lock().await.take())
                else {
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                while let Some(i) = rx.recv().await {
                    let event = format!("data: {i}\n\n");
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    sock.write_all(chunk.as_bytes()).await.unwrap();
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    (addr, tx)
}

#[tokio::test]
async fn sse_arrives_event_by_event() {
    let (addr, events) = driven_sse_upstream().await;
    let server = start(&static_backend(&[addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let req = c
        .request("GET", "/sse")
        .header("x-session-id", "sse")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_streaming(req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for i in 0..3 {
        events.send(i).await.unwrap();
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .unwrap_or_else(|_| panic!("event {i} was held back by the proxy (buffered)"))
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("data: {i}\n\n"));
    }
    drop(events);
    let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    assert!(end.is_none(), "the stream ends when the sandbox ends it");
    server.shutdown().await;
}

#[tokio::test]
async fn large_upload_and_download_stream() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());

    // Download: counted as it streams, never collected.
    let req = c
        .request("GET", &format!("/bytes?n={SIZE}"))
        .header("x-session-id", "big")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut body = c.send_streaming(req).await.into_body();
    let mut got = 0u64;
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
        got += frame.unwrap().into_data().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, SIZE);

    // Upload: a generated stream through /echo, counted on the way back.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (SIZE / chunk.len() as u64) as usize;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/echo", server.proxy_addr()))
        .header("x-session-id", "big")
        .body(StreamBody::new(stream))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    let mut echoed = 0u64;
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
        echoed += frame.unwrap().into_data().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(echoed, SIZE);
    server.shutdown().await;
}

#[tokio::test]
async fn trailers_pass_both_ways() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    // Response trailers over h2c (HTTP/2 always carries them).
    let c = HttpClient::h2c(server.proxy_addr());
    let req = c
        .request("GET", "/trailers")
        .header("x-session-id", "t")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let collected = c
        .send_streaming(req)
        .await
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc123");

    // Request trailers from an h2c client reach the HTTP/1.1 sandbox (chunked, declared by
    // `Trailer`) and come back as response trailers.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-req-sum", "42".parse().unwrap());
    let frames = vec![
        Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/echo", server.proxy_addr()))
        .header("x-session-id", "t")
        .header("te", "trailers")
        .header("trailer", "x-req-sum")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .unwrap()
        .unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-req-sum"], "42");
    assert_eq!(collected.to_bytes(), "payload");
    server.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let mut s = TcpStream::connect(server.proxy_addr()).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: x\r\nx-session-id: cont\r\ncontent-length: 5\r\n\
          expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            rest.extend_from_slice(&chunk[..n]);
            if n == 0 || rest.ends_with(b"hello") {
                break;
            }
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("200 OK"), "{text}");
    assert!(text.ends_with("hello"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    for c in [
        HttpClient::http1(server.proxy_addr()),
        HttpClient::h2c(server.proxy_addr()),
    ] {
        let r = c.get_session("/hop", "hop").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-kept"), Some("1"));
        assert!(r.header("x-hop-resp").is_none());
        assert!(r.header("keep-alive").is_none());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn pool_idle_timeout_closes_upstream_connections() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{pool_idle_timeout: 200ms}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get_session("/", "pool").await.status, 200);
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(c.get_session("/", "pool").await.status, 200);
    assert_eq!(
        up.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a pooled connection is reused while fresh"
    );
    // Without a pool timer the idle connection would stay open until reused.
    support::wait_until("the idle pooled connection to close", || {
        up.open.load(std::sync::atomic::Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(c.get_session("/", "pool").await.status, 200);
    assert_eq!(up.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    server.shutdown().await;
}
