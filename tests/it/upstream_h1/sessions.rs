//! Several sessions (and sandboxes) on one client connection, and concurrent HTTP/2
//! streams of one session.

use super::*;

#[tokio::test]
async fn interleaved_sessions_on_one_connection_never_cross() {
    // Three sandboxes, each with its own framing; each answers `name|session|n`.
    fn named(name: &'static str) -> impl Fn(&Received, usize) -> Vec<Step> + Send + Sync {
        move |req, i| {
            let body = format!("{name}|{}|{i}", req.session());
            match name {
                "A" => vec![Step::Send(ok(body.as_bytes()))],
                "B" => vec![Step::Send(ok_chunked(&[
                    name.as_bytes(),
                    &body.as_bytes()[1..],
                ]))],
                _ => {
                    let mut v = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
                    v.extend_from_slice(body.as_bytes());
                    vec![Step::Send(v), Step::Close]
                }
            }
        }
    }
    let sandboxes = [
        ScriptedSandbox::start(named("A")).await,
        ScriptedSandbox::start(named("B")).await,
        ScriptedSandbox::start(named("C")).await,
    ];
    let server = proxy(&[&sandboxes[0], &sandboxes[1], &sandboxes[2]], "").await;
    let mut client = Client::open(server.proxy_addr()).await;
    let sessions = ["s-one", "s-two", "s-three"];
    let mut home = std::collections::HashMap::new();
    let mut sent = std::collections::HashMap::<&str, usize>::new();
    let orders: [[usize; 3]; 4] = [[0, 1, 2], [2, 0, 1], [1, 1, 0], [2, 2, 1]];
    for order in orders {
        for s in order.map(|i| sessions[i]) {
            let got = client.get(&format!("/{s}"), s).await;
            assert_eq!(got.status, 200, "{s}: {}", got.text());
            let text = got.text();
            let parts: Vec<&str> = text.split('|').collect();
            assert_eq!(parts.len(), 3, "{text}");
            assert_eq!(parts[1], s, "the answer is to this session's request");
            let sandbox = *home.entry(s).or_insert(parts[0].to_owned()) == parts[0];
            assert!(sandbox, "{s} answered by {} after {}", parts[0], home[s]);
            *sent.entry(s).or_default() += 1;
        }
    }
    let mut homes: Vec<&String> = home.values().collect();
    homes.sort();
    assert_eq!(homes, ["A", "B", "C"], "one sandbox per session");
    for (sandbox, name) in sandboxes.iter().zip(["A", "B", "C"]) {
        let (s, _) = home.iter().find(|(_, h)| *h == name).unwrap();
        let got = sandbox.requests();
        assert!(
            got.iter()
                .all(|r| r.session() == *s && r.target() == format!("/{s}")),
            "{name} saw only {s}: {got:#?}"
        );
        assert_eq!(got.len(), sent[s], "{name}: each request once");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_h2_streams_of_one_session_are_not_held_behind_each_other() {
    // Each request is answered only once all three have reached the sandbox: a proxy that
    // queued one session's streams behind a single upstream HTTP/1.1 connection (which
    // cannot carry two exchanges at once) would never get there. Think of an open SSE
    // stream next to ordinary requests of the same agent session.
    let sandbox = ScriptedSandbox::start(|req, _| {
        vec![Step::AwaitRelease, Step::Send(ok(req.target().as_bytes()))]
    })
    .await;
    let server = proxy(&[&sandbox], "").await;
    let stream = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, ReqBody>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..3 {
        let mut sender = sender.clone();
        calls.spawn(async move {
            let req = Request::get(format!("http://app.example/c/{i}"))
                .header("x-session-id", "h2c")
                .body(Empty::new().boxed())
                .unwrap();
            let resp = sender.send_request(req).await.expect("a response");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, status, body)
        });
    }
    sandbox
        .wait_for("all three requests at the sandbox at once", WAIT, |log| {
            log.requests.len() == 3
        })
        .await;
    for _ in 0..3 {
        sandbox.release();
    }
    let mut answers = Vec::new();
    while let Some(done) = bounded("the answers", calls.join_next()).await {
        answers.push(done.unwrap());
    }
    answers.sort();
    for (i, status, body) in answers {
        assert_eq!((status, body), (200, Bytes::from(format!("/c/{i}"))));
    }
    let log = sandbox.log();
    assert_eq!(
        log.accepted, 3,
        "one upstream connection per exchange in flight"
    );
    for i in 0..3 {
        assert_eq!(log.count(&format!("/c/{i}")), 1);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn idle_upstream_connections_per_sandbox_are_capped() {
    // Five exchanges of one session at once need five connections; afterwards at most
    // `proxy.pool_max_idle_per_host` (2) stay open, the rest are closed by the proxy.
    let sandbox = ScriptedSandbox::start(|req, _| {
        vec![Step::AwaitRelease, Step::Send(ok(req.target().as_bytes()))]
    })
    .await;
    let server = proxy(&[&sandbox], "proxy: {pool_max_idle_per_host: 2}\n").await;
    let stream = TcpStream::connect(server.proxy_addr()).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, ReqBody>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..5 {
        let mut sender = sender.clone();
        calls.spawn(async move {
            let req = Request::get(format!("http://app.example/p/{i}"))
                .header("x-session-id", "cap")
                .body(Empty::new().boxed())
                .unwrap();
            let resp = sender.send_request(req).await.expect("a response");
            resp.into_body().collect().await.unwrap().to_bytes()
        });
    }
    sandbox
        .wait_for("five requests at once", WAIT, |log| log.requests.len() == 5)
        .await;
    for _ in 0..5 {
        sandbox.release();
    }
    while let Some(done) = bounded("the answers", calls.join_next()).await {
        assert!(done.unwrap().starts_with(b"/p/"));
    }
    sandbox
        .wait_for("all but two connections closed by the proxy", WAIT, |log| {
            log.closed_by_peer.len() == 3
        })
        .await;
    assert_eq!(sandbox.accepted(), 5);
    // The two kept are used again: two more exchanges at once open nothing new.
    for i in 0..2 {
        let mut sender = sender.clone();
        calls.spawn(async move {
            let req = Request::get(format!("http://app.example/q/{i}"))
                .header("x-session-id", "cap")
                .body(Empty::new().boxed())
                .unwrap();
            let resp = sender.send_request(req).await.expect("a response");
            resp.into_body().collect().await.unwrap().to_bytes()
        });
    }
    sandbox
        .wait_for("two more requests", WAIT, |log| log.requests.len() == 7)
        .await;
    sandbox.release();
    sandbox.release();
    while let Some(done) = bounded("the answers", calls.join_next()).await {
        assert!(done.unwrap().starts_with(b"/q/"));
    }
    assert_eq!(sandbox.accepted(), 5, "the idle connections were reused");
    server.shutdown().await;
}
