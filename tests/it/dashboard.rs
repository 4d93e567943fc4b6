//! The dashboard in a real browser: headless Chromium (DevTools protocol) against a running
//! activator with the process backend. The page loads without console errors, shows
//! sessions after traffic, shows a pause without a reload, and its buttons steer sessions.
//! Needs `chromium` (`.ci/run` installs it): without it the tests are reported ignored,
//! and under `CI=true` they run and fail.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;

use agent_activator::server::RunningServer;

pub(crate) mod cdp;
use crate::support;

use cdp::Browser;
use support::HttpClient;

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// One headless Chromium at a time: with two running side by side on the 2-core CI machine,
/// DevTools calls of one of them went unanswered for 30 s in 4 of 11 runs.
pub(crate) static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The dashboard at `admin` in a new headless Chromium, holding [`ONE_BROWSER`] while the
/// guard lives.
pub(crate) async fn open_dashboard(
    admin: std::net::SocketAddr,
) -> (tokio::sync::MutexGuard<'static, ()>, Browser) {
    let one = ONE_BROWSER.lock().await;
    let browser = Browser::launch(&output_dir()).await;
    browser.goto(&format!("http://{admin}/")).await;
    (one, browser)
}

/// Where screenshots go: `target/tmp/dashboard/`.
pub(crate) fn output_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) async fn start(name: &str, extra: &str) -> (RunningServer, PathBuf) {
    let dir = std::env::temp_dir().join(format!("aa-dash-{name}-{}", std::process::id()));
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n  warm_pool: 1\nidle:\n  timeout: 10m\n  policy: pause\nautoscaler:\n  enabled: false\n{extra}",
        dir.display()
    );
    (support::start(&yaml).await, dir)
}

fn hash(id: &str) -> String {
    agent_activator::session::SessionKey::parse(id, 128)
        .unwrap()
        .short_hash()
}

async fn post(c: &HttpClient, path: &str, session: &str) -> support::Reply {
    let req = c
        .request("POST", path)
        .header("x-session-id", session)
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send(req).await
}

fn row_state(h: &str) -> String {
    format!("(document.querySelector('tr[data-session=\"{h}\"] td.state') || {{}}).textContent")
}

#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn the_dashboard_shows_sessions_live_and_its_buttons_steer_them() {
    let _one = ONE_BROWSER.lock().await;
    let (server, dir) = start("live", "").await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let browser = Browser::launch(&output_dir()).await;
    browser
        .goto(&format!("http://{}/", server.admin_addr()))
        .await;
    browser
        .wait_for(
            "the event stream is live",
            "document.querySelector('#live').textContent === 'live'",
        )
        .await;
    browser
        .wait_for(
            "the warm sandbox is counted",
            "(document.querySelector('#sandbox-counts [data-state=warm] b') || {}).textContent === '1'",
        )
        .await;

    // Traffic: two sessions appear in the table without a reload.
    for s in ["alice", "bob"] {
        let r = post(&proxy, "/counter", s).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (alice, bob) = (hash("alice"), hash("bob"));
    for h in [&alice, &bob] {
        browser
            .wait_for(
                &format!("session {h} listed active"),
                &format!("{} === 'active'", row_state(h)),
            )
            .await;
    }
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#sessions tbody tr').length")
            .await,
        2
    );

    // A pause made elsewhere (the admin API) shows up as a state change, no reload.
    let paused = admin
        .send(
            admin
                .request("POST", "/api/sessions/alice/pause")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(paused.status, 200, "{}", paused.text());
    browser
        .wait_for(
            "alice shown paused",
            &format!("{} === 'paused'", row_state(&alice)),
        )
        .await;
    browser
        .wait_for(
            "a paused band on the timeline",
            "document.querySelector('#timeline rect[data-state=paused]') !== null",
        )
        .await;
    browser
        .wait_for(
            "the pause in the event log",
            &format!("document.querySelector('#events').textContent.includes('paused {alice}')"),
        )
        .await;

    // The buttons: resume alice, pause bob, release bob; each checked on the server.
    let click = |h: &str, action: &str| {
        format!(
            "document.querySelector('tr[data-session=\"{h}\"] button[data-action={action}]').click(), true"
        )
    };
    browser.eval(&click(&alice, "resume")).await;
    browser
        .wait_for(
            "alice active again",
            &format!("{} === 'active'", row_state(&alice)),
        )
        .await;
    assert_eq!(
        admin.get("/api/sessions/alice", &[]).await.json()["state"],
        "active"
    );
    browser.eval(&click(&bob, "pause")).await;
    browser
        .wait_for("bob paused", &format!("{} === 'paused'", row_state(&bob)))
        .await;
    assert_eq!(
        admin.get("/api/sessions/bob", &[]).await.json()["state"],
        "paused"
    );
    // The frozen sandbox kept its memory: the counter goes on after the resume.
    assert_eq!(post(&proxy, "/counter", "alice").await.json()["counter"], 2);
    browser.eval(&click(&bob, "release")).await;
    browser
        .wait_for(
            "bob gone from the table",
            &format!("document.querySelector('tr[data-session=\"{bob}\"]') === null"),
        )
        .await;
    assert_eq!(admin.get("/api/sessions/bob", &[]).await.status, 404);
    browser
        .wait_for(
            "the activation latency is drawn",
            "document.querySelector('#latency-text').textContent.includes('claim: n=')",
        )
        .await;

    let shot = output_dir().join("dashboard.png");
    browser.screenshot(&shot, 1280, 1300).await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    eprintln!("screenshot: {}", shot.display());
    drop(browser);
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// `admin.auth` on: the page (a public path: it holds no data) loads without a token, asks
/// for one when the API answers 401, refuses a wrong one, and with the right one goes live,
/// lists sessions and steers them, every call carrying `Authorization: Bearer`.
#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn with_admin_auth_the_page_asks_for_the_token_once_and_then_works() {
    let _one = ONE_BROWSER.lock().await;
    const TOKEN: &str = "dash-s3cret-token";
    let token_file = std::env::temp_dir().join(format!("aa-dash-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (server, dir) = start(
        "auth",
        &format!(
            "admin:\n  auth:\n    bearer_token_file: \"{}\"\n",
            token_file.display()
        ),
    )
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let bearer = format!("Bearer {TOKEN}");
    let authorized = [("authorization", bearer.as_str())];
    // Authentication is on: the page is served to anyone, its data only with the token.
    assert_eq!(admin.get("/", &[]).await.status, 200);
    let refused = admin.get("/api/overview", &[]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), "unauthorized");
    assert_eq!(admin.get("/api/overview", &authorized).await.status, 200);

    let browser = Browser::launch(&output_dir()).await;
    browser
        .goto(&format!("http://{}/", server.admin_addr()))
        .await;
    browser
        .wait_for(
            "the token form",
            "document.querySelector('#auth').classList.contains('show')",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#live').textContent")
            .await,
        "offline"
    );
    let submit = |token: &str| {
        format!(
            "document.querySelector('#token').value = '{token}', \
             document.querySelector('#token-save').click(), \
             !document.querySelector('#auth').classList.contains('show')"
        )
    };
    // A wrong token: the form closes, the API answers 401 again, the form comes back.
    assert_eq!(
        browser.eval(&submit("not-the-token")).await,
        true,
        "form closed"
    );
    browser
        .wait_for(
            "the token form again after a wrong token",
            "document.querySelector('#auth').classList.contains('show')",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#live').textContent")
            .await,
        "offline"
    );

    assert_eq!(browser.eval(&submit(TOKEN)).await, true, "form closed");
    browser
        .wait_for(
            "the event stream is live",
            "document.querySelector('#live').textContent === 'live'",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#auth').classList.contains('show')")
            .await,
        false,
        "the form stays closed"
    );
    let r = post(&proxy, "/counter", "carol").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let carol = hash("carol");
    browser
        .wait_for(
            "carol listed active",
            &format!("{} === 'active'", row_state(&carol)),
        )
        .await;
    browser
        .eval(&format!(
            "document.querySelector('tr[data-session=\"{carol}\"] button[data-action=pause]').click(), true"
        ))
        .await;
    browser
        .wait_for(
            "carol paused",
            &format!("{} === 'paused'", row_state(&carol)),
        )
        .await;
    let carol_now = admin.get("/api/sessions/carol", &authorized).await;
    assert_eq!(carol_now.json()["state"], "paused", "{}", carol_now.text());
    // The token is kept for the tab: a reload goes live without asking again.
    browser.eval("window.beforeReload = true").await;
    browser
        .goto(&format!("http://{}/", server.admin_addr()))
        .await;
    browser
        .wait_for(
            "live again after a reload",
            "window.beforeReload === undefined && \
             document.querySelector('#live').textContent === 'live'",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.querySelector('#auth').classList.contains('show')")
            .await,
        false,
        "no second prompt"
    );

    let shot = output_dir().join("dashboard-auth.png");
    browser.screenshot(&shot, 1280, 900).await;
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    drop(browser);
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&token_file).ok();
}

/// The JSON the page polls, without a browser: the page itself, `/api/overview`, paged
/// `/api/sessions`, and actions by short hash.
#[tokio::test]
async fn the_page_and_its_json_api_answer_over_http() {
    let upstream = support::EchoUpstream::start().await;
    let yaml = format!(
        "{}session:\n  max_sessions_per_sandbox: 100\nautoscaler:\n  enabled: false\n",
        support::static_backend(&[upstream.addr])
    );
    let server = support::start(&yaml).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());

    let page = admin.get("/", &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("connect-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    let html = page.text();
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "no external fetches"
    );
    assert!(
        !html.contains("fetch('/") && !html.contains("api('/"),
        "relative URLs only"
    );

    for i in 0..5 {
        let r = proxy
            .get("/", &[("x-session-id", &format!("user-{i}"))])
            .await;
        assert_eq!(r.status, 200);
    }
    let ov = admin.get("/api/overview", &[]).await.json();
    assert_eq!(ov["sessions"]["active"], 5, "{ov}");
    assert_eq!(ov["backend"], "static");
    let claim = &ov["activation_latency"]["claim"];
    assert_eq!(claim["count"], 5, "{ov}");
    assert_eq!(
        claim["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum::<u64>(),
        5
    );
    assert!(ov["stats"]["requests_total"].as_u64().unwrap() >= 5, "{ov}");

    // Paged by cursor, as the page's Previous/Next walk it.
    let page1 = admin.get("/api/sessions?limit=2", &[]).await.json();
    let c1 = page1["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let page2 = admin
        .get(&format!("/api/sessions?limit=2&cursor={c1}"), &[])
        .await
        .json();
    let c2 = page2["next_cursor"]
        .as_str()
        .expect("a third page")
        .to_owned();
    let page3 = admin
        .get(&format!("/api/sessions?limit=2&cursor={c2}"), &[])
        .await
        .json();
    assert_eq!(page1["total"], 5);
    assert_eq!(page1["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(page3["sessions"].as_array().unwrap().len(), 1);
    assert!(page3["next_cursor"].is_null(), "{page3}");
    let all = admin.get("/api/sessions", &[]).await.json();
    assert_eq!(
        all["sessions"][4]["session"], page3["sessions"][0]["session"],
        "pages follow the full order"
    );
    for bad in [
        "/api/sessions?limit=0",
        "/api/sessions?limit=5000",
        "/api/sessions?offset=1",
        "/api/sessions?cursor=zz",
    ] {
        let r = admin.get(bad, &[]).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.error_code(), "invalid_query", "{bad}");
    }

    let h = hash("user-3");
    let released = admin
        .send(
            admin
                .request("DELETE", &format!("/api/sessions/{h}?by=hash"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.text());
    assert_eq!(admin.get("/api/sessions/user-3", &[]).await.status, 404);
    let unknown = admin
        .send(
            admin
                .request("DELETE", "/api/sessions/0123456789ab?by=hash")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "unknown_session");
    server.shutdown().await;
}
