//! The deep idle tier (`idle.deep_after`) on the process backend, through the real proxy:
//! an idle session is frozen after `idle.timeout`, its process is stopped `deep_after`
//! later (memory released), and the next request gets a new sandbox with the session
//! marked state-lost (`on_sandbox_loss: reclaim`) or refused once (`fail`).

use agent_activator::server::RunningServer;

use crate::support;

use support::procs::{alive, eventually};
use support::{HttpClient, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

async fn start(name: &str, on_loss: &str) -> (RunningServer, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("aa-deep-{name}-{}", std::process::id()));
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  \
         workdir_root: \"{}\"\n  stop_grace: 2s\n  isolation: none\n\
         idle:\n  timeout: 300ms\n  sweep_interval: 50ms\n  policy: pause\n  deep_after: 700ms\n\
         activation:\n  on_sandbox_loss: {on_loss}\nautoscaler:\n  enabled: false\n",
        dir.display()
    );
    (support::start(&yaml).await, dir)
}

async fn post(c: &HttpClient, session: &str) -> Reply {
    let req = c
        .request("POST", "/counter")
        .header("x-session-id", session)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    c.send(req).await
}

fn state(server: &RunningServer, session: &str) -> &'static str {
    let key = agent_activator::session::SessionKey::parse(session, 128).unwrap();
    server
        .activator()
        .session(&key)
        .map(|s| s.state)
        .unwrap_or("gone")
}

fn metric(server: &RunningServer, result: &str) -> u64 {
    server
        .metrics()
        .deep_pauses_total
        .with_label_values(&[result])
        .get()
}

#[tokio::test]
async fn a_paused_session_is_stopped_after_deep_after_and_reclaimed_as_state_lost() {
    let (server, dir) = start("reclaim", "reclaim").await;
    let c = HttpClient::http1(server.proxy_addr());
    let first = post(&c, "deep").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(post(&c, "deep").await.json()["counter"], 2);
    let pid = first.json()["pid"].as_u64().unwrap() as u32;

    // Frozen first (the process lives on, paused) ...
    eventually("the session is paused", || {
        state(&server, "deep") == "paused"
    })
    .await;
    assert!(alive(pid), "frozen, not stopped, after idle.timeout");
    // ... then the deep tier stops the process: the session keeps no sandbox.
    eventually("the deep tier stops the process", || !alive(pid)).await;
    eventually("the session has no sandbox", || {
        state(&server, "deep") == "unbound"
    })
    .await;
    assert_eq!(metric(&server, "stopped"), 1);
    assert_eq!(server.metrics().sessions_lost_total.get(), 0, "not a loss");

    // The next request gets a new sandbox, told its state is gone; the counter restarts.
    let next = post(&c, "deep").await;
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.header("x-activator-state-lost"), Some("true"));
    let body = next.json();
    assert_eq!(body["counter"], 1);
    assert_ne!(body["pid"].as_u64().unwrap() as u32, pid);
    // Only that first lease says so.
    let again = post(&c, "deep").await;
    assert_eq!(again.header("x-activator-state-lost"), None);
    assert_eq!(again.json()["counter"], 2);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn with_on_sandbox_loss_fail_the_next_request_is_told_once() {
    let (server, dir) = start("fail", "fail").await;
    let c = HttpClient::http1(server.proxy_addr());
    let first = post(&c, "deep-fail").await;
    assert_eq!(first.status, 200, "{}", first.text());
    let pid = first.json()["pid"].as_u64().unwrap() as u32;
    eventually("the deep tier stops the process", || !alive(pid)).await;
    eventually("the session is lost", || {
        state(&server, "deep-fail") == "lost"
    })
    .await;
    let told = post(&c, "deep-fail").await;
    assert_eq!(told.status, 502, "{}", told.text());
    assert_eq!(told.error_code(), "sandbox_lost");
    // Then it is a new session.
    let fresh = post(&c, "deep-fail").await;
    assert_eq!(fresh.status, 200, "{}", fresh.text());
    assert_eq!(fresh.json()["counter"], 1);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn deep_after_must_be_shorter_than_the_session_ttl() {
    let err =
        agent_activator::config::Config::from_yaml("idle:\n  deep_after: 2h\n  session_ttl: 1h\n")
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("idle.deep_after:"), "{err}");
    let err =
        agent_activator::config::Config::from_yaml("idle:\n  deep_after: 1m\n  policy: release\n")
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("idle.deep_after:"), "{err}");
}
