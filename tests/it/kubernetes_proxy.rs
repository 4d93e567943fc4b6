//! The whole Kubernetes path: client -> activator proxy -> kube backend -> kube-testbed ->
//! demo-sandbox pods. Requests buffered during a resume are each served exactly once;
//! two activator replicas route one session to one sandbox.

use crate::kube_support;

use std::time::Duration;

use agent_activator::server;
use kube_support::*;

/// Starts an activator whose kubernetes backend reads a kubeconfig for `tb`.
async fn activator(tb: &kube_testbed::Testbed, name: &str, extra: &str) -> server::RunningServer {
    activator_with(tb, name, extra, |_| {}).await
}

/// [`activator`] with a last change to the parsed config.
async fn activator_with(
    tb: &kube_testbed::Testbed,
    name: &str,
    extra: &str,
    change: impl FnOnce(&mut agent_activator::config::Config),
) -> server::RunningServer {
    let path = std::env::temp_dir().join(format!(
        "aa-kube-{}-{}-{name}.yaml",
        std::process::id(),
        tb.addr().port()
    ));
    std::fs::write(&path, tb.kubeconfig("default")).unwrap();
    let mut cfg = config("agent-sandbox", "default", extra);
    cfg.backend.kubernetes.kubeconfig = Some(path);
    change(&mut cfg);
    server::start(cfg).await.expect("activator starts")
}

#[tokio::test]
async fn requests_buffered_during_resume_are_each_served_once() {
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let srv = activator(&tb, "one", "").await;
    let proxy = srv.proxy_addr();

    let (status, first, headers) = http(proxy, "POST", "/counter", Some("s1")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["counter"], 1);
    assert_eq!(headers["x-activator-activation"], "claim");
    let old_pid = first["pid"].clone();

    assert!(srv.activator().pause(&key("s1")).await.unwrap());
    wait_until(&tb, "the pod is gone", |tb| tb.pods().len() == 1).await;

    // Six requests arrive while the sandbox is suspended: one resume, all six served by
    // the new pod, each exactly once (its memory starts from zero).
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(tokio::spawn(http(proxy, "POST", "/counter", Some("s1"))));
    }
    let mut counters = Vec::new();
    let mut resumed = 0;
    for t in tasks {
        let (status, body, headers) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["pid"], old_pid);
        counters.push(body["counter"].as_u64().unwrap());
        if headers["x-activator-activation"] == "resume" {
            resumed += 1;
        }
    }
    counters.sort();
    assert_eq!(counters, vec![1, 2, 3, 4, 5, 6]);
    assert!(resumed >= 1);
    let resumes = srv
        .metrics()
        .activations_total
        .with_label_values(&["resume", "ok"])
        .get();
    assert_eq!(resumes, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn two_replicas_route_one_session_to_one_sandbox() {
    let tb = testbed(Duration::from_millis(20)).await;
    tb.seed_agent_sandbox("default", "default", 2).unwrap();
    wait_pods(&tb, 2).await;
    let (a, b) = (activator(&tb, "a", "").await, activator(&tb, "b", "").await);
    let (ra, rb) = tokio::join!(
        http(a.proxy_addr(), "POST", "/counter", Some("shared")),
        http(b.proxy_addr(), "POST", "/counter", Some("shared")),
    );
    assert_eq!((ra.0, rb.0), (200, 200));
    assert_eq!(ra.1["pid"], rb.1["pid"]);
    let mut counters = vec![ra.1["counter"].as_u64(), rb.1["counter"].as_u64()];
    counters.sort();
    assert_eq!(counters, vec![Some(1), Some(2)]);
    assert_eq!(tb.list(AGENT_SANDBOX, "SandboxClaim", "default").len(), 1);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_idle_replica_does_not_pause_a_session_busy_on_another() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let idle = "idle:\n  timeout: 4s\n  sweep_interval: 100ms\n";
    let (a, b) = (
        activator(&tb, "idle-a", idle).await,
        activator(&tb, "idle-b", idle).await,
    );
    let (status, first, _) = http(b.proxy_addr(), "POST", "/counter", Some("busy")).await;
    assert_eq!(status, 200, "{first}");

    // Traffic only through A until B's idle sweeper (4 s without B traffic) has tried
    // to pause and found the session in A's activity digest: B backs off. Bounded by
    // WAIT; the loop ends on the observed back-off, not after a fixed time.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = first["counter"].as_u64().unwrap();
    loop {
        let (status, body, _) = http(a.proxy_addr(), "POST", "/counter", Some("busy")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["pid"], first["pid"],
            "the sandbox was paused under traffic"
        );
        assert_eq!(body["counter"].as_u64().unwrap(), last + 1);
        last += 1;
        if b.metrics().pauses_total.with_label_values(&["busy"]).get() >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never tried to pause within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still served by the same pod after B backed off.
    let (status, body, _) = http(a.proxy_addr(), "POST", "/counter", Some("busy")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pid"], first["pid"]);

    // Once nobody has traffic, the session is paused cluster-wide.
    wait_until(&tb, "the sandbox is suspended", |tb| {
        tb.list("agents.x-k8s.io", "Sandbox", "default")
            .iter()
            .any(|s| s["spec"]["operatingMode"] == "Suspended")
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_failing_api_server_becomes_a_clear_503_without_hanging() {
    let tb = testbed(Duration::ZERO).await;
    tb.seed_agent_sandbox("default", "default", 1).unwrap();
    wait_pods(&tb, 1).await;
    let srv = activator_with(&tb, "failing", "", |c| {
        c.activation.timeout = "1s".parse().unwrap();
        c.session.admission_timeout = "1s".parse().unwrap();
    })
    .await;
    tb.faults
        .fail_next_matching(100_000, 500, "POST", "sandboxclaims");
    let started = tokio::time::Instant::now();
    let (status, body, headers) = http(srv.proxy_addr(), "GET", "/state", Some("doomed")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "control_plane", "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The API server recovers: the same session is served.
    tb.faults.clear();
    let (status, body, _) = http(srv.proxy_addr(), "GET", "/state", Some("doomed")).await;
    assert_eq!(status, 200, "{body}");
    srv.shutdown().await;
}
