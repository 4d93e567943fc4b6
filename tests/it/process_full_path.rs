//! The process backend behind the real proxy and activator: idle freeze and resume, an
//! open WebSocket keeps a session awake, 1:1 isolation, capacity and crash errors.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use agent_activator::backend::{SandboxInfo, SandboxState};
use agent_activator::server::RunningServer;

use crate::support;

use support::procs::eventually;
use support::{HttpClient, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_agent-activator");

/// Starts the activator with the demo sandbox as process backend and `extra` YAML
/// appended under `backend:` (indented) followed by `rest` at top level. Unisolated: these
/// tests match the pid a sandbox reports with the backend's rows, and inside a PID
/// namespace a sandbox sees its own pid numbering (tests/it/process_isolation.rs covers the
/// full path under isolation).
async fn start(name: &str, backend_extra: &str, rest: &str) -> (RunningServer, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("aa-full-{name}-{}", std::process::id()));
    let yaml = format!(
        "backend:\n  kind: process\n  command: [\"{BIN}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  workdir_root: \"{}\"\n  stop_grace: 2s\n  isolation: none\n{backend_extra}{rest}autoscaler:\n  enabled: false\n",
        dir.display()
    );
    (support::start(&yaml).await, dir)
}

async fn stop(server: RunningServer, dir: std::path::PathBuf) {
    server.shutdown().await;
    std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("{} not clean: {e}", dir.display()));
}

fn rows(server: &RunningServer) -> Vec<SandboxInfo> {
    server.backend().sandboxes()
}

fn state_of(server: &RunningServer, pid: u64) -> Option<SandboxState> {
    rows(server)
        .into_iter()
        .find(|r| r.pid.map(u64::from) == Some(pid))
        .map(|r| r.state)
}

async fn post(c: &HttpClient, path: &str, session: &str) -> Reply {
    let req = c
        .request("POST", path)
        .header("x-session-id", session)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    c.send(req).await
}

const IDLE: &str = "idle:\n  timeout: 300ms\n  sweep_interval: 50ms\n  policy: pause\n";

#[tokio::test]
async fn an_idle_session_freezes_and_its_next_request_resumes_it_with_state() {
    let (server, dir) = start("idle", "  warm_pool: 1\n", IDLE).await;
    let c = HttpClient::http1(server.proxy_addr());
    eventually("the warm pool is ready", || {
        rows(&server).iter().any(|r| r.state == SandboxState::Warm)
    })
    .await;
    let first = post(&c, "/counter", "alice").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-activator-activation"), Some("claim"));
    let pid = first.json()["pid"].as_u64().unwrap();
    assert_eq!(post(&c, "/counter", "alice").await.json()["counter"], 2);

    eventually("the idle sandbox is paused", || {
        state_of(&server, pid) == Some(SandboxState::Paused)
    })
    .await;
    let admin = HttpClient::http1(server.admin_addr());
    let listed = admin.get("/api/sandboxes", &[]).await.json();
    let row = listed["sandboxes"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["pid"] == pid))
        .unwrap_or_else(|| panic!("no row for pid {pid}: {listed}"));
    assert_eq!(row["state"], "paused", "{listed}");

    let resumed = post(&c, "/counter", "alice").await;
    assert_eq!(resumed.header("x-activator-activation"), Some("resume"));
    assert_eq!(resumed.json()["counter"], 3, "memory survived the freeze");
    assert_eq!(resumed.json()["pid"], pid);
    stop(server, dir).await;
}

#[tokio::test]
async fn an_open_websocket_keeps_its_session_from_pausing() {
    let (server, dir) = start("ws", "", IDLE).await;
    let mut req = format!("ws://{}/ws", server.proxy_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-session-id", "ws-user".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("upgrade in time")
    .expect("upgrade through the proxy");
    let bound = rows(&server);
    assert_eq!(bound.len(), 1);
    // Many idle timeouts pass with the socket open and silent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rows(&server)[0].state,
        SandboxState::Bound,
        "paused under an open WebSocket"
    );
    ws.send(Message::text("still here")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "still here");
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("paused once the socket closed", || {
        rows(&server).first().map(|r| r.state) == Some(SandboxState::Paused)
    })
    .await;
    stop(server, dir).await;
}

#[tokio::test]
async fn concurrent_sessions_each_get_their_own_sandbox() {
    let (server, dir) = start("isolation", "  warm_pool: 2\n", "").await;
    let c = HttpClient::http1(server.proxy_addr());
    let sessions: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let replies = futures_util::future::join_all(sessions.iter().map(|s| {
        let c = c.clone();
        async move {
            for _ in 0..3 {
                assert_eq!(post(&c, "/counter", s).await.status, 200);
            }
            c.get_session("/state", s).await.json()
        }
    }))
    .await;
    let mut pids = std::collections::BTreeSet::new();
    for (s, state) in sessions.iter().zip(&replies) {
        assert_eq!(state["sessions_seen"], serde_json::json!([s]), "{state}");
        assert_eq!(state["counter"], 3);
        pids.insert(state["pid"].as_u64().unwrap());
    }
    assert_eq!(pids.len(), sessions.len(), "one process per session");
    stop(server, dir).await;
}

#[tokio::test]
async fn full_capacity_is_503_and_a_crash_is_502_sandbox_lost() {
    let (server, dir) = start(
        "limits",
        "  max_sandboxes: 1\n",
        "session:\n  admission_timeout: 300ms\n",
    )
    .await;
    let c = HttpClient::http1(server.proxy_addr());
    let first = c.get_session("/state", "a").await;
    assert_eq!(first.status, 200);
    let full = c.get_session("/state", "b").await;
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.header("retry-after").is_some());

    let pid = first.json()["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("the dead sandbox left the table", || {
        rows(&server).is_empty()
    })
    .await;
    let lost = c.get_session("/state", "a").await;
    assert_eq!(lost.status, 502, "{}", lost.text());
    assert_eq!(lost.error_code(), "sandbox_lost");
    stop(server, dir).await;
}

/// 100 concurrent first requests for one new session, through the proxy to real
/// processes: exactly one sandbox is created, every request is forwarded exactly once
/// (the demo's counter hands out 1..=100, each value once) and only this session ever
/// reaches that sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_first_requests_cause_exactly_one_claim() {
    let (server, dir) = start("burst", "  warm_pool: 0\n", "").await;
    let c = HttpClient::http1(server.proxy_addr());
    let replies = futures_util::future::join_all((0..100).map(|_| {
        let c = c.clone();
        async move { post(&c, "/counter", "burst").await }
    }))
    .await;
    let mut counters: Vec<u64> = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        counters.push(v["counter"].as_u64().unwrap());
        pids.insert(v["pid"].as_u64().unwrap());
    }
    counters.sort_unstable();
    assert_eq!(
        counters,
        (1..=100).collect::<Vec<u64>>(),
        "a request was lost or repeated"
    );
    assert_eq!(
        pids.len(),
        1,
        "one session reached several sandboxes: {pids:?}"
    );
    let m = &server.metrics().activations_total;
    let started: u64 = ["claim", "create"]
        .iter()
        .map(|k| m.with_label_values(&[*k, "ok"]).get())
        .sum();
    assert_eq!(started, 1, "exactly one claim or create for the session");
    let bound: Vec<SandboxInfo> = rows(&server)
        .into_iter()
        .filter(|r| !r.sessions.is_empty())
        .collect();
    assert_eq!(bound.len(), 1);
    let state = c.get_session("/state", "burst").await.json();
    assert_eq!(state["sessions_seen"], serde_json::json!(["burst"]));
    stop(server, dir).await;
}
