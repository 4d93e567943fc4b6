//! Preview URLs over real sockets (issue 23): `{port}-{preview-id}.{domain}` reaches that
//! port of the preview's session's sandbox and never another session's; the admin API
//! mints, lists and revokes; `access: token` exchanges a token for a host-only cookie; every
//! refusal has its status and code; a preview request resumes a paused sandbox; WebSocket
//! and SSE pass; requests are counted per result.

use crate::support;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use agent_activator::metrics::Metrics;
use agent_activator::server::{self, RunningServer};
use agent_activator::testing::ScriptedBackend;
use support::{EchoUpstream, HttpClient, Reply, WAIT};

const DOMAIN: &str = "preview.test";

/// An activator over a scripted backend whose sandboxes `sbx-0`, `sbx-1` are served by
/// `mains[0]`, `mains[1]`, with ports 5173 and 3000 of each served by their own upstream.
struct Rig {
    server: RunningServer,
    backend: Arc<ScriptedBackend>,
    /// `ports[sandbox][0]` serves 5173, `[1]` serves 3000.
    ports: Vec<[EchoUpstream; 2]>,
    _mains: Vec<EchoUpstream>,
    proxy: HttpClient,
    admin: HttpClient,
}

async fn rig(access: &str, extra: &str) -> Rig {
    let mains = support::echo_upstreams(2).await;
    let mut ports = Vec::new();
    for _ in 0..2 {
        ports.push([EchoUpstream::start().await, EchoUpstream::start().await]);
    }
    let backend =
        Arc::new(ScriptedBackend::new(true).sandboxes_at(mains.iter().map(|m| m.addr).collect()));
    for (n, [p5173, p3000]) in ports.iter().enumerate() {
        backend.expose(&format!("sbx-{n}"), 5173, p5173.addr);
        backend.expose(&format!("sbx-{n}"), 3000, p3000.addr);
    }
    let config = support::config(&format!(
        "{}preview: {{domain: {DOMAIN}, ports: [5173, 3000], access: {access}}}\n{extra}",
        support::static_backend(&[mains[0].addr])
    ));
    let server = server::start_with_backend(config, backend.clone(), Arc::new(Metrics::new()))
        .await
        .expect("activator starts");
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    Rig {
        server,
        backend,
        ports,
        _mains: mains,
        proxy,
        admin,
    }
}

impl Rig {
    /// Starts session `id` with a request on the main route.
    async fn session(&self, id: &str) {
        let r = self.proxy.get_session("/", id).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Mints a preview of `session`: (preview ID, token if any).
    async fn mint(&self, session: &str) -> (String, Option<String>) {
        let r = self
            .admin
            .call("POST", &format!("/api/sessions/{session}/previews"))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let j = r.json();
        let id = j["preview"].as_str().unwrap().to_owned();
        (id, j["token"].as_str().map(str::to_owned))
    }

    /// `GET path` on preview host `{port}-{id}.{DOMAIN}` with `headers`.
    async fn get(&self, port: u16, id: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let host = format!("{port}-{id}.{DOMAIN}");
        let mut all = vec![("host", host.as_str())];
        all.extend_from_slice(headers);
        self.proxy.get(path, &all).await
    }

    fn port_of(&self, sandbox: usize, which: usize) -> u64 {
        u64::from(self.ports[sandbox][which].addr.port())
    }
}

fn assert_refused(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.error_code(), code, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn a_preview_reaches_that_port_of_its_own_sessions_sandbox_only() {
    let rig = rig("public", "").await;
    rig.session("alice").await;
    rig.session("bob").await;
    let (alice, token) = rig.mint("alice").await;
    let (bob, _) = rig.mint("bob").await;
    assert!(token.is_none(), "public previews carry no token");
    assert_eq!(alice.len(), 32);
    assert!(alice.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(alice, bob);

    let a5173 = rig.get(5173, &alice, "/app?x=1", &[]).await;
    assert_eq!(a5173.status, 200, "{}", a5173.text());
    let seen = a5173.json();
    assert_eq!(seen["port"].as_u64(), Some(rig.port_of(0, 0)));
    assert_eq!(seen["path"], "/app?x=1");
    assert_eq!(
        seen["headers"]["host"].as_str(),
        Some(format!("5173-{alice}.{DOMAIN}").as_str()),
        "the dev server sees the preview host"
    );
    let a3000 = rig.get(3000, &alice, "/", &[]).await;
    assert_eq!(a3000.json()["port"].as_u64(), Some(rig.port_of(0, 1)));
    let b5173 = rig.get(5173, &bob, "/", &[]).await;
    assert_eq!(b5173.json()["port"].as_u64(), Some(rig.port_of(1, 0)));
    // Never another session's: a session header on a preview host changes nothing.
    let mixed = rig.get(5173, &alice, "/", &[("x-session-id", "bob")]).await;
    assert_eq!(mixed.json()["port"].as_u64(), Some(rig.port_of(0, 0)));
    assert_eq!(
        mixed.json()["session"],
        "alice",
        "forwarded as alice's request"
    );

    // Listing: both ports' URLs, no token; another session's list is its own.
    let list = rig
        .admin
        .get("/api/sessions/alice/previews", &[])
        .await
        .json();
    let rows = list["previews"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["preview"], alice.as_str());
    let port = rig.server.proxy_addr().port();
    assert_eq!(
        rows[0]["urls"]["5173"].as_str(),
        Some(format!("http://5173-{alice}.{DOMAIN}:{port}/").as_str())
    );
    assert!(rows[0].get("token").is_none());
    rig.server.shutdown().await;
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code() {
    let rig = rig("public", "").await;
    rig.session("carol").await;
    let (id, _) = rig.mint("carol").await;
    // The port allowlist.
    assert_refused(
        &rig.get(8888, &id, "/", &[]).await,
        403,
        "preview_port_not_allowed",
    );
    // Unknown, and a host under the domain that is not {port}-{id}.
    let guess = "0123456789abcdef0123456789abcdef";
    assert_refused(
        &rig.get(5173, guess, "/", &[]).await,
        404,
        "unknown_preview",
    );
    let bad = rig
        .proxy
        .get("/", &[("host", &format!("{id}.{DOMAIN}"))])
        .await;
    assert_refused(&bad, 400, "invalid_preview_host");
    // Minting: an unknown session, then the per-session bound (default 8).
    let unknown = rig
        .admin
        .call("POST", "/api/sessions/nobody/previews")
        .await;
    assert_refused(&unknown, 404, "unknown_session");
    for _ in 1..8 {
        rig.mint("carol").await;
    }
    let ninth = rig.admin.call("POST", "/api/sessions/carol/previews").await;
    assert_refused(&ninth, 409, "too_many_previews");
    // Revoked: gone at once.
    let revoke = rig
        .admin
        .call("DELETE", &format!("/api/sessions/carol/previews/{id}"))
        .await;
    assert_eq!(revoke.status, 200, "{}", revoke.text());
    assert_refused(&rig.get(5173, &id, "/", &[]).await, 404, "unknown_preview");
    // Released: every preview of the session answers 410, also once the ID is back.
    let (live, _) = {
        let list = rig
            .admin
            .get("/api/sessions/carol/previews", &[])
            .await
            .json();
        (
            list["previews"][0]["preview"].as_str().unwrap().to_owned(),
            (),
        )
    };
    assert_eq!(rig.get(5173, &live, "/", &[]).await.status, 200);
    let released = rig.admin.call("DELETE", "/api/sessions/carol").await;
    assert_eq!(released.status, 200, "{}", released.text());
    assert_refused(
        &rig.get(5173, &live, "/", &[]).await,
        410,
        "preview_session_released",
    );
    rig.session("carol").await;
    assert_refused(
        &rig.get(5173, &live, "/", &[]).await,
        410,
        "preview_session_released",
    );
    let fresh = rig
        .admin
        .get("/api/sessions/carol/previews", &[])
        .await
        .json();
    assert_eq!(
        fresh["previews"].as_array().unwrap().len(),
        0,
        "a new incarnation starts empty"
    );
    // An unreachable port (the backend has no address for it).
    rig.backend.script().ports.clear();
    let (again, _) = rig.mint("carol").await;
    assert_refused(
        &rig.get(5173, &again, "/", &[]).await,
        502,
        "preview_port_unreachable",
    );
    let metrics = rig.admin.get("/metrics", &[]).await.text();
    for (result, n) in [
        ("preview_port_not_allowed", 1.0),
        ("unknown_preview", 2.0),
        ("invalid_preview_host", 1.0),
        ("preview_session_released", 2.0),
        ("forwarded", 1.0),
    ] {
        let name = format!("activator_preview_requests_total{{result=\"{result}\"}}");
        assert_eq!(
            support::metric_value(&metrics, &name),
            Some(n),
            "{name}\n{metrics}"
        );
    }
    rig.server.shutdown().await;
}

#[tokio::test]
async fn a_preview_expires() {
    let mains = support::echo_upstreams(1).await;
    let backend = Arc::new(ScriptedBackend::new(true).sandboxes_at(vec![mains[0].addr]));
    backend.expose("sbx-0", 5173, mains[0].addr);
    let config = support::config(&format!(
        "{}preview: {{domain: {DOMAIN}, ports: [5173], access: public, ttl: 1s}}\n",
        support::static_backend(&[mains[0].addr])
    ));
    let server = server::start_with_backend(config, backend, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let rig_proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(rig_proxy.get_session("/", "dora").await.status, 200);
    let minted = admin
        .call("POST", "/api/sessions/dora/previews")
        .await
        .json();
    let id = minted["preview"].as_str().unwrap().to_owned();
    let host = format!("5173-{id}.{DOMAIN}");
    assert_eq!(rig_proxy.get("/", &[("host", &host)]).await.status, 200);
    // Expiry is in whole Unix seconds: at most 2 s from now it has passed.
    let expired = support::eventually("the preview to expire", || {
        let c = rig_proxy.clone();
        let host = host.clone();
        async move {
            let r = c.get("/", &[("host", &host)]).await;
            (r.status != 200).then_some(r)
        }
    })
    .await;
    assert_refused(&expired, 410, "preview_expired");
    server.shutdown().await;
}

#[tokio::test]
async fn the_token_is_exchanged_for_a_host_only_cookie_that_never_reaches_the_sandbox() {
    let rig = rig("token", "").await;
    rig.session("erin").await;
    rig.session("fred").await;
    let (id, token) = rig.mint("erin").await;
    let (other, other_token) = rig.mint("fred").await;
    let token = token.expect("access: token mints a token");
    assert!(token.len() < 256);
    assert_refused(
        &rig.get(5173, &id, "/", &[]).await,
        401,
        "preview_token_required",
    );
    let path = |t: &str| format!("/page?x=1&preview_token={t}");
    assert_refused(
        &rig.get(5173, &id, &path("nope"), &[]).await,
        401,
        "invalid_preview_token",
    );
    // Another preview's token does not open this one.
    let theirs = other_token.unwrap();
    assert_refused(
        &rig.get(5173, &id, &path(&theirs), &[]).await,
        401,
        "invalid_preview_token",
    );

    // The exchange: a redirect without the token, and the cookie.
    let ex = rig.get(5173, &id, &path(&token), &[]).await;
    assert_eq!(ex.status, 303, "{}", ex.text());
    assert_eq!(ex.header("location"), Some("/page?x=1"));
    assert_eq!(ex.header("referrer-policy"), Some("no-referrer"));
    let set = ex.header("set-cookie").unwrap().to_owned();
    assert!(set.starts_with("activator-preview="), "{set}");
    assert!(set.contains("HttpOnly") && set.contains("Path=/"), "{set}");
    assert!(
        !set.to_ascii_lowercase().contains("domain="),
        "host-only: {set}"
    );
    assert!(!set.contains(&token), "the cookie is not the token");
    let cookie = set.split(';').next().unwrap().to_owned();
    for p in &rig.ports[0] {
        assert_eq!(p.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    // With the cookie (next to the page's own): forwarded, the cookie stripped.
    let both = format!("theme=dark; {cookie}");
    let ok = rig.get(5173, &id, "/page?x=1", &[("cookie", &both)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = ok.json();
    assert_eq!(seen["port"].as_u64(), Some(rig.port_of(0, 0)));
    assert_eq!(seen["headers"]["cookie"], "theme=dark");
    // The same cookie opens the preview's other port (its own host) but not fred's.
    let c = [("cookie", cookie.as_str())];
    assert_eq!(rig.get(3000, &id, "/", &c).await.status, 200);
    assert_refused(
        &rig.get(5173, &other, "/", &c).await,
        401,
        "invalid_preview_token",
    );
    // A garbled or oversized cookie is refused, never a panic.
    let long = format!("activator-preview={}", "a".repeat(5000));
    assert_refused(
        &rig.get(5173, &id, "/", &[("cookie", &long)]).await,
        401,
        "invalid_preview_token",
    );

    // The header form: forwarded at once (token stripped) and the cookie set.
    let h = rig
        .get(5173, &id, "/h", &[("x-preview-token", &token)])
        .await;
    assert_eq!(h.status, 200, "{}", h.text());
    assert!(h.json()["headers"].get("x-preview-token").is_none());
    assert!(
        h.header("set-cookie")
            .is_some_and(|c| c.starts_with("activator-preview="))
    );
    let metrics = rig.admin.get("/metrics", &[]).await.text();
    let exchanged = "activator_preview_requests_total{result=\"exchanged\"}";
    assert_eq!(support::metric_value(&metrics, exchanged), Some(1.0));
    rig.server.shutdown().await;
}

#[tokio::test]
async fn a_preview_request_resumes_a_paused_sandbox_and_counts_as_activity() {
    let rig = rig("public", "").await;
    rig.session("gina").await;
    let (id, _) = rig.mint("gina").await;
    let paused = rig.admin.call("POST", "/api/sessions/gina/pause").await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    let r = rig.get(5173, &id, "/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("resume"));
    assert_eq!(ScriptedBackend::count(&rig.backend.resumes), 1);
    // In flight on the preview host = in flight for the session (no idle pause meanwhile).
    let slow = {
        let c = rig.proxy.clone();
        let host = format!("5173-{id}.{DOMAIN}");
        tokio::spawn(async move { c.get("/slow?ms=600", &[("host", &host)]).await })
    };
    support::eventually("the preview request to count in flight", || {
        let admin = rig.admin.clone();
        async move {
            let row = admin.get("/api/sessions/gina", &[]).await.json();
            (row["in_flight"].as_u64() == Some(1)).then_some(())
        }
    })
    .await;
    assert_eq!(slow.await.unwrap().status, 200);
    rig.server.shutdown().await;
}

#[tokio::test]
async fn websocket_and_sse_pass_on_a_preview_host() {
    let rig = rig("public", "").await;
    rig.session("hugo").await;
    let (id, _) = rig.mint("hugo").await;
    let addr = rig.server.proxy_addr();
    let mut req = format!("ws://5173-{id}.{DOMAIN}:{}/ws", addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "origin",
        format!("http://5173-{id}.{DOMAIN}").parse().unwrap(),
    );
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .unwrap()
        .expect("websocket handshake on the preview host");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hmr {i}"))).await.unwrap();
        let got = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), format!("hmr {i}"));
    }
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    assert!(
        rig.ports[0][0]
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );

    // SSE: events arrive one by one, not buffered to the end.
    let sse = rig
        .proxy
        .send_streaming(
            rig.proxy
                .request("GET", "/sse?n=3&interval_ms=300")
                .header("host", format!("5173-{id}.{DOMAIN}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(sse.status(), 200);
    let mut body = sse.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the first event")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: 0\n\n")
    );
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rest.to_bytes(),
        Bytes::from_static(b"data: 1\n\ndata: 2\n\n")
    );
    rig.server.shutdown().await;
}

#[tokio::test]
async fn previews_are_per_pool_and_metered_per_pool() {
    let ups = support::echo_upstreams(3).await;
    let (web, web_dev, other) = (ups[0].addr, ups[1].addr, ups[2].addr);
    let server = support::start(&format!(
        "pools:\n\
         - name: web\n  match: {{header: {{name: X-Pool, value: web}}}}\n  \
           backend: {{kind: static, endpoints: ['{web}']}}\n  \
           preview: {{domain: {DOMAIN}, ports: [{}], access: public}}\n\
         - name: other\n  backend: {{kind: static, endpoints: ['{other}']}}\n",
        web_dev.port()
    ))
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let r = proxy
        .get("/", &[("x-session-id", "wanda"), ("x-pool", "web")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(proxy.get_session("/", "otto").await.status, 200);
    assert_refused(
        &admin.call("POST", "/api/sessions/otto/previews").await,
        409,
        "previews_disabled",
    );
    let minted = admin.call("POST", "/api/sessions/wanda/previews").await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    assert_eq!(minted.json()["pool"], "web");
    let id = minted.json()["preview"].as_str().unwrap().to_owned();
    let host = format!("{}-{id}.{DOMAIN}", web_dev.port());
    let seen = proxy.get("/", &[("host", &host)]).await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    assert_eq!(
        seen.json()["port"].as_u64(),
        Some(u64::from(web_dev.port()))
    );
    let metrics = admin.get("/metrics", &[]).await.text();
    let name = "activator_preview_requests_total{result=\"forwarded\",pool=\"web\"}";
    assert_eq!(
        support::metric_value(&metrics, name),
        Some(1.0),
        "{metrics}"
    );
    server.shutdown().await;
}
