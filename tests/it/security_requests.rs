//! Hostile clients against request handling, one probe per test, over real sockets:
//! upgrades outside the allowlist, forged client addresses, error bodies that must not
//! leak internals, the admin port's token, and the drain delay.

use crate::support;

use std::time::Duration;

use tokio::net::TcpStream;

use support::{EchoUpstream, HttpClient, WAIT, start, static_backend};

#[tokio::test]
async fn h2c_upgrade_is_not_relayed() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c
        .get(
            "/plain",
            &[
                ("x-session-id", "h2c"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
            ],
        )
        .await;
    // Served as a plain request: the sandbox never saw the upgrade offer.
    assert_eq!(r.status, 200);
    let seen = &r.json()["headers"];
    assert!(seen.get("upgrade").is_none(), "{seen}");
    assert!(seen.get("http2-settings").is_none(), "{seen}");
    assert!(seen.get("connection").is_none(), "{seen}");
    assert_eq!(server.metrics().websockets_open.get(), 0);

    // A mixed offer is refused as a whole; the sandbox could pick the bad one.
    let r = c
        .get(
            "/plain",
            &[
                ("x-session-id", "h2c"),
                ("connection", "upgrade"),
                ("upgrade", "websocket, h2c"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("upgrade").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn allowed_websocket_upgrade_still_relays() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let url = format!("ws://{}/ws", server.proxy_addr());
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("x-session-id", "ws-ok".parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hi")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("hi"));
    drop(ws);
    let outcome = tokio::time::timeout(WAIT, server.shutdown()).await.unwrap();
    assert!(outcome.complete);
}

#[tokio::test]
async fn spoofed_forwarding_headers_from_an_untrusted_peer_are_replaced() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let spoof = [
        ("x-session-id", "spoof"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "bank.example"),
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("x-real-ip", "6.6.6.6"),
        ("x-request-id", "attacker-chosen"),
    ];
    let r = c.get("/who", &spoof).await;
    assert_eq!(r.status, 200);
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], format!("{}", server.proxy_addr()));
    assert!(seen.get("forwarded").is_none(), "{seen}");
    assert!(seen.get("x-real-ip").is_none(), "{seen}");
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_ne!(id, "attacker-chosen");
    assert_eq!(
        seen["x-request-id"],
        id.as_str(),
        "the sandbox sees the same ID"
    );
    server.shutdown().await;

    // The same request from a trusted proxy (loopback here) keeps its hops. Three
    // sandboxes: one per session below (the static backend pins them exclusively).
    let ups = support::echo_upstreams(3).await;
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let server = start(&format!(
        "{}proxy: {{trusted_proxies: [127.0.0.0/8]}}\nsession: {{on_missing: create}}\n",
        static_backend(&addrs)
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get("/who", &spoof).await;
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "bank.example");
    assert_eq!(seen["x-real-ip"], "6.6.6.6");
    assert_eq!(r.header("x-request-id"), Some("attacker-chosen"));
    // TLS terminated at the trusted Gateway: a minted cookie is Secure.
    let r = c.get("/mint", &[("x-forwarded-proto", "https")]).await;
    let cookie = r.header("set-cookie").expect("a session was minted");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let r = c.get("/mint", &[]).await;
    assert!(!r.header("set-cookie").unwrap().contains("Secure"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_failing_sandboxs_stderr_never_reaches_the_client() {
    let dir = std::env::temp_dir().join(format!("aa-sec-err-{}", std::process::id()));
    let server = start(&format!(
        "backend:\n  kind: process\n  command: [\"sh\", \"-c\", \"echo DATABASE_URL=postgres://app:hunter2@db.internal:5432/x >&2; exit 3\", \"sh\", \"{{port}}\"]\n  workdir_root: \"{}\"\n",
        dir.display()
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get_session("/", "victim").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "sandbox_start_failed");
    let body = r.text();
    for secret in [
        "hunter2",
        "DATABASE_URL",
        "db.internal",
        "exit",
        "127.0.0.1",
    ] {
        assert!(!body.contains(secret), "{secret} leaked: {body}");
    }
    assert_eq!(
        r.json()["error"]["message"],
        "the session's sandbox failed to start"
    );
    let id = r
        .header("x-request-id")
        .expect("the client gets the request ID");
    assert_eq!(id.len(), 32);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn upstream_errors_name_no_internal_address() {
    let dead = support::closed_port().await;
    let server = start(&static_backend(&[dead.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get_session("/", "gone").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "upstream_connect");
    assert!(
        !r.text().contains(&dead.addr.port().to_string()),
        "{}",
        r.text()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn admin_needs_the_token_except_on_public_paths() {
    let dir = std::env::temp_dir().join(format!("aa-sec-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}admin:\n  auth:\n    bearer_token_file: '{}'\n",
        static_backend(&[up.addr]),
        token.display()
    ))
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    assert_eq!(proxy.get_session("/", "alice").await.status, 200);
    let admin = HttpClient::http1(server.admin_addr());

    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            admin.get(path, &[]).await.status,
            200,
            "{path} stays public"
        );
    }
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("Bearer s3cret-token-x"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = admin.get("/api/sessions", &headers).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.error_code(), "unauthorized");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        let del = admin
            .send(
                admin
                    .request("DELETE", "/api/sessions/alice")
                    .header("authorization", auth.unwrap_or(""))
                    .body(Default::default())
                    .unwrap(),
            )
            .await;
        assert_eq!(del.status, 401, "{auth:?}: DELETE without the token");
    }
    assert_eq!(
        server
            .activator()
            .session_counts()
            .iter()
            .map(|(_, n)| n)
            .sum::<i64>(),
        1
    );

    let ok = [("authorization", "Bearer s3cret-token")];
    let r = admin.get("/api/sessions", &ok).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let del = admin
        .send(
            admin
                .request("DELETE", "/api/sessions/alice")
                .header("authorization", "Bearer s3cret-token")
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(del.status, 200, "{}", del.text());
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_missing_token_file_stops_the_start_naming_the_key() {
    let up = EchoUpstream::start().await;
    let config = support::config(&format!(
        "{}admin:\n  auth:\n    bearer_token_file: /nonexistent/aa-token\n",
        static_backend(&[up.addr])
    ));
    let err = agent_activator::server::start(config)
        .await
        .err()
        .expect("refused");
    assert!(err.is_config());
    assert!(
        err.to_string().starts_with("admin.auth.bearer_token_file"),
        "{err}"
    );
}

#[tokio::test]
async fn drain_delay_keeps_accepting_while_readiness_is_503() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}proxy: {{drain_delay: 600ms, drain_timeout: 5s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let proxy_addr = server.proxy_addr();
    let admin = HttpClient::http1(server.admin_addr());
    let handle = server.shutdown_handle();
    let drain = tokio::spawn(server.shutdown());
    support::wait_until("unready", || handle.is_draining()).await;
    assert_eq!(admin.get("/readyz", &[]).await.status, 503);
    // Still accepting and serving new connections during the delay.
    let fresh = HttpClient::http1(proxy_addr);
    assert_eq!(fresh.get_session("/late", "late").await.status, 200);
    // Then the listener closes.
    tokio::time::timeout(WAIT, async {
        while TcpStream::connect(proxy_addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("listener closed after the delay");
    let outcome = tokio::time::timeout(WAIT, drain).await.unwrap().unwrap();
    assert!(outcome.complete);
}
