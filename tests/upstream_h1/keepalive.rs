//! Keep-alive towards the sandbox: connection reuse, `Connection: close`, and a sandbox
//! that closes an idle connection.

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
