//! Scaling signals over real sockets: `/api/stats`, the leader summing a peer's stats,
//! and a scheduled wake-up sent through the activator to the demo sandbox.

use crate::support;

use support::{DemoSandbox, HttpClient, eventually, metric_value, start, static_backend};

#[tokio::test]
async fn api_stats_counts_requests_and_the_sole_replica_leads() {
    let demo = DemoSandbox::start().await;
    let server = start(&static_backend(&[demo.addr])).await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    for _ in 0..3 {
        let r = proxy.get_session("/healthz", "stats-1").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stats = admin.get("/api/stats", &[]).await;
    assert_eq!(stats.status, 200);
    let json = stats.json();
    assert_eq!(json["requests_total"], 3, "{json}");
    assert_eq!(json["in_flight"], 0, "{json}");
    assert_eq!(json["stable_window_seconds"], 60.0, "{json}");
    assert_eq!(json["panic_window_seconds"], 6.0, "{json}");
    assert!(!json["replica_id"].as_str().unwrap().is_empty(), "{json}");
    let wrong = admin
        .request("POST", "/api/stats")
        .body(Default::default())
        .unwrap();
    assert_eq!(admin.send(wrong).await.status, 405);
    // Within a second the sampler has closed a bucket with the three requests in it.
    eventually("stable rps > 0", || async {
        let j = admin.get("/api/stats", &[]).await.json();
        (j["stable_rps"].as_f64().unwrap() > 0.0).then_some(())
    })
    .await;
    let metrics = admin.get("/metrics", &[]).await.text();
    assert_eq!(
        metric_value(&metrics, "activator_autoscaler_leader"),
        Some(1.0)
    );
    assert!(metric_value(&metrics, "activator_desired_sandboxes").is_some());
    assert!(metric_value(&metrics, "activator_stable_rps").is_some_and(|v| v > 0.0));
    server.shutdown().await;
}

#[tokio::test]
async fn the_leader_sums_a_peers_stats() {
    let demo = DemoSandbox::start().await;
    let b = start(&static_backend(&[demo.addr])).await;
    // A decides on RPS (1 per sandbox at 70 %) from its own traffic (none) plus B's.
    let a_yaml = format!(
        "{}autoscaler:\n  metric: rps\n  target: 1\n  initial_scale: 0\n  tick_interval: 200ms\n  peers: ['{}']\n",
        static_backend(&[demo.addr]),
        b.admin_addr()
    );
    let a = start(&a_yaml).await;
    let b_proxy = HttpClient::http1(b.proxy_addr());
    for _ in 0..20 {
        assert_eq!(b_proxy.get_session("/healthz", "peer-1").await.status, 200);
    }
    let a_admin = HttpClient::http1(a.admin_addr());
    let desired = eventually("A scales for B's traffic", || async {
        let m = a_admin.get("/metrics", &[]).await.text();
        metric_value(&m, "activator_desired_sandboxes").filter(|d| *d >= 2.0)
    })
    .await;
    assert!(desired >= 2.0);
    // A's own /api/stats still shows only its own traffic.
    assert_eq!(
        a_admin.get("/api/stats", &[]).await.json()["requests_total"],
        0
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_schedule_wakes_its_session_through_the_activator() {
    let demo = DemoSandbox::start().await;
    let unique: u64 = rand::random();
    let workdir = std::env::temp_dir().join(format!("aa-sched-it-{unique:x}"));
    let yaml = format!(
        "{}  workdir_root: '{}'\nschedules:\n  - name: nightly\n    cron: '* * * * * *'\n    session: sched-7\n    method: POST\n    path: /counter\n    headers: {{X-Job: summary}}\n",
        static_backend(&[demo.addr]),
        workdir.display()
    );
    let server = start(&yaml).await;
    let admin = HttpClient::http1(server.admin_addr());
    let demo_client = HttpClient::http1(demo.addr);
    eventually("the scheduled request reaches the sandbox", || async {
        let state = demo_client.get("/state", &[]).await.json();
        let seen = state["sessions_seen"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (seen.iter().any(|s| s == "sched-7") && state["counter"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    eventually("the run is counted ok", || async {
        let m = admin.get("/metrics", &[]).await.text();
        metric_value(&m, "activator_schedule_runs_total{result=\"ok\"}").filter(|v| *v >= 1.0)
    })
    .await;
    server.shutdown().await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(workdir.join("schedule-state.json")).unwrap())
            .unwrap();
    assert!(state["nightly"].is_string(), "{state}");
    let _ = std::fs::remove_dir_all(&workdir);
}
