//! Keep-alive towards the sandbox: connection reuse, `Connection: close`, a sandbox that
//! closes an idle connection, pipelining clients, idle expiry, and bytes after a response.

use super::*;

#[tokio::test]
async fn sequential_requests_of_one_session_share_one_upstream_connection() {
    let sandbox =
        ScriptedSandbox::start(|_, i| vec![Step::Send(ok(format!("reply {i}").as_bytes()))]).await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..8 {
        let got = client.get(&format!("/n/{i}"), "ka").await;
        assert_eq!((got.status, got.text()), (200, format!("reply {i}")));
    }
    let log = sandbox.log();
    assert_eq!(log.accepted, 1, "one upstream TCP connection");
    assert_eq!(log.requests.len(), 8);
    assert!(
        log.requests
            .iter()
            .all(|r| r.conn == 0 && r.extra.is_empty())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn connection_close_from_the_sandbox_means_a_new_connection() {
    let sandbox = ScriptedSandbox::start(|_, i| {
        vec![
            Step::Send(
                format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n{i}")
                    .into_bytes(),
            ),
            Step::Close,
        ]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..3 {
        let got = client.get("/c", "cc").await;
        assert_eq!((got.status, got.text()), (200, i.to_string()));
        // The proxy's client connection stays up: `Connection: close` is hop-by-hop.
        assert!(!got.headers.contains_key("connection"), "{:?}", got.headers);
    }
    let log = sandbox.log();
    assert_eq!(log.accepted, 3);
    let conns: Vec<usize> = log.requests.iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 1, 2]);
    server.shutdown().await;
}

#[tokio::test]
async fn connection_close_is_honoured_even_if_the_sandbox_keeps_the_socket_open() {
    let sandbox = ScriptedSandbox::start(|req, _| {
        vec![
            Step::Send(
                format!(
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}",
                    req.target().len(),
                    req.target()
                )
                .into_bytes(),
            ),
            Step::Hang,
        ]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..3 {
        let path = format!("/k/{i}");
        assert_eq!(client.get(&path, "kc").await.text(), path);
    }
    let log = sandbox.log();
    assert_eq!(
        log.requests.iter().map(|r| r.conn).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // The proxy closes each of them itself: nothing is left open on the sandbox.
    sandbox
        .wait_for("the proxy to close every connection", WAIT, |log| {
            (0..3).all(|c| log.closed_by_peer.contains(&c))
        })
        .await;
    assert!(sandbox.log().late.is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn sandbox_closing_an_idle_connection_is_neither_a_502_nor_a_duplicate() {
    // Every response is followed at once by the sandbox closing the connection without
    // announcing it (its keep-alive timeout firing), so the next request races that close.
    let sandbox =
        ScriptedSandbox::start(|req, _| vec![Step::Send(ok(req.target().as_bytes())), Step::Close])
            .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..10 {
        let path = format!("/idle/{i}");
        let got = client.get(&path, "ic").await;
        assert_eq!((got.status, got.text()), (200, path.clone()), "request {i}");
        if i % 2 == 0 {
            // Half the time the next request goes out after the close surely happened.
            sandbox
                .wait_for("the sandbox to close", WAIT, |log| {
                    log.closed_by_sandbox.len() > i
                })
                .await;
            tokio::task::yield_now().await;
        }
    }
    let log = sandbox.log();
    for i in 0..10 {
        assert_eq!(
            log.count(&format!("/idle/{i}")),
            1,
            "delivered exactly once"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_closing_an_idle_connection_never_fails_a_post() {
    // As above, with bodies: a request with a body is never retried, so the proxy must
    // notice the close before it writes, not after (the sandbox never saw the POST).
    let sandbox =
        ScriptedSandbox::start(|req, _| vec![Step::Send(ok(req.target().as_bytes())), Step::Close])
            .await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..30 {
        let path = format!("/post/{i}");
        let req = Request::post(path.as_str())
            .header("host", "a")
            .header("x-session-id", "ip")
            .body(Full::new(Bytes::from(format!("body {i}"))).boxed())
            .unwrap();
        let got = client.fetch(req).await;
        assert_eq!((got.status, got.text()), (200, path.clone()), "request {i}");
        // The sandbox's FIN follows its answer at once: wait until it is sent.
        sandbox
            .wait_for("the sandbox to close", WAIT, |log| {
                log.closed_by_sandbox.len() > i
            })
            .await;
    }
    let log = sandbox.log();
    for i in 0..30 {
        assert_eq!(
            log.count(&format!("/post/{i}")),
            1,
            "delivered exactly once"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn pipelined_client_requests_are_answered_in_order_one_at_a_time_upstream() {
    let sandbox =
        ScriptedSandbox::start(|req, _| vec![Step::Send(ok(req.target().as_bytes()))]).await;
    let server = proxy(&[&sandbox], "").await;
    let mut client = raw(&server).await;
    // Three requests in one write: the client pipelines.
    let mut burst = Vec::new();
    for i in 0..3 {
        burst.extend_from_slice(
            format!("GET /p/{i} HTTP/1.1\r\nhost: a\r\nx-session-id: pl\r\n\r\n").as_bytes(),
        );
    }
    client.write(&burst).await.unwrap();
    for i in 0..3 {
        let resp = bounded("response", client.read_response("GET"))
            .await
            .unwrap();
        assert_eq!(resp.head.status, 200);
        assert_eq!(resp.body.data, format!("/p/{i}").as_bytes(), "in order");
    }
    let log = sandbox.log();
    assert_eq!(log.requests.len(), 3);
    // Never pipelined towards the sandbox: each request alone, after the previous answer.
    assert!(log.requests.iter().all(|r| r.extra.is_empty()), "{log:#?}");
    assert_eq!(log.accepted, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn sandbox_closing_idle_pooled_connections_is_neither_a_502_nor_a_duplicate() {
    // Two sessions on one client connection: from the second session on, requests take
    // the shared pool; the sandbox closes every connection right after answering.
    let closing =
        ScriptedSandbox::start(|req, _| vec![Step::Send(ok(req.target().as_bytes())), Step::Close])
            .await;
    let steady = always(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsteady").await;
    let server = proxy(&[&closing, &steady], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    // Bind both sessions; which sandbox each got is read from the answers.
    let a = client.get("/bind", "pc-1").await;
    let b = client.get("/bind", "pc-2").await;
    let session = if a.text() == "/bind" { "pc-1" } else { "pc-2" };
    assert_eq!((a.status, b.status), (200, 200));
    for i in 0..10 {
        let path = format!("/pooled/{i}");
        let got = client.get(&path, session).await;
        assert_eq!((got.status, got.text()), (200, path.clone()), "request {i}");
        if i % 2 == 0 {
            closing
                .wait_for("the sandbox to close", WAIT, |log| {
                    log.closed_by_sandbox.len() > i + 1
                })
                .await;
        }
    }
    let log = closing.log();
    for i in 0..10 {
        assert_eq!(
            log.count(&format!("/pooled/{i}")),
            1,
            "delivered exactly once"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connection_is_closed_after_pool_idle_timeout() {
    let sandbox =
        ScriptedSandbox::start(|req, _| vec![Step::Send(ok(req.target().as_bytes()))]).await;
    let server = proxy(&[&sandbox], "proxy: {pool_idle_timeout: 200ms}\n").await;
    // One client connection, kept open and idle: the sandbox connection it used must not
    // outlive proxy.pool_idle_timeout (the sandbox's own keep-alive timeout may be close).
    let mut client = Client::open(server.proxy_addr()).await;
    assert_eq!(client.get("/1", "it").await.text(), "/1");
    sandbox
        .wait_for("the proxy to close the idle connection", WAIT, |log| {
            log.closed_by_peer.contains(&0)
        })
        .await;
    assert_eq!(client.get("/2", "it").await.text(), "/2");
    let log = sandbox.log();
    assert_eq!((log.accepted, log.requests[1].conn), (2, 1));
    server.shutdown().await;
}

/// Answers `/same-write` and `/later` with their target plus an unsolicited second
/// response (`EXTRA`): in the same write, or 20 ms after it (then marks "extra sent");
/// every other request with its target.
fn with_unsolicited_extra(req: &Received, _: usize) -> Vec<Step> {
    let mut first = ok(req.target().as_bytes());
    let extra = ok(b"EXTRA");
    match req.target() {
        "/same-write" => {
            first.extend_from_slice(&extra);
            vec![Step::Send(first), Step::Hang]
        }
        "/later" => vec![
            Step::Send(first),
            Step::Pause(Duration::from_millis(20)),
            Step::Send(extra),
            Step::Mark("extra sent"),
            Step::Hang,
        ],
        _ => vec![Step::Send(first)],
    }
}

/// RFC 9112 6.3: bytes after a complete response belong to no request; a client "MUST
/// NOT process, cache, or forward such extra data as a separate response". The
/// connection is unusable and the next requests get their own answers.
async fn extra_bytes_never_answer(
    sandbox: &ScriptedSandbox,
    client: &mut Client,
    session: &str,
    first: &str,
) {
    let got = client.get(first, session).await;
    assert_eq!((got.status, got.text().as_str()), (200, first));
    if first == "/later" {
        // Written (and, the sandbox's sockets having TCP_NODELAY, on the wire) before the
        // next request leaves the client: a correct proxy finds them on the idle connection.
        sandbox
            .wait_for("the unsolicited bytes", WAIT, |log| {
                log.marked("extra sent")
            })
            .await;
    }
    for i in 0..2 {
        let path = format!("{first}/next/{i}");
        let got = client.get(&path, session).await;
        assert_eq!((got.status, got.text()), (200, path.clone()), "never EXTRA");
        let log = sandbox.log();
        let conn_of = |t: &str| log.requests.iter().find(|r| r.target() == t).unwrap().conn;
        assert_ne!(
            conn_of(&path),
            conn_of(first),
            "not on the spoilt connection"
        );
    }
}

#[tokio::test]
async fn bytes_after_a_complete_response_never_answer_the_next_request() {
    let sandbox = ScriptedSandbox::start(with_unsolicited_extra).await;
    let server = proxy(&[&sandbox], "").await;
    for first in ["/same-write", "/later"] {
        // A warm connection: the spoilt exchange is not the first on it.
        let mut client = Client::open(server.proxy_addr()).await;
        assert_eq!(client.get("/warm", "ex").await.text(), "/warm");
        extra_bytes_never_answer(&sandbox, &mut client, "ex", first).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn bytes_after_a_complete_response_never_answer_the_next_pooled_request() {
    let sandbox = ScriptedSandbox::start(with_unsolicited_extra).await;
    let other = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother").await;
    let server = proxy(&[&sandbox, &other], "").await;
    let mut setup = Client::open(server.proxy_addr()).await;
    let a = setup.get("/bind", "ep-1").await;
    assert_eq!(setup.get("/bind", "ep-2").await.status, 200);
    let (session, other_session) = if a.text() == "/bind" {
        ("ep-1", "ep-2")
    } else {
        ("ep-2", "ep-1")
    };
    drop(setup);
    for first in ["/same-write", "/later"] {
        // A mixed client connection: the session's requests take the pool.
        let mut client = Client::open(server.proxy_addr()).await;
        assert_eq!(client.get("/", other_session).await.text(), "other");
        extra_bytes_never_answer(&sandbox, &mut client, session, first).await;
    }
    server.shutdown().await;
}
