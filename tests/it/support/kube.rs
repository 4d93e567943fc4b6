//! Helpers for the Kubernetes backend tests: a kube-testbed with demo-sandbox pods, a real
//! `kube::Client` over HTTP to it, backends built from YAML, and a tiny HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kube_testbed::{Testbed, TestbedOptions};
use tokio::time::Instant;

use agent_activator::backend::ClaimBudget;
use agent_activator::backend::kubernetes::KubernetesBackend;
use agent_activator::cluster::{KubeContext, ReplicaId};
use agent_activator::config::Config;
use agent_activator::session::SessionKey;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub const AGENT_SANDBOX: &str = "extensions.agents.x-k8s.io";
pub const KRUISE: &str = "agents.kruise.io";

/// A testbed whose pods are `agent-activator demo-sandbox` processes.
pub async fn testbed(bind_delay: Duration) -> Testbed {
    testbed_with(|o| o.bind_delay = bind_delay).await
}

/// A testbed with pods, its options adjusted by `f`.
pub async fn testbed_with(f: impl FnOnce(&mut TestbedOptions)) -> Testbed {
    let mut opts = TestbedOptions {
        activator_bin: Some(env!("CARGO_BIN_EXE_agent-activator").into()),
        bookmark_interval: Duration::from_millis(200),
        ..TestbedOptions::default()
    };
    f(&mut opts);
    Testbed::start(opts).await.expect("testbed starts")
}

/// The object `name` of `kind` in `group`, namespace `default`.
pub fn object(tb: &Testbed, group: &str, kind: &str, name: &str) -> Option<serde_json::Value> {
    tb.list(group, kind, "default")
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
}

/// Waits for the next backend event, bounded by [`WAIT`].
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<agent_activator::backend::BackendEvent>,
) -> agent_activator::backend::BackendEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

/// A real kube client talking HTTP to the testbed, default namespace `default`.
pub fn client(tb: &Testbed) -> kube::Client {
    let cfg = kube::Config::new(tb.url().parse().expect("testbed url"));
    kube::Client::try_from(cfg).expect("kube client")
}

/// A config with the kubernetes backend (`api`: agent-sandbox | openkruise) and `extra`
/// YAML appended at the top level.
pub fn config(api: &str, pool: &str, extra: &str) -> Config {
    let yaml = format!(
        "backend:\n  kind: kubernetes\n  kubernetes:\n    api: {api}\n    pool: {pool}\n    \
         namespace: default\n    write_session_id: true\n    activity_write_interval: 200ms\n    \
         port_from_annotation: true\n\
         activation:\n  timeout: 15s\n{extra}"
    );
    let mut c = Config::from_yaml(&yaml).expect("test config is valid");
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin_listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// The cluster context a backend gets: the testbed client, namespace `default`, and a
/// fresh replica identity (each call is another replica).
pub fn kube_context(tb: &Testbed) -> KubeContext {
    KubeContext::new(client(tb), "default", ReplicaId::with_host(Some("test")))
}

pub fn backend(tb: &Testbed, config: &Config) -> KubernetesBackend {
    KubernetesBackend::new(&kube_context(tb), config)
}

pub fn key(s: &str) -> SessionKey {
    SessionKey::parse(s, 128).unwrap()
}

pub fn budget(d: Duration) -> ClaimBudget {
    let deadline = Instant::now() + d;
    ClaimBudget {
        admission_deadline: deadline,
        deadline,
    }
}

/// Waits until `f` holds, re-checking after every write to the testbed's store.
pub async fn wait_until(tb: &Testbed, what: &str, f: impl Fn(&Testbed) -> bool) {
    let mut events = tb.store.subscribe();
    let deadline = Instant::now() + WAIT;
    loop {
        if f(tb) {
            return;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for: {what}"),
        }
    }
}

/// Waits until the warm pool has `n` running pods.
pub async fn wait_pods(tb: &Testbed, n: usize) {
    wait_until(tb, &format!("{n} running pods"), |tb| tb.pods().len() == n).await;
}

/// `METHOD http://addr/path` with optional session header; returns status and JSON body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    session: Option<&str>,
) -> (u16, serde_json::Value, http::HeaderMap) {
    http_with(addr, method, path, session, &[]).await
}

/// [`http`] with `headers` added.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    session: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value, http::HeaderMap) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(s) = session {
        req = req.header("x-session-id", s);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("response in time")
        .expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

/// Starts an activator whose kubernetes backend (`api`, `pool`) reads a kubeconfig for
/// `tb`; `extra` YAML is appended at the top level, `change` edits the parsed config last.
pub async fn activator_on(
    tb: &Testbed,
    api: &str,
    pool: &str,
    extra: &str,
    change: impl FnOnce(&mut Config),
) -> agent_activator::server::RunningServer {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "aa-kube-{}-{}-{n}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&path, tb.kubeconfig("default")).unwrap();
    let mut cfg = config(api, pool, extra);
    cfg.backend.kubernetes.kubeconfig = Some(path);
    change(&mut cfg);
    agent_activator::server::start(cfg)
        .await
        .expect("activator starts")
}

/// Every event in the admin API's backlog (`GET /api/events` is SSE: its `data:` lines).
pub async fn admin_events(admin: SocketAddr) -> Vec<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(
        b"GET /api/events?last_event_id=0 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // The stream stays open: read what the backlog holds, until it has been quiet a while.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}
