//! Pause/resume hooks (issue 23) over real sockets: `hooks.before_pause` runs before the
//! pause and `hooks.after_resume` after the resume but before the held requests reach the
//! sandbox; a hung hook holds nothing past its timeout; `on_failure: proceed | abort`.
//! Both real backends too: process (demo-sandbox children) and Kubernetes (kube-testbed).

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_activator::events::EventKind;
use agent_activator::metrics::Metrics;
use agent_activator::server::{self, RunningServer};
use agent_activator::testing::ScriptedBackend;
use support::h1_wire::{ScriptedSandbox, Step, ok};
use support::{HttpClient, WAIT};

/// A scripted backend whose one sandbox is `sandbox`, with `hooks` (YAML flow mapping).
async fn start(sandbox: &ScriptedSandbox, hooks: &str) -> (RunningServer, Arc<ScriptedBackend>) {
    let backend = Arc::new(ScriptedBackend::new(true).one_sandbox("sbx", sandbox.addr));
    // Hooks need a backend that can pause: the file names the process kind, the test
    // hands the scripted one in.
    let config = support::config(&format!(
        "backend: {{kind: process, command: [\"true\", \"{{port}}\"], isolation: none}}\nhooks: {hooks}\n"
    ));
    let server = server::start_with_backend(config, backend.clone(), Arc::new(Metrics::new()))
        .await
        .expect("activator starts");
    (server, backend)
}

fn targets(sandbox: &ScriptedSandbox) -> Vec<String> {
    sandbox
        .requests()
        .iter()
        .map(|r| r.target().to_owned())
        .collect()
}

fn hook_calls(metrics: &str, hook: &str, result: &str) -> f64 {
    let name = format!("activator_hook_calls_total{{hook=\"{hook}\",result=\"{result}\"}}");
    support::metric_value(metrics, &name).unwrap_or(0.0)
}

#[tokio::test]
async fn hooks_run_before_the_pause_and_after_the_resume_before_held_requests() {
    let sandbox = ScriptedSandbox::start(|r, _| {
        if r.target().starts_with("/hooks/") {
            vec![Step::AwaitRelease, Step::Send(ok(b"hooked"))]
        } else {
            vec![Step::Send(ok(b"work"))]
        }
    })
    .await;
    let (server, backend) = start(
        &sandbox,
        "{before_pause: {path: /hooks/before-pause}, after_resume: {path: \"/hooks/after-resume?x=1\"}}",
    )
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(proxy.get_session("/", "ann").await.status, 200);

    let pausing = tokio::spawn({
        let admin = admin.clone();
        async move { admin.call("POST", "/api/sessions/ann/pause").await }
    });
    sandbox
        .wait_for("the before_pause hook", WAIT, |l| {
            l.count("/hooks/before-pause") == 1
        })
        .await;
    let hook = sandbox.requests().pop().unwrap();
    assert_eq!(hook.head.method(), "POST");
    assert_eq!(hook.head.get("x-activator-hook"), Some("before_pause"));
    assert_eq!(
        ScriptedBackend::count(&backend.pauses),
        0,
        "the hook runs first"
    );
    sandbox.release();
    assert_eq!(pausing.await.unwrap().status, 200);
    assert_eq!(ScriptedBackend::count(&backend.pauses), 1);

    // A request resumes the sandbox; it reaches the sandbox only after the hook answered.
    let held = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.get_session("/work", "ann").await }
    });
    sandbox
        .wait_for("the after_resume hook", WAIT, |l| {
            l.count("/hooks/after-resume?x=1") == 1
        })
        .await;
    assert_eq!(
        ScriptedBackend::count(&backend.resumes),
        1,
        "after the resume"
    );
    assert_eq!(
        sandbox.log().count("/work"),
        0,
        "the held request waits for the hook"
    );
    sandbox.release();
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("resume"));
    assert_eq!(
        targets(&sandbox),
        [
            "/",
            "/hooks/before-pause",
            "/hooks/after-resume?x=1",
            "/work"
        ]
    );

    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(hook_calls(&metrics, "before_pause", "ok"), 1.0);
    assert_eq!(hook_calls(&metrics, "after_resume", "ok"), 1.0);
    // On the event stream, in order: the hook, then the pause; the resume after its hook.
    let events = server.activator().events().subscribe(Some(0)).backlog;
    let kinds: Vec<(EventKind, Option<&str>)> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Hook | EventKind::Paused | EventKind::Resumed
            )
        })
        .map(|e| (e.kind, e.hook))
        .collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Hook, Some("before_pause")),
            (EventKind::Paused, None),
            (EventKind::Hook, Some("after_resume")),
            (EventKind::Resumed, None),
        ]
    );
    assert_eq!(
        events
            .iter()
            .find(|e| e.kind == EventKind::Hook)
            .unwrap()
            .reason,
        Some("ok")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_hung_hook_holds_requests_no_longer_than_its_timeout() {
    let sandbox = ScriptedSandbox::start(|r, _| {
        if r.target().starts_with("/hooks/") {
            vec![Step::Hang]
        } else {
            vec![Step::Send(ok(b"work"))]
        }
    })
    .await;
    let (server, backend) = start(
        &sandbox,
        "{before_pause: {path: /hooks/p, timeout: 300ms}, after_resume: {path: /hooks/r, timeout: 300ms}}",
    )
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(proxy.get_session("/", "bea").await.status, 200);
    let started = tokio::time::Instant::now();
    assert_eq!(
        admin.call("POST", "/api/sessions/bea/pause").await.status,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        ScriptedBackend::count(&backend.pauses),
        1,
        "proceed: paused anyway"
    );
    let started = tokio::time::Instant::now();
    let r = proxy.get_session("/work", "bea").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(300));
    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(hook_calls(&metrics, "before_pause", "timeout"), 1.0);
    assert_eq!(hook_calls(&metrics, "after_resume", "timeout"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn abort_keeps_the_sandbox_running_or_fails_the_held_requests() {
    // Each hook fails (500) the first time and succeeds after.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let sandbox = ScriptedSandbox::start(move |r, _| {
        if r.target().starts_with("/hooks/") {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if n.is_multiple_of(2) {
                return vec![Step::Send(
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_vec(),
                )];
            }
            return vec![Step::Send(ok(b"ok"))];
        }
        vec![Step::Send(ok(b"work"))]
    })
    .await;
    let (server, backend) = start(
        &sandbox,
        "{before_pause: {path: /hooks/p, on_failure: abort}, after_resume: {path: /hooks/r, on_failure: abort}}",
    )
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(proxy.get_session("/", "cid").await.status, 200);
    // before_pause fails: no pause, the session stays active, the admin gets 409.
    let refused = admin.call("POST", "/api/sessions/cid/pause").await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(refused.error_code(), "hook_failed");
    assert_eq!(ScriptedBackend::count(&backend.pauses), 0);
    let row = admin.get("/api/sessions/cid", &[]).await.json();
    assert_eq!(row["state"], "active");
    assert_eq!(proxy.get_session("/x", "cid").await.status, 200);
    // Second try: the hook answers 200, the pause happens.
    assert_eq!(
        admin.call("POST", "/api/sessions/cid/pause").await.status,
        200
    );
    assert_eq!(ScriptedBackend::count(&backend.pauses), 1);
    // after_resume fails: the sandbox is paused again and the held request gets 502.
    let failed = proxy.get_session("/work", "cid").await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert_eq!(failed.error_code(), "hook_failed");
    assert_eq!(ScriptedBackend::count(&backend.resumes), 1);
    assert_eq!(ScriptedBackend::count(&backend.pauses), 2, "paused again");
    assert_eq!(
        admin.get("/api/sessions/cid", &[]).await.json()["state"],
        "paused"
    );
    assert_eq!(sandbox.log().count("/work"), 0, "never reached the sandbox");
    // The next request resumes again; the hook passes this time.
    let r = proxy.get_session("/work", "cid").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("resume"));
    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(hook_calls(&metrics, "before_pause", "status"), 1.0);
    assert_eq!(hook_calls(&metrics, "after_resume", "status"), 1.0);
    assert_eq!(hook_calls(&metrics, "after_resume", "ok"), 1.0);
    let aborted = "activator_pauses_total{result=\"hook_aborted\"}";
    assert_eq!(support::metric_value(&metrics, aborted), Some(1.0));
    server.shutdown().await;
}

#[tokio::test]
async fn hooks_are_refused_on_a_backend_that_cannot_pause() {
    let err = agent_activator::config::Config::from_yaml(
        "backend: {kind: static, endpoints: ['127.0.0.1:1']}\nhooks: {before_pause: {path: /p}}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("hooks:"), "{err}");
    let err = agent_activator::config::Config::from_yaml(
        "backend: {kind: process, command: [\"true\", \"{port}\"], isolation: none}\n\
         hooks: {after_resume: {path: nope, timeout: 2m}}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("hooks.after_resume.path:"), "{err}");
}

const HOOKS: &str = "hooks:\n  before_pause: {path: /hooks/before-pause, timeout: 2s}\n  \
                     after_resume: {path: /hooks/after-resume, timeout: 2s}\n";

/// The process backend end to end: demo-sandbox processes record the hooks they receive
/// (`GET /state`), so the resumed sandbox shows both, the after_resume one before the
/// request that resumed it read its state.
#[tokio::test]
async fn process_backend_sandboxes_receive_both_hooks_in_order() {
    let dir = std::env::temp_dir().join(format!("aa-hooks-process-{}", std::process::id()));
    let server = support::start(&format!(
        "backend:\n  kind: process\n  command: [\"{}\", \"demo-sandbox\", \"--port\", \"{{port}}\"]\n  \
         workdir_root: \"{}\"\n  isolation: none\n  warm_pool: 0\n  stop_grace: 1s\n\
         idle: {{timeout: 10m, policy: pause}}\nautoscaler: {{enabled: false}}\n{HOOKS}",
        env!("CARGO_BIN_EXE_agent-activator"),
        dir.display()
    ))
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let first = proxy.get_session("/state", "pia").await.json();
    assert_eq!(first["hooks"], serde_json::json!([]));
    assert_eq!(
        admin.call("POST", "/api/sessions/pia/pause").await.status,
        200
    );
    let after = proxy.get_session("/state", "pia").await;
    assert_eq!(after.header("x-activator-activation"), Some("resume"));
    let state = after.json();
    assert_eq!(
        state["instance"], first["instance"],
        "the same, thawed process"
    );
    assert_eq!(
        state["hooks"],
        serde_json::json!(["before-pause", "after-resume"]),
        "before the pause, then after the resume and before this request"
    );
    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(hook_calls(&metrics, "before_pause", "ok"), 1.0);
    assert_eq!(hook_calls(&metrics, "after_resume", "ok"), 1.0);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Kubernetes (kube-testbed, demo-sandbox pods): a pause suspends the Sandbox (its pod
/// goes), so before_pause reaches the old pod and after_resume the new one, before the
/// request that resumed it.
#[tokio::test]
async fn kubernetes_sandboxes_receive_both_hooks_around_a_suspend() {
    use crate::kube_support::{self, testbed, wait_pods, wait_until};
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let kubeconfig = std::env::temp_dir().join(format!(
        "aa-kube-hooks-{}-{}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&kubeconfig, tb.kubeconfig("default")).unwrap();
    let mut cfg = kube_support::config("agent-sandbox", "default", HOOKS);
    cfg.backend.kubernetes.kubeconfig = Some(kubeconfig.clone());
    let server = server::start(cfg).await.expect("activator starts");
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    let first = proxy.get_session("/state", "kay").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["hooks"], serde_json::json!([]));
    assert_eq!(
        admin.call("POST", "/api/sessions/kay/pause").await.status,
        200
    );
    wait_until(&tb, "the pod is gone", |tb| tb.pods().len() == 1).await;
    let after = proxy.get_session("/state", "kay").await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.header("x-activator-activation"), Some("resume"));
    assert_ne!(
        after.json()["instance"],
        first.json()["instance"],
        "a new pod"
    );
    assert_eq!(
        after.json()["hooks"],
        serde_json::json!(["after-resume"]),
        "the new pod got after_resume before this request"
    );
    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(hook_calls(&metrics, "before_pause", "ok"), 1.0, "{metrics}");
    assert_eq!(hook_calls(&metrics, "after_resume", "ok"), 1.0);
    server.shutdown().await;
    let _ = std::fs::remove_file(kubeconfig);
}
