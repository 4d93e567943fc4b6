//! The shipped Knative examples: `check` accepts them through the real binary, and they
//! behave as their comments say on the process backend with the demo sandbox.

use crate::support;

use std::path::PathBuf;

use agent_activator::server::{self, RunningServer};
use bytes::Bytes;
use http_body_util::Full;

use support::{HttpClient, eventually, metric_value};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
}

async fn check(path: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_agent-activator"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .await
        .expect("run agent-activator check")
}

#[tokio::test]
async fn check_accepts_both_examples_and_names_a_bad_annotation() {
    for name in ["knative-rps.yaml", "knative-agent.yaml"] {
        let out = check(&example(name)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
    }
    let text = std::fs::read_to_string(example("knative-agent.yaml")).unwrap();
    let metric = "        autoscaling.knative.dev/metric: session\n";
    assert!(
        text.contains(metric),
        "the example keeps its metric annotation"
    );
    let with = |extra: &str| text.replace(metric, &format!("{metric}{extra}"));
    // (edited manifest, the exact error line `check` must print)
    let cases = [
        (
            text.replace("warm-pool: \"3\"", "warm-pool: \"three\""),
            "serving.knative.dev/warm-pool: \"three\" is not a whole number >= 0",
        ),
        // Upstream bounds (knative/serving 98e5ef90aa70 pkg/apis/autoscaling).
        (
            with("        autoscaling.knative.dev/window: 5s\n"),
            "autoscaling.knative.dev/window: \"5s\" is out of bounds: must be between 6s and 3600s",
        ),
        (
            with("        autoscaling.knative.dev/scaleDownDelay: 2h\n"),
            "autoscaling.knative.dev/scaleDownDelay: \"2h\" is out of bounds: must be between 0s and 3600s",
        ),
        (
            with("        autoscaling.knative.dev/target: \"0.001\"\n"),
            "autoscaling.knative.dev/target: target 0.001 should be at least 0.01",
        ),
        (
            with("        autoscaling.knative.dev/metricAggregationAlgorithm: median\n"),
            "autoscaling.knative.dev/metricAggregationAlgorithm: \"median\" is not linear, \
             weighted-exponential or weightedExponential",
        ),
    ];
    for (manifest, expected) in cases {
        let unique: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("aa-knative-{unique:x}.yaml"));
        std::fs::write(&path, manifest).unwrap();
        let out = check(&path).await;
        let _ = std::fs::remove_file(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{expected}: {stderr}");
        assert!(stderr.contains(expected), "want {expected:?} in: {stderr}");
    }
    // The aliases and the aggregation algorithm are accepted by the real binary.
    let unique: u64 = rand::random();
    let path = std::env::temp_dir().join(format!("aa-knative-{unique:x}.yaml"));
    std::fs::write(
        &path,
        with(
            "        autoscaling.knative.dev/window: 1.5m\n        \
             autoscaling.knative.dev/minScale: \"1\"\n        \
             autoscaling.knative.dev/metricAggregationAlgorithm: weightedExponential\n",
        ),
    )
    .unwrap();
    let out = check(&path).await;
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts an example as written, except: ephemeral ports, a private work directory, and
/// `{self}` spelled as the built binary (inside a test, the current exe is the harness).
async fn start_example(name: &str) -> (RunningServer, PathBuf) {
    let mut config = agent_activator::loader::load(&example(name)).expect("example loads");
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin_listen = "127.0.0.1:0".parse().unwrap();
    let unique: u64 = rand::random();
    let workdir = std::env::temp_dir().join(format!("aa-knative-it-{unique:x}"));
    config.backend.workdir_root = workdir.clone();
    for arg in &mut config.backend.command {
        *arg = arg.replace("{self}", env!("CARGO_BIN_EXE_agent-activator"));
    }
    let server = server::start(config).await.expect("example starts");
    (server, workdir)
}

async fn counts(admin: &HttpClient) -> (usize, usize, f64) {
    let sandboxes = admin.get("/api/sandboxes", &[]).await.json();
    let rows = sandboxes["sandboxes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let warm = rows.iter().filter(|r| r["state"] == "warm").count();
    let metrics = admin.get("/metrics", &[]).await.text();
    let desired = metric_value(&metrics, "activator_desired_sandboxes").unwrap_or(-1.0);
    (rows.len(), warm, desired)
}

async fn post_counter(proxy: &HttpClient, session: &str) -> support::Reply {
    let req = proxy
        .request("POST", "/counter")
        .header("x-session-id", session)
        .body(Full::new(Bytes::new()))
        .unwrap();
    proxy.send(req).await
}

#[tokio::test]
async fn agent_example_keeps_three_warm_claims_fast_and_resumes_state() {
    let (server, workdir) = start_example("knative-agent.yaml").await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    // No sessions: the warm pool of three, and that is what the autoscaler wants.
    eventually("three warm sandboxes", || async {
        let (_, warm, desired) = counts(&admin).await;
        (warm == 3 && desired == 3.0).then_some(())
    })
    .await;
    // A new conversation is claimed from the pool...
    let r = post_counter(&proxy, "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("claim"));
    let first = r.json();
    assert_eq!(first["counter"], 1, "{first}");
    // ...and the autoscaler wants 1 bound + 3 warm, which the pool refills to.
    eventually("1 bound + 3 warm", || async {
        let (total, warm, desired) = counts(&admin).await;
        (total == 4 && warm == 3 && desired == 4.0).then_some(())
    })
    .await;
    // Paused (as the idle policy does after 30 s) and resumed with its memory.
    let pause = admin
        .request("POST", "/api/sessions/alice/pause")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(admin.send(pause).await.status, 200);
    let r = post_counter(&proxy, "alice").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-activator-activation"), Some("resume"));
    let second = r.json();
    assert_eq!(second["counter"], 2, "state survived the pause: {second}");
    // `instance`, not `pid`: inside the sandbox's PID namespace every sandbox is a small pid.
    assert_eq!(
        second["instance"], first["instance"],
        "the same sandbox process"
    );
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(workdir);
}

#[tokio::test]
async fn rps_example_scales_sandboxes_with_the_request_rate() {
    let (server, workdir) = start_example("knative-rps.yaml").await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    // min-scale 1: one sandbox with no traffic.
    eventually("one sandbox at rest", || async {
        let (total, _, desired) = counts(&admin).await;
        (total == 1 && desired == 1.0).then_some(())
    })
    .await;
    // A burst of 60 requests from 10 sessions: far above 10 RPS x 70 % per sandbox.
    let burst = (0..60).map(|i| {
        let proxy = &proxy;
        async move {
            post_counter(proxy, &format!("user-{}", i % 10))
                .await
                .status
        }
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200);
    }
    let (total, desired) = eventually("more sandboxes for the burst", || async {
        let (total, _, desired) = counts(&admin).await;
        (total >= 2 && desired >= 2.0).then_some((total, desired))
    })
    .await;
    assert!(desired <= 20.0, "max-scale bounds it: {desired}");
    assert!(total <= 20, "max_sandboxes bounds it: {total}");
    let metrics = admin.get("/metrics", &[]).await.text();
    assert!(metric_value(&metrics, "activator_stable_rps").is_some_and(|r| r > 0.0));
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(workdir);
}
