//! Hostile clients and sandboxes against session trust and bounds, over real sockets:
//! signed tokens (forged, expired, rotated, missing), the table cap and the creation rate
//! under a flood, conflicting sources, the `/s/{id}/` prefix with a cookie-routed
//! WebSocket, a sandbox's `Set-Cookie` for the activator's cookie, the forward header.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use agent_activator::session::{SessionKey, TokenSigner};

use support::{EchoUpstream, HttpClient, WAIT, start, static_backend};

const SECRET_A: &str = "test-secret-a-0123456789abcdefghijklmnop";
const SECRET_B: &str = "test-secret-b-0123456789abcdefghijklmnop";

/// A directory with two key files, removed on drop.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new(tag: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!(
            "aa-sec-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), format!("{SECRET_A}\n")).unwrap();
        std::fs::write(dir.join("b"), SECRET_B).unwrap();
        Keys { dir }
    }

    /// A `session:` block with `auth: hmac` over `keys` (`(id, file)`), first signing.
    fn session_yaml(&self, keys: &[(&str, &str)], extra: &str) -> String {
        let mut y = String::from("session:\n  auth: hmac\n  hmac:\n    ttl: 1h\n    keys:\n");
        for (id, file) in keys {
            y.push_str(&format!(
                "      - {{id: {id}, secret_file: '{}'}}\n",
                self.dir.join(file).display()
            ));
        }
        y.push_str(extra);
        y
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        .into()
}

async fn mint(admin: &HttpClient, body: &str) -> serde_json::Value {
    let r = admin
        .send(
            admin
                .request("POST", "/api/sessions")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn forged_expired_rotated_and_missing_tokens() {
    let keys = Keys::new("tokens");
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}{}",
        static_backend(&[up.addr]),
        keys.session_yaml(&[("old", "a")], "")
    ))
    .await;
    let admin = HttpClient::http1(server.admin_addr());
    let c = HttpClient::http1(server.proxy_addr());

    let minted = mint(&admin, r#"{"session": "alice"}"#).await;
    assert_eq!(minted["session"], "alice");
    let token = minted["token"].as_str().unwrap().to_owned();
    assert!(
        token.starts_with("alice.") && token.contains(".old."),
        "{token}"
    );

    // The token routes; the sandbox sees the plain ID and never the token.
    let r = c.get_session("/x", &token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["session"], "alice");
    assert!(
        !r.text().contains(&token[token.len() - 64..]),
        "{}",
        r.text()
    );

    // The raw ID is not enough.
    let r = c.get_session("/x", "alice").await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (401, "invalid_session_token".into())
    );
    assert_eq!(r.header("www-authenticate"), Some("Session-Token"));
    // Forged: bob's ID under alice's MAC.
    let forged = token.replacen("alice", "bobby", 1);
    let r = c.get_session("/x", &forged).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (401, "invalid_session_token".into())
    );
    // Expired: correctly signed with the server's own secret, expiry in the past.
    let signer = TokenSigner::new(&[("old", SECRET_A.as_bytes())], 3600, 128).unwrap();
    let alice = SessionKey::parse("alice", 128).unwrap();
    let expired = signer.mint_at(&alice, agent_activator::session::now_unix() - 1);
    let r = c.get_session("/x", &expired).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (401, "invalid_session_token".into())
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    // The same signer with a future expiry is accepted: the secret file was read right.
    let fresh = signer.mint_at(&alice, agent_activator::session::now_unix() + 60);
    assert_eq!(c.get_session("/x", &fresh).await.status, 200);
    // Missing.
    let r = c.get("/x", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (401, "invalid_session_token".into())
    );
    // A random ID when none is asked for.
    let random = mint(&admin, "").await;
    assert_eq!(random["session"].as_str().unwrap().len(), 32);
    assert!(random["expires_at"].as_u64().unwrap() > agent_activator::session::now_unix());
    server.shutdown().await;

    // Rotation: the new key signs, the old one still verifies.
    let rotated = start(&format!(
        "{}{}",
        static_backend(&[up.addr]),
        keys.session_yaml(&[("new", "b"), ("old", "a")], "")
    ))
    .await;
    let c = HttpClient::http1(rotated.proxy_addr());
    let admin = HttpClient::http1(rotated.admin_addr());
    assert_eq!(c.get_session("/x", &token).await.status, 200);
    let new_token = mint(&admin, r#"{"session": "alice"}"#).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(new_token.contains(".new."), "{new_token}");
    assert_eq!(c.get_session("/x", &new_token).await.status, 200);
    rotated.shutdown().await;

    // Retired: only the new key left; old tokens are refused.
    let retired = start(&format!(
        "{}{}",
        static_backend(&[up.addr]),
        keys.session_yaml(&[("new", "b")], "")
    ))
    .await;
    let c = HttpClient::http1(retired.proxy_addr());
    let r = c.get_session("/x", &token).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (401, "invalid_session_token".into())
    );
    assert_eq!(c.get_session("/x", &new_token).await.status, 200);
    retired.shutdown().await;
}

#[tokio::test]
async fn minted_tokens_travel_in_the_cookie_and_never_reach_the_sandbox() {
    let keys = Keys::new("mint");
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}{}",
        static_backend(&[up.addr]),
        keys.session_yaml(
            &[("k1", "a")],
            "  on_missing: create\n  sources: [{header: X-Session-ID}, {cookie: sid}, {query: session}]\n"
        )
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get("/first", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = r.header("x-session-id").unwrap().to_owned();
    let plain = r.json()["session"].as_str().unwrap().to_owned();
    assert_eq!(plain.len(), 32, "the sandbox sees the plain minted ID");
    assert!(token.starts_with(&format!("{plain}.")), "{token}");
    let cookie = r.header("set-cookie").unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!(
            "sid={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"
        )),
        "{cookie}"
    );

    // Back through the cookie (next to another cookie) and the query: same session; the
    // sandbox gets neither the session cookie nor the token parameter.
    let r = c
        .get(
            &format!("/again?a=1&session={token}&b=2"),
            &[("cookie", &format!("theme=dark; sid={token}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["session"], plain);
    assert_eq!(j["headers"]["cookie"], "theme=dark");
    assert_eq!(j["path"], "/again?a=1&b=2");
    assert!(!r.text().contains(&token), "token leaked: {}", r.text());
    server.shutdown().await;
}

#[tokio::test]
async fn session_flood_against_the_cap() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  max_sessions: 5\n  max_sessions_per_sandbox: 100\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    for i in 0..5 {
        let r = c.get_session("/x", &format!("flood-{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut refused = 0;
    for i in 5..40 {
        let r = c.get_session("/x", &format!("flood-{i}")).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code()),
            (503, "session_limit".into())
        );
        assert_eq!(r.header("retry-after"), Some("1"));
        refused += 1;
    }
    assert_eq!(refused, 35);
    assert_eq!(server.activator().session_total(), 5);
    // Established sessions keep working at the cap.
    assert_eq!(c.get_session("/x", "flood-3").await.status, 200);
    // Releasing one makes room for exactly one.
    let del = admin
        .request("DELETE", "/api/sessions/flood-0")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(admin.send(del).await.status, 200);
    assert_eq!(c.get_session("/x", "late-1").await.status, 200);
    assert_eq!(c.get_session("/x", "late-2").await.status, 503);
    server.shutdown().await;
}

#[tokio::test]
async fn session_flood_against_the_rate_limit() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  max_sessions_per_sandbox: 100\n  create_rate: {{per_second: 0.5, burst: 3}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    for i in 0..3 {
        assert_eq!(c.get_session("/x", &format!("rate-{i}")).await.status, 200);
    }
    for i in 3..20 {
        let r = c.get_session("/x", &format!("rate-{i}")).await;
        assert_eq!(
            (r.status.as_u16(), r.error_code()),
            (429, "rate_limited".into())
        );
        // 0.5 tokens/s: the next one is due in at most 2 s.
        let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&after), "{after}");
    }
    // Requests for existing sessions spend no tokens.
    for _ in 0..10 {
        assert_eq!(c.get_session("/x", "rate-1").await.status, 200);
    }
    assert_eq!(server.activator().session_total(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn conflicting_sources_are_refused() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  sources: [{{path_prefix: /s/}}, {{header: X-Session-ID}}]\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get("/s/alice/x", &[("x-session-id", "bob")]).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (400, "conflicting_session".into())
    );
    assert_eq!(server.activator().session_total(), 0);
    // Agreeing sources are fine; the sandbox is told the routed session.
    let r = c.get("/s/alice/x", &[("x-session-id", "alice")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["session"], "alice");
    assert_eq!(r.json()["path"], "/x");
    let r = c.get("/s/alice/y", &[]).await;
    assert_eq!(r.json()["session"], "alice", "path-routed, header added");
    server.shutdown().await;
}

/// The shipped `config/local.yaml` sources: header, cookie, then `/s/`. A browser opening
/// a WebSocket on `/s/{id}/ws` also sends the session cookie, which decides; the prefix
/// must still be stripped or the sandbox answers 404 instead of 101.
#[tokio::test]
async fn prefix_and_cookie_websocket() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  sources: [{{header: X-Session-ID}}, {{cookie: activator-session}}, \
         {{path_prefix: /s/}}]\n  on_missing: create\n",
        static_backend(&[up.addr])
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(server.proxy_addr())
        .await
        .unwrap();
    let mut req = format!("ws://{}/s/browser-1/ws", server.proxy_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "cookie",
        HeaderValue::from_static("activator-session=browser-1; theme=dark"),
    );
    let (mut ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .unwrap()
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_text().unwrap().as_str(), "hello");
    ws.close(None).await.unwrap();
    // Wait for the close handshake so the relay has ended before the drain.
    tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} })
        .await
        .unwrap();
    drop(ws);
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(
        admin.get("/api/sessions/browser-1", &[]).await.status,
        200,
        "routed by the cookie's session"
    );
    server.shutdown().await;
}

/// A sandbox that tries to set the activator's cookie, and echoes the session header.
async fn cookie_setting_sandbox() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let seen: Vec<String> = req
                        .headers()
                        .get_all("x-routed-session")
                        .iter()
                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                        .collect();
                    let mut resp = Response::new(Full::new(Bytes::from(seen.join(","))));
                    let h = resp.headers_mut();
                    for c in [
                        "activator-session=victim; Path=/",
                        "theme=dark; Path=/",
                        "sid=other; Path=/",
                    ] {
                        h.append("set-cookie", HeaderValue::from_static(c));
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn sandbox_set_cookie_dropped_and_forward_header_replaced() {
    let (addr, task) = cookie_setting_sandbox().await;
    let server = start(&format!(
        "{}session:\n  sources: [{{header: X-Session-ID}}, {{cookie: sid}}]\n  \
         on_missing: create\n  cookie_name: activator-session\n  \
         forward_header: X-Routed-Session\n",
        static_backend(&[addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c
        .get(
            "/x",
            &[
                ("x-session-id", "alice"),
                ("x-routed-session", "bob"),
                ("x-routed-session", "carol"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "alice", "one forward header, the routed session");
    let cookies: Vec<&str> = r
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["theme=dark; Path=/"]);
    server.shutdown().await;
    task.abort();
}

/// A process sandbox cannot see a secret in the activator's environment: the activator
/// runs as a real process with `AA_TEST_DB_PASSWORD` set, its warm sandbox dumps its
/// environment into its working directory.
#[tokio::test]
async fn process_sandbox_does_not_inherit_the_activator_environment() {
    let root = std::env::temp_dir().join(format!(
        "aa-sec-env-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&root).unwrap();
    let bin = env!("CARGO_BIN_EXE_agent-activator");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nautoscaler: {{enabled: false}}\n\
         backend:\n  kind: process\n  warm_pool: 1\n  workdir_root: '{root}'\n  stop_grace: 1s\n  \
         env: {{GIVEN_BY_CONFIG: 'yes'}}\n  \
         command: [sh, -c, 'env > env.txt; exec \"$0\" demo-sandbox --port \"$1\"', '{bin}', '{{port}}']\n",
        root = root.display()
    );
    let config = root.join("activator.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("AA_TEST_DB_PASSWORD", "hunter2")
        .env("PATH", std::env::var_os("PATH").unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let env_file = support::eventually("the warm sandbox's env.txt", || {
        let root = root.clone();
        async move {
            find_file(&root, "env.txt").filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        }
    })
    .await;
    let env = std::fs::read_to_string(&env_file).unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
    let _ = std::fs::remove_dir_all(&root);
    assert!(
        !env.contains("hunter2"),
        "secret leaked into the sandbox:\n{env}"
    );
    assert!(!env.contains("AA_TEST_DB_PASSWORD"), "{env}");
    assert!(env.lines().any(|l| l == "GIVEN_BY_CONFIG=yes"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PORT=")), "{env}");
}

fn find_file(dir: &std::path::Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}
