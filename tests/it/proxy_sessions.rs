//! Session sources, `on_missing`, every error status with its JSON body, metrics content
//! and the admin API, over real sockets.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use agent_activator::backend::{ActivationKind, BackendError, BackendEvent, SandboxId};
use agent_activator::metrics::Metrics;
use agent_activator::server;
use agent_activator::testing::{Outcome, ScriptedBackend};

use support::{EchoUpstream, HttpClient, WAIT, closed_port, start, static_backend};

#[tokio::test]
async fn each_session_source() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session:\n  sources:\n    - header: X-Tenant-Session\n    - cookie: sid\n    \
         - path_prefix: /s/\n    - query: session\n",
        static_backend(&[up.addr])
    ))
    .await;
    let admin = HttpClient::http1(server.admin_addr());
    let c = HttpClient::http1(server.proxy_addr());

    let r = c.get("/a", &[("x-tenant-session", "from-header")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin.get("/api/sessions/from-header", &[]).await.status,
        200
    );
    admin.send(del(&admin, "from-header")).await;

    let r = c
        .get("/b", &[("cookie", "theme=dark; sid=from-cookie")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin.get("/api/sessions/from-cookie", &[]).await.status,
        200
    );
    admin.send(del(&admin, "from-cookie")).await;

    let r = c.get("/s/from-path/deep/path?keep=1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["path"],
        "/deep/path?keep=1",
        "prefix stripped, query kept"
    );
    assert_eq!(admin.get("/api/sessions/from-path", &[]).await.status, 200);
    admin.send(del(&admin, "from-path")).await;

    let r = c.get("/c?x=1&session=from-query", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/c?x=1&session=from-query");
    assert_eq!(admin.get("/api/sessions/from-query", &[]).await.status, 200);
    server.shutdown().await;
}

fn del(admin: &HttpClient, id: &str) -> http::Request<Full<Bytes>> {
    admin
        .request("DELETE", &format!("/api/sessions/{id}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn on_missing_reject_and_create() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "missing_session");
    server.shutdown().await;

    let server = start(&format!(
        "{}session: {{on_missing: create, sources: [{{cookie: sid}}]}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let minted = r.header("x-session-id").expect("minted id").to_owned();
    assert_eq!(minted.len(), 32);
    let cookie = r.header("set-cookie").unwrap();
    assert_eq!(
        cookie,
        format!("sid={minted}; Path=/; HttpOnly; SameSite=Lax")
    );
    // The sandbox saw the minted session, and the cookie routes back to the same one.
    assert_eq!(r.json()["session"], minted.as_str());
    let again = c.get("/", &[("cookie", &format!("sid={minted}"))]).await;
    assert_eq!(again.header("x-activator-activation"), Some("none"));
    assert!(again.header("set-cookie").is_none());
    server.shutdown().await;
}

async fn assert_error(r: &support::Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{code}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.error_code(), code, "{}", r.text());
    assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    if status == 503 {
        assert_eq!(r.header("retry-after"), Some("2"), "{code}");
    }
}

#[tokio::test]
async fn error_statuses_have_json_bodies() {
    let up = EchoUpstream::start().await;
    let dead = closed_port().await;
    let server = start(&format!(
        "{}proxy: {{request_timeout: 300ms}}\nactivation: {{retry_after: 2s}}\n",
        static_backend(&[up.addr, dead.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());

    assert_error(
        &c.get("/", &[("x-session-id", "bad id!")]).await,
        400,
        "invalid_session",
    )
    .await;
    assert_error(&c.get("/", &[]).await, 400, "missing_session").await;

    // Two sessions take the two endpoints; find which one got the dead port.
    let a = c.get_session("/", "sess-a").await;
    let b = c.get_session("/", "sess-b").await;
    let (live, dead_reply) = if a.status == 200 {
        ("sess-a", b)
    } else {
        ("sess-b", a)
    };
    assert_error(&dead_reply, 502, "upstream_connect").await;
    assert_error(&c.get_session("/reset", live).await, 502, "upstream_reset").await;
    assert_error(
        &c.get_session("/slow?ms=3000", live).await,
        504,
        "upstream_timeout",
    )
    .await;
    // Upstream statuses pass through untouched.
    assert_eq!(c.get_session("/status?code=418", live).await.status, 418);
    let m = server.metrics();
    let errors = &m.upstream_errors_total;
    assert_eq!(errors.with_label_values(&["connect"]).get(), 1);
    assert_eq!(errors.with_label_values(&["reset"]).get(), 1);
    assert_eq!(errors.with_label_values(&["timeout"]).get(), 1);

    server.activator().begin_shutdown();
    assert_error(&c.get_session("/", "sess-new").await, 503, "shutting_down").await;
    server.shutdown().await;
}

#[tokio::test]
async fn capacity_errors() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session: {{admission_timeout: 300ms}}\nactivation: {{retry_after: 2s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get_session("/", "holder").await.status, 200);
    // The only endpoint is taken: a new session waits for admission, then 503.
    let started = tokio::time::Instant::now();
    assert_error(&c.get_session("/", "late").await, 503, "no_capacity").await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for admission"
    );
    server.shutdown().await;

    let server = start(&format!(
        "{}session: {{admission_timeout: 1s}}\n\
         activation: {{retry_after: 2s, max_queued_per_session: 1}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get_session("/", "holder").await.status, 200);
    // One request of `late` waits in the session's queue; a second one overflows it.
    let first = tokio::spawn({
        let c = c.clone();
        async move { c.get_session("/", "late").await }
    });
    support::wait_until("the first request queued", || {
        server.activator().queued_requests() > 0
    })
    .await;
    assert_error(&c.get_session("/", "late").await, 503, "queue_full").await;
    assert_error(&first.await.unwrap(), 503, "no_capacity").await;
    server.shutdown().await;
}

#[tokio::test]
async fn backend_failures_map_to_statuses() {
    let up = EchoUpstream::start().await;
    // Claims fail the way the session name says: `hang-*` never finishes, `cp-*`
    // control-plane error, `fail-*` start failure; anything else binds to `scripted-0`.
    let backend = Arc::new(
        ScriptedBackend::new(false)
            .one_sandbox("scripted-0", up.addr)
            .claims_as(ActivationKind::Create),
    );
    backend.script().claim_by_prefix = vec![
        ("hang-".into(), Outcome::Hang),
        (
            "cp-".into(),
            Outcome::Fail(BackendError::ControlPlane("API server unreachable".into())),
        ),
        (
            "fail-".into(),
            Outcome::Fail(BackendError::StartFailed("exit status 1".into())),
        ),
    ];
    let config = support::config(&format!(
        "{}activation: {{retry_after: 2s, timeout: 300ms}}\n\
         session: {{admission_timeout: 200ms}}\n\
         idle: {{policy: release}}\n",
        static_backend(&[up.addr])
    ));
    let server = server::start_with_backend(config, backend.clone(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let c = HttpClient::http1(server.proxy_addr());
    let ok = c.get_session("/", "fine").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-activator-activation"), Some("create"));
    assert_error(
        &c.get_session("/", "hang-1").await,
        504,
        "activation_timeout",
    )
    .await;
    assert_error(&c.get_session("/", "cp-1").await, 503, "control_plane").await;
    assert_error(
        &c.get_session("/", "fail-1").await,
        502,
        "sandbox_start_failed",
    )
    .await;
    // The bound sandbox dies: with `on_sandbox_loss: fail` the session reports the loss.
    backend
        .events
        .send(BackendEvent::Lost {
            sandbox: SandboxId::new("scripted-0"),
            reason: "killed".into(),
        })
        .unwrap();
    let lost = tokio::time::timeout(WAIT, async {
        loop {
            let r = c.get_session("/", "fine").await;
            if r.status != 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("loss observed");
    assert_error(&lost, 502, "sandbox_lost").await;
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_content() {
    let up = EchoUpstream::start().await;
    let spare = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr, spare.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    for _ in 0..3 {
        assert_eq!(c.get_session("/", "metrics-session-id").await.status, 200);
    }
    assert_eq!(c.get("/", &[]).await.status, 400);
    let admin = HttpClient::http1(server.admin_addr());
    let r = admin.get("/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    for line in [
        "activator_requests_total{code=\"200\"} 3",
        "activator_requests_total{code=\"400\"} 1",
        "activator_request_duration_seconds_count 4",
        "activator_requests_in_flight 0",
        "activator_sessions{state=\"active\"} 1",
        "activator_sandboxes{state=\"bound\"} 1",
        "activator_sandboxes{state=\"warm\"} 1",
        "activator_warm_pool_ready 1",
        "activator_websockets_open 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        !text.contains("metrics-session-id"),
        "session IDs never become labels"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn admin_api() {
    let up = EchoUpstream::start().await;
    let server = start(&static_backend(&[up.addr])).await;
    let c = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(c.get_session("/", "admin-raw-id").await.status, 200);

    let list = admin.get("/api/sessions", &[]).await;
    assert_eq!(list.status, 200);
    let sessions = list.json()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 1);
    assert!(
        !list.text().contains("admin-raw-id"),
        "hashes only: {}",
        list.text()
    );
    assert_eq!(sessions[0]["sandbox"], up.addr.to_string());

    let one = admin.get("/api/sessions/admin-raw-id", &[]).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["session"], sessions[0]["session"]);
    let missing = admin.get("/api/sessions/nobody", &[]).await;
    assert_eq!(
        (missing.status.as_u16(), missing.error_code().as_str()),
        (404, "unknown_session")
    );
    let invalid = admin.get("/api/sessions/bad%20id", &[]).await;
    assert_eq!(
        (invalid.status.as_u16(), invalid.error_code().as_str()),
        (400, "invalid_session")
    );

    let sandboxes = admin.get("/api/sandboxes", &[]).await.json();
    assert_eq!(sandboxes["sandboxes"][0]["state"], "bound");

    let pause = admin
        .send(
            admin
                .request("POST", "/api/sessions/admin-raw-id/pause")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(
        (pause.status.as_u16(), pause.error_code().as_str()),
        (501, "unsupported")
    );

    let released = admin.send(del(&admin, "admin-raw-id")).await;
    assert_eq!(released.status, 200, "{}", released.text());
    assert_eq!(released.json()["released"], true);
    assert_eq!(
        admin.get("/api/sessions/admin-raw-id", &[]).await.status,
        404
    );
    assert_eq!(admin.send(del(&admin, "admin-raw-id")).await.status, 404);

    let nowhere = admin.get("/nowhere", &[]).await;
    assert_eq!(
        (nowhere.status.as_u16(), nowhere.error_code().as_str()),
        (404, "not_found")
    );
    let wrong = admin
        .send(
            admin
                .request("POST", "/metrics")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(wrong.status, 405);
    server.shutdown().await;
}

#[tokio::test]
async fn client_gone_while_waiting_is_recorded_as_499() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session: {{admission_timeout: 5s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get_session("/", "holder").await.status, 200);
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.get_session("/", "impatient").await }
    });
    support::wait_until("the request waiting for capacity", || {
        server.activator().waiting_sessions() > 0
    })
    .await;
    waiting.abort();
    let metrics = server.metrics().clone();
    support::wait_until("the abandoned request recorded", || {
        metrics.requests_total.with_label_values(&["499"]).get() == 1
    })
    .await;
    assert_eq!(metrics.requests_in_flight.get(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn minted_session_is_handed_out_even_on_failure() {
    let up = EchoUpstream::start().await;
    let server = start(&format!(
        "{}session: {{on_missing: create, sources: [{{cookie: sid}}], admission_timeout: 200ms}}\n\
         activation: {{retry_after: 2s}}\n",
        static_backend(&[up.addr])
    ))
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    assert_eq!(c.get("/", &[("cookie", "sid=holder")]).await.status, 200);
    let r = c.get("/", &[]).await;
    assert_error(&r, 503, "no_capacity").await;
    let minted = r
        .header("x-session-id")
        .expect("minted id on the 503")
        .to_owned();
    assert_eq!(
        r.header("set-cookie"),
        Some(format!("sid={minted}; Path=/; HttpOnly; SameSite=Lax").as_str())
    );
    server.shutdown().await;
}
