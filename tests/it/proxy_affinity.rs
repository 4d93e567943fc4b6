//! Upstream connection reuse over real sockets (the inline HTTP/1.1 client's per-sandbox
//! pool, `proxy/h1client.rs`): a session's requests reuse one upstream connection to its
//! sandbox, sessions on one client connection never reach each other's sandbox, and a
//! session's new binding (resume onto a new endpoint) closes the old connection instead
//! of leaving it idle.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use agent_activator::backend::ActivationKind;
use agent_activator::metrics::Metrics;
use agent_activator::server;
use agent_activator::testing::ScriptedBackend;
use support::{EchoUpstream, WAIT, static_backend};

/// One client TCP connection to the proxy; requests on it are strictly sequential.
struct OneConnection {
    sender: SendRequest<Empty<Bytes>>,
}

/// What the echo upstream saw: its own port and the `X-Session-ID` it received.
#[derive(Debug, PartialEq)]
struct Seen {
    port: u16,
    session: String,
}

impl OneConnection {
    async fn open(addr: SocketAddr) -> OneConnection {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        OneConnection { sender }
    }

    async fn get(&mut self, session: &str) -> Seen {
        let req = Request::get("/who")
            .header("host", "app.example")
            .header("x-session-id", session)
            .body(Empty::new())
            .unwrap();
        tokio::time::timeout(WAIT, async {
            self.sender
                .ready()
                .await
                .expect("the client connection stays open");
            let resp = self.sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "session {session}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            Seen {
                port: u16::try_from(json["port"].as_u64().unwrap()).unwrap(),
                session: json["session"].as_str().unwrap().to_owned(),
            }
        })
        .await
        .expect("response within the test bound")
    }
}

fn seen(up: &EchoUpstream, session: &str) -> Seen {
    Seen {
        port: up.addr.port(),
        session: session.to_owned(),
    }
}

#[tokio::test]
async fn one_client_connection_alternating_two_sessions_never_mixes_them() {
    let a = EchoUpstream::start().await;
    let b = EchoUpstream::start().await;
    let server = support::start(&static_backend(&[a.addr, b.addr])).await;
    let mut conn = OneConnection::open(server.proxy_addr()).await;

    // One session: every request on one pooled upstream connection to its sandbox.
    for _ in 0..3 {
        assert_eq!(conn.get("alpha").await, seen(&a, "alpha"));
    }
    assert_eq!(
        a.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );

    // A second session on the same client connection: each sandbox sees only its own,
    // whatever the order.
    for round in 0..4 {
        assert_eq!(conn.get("beta").await, seen(&b, "beta"), "round {round}");
        assert_eq!(conn.get("alpha").await, seen(&a, "alpha"), "round {round}");
    }
    // Mixed sessions on one client connection: the per-sandbox pool reaches only alpha's
    // sandbox for alpha.
    assert_eq!(conn.get("alpha").await, seen(&a, "alpha"));

    // A fresh client connection of beta alone reuses beta's pooled connection.
    let mut other = OneConnection::open(server.proxy_addr()).await;
    let before = b.accepted.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(other.get("beta").await, seen(&b, "beta"));
    }
    assert!(
        b.accepted.load(Ordering::SeqCst) <= before + 1,
        "at most one new upstream connection for a single-session client connection"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn pooled_connection_is_closed_when_the_binding_moves() {
    let first = EchoUpstream::start().await;
    let second = EchoUpstream::start().await;
    // One sandbox, `box-0`, that moves on resume: claimed at `first`, resumed at `second`
    // (a real cluster gives a resumed pod a new IP).
    let backend = Arc::new(
        ScriptedBackend::new(true)
            .one_sandbox("box-0", first.addr)
            .claims_as(ActivationKind::Create)
            .resumes_at(second.addr),
    );
    // The config names a static backend only to validate; the scripted one replaces it.
    let config = support::config(&static_backend(&[first.addr]));
    let server = server::start_with_backend(config, backend, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let mut conn = OneConnection::open(server.proxy_addr()).await;
    for _ in 0..3 {
        assert_eq!(conn.get("mover").await, seen(&first, "mover"));
    }
    assert_eq!(first.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        first.open.load(Ordering::SeqCst),
        1,
        "pooled connection open"
    );

    // Pause through the admin API; the next request resumes the sandbox elsewhere.
    let admin = support::HttpClient::http1(server.admin_addr());
    let paused = admin
        .send(
            admin
                .request("POST", "/api/sessions/mover/pause")
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.text());

    // Same client connection: the request goes to the new endpoint, never the old one.
    for _ in 0..3 {
        assert_eq!(conn.get("mover").await, seen(&second, "mover"));
    }
    assert_eq!(
        second.accepted.load(Ordering::SeqCst),
        1,
        "a new connection to the new endpoint"
    );
    assert_eq!(
        first.accepted.load(Ordering::SeqCst),
        1,
        "nothing new to the old endpoint"
    );
    // The old endpoint's connection was dropped, not left idle in a slot or the pool.
    support::wait_until("the old endpoint's connection closed", || {
        first.open.load(Ordering::SeqCst) == 0
    })
    .await;
    server.shutdown().await;
}
