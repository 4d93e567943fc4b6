//! Request framing towards the sandbox: no body framing on a GET, byte-exact and streamed
//! bodies, `Expect`, early answers, hop-by-hop headers, `Host`, large and opaque fields,
//! absolute-form targets and WebSocket upgrades.

use super::*;

#[tokio::test]
async fn get_reaches_the_sandbox_without_body_framing_and_alone() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(
            b"GET /path/x?q=1&r=%20 HTTP/1.1\r\nHost: app.example\r\nX-Session-ID: s1\r\n\
              Accept: */*\r\nX-Custom: v 1\r\n\r\n",
        )
        .await
        .unwrap();
    let resp = bounded("response", client.read_response("GET"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);
    assert_eq!(resp.body.data, b"ok");

    let got = only_request(&sandbox);
    assert_eq!(got.head.start_line, "GET /path/x?q=1&r=%20 HTTP/1.1");
    assert_eq!(
        field_set(&got.head),
        expected_fields(
            "app.example",
            "s1",
            &[("accept", "*/*"), ("x-custom", "v 1")]
        ),
        "no content-length, no transfer-encoding: {:?}",
        String::from_utf8_lossy(&got.head.raw)
    );
    assert!(got.body.raw.is_empty());
    assert!(
        got.extra.is_empty(),
        "nothing after the request: {:?}",
        got.extra
    );
    server.shutdown().await;
}

/// 64 KiB + 7 bytes of every byte value, CRLFs and NULs included.
fn binary_payload() -> Vec<u8> {
    (0..64 * 1024 + 7).map(|i| (i * 7 % 256) as u8).collect()
}

#[tokio::test]
async fn content_length_body_arrives_byte_exact() {
    let sandbox = always(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone").await;
    let server = proxy(&[&sandbox], "").await;
    let payload = binary_payload();
    let mut client = Client::open(server.proxy_addr()).await;
    let req = Request::post("/upload")
        .header("host", "app.example")
        .header("x-session-id", "up")
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(payload.clone())).boxed())
        .unwrap();
    let got = client.fetch(req).await;
    assert_eq!((got.status, got.text().as_str()), (201, "done"));

    let req = only_request(&sandbox);
    assert_eq!(req.head.start_line, "POST /upload HTTP/1.1");
    assert_eq!(
        field_set(&req.head),
        expected_fields(
            "app.example",
            "up",
            &[
                ("content-length", &payload.len().to_string()),
                ("content-type", "application/octet-stream")
            ]
        )
    );
    assert!(req.body.raw == payload, "body byte exact");
    assert!(req.extra.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn chunked_client_body_arrives_complete_and_well_framed() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    // Chunks of several sizes, one with an extension (hop-by-hop framing: not relayed).
    let mut wire = b"POST /stream HTTP/1.1\r\nhost: app.example\r\nx-session-id: ch\r\n\
                     transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    let parts: [&[u8]; 3] = [b"hello ", b"\r\n0\r\n", &[b'z'; 5000]];
    wire.extend_from_slice(b"6;note=first\r\nhello \r\n");
    wire.extend_from_slice(b"5\r\n\r\n0\r\n\r\n");
    wire.extend_from_slice(b"1388\r\n");
    wire.extend_from_slice(parts[2]);
    wire.extend_from_slice(b"\r\n0\r\n\r\n");
    client.write(&wire).await.unwrap();
    let resp = bounded("response", client.read_response("POST"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);

    let req = only_request(&sandbox);
    let expected: Vec<u8> = parts.concat();
    assert!(
        req.body.data == expected,
        "body complete: {} of {} bytes",
        req.body.data.len(),
        expected.len()
    );
    // Either re-chunked or given a length, never both, never neither.
    match h1_wire::request_framing(&req.head) {
        Framing::Chunked => assert!(!req.head.has("content-length")),
        Framing::Length(n) => assert_eq!(n, expected.len()),
        other => panic!("unframed body ({other:?}): {:?}", req.head),
    }
    assert!(req.extra.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_never_forwarded() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nthanks").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(
            b"PUT /file HTTP/1.1\r\nhost: app.example\r\nx-session-id: ex\r\n\
              content-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    // The body is held back until the 100 arrives, as a real client does.
    let interim = bounded("100 Continue", client.read_response_head())
        .await
        .unwrap();
    assert_eq!(interim.status, 100, "{:?}", interim.start_line);
    client.write(b"hello").await.unwrap();
    let resp = bounded("final response", client.read_response("PUT"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);
    assert_eq!(resp.body.data, b"thanks");

    let req = only_request(&sandbox);
    assert!(!req.head.has("expect"), "{:?}", req.head.headers);
    assert_eq!(req.head.get("content-length"), Some("5"));
    assert_eq!(req.body.raw, b"hello");
    server.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded_and_host_is_kept() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    let requests: [&[u8]; 2] = [
        b"GET /a HTTP/1.1\r\nHost: App.Example:8443\r\nx-session-id: hop\r\n\
          Connection: keep-alive, X-Hop-A\r\nConnection: x-hop-b\r\nX-Hop-A: 1\r\nX-Hop-B: 2\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers, deflate;q=0.5\r\nProxy-Authorization: Basic eDp5\r\n\
          Proxy-Connection: keep-alive\r\nUpgrade: foo/1\r\nX-End: kept\r\n\r\n",
        b"GET /b HTTP/1.1\r\nHost: App.Example:8443\r\nx-session-id: hop\r\nTE: deflate\r\n\r\n",
    ];
    for r in requests {
        client.write(r).await.unwrap();
        let resp = bounded("response", client.read_response("GET"))
            .await
            .unwrap();
        assert_eq!(resp.head.status, 200);
    }
    let got = sandbox.requests();
    assert_eq!(got.len(), 2);
    assert_eq!(
        field_set(&got[0].head),
        expected_fields(
            "App.Example:8443",
            "hop",
            &[("te", "trailers"), ("x-end", "kept")]
        ),
        "only end-to-end headers, TE reduced to trailers"
    );
    assert_eq!(
        field_set(&got[1].head),
        expected_fields("App.Example:8443", "hop", &[]),
        "TE without trailers is dropped"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn upload_streams_to_the_sandbox_before_it_is_complete() {
    let sandbox = ScriptedSandbox::start_on_head(|_, _| {
        vec![Step::Mark("head"), Step::ReadBody, Step::Send(ok(b"got"))]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(
            b"POST /up HTTP/1.1\r\nhost: a\r\nx-session-id: st\r\ntransfer-encoding: chunked\r\n\r\n\
              4\r\nfirs\r\n",
        )
        .await
        .unwrap();
    // The head reaches the sandbox while the client still holds back the rest of the body:
    // the upload is streamed, not collected first.
    sandbox
        .wait_for("the request head at the sandbox", WAIT, |log| {
            log.marked("head")
        })
        .await;
    client.write(b"6\r\nt part\r\n0\r\n\r\n").await.unwrap();
    let resp = bounded("response", client.read_response("POST"))
        .await
        .unwrap();
    assert_eq!(
        (resp.head.status, resp.body.data.as_slice()),
        (200, &b"got"[..])
    );
    assert_eq!(only_request(&sandbox).body.data, b"first part");
    server.shutdown().await;
}

#[tokio::test]
async fn early_final_response_is_relayed_while_the_body_is_unsent() {
    // The sandbox refuses the upload from its head alone and reads no body (it drains
    // what arrives until the proxy closes, as a lingering close does).
    let sandbox = ScriptedSandbox::start_on_head(|_, _| {
        vec![
            Step::Send(
                b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 7\r\n\r\ntoo big"
                    .to_vec(),
            ),
            Step::Hang,
        ]
    })
    .await;
    let server = proxy(&[&sandbox], "proxy: {body_timeout: 8s}\n").await;
    let mut client = raw(&server).await;
    client
        .write(b"POST /big HTTP/1.1\r\nhost: a\r\nx-session-id: eb\r\ncontent-length: 10000000\r\n\r\n")
        .await
        .unwrap();
    client.write(&[b'u'; 64 * 1024]).await.unwrap();
    let resp = bounded("the early answer", client.read_response("POST"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 413);
    assert_eq!(resp.body.data, b"too big");
    // The rest of the body can no longer go anywhere: the connection ends at once (well
    // before `proxy.body_timeout`, 8 s here; the margin is for starved CI runners), with
    // nothing after the 413 (no 408). hyper's client held it until the body timeout.
    let rest = tokio::time::timeout(Duration::from_secs(6), client.read_until_closed())
        .await
        .expect("the client connection closes before the body timeout");
    assert!(rest.as_ref().map_or(true, Vec::is_empty), "{rest:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn large_repeated_and_opaque_request_fields_arrive_intact() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    let big = "b".repeat(48 * 1024);
    let mut req = format!(
        "PURGE /cache/item HTTP/1.1\r\nhost: a\r\nx-session-id: lf\r\nx-multi: one\r\n\
         x-big: {big}\r\nx-multi: two\r\n"
    )
    .into_bytes();
    // obs-text (RFC 9110 5.5): bytes above 0x7f are opaque, relayed as they are.
    req.extend_from_slice(b"x-latin: caf\xe9\r\n\r\n");
    client.write(&req).await.unwrap();
    let resp = bounded("response", client.read_response("PURGE"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);
    let got = only_request(&sandbox);
    assert_eq!(got.head.start_line, "PURGE /cache/item HTTP/1.1");
    let multi: Vec<&str> = got
        .head
        .headers
        .iter()
        .filter(|(n, _)| n == "x-multi")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(multi, ["one", "two"], "repeated fields in order");
    assert_eq!(got.head.get("x-big"), Some(big.as_str()));
    let raw_head = &got.head.raw;
    assert!(
        raw_head
            .windows(15)
            .any(|w| w.eq_ignore_ascii_case(b"x-latin: caf\xe9\r\n")),
        "{:?}",
        String::from_utf8_lossy(raw_head)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn absolute_form_and_empty_bodies_reach_the_sandbox_in_origin_form() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    let requests: [&[u8]; 2] = [
        // RFC 9112 3.2.2: absolute-form; the host in it wins over Host.
        b"GET http://app.example/abs?x=1 HTTP/1.1\r\nhost: app.example\r\nx-session-id: af\r\n\r\n",
        b"POST /empty HTTP/1.1\r\nhost: app.example\r\nx-session-id: af\r\ncontent-length: 0\r\n\r\n",
    ];
    for r in requests {
        client.write(r).await.unwrap();
        let resp = bounded("response", client.read_response("GET"))
            .await
            .unwrap();
        assert_eq!(resp.head.status, 200);
    }
    let got = sandbox.requests();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].head.start_line, "GET /abs?x=1 HTTP/1.1");
    assert_eq!(got[0].head.get("host"), Some("app.example"));
    assert_eq!(got[1].head.start_line, "POST /empty HTTP/1.1");
    // An empty body: `content-length: 0` or no framing at all (equivalent for a request).
    assert!(
        matches!(
            h1_wire::request_framing(&got[1].head),
            Framing::Length(0) | Framing::Empty
        ),
        "{:?}",
        got[1].head.headers
    );
    assert!(
        got.iter()
            .all(|r| r.body.raw.is_empty() && r.extra.is_empty())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_reaches_the_sandbox_and_bytes_flow_both_ways() {
    let sandbox = ScriptedSandbox::start(|_, _| {
        vec![
            Step::Send(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                    .to_vec(),
            ),
            Step::Send(b"from-sandbox".to_vec()),
            Step::Hang,
        ]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(
            b"GET /ws HTTP/1.1\r\nhost: a\r\nx-session-id: wsu\r\nconnection: Upgrade\r\n\
              upgrade: websocket\r\nsec-websocket-version: 13\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = bounded("101", client.read_response_head()).await.unwrap();
    assert_eq!(head.status, 101);
    assert_eq!(head.get("upgrade"), Some("websocket"));
    assert_eq!(
        head.get("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    // The sandbox's first tunnel bytes, then the client's, raw both ways.
    let first = bounded("tunnel bytes", client.read_body(Framing::Length(12)))
        .await
        .unwrap();
    assert_eq!(first.data, b"from-sandbox");
    client.write(b"from-client").await.unwrap();
    drop(client);
    sandbox
        .wait_for("the tunnel to end", WAIT, |log| {
            log.closed_by_peer.contains(&0)
        })
        .await;
    let log = sandbox.log();
    let req = &log.requests[0];
    assert_eq!(req.head.get("upgrade"), Some("websocket"));
    assert_eq!(req.head.get("connection"), Some("upgrade"));
    assert_eq!(
        req.head.get("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(
        log.late,
        [(0, b"from-client".to_vec())],
        "tunnel bytes after the 101"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn http_1_0_client_without_host_is_forwarded_as_http_1_1_with_a_host() {
    let sandbox = always(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
    )
    .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(b"GET /old HTTP/1.0\r\nx-session-id: old\r\n\r\n")
        .await
        .unwrap();
    let resp = bounded("response", client.read_response("GET"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);
    // An HTTP/1.0 client cannot read chunked framing (RFC 9112 7.1).
    assert!(
        !resp.head.has("transfer-encoding"),
        "{:?}",
        resp.head.headers
    );
    assert_eq!(resp.body.data, b"hello");
    let got = only_request(&sandbox);
    assert_eq!(got.head.start_line, "GET /old HTTP/1.1");
    // HTTP/1.1 requires Host (RFC 9112 3.2): the sandbox's own address stands in.
    assert_eq!(
        got.head.get("host"),
        Some(sandbox.addr.to_string().as_str())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn request_trailers_of_a_chunked_upload_reach_the_sandbox() {
    let sandbox = always(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(
            b"POST /sum HTTP/1.1\r\nhost: a\r\nx-session-id: rt\r\ntrailer: x-sum\r\n\
              transfer-encoding: chunked\r\n\r\n4\r\ndata\r\n0\r\nx-sum: 7\r\n\r\n",
        )
        .await
        .unwrap();
    let resp = bounded("response", client.read_response("POST"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 200);
    let got = only_request(&sandbox);
    assert_eq!(got.body.data, b"data");
    assert_eq!(got.head.get("trailer"), Some("x-sum"));
    assert_eq!(h1_wire::request_framing(&got.head), Framing::Chunked);
    assert_eq!(got.body.trailers, [("x-sum".to_owned(), "7".to_owned())]);
    server.shutdown().await;
}

#[tokio::test]
async fn asterisk_form_options_reaches_the_sandbox_as_sent() {
    let sandbox = always(b"HTTP/1.1 204 No Content\r\nallow: GET, POST\r\n\r\n").await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    client
        .write(b"OPTIONS * HTTP/1.1\r\nhost: a\r\nx-session-id: op\r\n\r\n")
        .await
        .unwrap();
    let resp = bounded("response", client.read_response("OPTIONS"))
        .await
        .unwrap();
    assert_eq!(resp.head.status, 204);
    assert_eq!(only_request(&sandbox).head.start_line, "OPTIONS * HTTP/1.1");
    server.shutdown().await;
}

#[tokio::test]
async fn a_response_streams_while_the_upload_is_still_going() {
    // Full duplex: the sandbox answers from the request head, streams a first chunk, then
    // reads the body and ends its answer with what it read.
    let sandbox = ScriptedSandbox::start_on_head(|_, _| {
        vec![
            Step::Send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\nstarted\r\n".to_vec(),
            ),
            Step::ReadBody,
            Step::Send(b"5\r\n done\r\n0\r\n\r\n".to_vec()),
        ]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let req = Request::post("/duplex")
        .header("host", "a")
        .header("x-session-id", "fd")
        .body(http_body_util::StreamBody::new(frames).boxed())
        .unwrap();
    tx.send(Bytes::from_static(b"part1")).await.unwrap();
    let mut client = Client::open(server.proxy_addr()).await;
    // The head and the first chunk arrive while the upload is still open.
    let resp = client.send(req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = bounded("the first chunk", body.frame())
        .await
        .expect("a frame")
        .expect("no error");
    assert_eq!(first.into_data().unwrap(), "started");
    tx.send(Bytes::from_static(b"part2")).await.unwrap();
    drop(tx);
    let rest = bounded("the rest", body.collect())
        .await
        .expect("the rest of the answer")
        .to_bytes();
    assert_eq!(rest, " done");
    assert_eq!(only_request(&sandbox).body.data, b"part1part2");
    server.shutdown().await;
}
